"""Progressive stacking (Gong et al., "Efficient Training of BERT by Progressively Stacking",
ICML 2019).

Training starts with ``final_layers / 2**doublings`` blocks. At each scheduled point of budget
progress the depth doubles: the trained blocks ``0..d-1`` stay where they are and a copy of the
whole stack is put on top (block ``d + i`` starts as block ``i``), as in the paper's 3 → 6 → 12.
Embeddings, norms and head carry over unchanged.

The optimizer state of the copied blocks is copied from their sources (``optimizer=copy``) or
started fresh (``optimizer=reset``), while the original blocks and everything else keep theirs
(with the counters an optimizer keeps per parameter group, such as LAMB's step count);
``optimizer=reset_all`` starts every parameter's state fresh, as the authors' recipe does
(``reproduce_bert.sh`` trains each stage with fairseq's ``--reset-optimizer``).

The default schedule is the authors' (StackingBERT ``reproduce_bert.sh``): 50k updates at 3
layers, 70k at 6, 280k at 12. In compute (a step costs in proportion to depth) the doublings fall
at 3.8 % and 14.5 %, which is what a time or FLOP budget's progress measures: hence 0.04 and 0.15.
For a step or token budget their step split is ``at=[0.125,0.3]``.
The switch goes through the trainer (``state.request_model``), which rebuilds the optimizer and
recomputes the FLOPs per token for the new depth. On resume, the saved depth decides what
``configure_model`` builds, so the checkpoint's weights fit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch

from ..configbase import Config, field
from ..errors import ConfigError
from ..models.config import ModelConfig
from ..optim import evaluation_weights
from .base import ContractCases, Technique, register
from .common import full_state_dict, materialize, model_device

#: Gong et al.'s 3 -> 6 -> 12 recipe as fractions of compute: (50k x 3) and (50k x 3 + 70k x 6)
#: layer-updates out of 50k x 3 + 70k x 6 + 280k x 12.
AUTHORS_SCHEDULE = (0.04, 0.15)


@dataclasses.dataclass
class StackingOptions(Config):
    """Progressive stacking."""

    doublings: int = field(2, help="how many times the depth doubles (0 = off)")
    at: list[float] = field(
        default_factory=list,
        help="budget fractions at which the depth doubles, one per doubling, increasing; "
        "empty = the authors' compute split for two doublings (0.04, 0.15), evenly spaced "
        "for any other count",
    )
    optimizer: Literal["copy", "reset", "reset_all"] = field(
        "copy",
        help="optimizer state at a doubling: copy (the copies get their sources' state), reset "
        "(the copies start fresh) or reset_all (every parameter starts fresh, as the authors do)",
    )

    def validate(self) -> None:
        if self.doublings < 0:
            raise ConfigError(f"technique.stacking.doublings must be >= 0, got {self.doublings}")
        if self.at:
            if len(self.at) != self.doublings:
                raise ConfigError(
                    f"technique.stacking.at has {len(self.at)} fractions for {self.doublings} doublings"
                )
            if any(not 0.0 < a < 1.0 for a in self.at) or list(self.at) != sorted(set(self.at)):
                raise ConfigError("technique.stacking.at must be increasing fractions in (0, 1)")

    def schedule(self) -> list[float]:
        """The progress at which each doubling happens."""
        if self.at:
            return list(self.at)
        if self.doublings == len(AUTHORS_SCHEDULE):
            return list(AUTHORS_SCHEDULE)
        return [(i + 1) / (self.doublings + 1) for i in range(self.doublings)]


def stack(model: torch.nn.Module) -> torch.nn.Module:
    """A model twice as deep: blocks ``0..d-1`` as they are, then copies of them on top.

    Pure: ``model`` is not changed; the new model lives on the same device.
    """
    cfg = model.config
    depth = cfg.layers
    new_cfg = dataclasses.replace(cfg, layers=2 * depth)
    old = full_state_dict(model)
    tensors = {}
    for name in _names_of(new_cfg, model):
        tensors[name] = old[source_name(name, depth)].detach().clone()
    return materialize(new_cfg, tensors, model_device(model))


def source_name(name: str, depth: int) -> str:
    """The parameter of the shallow model (``depth`` blocks) that ``name`` is copied from."""
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        return f"layers.{int(index) % depth}.{rest}"
    return name


def _names_of(cfg: ModelConfig, like: torch.nn.Module) -> list[str]:
    """State-dict names of a model shaped like ``like`` but with ``cfg.layers`` blocks."""
    names = []
    for name in like.state_dict():
        if not name.startswith("layers."):
            names.append(name)
        elif name.startswith("layers.0."):
            rest = name[len("layers.0."):]
            names.extend(f"layers.{i}.{rest}" for i in range(cfg.layers))
    return names


def transfer_optimizer_state(copy_sources: bool, keep: bool = True):
    """A ``transfer`` callback for ``state.request_model`` after :func:`stack`.

    ``keep=False`` transfers nothing: the rebuilt optimizer starts fresh for every parameter.
    """

    def transfer(old_model, new_model, old_opt, new_opt) -> None:
        if not keep:
            return
        _transfer_group_state(old_opt, new_opt)
        depth = old_model.config.layers
        old_params = dict(old_model.named_parameters())
        for name, param in new_model.named_parameters():
            is_copy = name.startswith("layers.") and int(name.split(".")[1]) >= depth
            if is_copy and not copy_sources:
                continue
            source = old_params[source_name(name, depth)]
            saved = old_opt.state.get(source)
            if saved:
                new_opt.state[param] = {
                    k: v.detach().clone() if torch.is_tensor(v) else v for k, v in saved.items()
                }

    return transfer


def _transfer_group_state(old_opt, new_opt) -> None:
    """Carry the scalars an optimizer keeps per parameter group across a doubling.

    Several optimizers count steps per group, not per parameter (LAMB's and LARS's ``step``,
    which LAMB's bias correction reads; Schedule-Free's ``step``, ``weight_sum`` and ``lr_max``,
    which set its averaging weight; SAM's ``sam_step``). Left at a fresh optimizer's values, the
    moments copied below would be bias-corrected as a first step's and Schedule-Free's average
    would restart at the doubling, so the original blocks would not keep their optimizer state.
    Only scalars move: hyperparameters are equal in both (one config builds both optimizers),
    and lists may be per-parameter (``stacked``), which the new model has more of.
    """
    old_groups, new_groups = old_opt.param_groups, new_opt.param_groups
    if len(old_groups) != len(new_groups):  # one config groups both models' parameters alike
        raise RuntimeError(f"stacking: the optimizer has {len(new_groups)} parameter groups after "
                           f"the doubling and {len(old_groups)} before")
    for old, new in zip(old_groups, new_groups):
        for key, value in old.items():
            if key != "params" and isinstance(value, (bool, int, float)):
                new[key] = value


@register
class ProgressiveStacking(Technique):
    """Train shallow, then double the depth by stacking copies of the trained blocks."""

    name = "stacking"
    Options = StackingOptions
    conflicts = ("vcycle",)  # both own the depth
    order = 30
    options: StackingOptions

    def __init__(self, options: StackingOptions) -> None:
        super().__init__(options)
        self.done = 0  # doublings performed so far

    @classmethod
    def contract_cases(cls) -> ContractCases:
        return ContractCases(
            acting=("model.layers=4", "technique.stacking.doublings=2",
                    "technique.stacking.at=[0.25,0.75]"),
            disabled=("technique.stacking.doublings=0",),
            misapplied=("model.layers=6", "technique.stacking.doublings=2"),
        )

    def configure_model(self, model_config: ModelConfig) -> ModelConfig:
        doublings, layers = self.options.doublings, model_config.layers
        # Capped where it exceeds layers anyway: 2**doublings of a mistyped doublings=1e12 ran
        # out of memory (a MemoryError traceback, after a minute, once the data was ready).
        factor = 2 ** min(doublings, layers.bit_length())
        if layers % factor:
            multiple = 2**doublings if doublings <= 64 else f"2**{doublings}"
            raise ConfigError(
                f"stacking: model.layers={layers} cannot be reached by doubling "
                f"{doublings} times; use a multiple of {multiple}"
            )
        depth = model_config.layers // factor * 2 ** self.done
        return dataclasses.replace(model_config, layers=depth)

    def on_step_end(self, state) -> None:
        if state.last_step:
            # Nothing would train the deeper model: the run ends on the depth it trained, and
            # `done` (what configure_model builds on resume) counts only doublings made. A resume
            # with a larger budget doubles after its first step that starts past the point.
            return
        schedule = self.options.schedule()
        # Every doubling whose fraction this step's start passed, not one per step: a later one
        # would otherwise train a step (or, at the last step, the rest of the run) too shallow.
        due = sum(1 for at in schedule[self.done:] if state.progress >= at)
        if due:
            self.done += due
            mode = self.options.optimizer
            # Without any optimizer state carried over, the deeper model starts from the weights
            # the run is evaluated with (Schedule-Free's average x), as a V-cycle level does; the
            # state the other modes carry belongs to the training weights (its y).
            fresh = mode == "reset_all"
            with evaluation_weights(getattr(state, "optimizer", None) if fresh else None, state.model):
                new_model = state.model
                for _ in range(due):
                    new_model = stack(new_model)
            # Block i of the new model starts as block i mod (the old depth), however many
            # doublings it went through, which is what the transfer maps.
            state.request_model(
                new_model, transfer_optimizer_state(mode == "copy", keep=not fresh)
            )

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = int(state.get("done", 0))
