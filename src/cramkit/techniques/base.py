"""The technique interface: a few hooks the trainer calls, and a registry.

A technique is one module holding a config dataclass, the pure functions that do the work, and a
small :class:`Technique` subclass registered with :func:`register`. The trainer calls the hooks
below in a fixed order and never names a technique; everything a technique needs to resume
exactly goes through ``state_dict`` / ``load_state_dict`` into the checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

from ..configbase import Config
from ..errors import ConfigError, UnknownName
from ..plugins import unknown_hint
from ..utils import add_unique

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..models.config import ModelConfig
    from ..train.state import TrainState


@dataclasses.dataclass
class NoOptions(Config):
    """A technique without options."""


@dataclasses.dataclass(frozen=True)
class ContractCases:
    """What the contract test (``tests/techniques/test_technique_contract.py``) needs from a
    technique, as ``key=value`` run overrides on top of a tiny 12-step CPU config.

    - ``acting``: the technique visibly acts within the run (a stage change, dropped layers...),
      and preferably on both sides of the mid-run checkpoint, so resuming is really exercised.
      The run must end with other weights than the same overrides without the technique (the
      ``technique.NAME.*`` ones left out).
    - ``disabled``: the technique is enabled but must be a no-op: bit-identical to no technique.
    - ``misapplied``: a valid config (it loads) that the technique must refuse with a
      ConfigError once it meets the run (``configure_model``, ``on_model``), before any run
      directory is made.
    - ``arch``: ``bert`` or ``gpt`` (which tiny preset and data the test uses).
    - ``changes_flops``: whether acting changes the training FLOPs per token (dropped layers,
      growth, shorter sequences). ``tests/techniques/test_technique_flops.py`` checks each
      step's charge against a count of the FLOPs it ran, and that the cost per token varies
      within the acting run when this is true, or stays constant when it is false (a technique
      that freezes weights or reweights the loss).
    """

    acting: tuple[str, ...]
    disabled: tuple[str, ...]
    misapplied: tuple[str, ...]
    arch: str = "bert"
    changes_flops: bool = True


class Technique:
    """Base class: every hook is a no-op, so a technique overrides only what it needs.

    Class attributes:
        name: registry key used in ``techniques=[...]``.
        Options: its config dataclass (``technique.NAME.KEY=VALUE`` on the command line).
        conflicts: names of techniques it cannot be combined with.
        order: hooks run in ascending order (ties by name), so surgery composes predictably.
            Convention: 10 data-side (``on_batch``), 30 architecture growth/shrinking, 50
            per-block surgery (it then applies to whatever model growth produced).
        unused_parameters: a training step may leave some parameters out of the forward pass
            (pld skips whole blocks); DDP is then told to look for them
            (``find_unused_parameters``), without which its next step fails.

    ``on_model`` runs on the first model and again on every model a technique swaps in through
    ``state.request_model``, so surgery must be idempotent.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[Config]] = NoOptions
    conflicts: ClassVar[tuple[str, ...]] = ()
    order: ClassVar[int] = 100
    unused_parameters: ClassVar[bool] = False

    def __init__(self, options: Config) -> None:
        self.options = options

    @classmethod
    def contract_cases(cls) -> ContractCases | None:
        """Overrides for the contract test; every registered technique should provide them."""
        return None

    # -- architecture ------------------------------------------------------------------------
    def configure_model(self, model_config: ModelConfig) -> ModelConfig:
        """Change the architecture before the model is built (e.g. start shallow)."""
        return model_config

    def on_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Surgery on the built model, before checkpointing, compile and sharding.

        Raise ConfigError here when the technique cannot apply to this model.
        """
        return model

    # -- per step ----------------------------------------------------------------------------
    def on_step_start(self, state: TrainState) -> None:
        """Schedules and per-step decisions; read ``state.progress`` (0 → 1). The learning rate
        is set after this hook: multiply a factor into ``state.lr_scale``, or move
        ``state.lr_progress`` (where the schedule is read; ``state.progress`` until moved)."""

    def on_batch(self, batch: dict[str, torch.Tensor], state: TrainState) -> dict[str, torch.Tensor]:
        """Change a micro-batch before the forward pass (e.g. truncate the sequence)."""
        return batch

    def warm_up_batches(self, batch: dict[str, torch.Tensor], model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
        """Micro-batches for the compile warm-up (outside the budget) beyond the full-size ones
        it runs anyway: shaped as this technique will shape training batches (from the full-size
        ``batch``), so that training meets no recompilation. The compiler generalises over a
        size it has seen change, so one example of a changed shape is enough."""
        return []

    def on_after_backward(self, model: torch.nn.Module, state: TrainState) -> None:
        """Gradient-side work before clipping and the optimizer step (masks, extra passes).

        Called once per forward/backward pass over a step's micro-batches, after gradient
        accumulation, with the gradients unscaled (fp16 loss scaling taken out), so twice per
        step under SAM (its second pass recomputes them). ``model`` is the unwrapped model;
        under FSDP2 its gradients are the rank's shards (DTensors)."""

    def on_step_end(self, state: TrainState) -> None:
        """Growth, pruning, stage changes. To replace the model, call
        ``state.request_model(new_model, transfer)``: the trainer rebuilds the optimizer.

        Not when ``state.last_step`` is set (this step spends the budget): nothing would train
        the new model, so leave the model and the state that describes it as they are (the
        trainer warns of a request). A resume with a larger budget gets the change later."""

    def flops_per_token(self, base: float, state: TrainState) -> float:
        """Training FLOPs per token of the current step, given the full model's ``base``."""
        return base

    # -- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; called before the model is built so ``configure_model`` sees the state."""


TECHNIQUES: dict[str, type[Technique]] = {}


def register(cls: type[Technique]) -> type[Technique]:
    """Class decorator adding a technique to the registry under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    add_unique(TECHNIQUES, cls.name, cls, "technique")
    return cls


def _lookup(name: str) -> type[Technique]:
    try:
        return TECHNIQUES[name]
    except KeyError:
        known = ", ".join(sorted(TECHNIQUES)) or "none"
        raise UnknownName(f"techniques: unknown technique '{name}'{unknown_hint(name, TECHNIQUES)}; "
                          f"known: {known}") from None


def validate_technique_options(names: list[str], options: dict[str, Any]) -> None:
    """Check names, duplicates, conflicts and every option table, without building anything."""
    if len(set(names)) != len(names):
        raise ConfigError(f"techniques lists a technique twice: {names}")
    for name in names:
        cls = _lookup(name)
        for other in names:
            if other in cls.conflicts or name in _lookup(other).conflicts:
                raise ConfigError(f"techniques '{name}' and '{other}' cannot be combined")
    for name, table in options.items():
        if name not in TECHNIQUES and not isinstance(table, dict):
            # `technique.theta_bar=0.5`: an option given without its technique's name.
            owners = [t for t, c in sorted(TECHNIQUES.items()) if name in {f.name for f in dataclasses.fields(c.Options)}]
            if owners:
                raise ConfigError(f"technique.{name}: options go under technique.NAME.KEY (did you mean "
                                  f"{' or '.join(repr(f'technique.{t}.{name}') for t in owners)}?)")
        cls = _lookup(name)
        if name not in names:
            raise ConfigError(f"options given for technique '{name}', which is not enabled (add it to techniques)")
        if not isinstance(table, dict):
            raise ConfigError(f"technique.{name} must be a table of options")
        cls.Options.from_dict(table, path=f"technique.{name}")


def build_techniques(names: list[str], options: dict[str, Any]) -> list[Technique]:
    """Instantiate enabled techniques in hook order."""
    validate_technique_options(names, options)
    built = []
    for name in names:
        cls = _lookup(name)
        built.append(cls(cls.Options.from_dict(options.get(name, {}), path=f"technique.{name}")))
    return sorted(built, key=lambda t: (t.order, t.name))
