"""Multi-level V-cycle training (Zou, Zhang & Deng, "A Multi-Level Framework for Accelerating
Training Transformer Models", ICLR 2024).

Three operators on cramkit's BERT and GPT models, all pure (they return new models):

- :func:`coalesce` — a smaller model. Width: groups of ``width`` units are merged — attention
  heads, feed-forward neurons (the value and gate halves of a GLU separately) and hidden
  channels. On the output side of a weight the merged rows are averaged; on the input side the
  merged columns are summed (the paper's row-normalised F and its transpose), so a large model
  whose units come in identical groups maps to a small one computing the same thing. Norm
  parameters are averaged. Depth: each small block is the average of a group of ``depth`` large
  blocks. Which units form a group is the scheme's pairing (:data:`PAIRINGS`): ``adjacent``
  (small unit ``j`` = large units ``k*j .. k*j+k-1``, the default) or ``strided`` (``j``,
  ``j + n/k``, ...: the official code's width template, and the depth scheme its GPT-2 example
  ships, layer ``i`` with layer ``i + L/2``).
- :func:`decoalesce` — the inverse mapping: each merged unit is copied back to every unit it came
  from (input-side columns divided by the group size), each small block to every block of its
  group. Coalesce → de-coalesce → coalesce is exact for factors of 2 (up to float rounding
  with ``model.embedding_scale=sqrt_hidden``, whose width ratio is sqrt(2)).
- :func:`interpolate` — ``(1 - alpha) * large + alpha * decoalesced``, which breaks the symmetry
  that de-coalescing introduces.

Embedding scaling. The token, position and token-type tables are averaged (coalesce) and
duplicated (de-coalesce) like any output-side weight, so de-coalesced hidden states are exact
copies of the small model's and every norm keeps its statistics. With tied input/output
embeddings the decoder reads the hidden states through the same duplicated table, which would
multiply the logits by the width factor ``k``; the norm that feeds the decoder
(``head.transform.norm`` when there is a head transform, else ``final_norm``) therefore gets its
parameters divided by ``k`` on de-coalescing and multiplied by ``k`` on coalescing. A token
embedding scaled with the width (``model.embedding_scale=sqrt_hidden``) is kept exact the same way:
the token table is multiplied by the ratio ``r`` of the two widths' factors on coalescing (divided
on de-coalescing), and the decoder's norm then carries ``k / r``. With that, a
de-coalesced width-only model computes the same logits as the small model (up to float rounding),
when positions are ``learned``, ``rotary`` or ``none``. With ``sinusoidal`` positions the fixed
table is a function of the width, so the two widths see different (equally valid) position codes
and the functions differ; the learned scale of the table is carried over unchanged.
The official code (Photooon/Multi-Level-Training-Framework) instead multiplies the token,
position and token-type tables by ``k`` on coalescing and by ``1/k`` on de-coalescing; with
pre-LN blocks that changes the residual stream's scale relative to the branches, so it does not
preserve the function (docs/techniques.md gives the measurement).

The V-cycle is a table of stages over the budget: levels 0, 1, .., L-1 on the way down, then L-2,
.., 0 on the way up (2L-1 stages), each with its budget fraction; the learning rate is multiplied
by ``lr_scale[level]`` through ``state.lr_scale``. The run's schedule is read either over the whole
budget (``schedule=global``) or restarted in each stage over the stage's own budget window
(``per_stage``, through ``state.lr_progress``), as the official GPT-2 example restarts a linear
decay in each stage so every level is annealed before it is left. A level change builds the new
model and hands it to the trainer (``state.request_model``), which builds a fresh optimizer (Adam
moments start over at each level) and recomputes the FLOPs per token for the new shape. The weights
a level was entered from are kept (on the CPU, in the technique state that goes into every
checkpoint) for the interpolation on the way back up, so a resumed run continues inside the right
level with everything it needs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from ..configbase import Config, field
from ..errors import ConfigError, resume_refusal
from ..models.config import ModelConfig
from ..models.layers import token_embedding_scale
from ..models.registry import Registry
from ..optim import evaluation_weights
from ..utils import changed_keys
from .base import ContractCases, Technique, register
from .common import full_state_dict, materialize, model_device

# ---------------------------------------------------------------- pairings (which units merge)

# A pairing maps each of ``units`` large units to the small unit it merges into, for groups of
# ``factor``; every small unit gets exactly ``factor`` large ones.
Pairing = Callable[[int, int], torch.Tensor]


def adjacent(units: int, factor: int) -> torch.Tensor:
    """Neighbours merge: large units ``factor*j .. factor*j+factor-1`` become small unit ``j``."""
    return torch.arange(units) // factor


def strided(units: int, factor: int) -> torch.Tensor:
    """Unit ``j`` merges with ``j + n/factor``, ``j + 2n/factor``, ... (n units): the official
    code's width template and its shipped GPT-2 depth scheme (layer ``i`` with ``i + L/2``), so
    de-coalescing stacks the small model's blocks ``0 .. L/2-1`` twice."""
    return torch.arange(units) % (units // factor)


PAIRINGS: Registry[Pairing] = Registry("pairing")
PAIRINGS.add("adjacent", adjacent)
PAIRINGS.add("strided", strided)


def _known(registry: Registry, name: str, path: str):
    """``registry.get(name)`` with the option's dotted ``path`` in front of an error."""
    try:
        return registry.get(name)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class Scheme:
    """How one level coarsens: merge groups of ``width`` units and of ``depth`` blocks, the
    members of a group chosen by ``pairing`` (a key of :data:`PAIRINGS`)."""

    width: int = 2
    depth: int = 1
    pairing: str = "adjacent"

    def __post_init__(self) -> None:
        if self.width < 1 or self.depth < 1:
            raise ConfigError(f"coalescing factors must be >= 1, got width={self.width}, depth={self.depth}")
        _known(PAIRINGS, self.pairing, "pairing")

    @property
    def unit(self) -> Pairing:
        return PAIRINGS.get(self.pairing)


def coarse_config(cfg: ModelConfig, scheme: Scheme) -> ModelConfig:
    """The architecture one level down; ConfigError when ``cfg`` cannot be coalesced so."""
    k, d = scheme.width, scheme.depth
    gated = cfg.gated
    inner = cfg.intermediate // 2 if gated else cfg.intermediate
    problems = [f"{name}={value} is not divisible by {factor}" for name, value, factor in (
        ("hidden", cfg.hidden, k), ("heads", cfg.heads, k),
        ("intermediate" + (" / 2 (GLU halves)" if gated else ""), inner, k), ("layers", cfg.layers, d),
    ) if value % factor]
    if problems:
        raise ConfigError(f"cannot coalesce (width {k}, depth {d}): " + "; ".join(problems))
    small = dataclasses.replace(cfg, hidden=cfg.hidden // k, heads=cfg.heads // k,
                                intermediate=cfg.intermediate // k, layers=cfg.layers // d)
    # With norm=none the final norm (and the head transform's) is an Identity: no parameter to
    # carry the factor k, and the logits would silently change by k at every level change.
    if cfg.tie_embeddings and k > 1 and (cfg.norm == "none" or not (cfg.head_transform or cfg.final_norm)):
        raise ConfigError("width coalescing with tied embeddings needs a final norm or head transform "
                          "with parameters (model.norm other than none; it carries the decoder's scale)")
    small.validate()
    return small


def fine_config(cfg: ModelConfig, scheme: Scheme) -> ModelConfig:
    """The architecture one level up (the inverse of :func:`coarse_config`)."""
    k, d = scheme.width, scheme.depth
    return dataclasses.replace(cfg, hidden=cfg.hidden * k, heads=cfg.heads * k,
                               intermediate=cfg.intermediate * k, layers=cfg.layers * d)


# ---------------------------------------------------------------- unit maps (large → small index)


def _hidden_map(cfg: ModelConfig, k: int, unit: Pairing) -> torch.Tensor:
    return unit(cfg.hidden, k)


def _heads_map(cfg: ModelConfig, k: int, unit: Pairing) -> torch.Tensor:
    # (head, d) → (small head, d): whole heads merge, the head dimension is kept.
    i = torch.arange(cfg.hidden)
    hd = cfg.head_dim
    return unit(cfg.heads, k)[i // hd] * hd + i % hd


def _qkv_map(cfg: ModelConfig, k: int, unit: Pairing) -> torch.Tensor:
    heads = _heads_map(cfg, k, unit)
    return torch.cat([part * (cfg.hidden // k) + heads for part in range(3)])


def _up_map(cfg: ModelConfig, k: int, unit: Pairing) -> torch.Tensor:
    if not cfg.gated:
        return unit(cfg.intermediate, k)
    inner = cfg.intermediate // 2
    # [value | gate]: neurons merge inside each half, so value j still pairs with gate j.
    return torch.cat([half * (inner // k) + unit(inner, k) for half in range(2)])


def _inner_map(cfg: ModelConfig, k: int, unit: Pairing) -> torch.Tensor:
    inner = cfg.intermediate // 2 if cfg.gated else cfg.intermediate
    return unit(inner, k)


_MapFn = Callable[[ModelConfig, int, Pairing], torch.Tensor]
OUT, IN = "out", "in"


def _rules(name: str, cfg: ModelConfig) -> list[tuple[int, _MapFn, str]]:
    """(dimension, unit map, side) for each width-mapped dimension of parameter ``name``."""
    leaf = name.rsplit(".", 1)[-1]
    owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if name.startswith("embeddings.") and owner in ("tokens", "positions", "token_types") and leaf == "weight":
        return [(1, _hidden_map, OUT)]
    if name == "embeddings.positions.scale" or name == "head.decoder.bias":
        return []
    if owner in ("gain1", "gain2"):
        return []  # a branch gain (residual_scale=scalar) is one scalar: no width, blocks average
    if owner.startswith("norm") or owner == "final_norm":
        return [(0, _hidden_map, OUT)]
    table = {
        "qkv": [(0, _qkv_map, OUT), (1, _hidden_map, IN)],
        "out": [(0, _hidden_map, OUT), (1, _heads_map, IN)],
        "up": [(0, _up_map, OUT), (1, _hidden_map, IN)],
        "down": [(0, _hidden_map, OUT), (1, _inner_map, IN)],
        "dense": [(0, _hidden_map, OUT), (1, _hidden_map, IN)],
        "decoder": [(1, _hidden_map, IN)],
    }
    if owner not in table:
        raise ConfigError(f"coalescing does not know how to map parameter '{name}'")
    rules = table[owner]
    return rules if leaf == "weight" else [rules[0]]  # a bias follows its weight's output side


def _decoder_norm(cfg: ModelConfig) -> str:
    return "head.transform.norm." if cfg.head_transform else "final_norm."


def _tied_name(cfg: ModelConfig) -> str | None:
    return "head.decoder.weight" if cfg.tie_embeddings else None


def _token_scale_ratio(large: ModelConfig, k: int) -> float:
    """The large width's token-embedding factor over the small one's (``model.embedding_scale``;
    1 for ``none``, sqrt(k) for ``sqrt_hidden``)."""
    return token_embedding_scale(large) / token_embedding_scale(
        dataclasses.replace(large, hidden=large.hidden // k))


def _width_factors(cfg: ModelConfig, k: int) -> dict[str, float]:
    """Parameter-name prefix → factor that coalescing multiplies by (de-coalescing divides).

    The token table carries the ratio r of the two widths' embedding scales, so the scaled
    embedding the blocks see is averaged / copied exactly; a tied decoder then reads a table r
    times larger, so the norm feeding it carries k / r instead of k.
    """
    ratio = _token_scale_ratio(cfg, k)
    factors = {"embeddings.tokens.weight": ratio}
    if cfg.tie_embeddings and k > 1:
        factors[_decoder_norm(cfg)] = k / ratio
    return {name: f for name, f in factors.items() if f != 1.0}


def _factor(name: str, factors: dict[str, float]) -> float:
    return next((f for prefix, f in factors.items() if name.startswith(prefix)), 1.0)


def _coalesce_width(tensors: dict[str, torch.Tensor], cfg: ModelConfig, k: int,
                    unit: Pairing) -> dict[str, torch.Tensor]:
    out = {}
    factors = _width_factors(cfg, k)
    for name, t in tensors.items():
        if name == _tied_name(cfg):
            continue
        for dim, map_fn, side in _rules(name, cfg):
            index = map_fn(cfg, k, unit).to(t.device)
            shape = list(t.shape)
            shape[dim] //= k
            summed = torch.zeros(shape, dtype=t.dtype, device=t.device).index_add_(dim, index, t)
            t = summed / k if side == OUT else summed
        factor = _factor(name, factors)
        if factor != 1.0:
            t = t * factor
        out[name] = t
    if cfg.tie_embeddings:
        out["head.decoder.weight"] = out["embeddings.tokens.weight"]
    return out


def _decoalesce_width(tensors: dict[str, torch.Tensor], large: ModelConfig, k: int,
                      unit: Pairing) -> dict[str, torch.Tensor]:
    out = {}
    factors = _width_factors(large, k)
    for name, t in tensors.items():
        if name == _tied_name(large):
            continue
        for dim, map_fn, side in _rules(name, large):
            t = t.index_select(dim, map_fn(large, k, unit).to(t.device))
            if side == IN:
                t = t / k
        factor = _factor(name, factors)
        if factor != 1.0:
            t = t / factor
        out[name] = t
    if large.tie_embeddings:
        out["head.decoder.weight"] = out["embeddings.tokens.weight"]
    return out


def _layer_split(name: str) -> tuple[int, str] | None:
    if not name.startswith("layers."):
        return None
    _, index, rest = name.split(".", 2)
    return int(index), rest


def _coalesce_depth(tensors: dict[str, torch.Tensor], d: int, layers: int,
                    unit: Pairing) -> dict[str, torch.Tensor]:
    if d == 1:
        return dict(tensors)
    small_of = unit(layers, d).tolist()
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        split = _layer_split(name)
        if split is None:
            out[name] = t
            continue
        index, rest = split
        key = f"layers.{small_of[index]}.{rest}"
        out[key] = t.clone() if key not in out else out[key] + t
    for name in out:
        if name.startswith("layers."):
            out[name] = out[name] / d
    return out


def _decoalesce_depth(tensors: dict[str, torch.Tensor], d: int, layers: int,
                      unit: Pairing) -> dict[str, torch.Tensor]:
    """``layers``: the large model's depth."""
    if d == 1:
        return dict(tensors)
    small_of = unit(layers, d).tolist()
    out = {}
    for name, t in tensors.items():
        split = _layer_split(name)
        if split is None:
            out[name] = t
            continue
        index, rest = split
        for i in (i for i, j in enumerate(small_of) if j == index):
            out[f"layers.{i}.{rest}"] = t.clone()
    return out


def coalesce(model: torch.nn.Module, scheme: Scheme) -> torch.nn.Module:
    """The smaller model one level down (see the module docstring); ``model`` is unchanged."""
    cfg = model.config
    small = coarse_config(cfg, scheme)
    tensors = _coalesce_depth(full_state_dict(model), scheme.depth, cfg.layers, scheme.unit)
    tensors = _coalesce_width(tensors, dataclasses.replace(cfg, layers=small.layers), scheme.width, scheme.unit)
    return materialize(small, tensors, model_device(model))


def decoalesce(small: torch.nn.Module, scheme: Scheme) -> torch.nn.Module:
    """The large-shaped model one level up whose units are copies of ``small``'s."""
    large = fine_config(small.config, scheme)
    large.validate()
    tensors = _decoalesce_width(full_state_dict(small), dataclasses.replace(large, layers=small.config.layers),
                                scheme.width, scheme.unit)
    tensors = _decoalesce_depth(tensors, scheme.depth, large.layers, scheme.unit)
    return materialize(large, tensors, model_device(small))


def interpolate(large: torch.nn.Module, decoalesced: torch.nn.Module, alpha: float) -> torch.nn.Module:
    """A new model with ``(1 - alpha) * large + alpha * decoalesced`` for every parameter."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"interpolation alpha must be in [0, 1], got {alpha}")
    if large.config != decoalesced.config:
        raise ConfigError("interpolate: the two models have different architectures")
    a, b = full_state_dict(large), full_state_dict(decoalesced)
    mixed = {name: (1.0 - alpha) * a[name] + alpha * b[name].to(a[name].device) for name in a}
    return materialize(large.config, mixed, model_device(large))


# ---------------------------------------------------------------- the V-cycle schedule


def stage_levels(levels: int) -> list[int]:
    """The level of each stage: down 0..L-1, then up to 0 (2L-1 stages)."""
    return list(range(levels)) + list(range(levels - 2, -1, -1))


def default_fractions(levels: int) -> list[float]:
    """Budget per stage: 5 % per step down, 25 % on the coarsest level, 10 % per intermediate
    level on the way up, the rest on the full model."""
    if levels == 1:
        return [1.0]
    down = [0.05] * (levels - 1)
    up = [0.1] * (levels - 2)
    used = sum(down) + 0.25 + sum(up)
    return down + [0.25] + up + [1.0 - used]


def default_full_share(levels: int) -> float:
    """The full model's share of the budget in :func:`default_fractions` (its last stage),
    computed without building the table, whose length is any number a user typed."""
    return 1.0 if levels == 1 else 1.0 - (0.05 * (levels - 1) + 0.25 + 0.1 * (levels - 2))


def stage_starts(fractions: list[float]) -> list[float]:
    """Budget progress at which each stage begins."""
    return [sum(fractions[:i]) for i in range(len(fractions))]


# Where a stage reads the run's learning-rate schedule: the schedule position (the budget
# progress) given the stage's start and length, both in budget progress.
StageSchedule = Callable[[float, float, float], float]


def global_schedule(p: float, start: float, length: float) -> float:
    """One schedule over the whole budget; each level only multiplies it by its ``lr_scale``."""
    return p


def per_stage_schedule(p: float, start: float, length: float) -> float:
    """The schedule restarts in every stage and runs over the stage's own window: it is read at
    ``(p - start) / length``, so a decaying schedule anneals each level before it is left."""
    return min(1.0, max(0.0, (p - start) / length))


STAGE_SCHEDULES: Registry[StageSchedule] = Registry("stage schedule")
STAGE_SCHEDULES.add("global", global_schedule)
STAGE_SCHEDULES.add("per_stage", per_stage_schedule)


def stage_at(progress: float, fractions: list[float]) -> int:
    """Index of the stage that budget progress ``progress`` falls in."""
    edge = 0.0
    for i, f in enumerate(fractions):
        edge += f
        if progress < edge - 1e-12:
            return i
    return len(fractions) - 1


@dataclasses.dataclass
class VCycleOptions(Config):
    """Multi-level V-cycle."""

    levels: int = field(2, help="number of levels including the full model (1 = off)")
    width: int = field(2, help="units merged per group at each level (heads, neurons, channels)")
    depth: int = field(2, help="blocks merged per group at each level (1 = keep the depth)")
    fractions: list[float] = field(
        default_factory=list,
        help="budget fraction of each of the 2*levels-1 stages (down, then up), summing to 1; "
        "empty = 5 % per step down, 25 % coarsest, 10 % per step up, rest on the full model",
    )
    lr_scale: list[float] = field(
        default_factory=list, help="learning-rate multiplier per level (empty = 2**level)"
    )
    alpha: float = field(0.5, help="interpolation weight of the de-coalesced model (paper 0.25-0.5)")
    schedule: str = field(
        "global", help="global: one lr schedule over the whole budget, times lr_scale | per_stage: "
        "the schedule restarts in each stage, over the stage's own budget window (as the official "
        "GPT-2 example restarts a linear decay per stage)",
    )
    pairing: str = field(
        "adjacent", help="which units merge: adjacent (2j with 2j+1) | strided (j with j+n/2, the "
        "official code's width template and its GPT-2 depth scheme)",
    )

    def validate(self) -> None:
        if self.levels < 1:
            raise ConfigError(f"technique.vcycle.levels must be >= 1, got {self.levels}")
        Scheme(self.width, self.depth)
        if self.levels > 1 and self.width == self.depth == 1:
            # Every level would be the full model: the level changes would only restart the
            # optimizer and scale the learning rate, which is not a V-cycle.
            raise ConfigError("technique.vcycle.width=1 and depth=1 coalesce nothing; set width or depth "
                              "to 2 or more (or technique.vcycle.levels=1 to switch the V-cycle off)")
        if self.fractions:
            n = 2 * self.levels - 1
            if len(self.fractions) != n:
                raise ConfigError(f"technique.vcycle.fractions needs {n} stage fractions, got {len(self.fractions)}")
            if any(f <= 0 for f in self.fractions) or not math.isclose(sum(self.fractions), 1.0, abs_tol=1e-6):
                raise ConfigError("technique.vcycle.fractions must be positive and sum to 1")
        elif default_full_share(self.levels) <= 0:  # levels=1e12: the table would not fit in memory
            # The defaults' down and up stages alone take the whole budget from 7 levels on: the
            # run would end on a coarse level and never return to the full model.
            raise ConfigError(
                f"technique.vcycle.levels={self.levels} leaves no budget for the full model with the "
                "default fractions (5 % per step down, 25 % coarsest, 10 % per step up); give "
                f"technique.vcycle.fractions ({2 * self.levels - 1} values)"
            )
        if self.lr_scale and len(self.lr_scale) != self.levels:
            raise ConfigError(f"technique.vcycle.lr_scale needs {self.levels} values, got {len(self.lr_scale)}")
        if any(s <= 0 for s in self.lr_scale):
            raise ConfigError("technique.vcycle.lr_scale values must be positive")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"technique.vcycle.alpha must be in [0, 1], got {self.alpha}")
        _known(STAGE_SCHEDULES, self.schedule, "technique.vcycle.schedule")
        _known(PAIRINGS, self.pairing, "technique.vcycle.pairing")

    def stage_fractions(self) -> list[float]:
        return list(self.fractions) if self.fractions else default_fractions(self.levels)

    def level_lr_scale(self, level: int) -> float:
        return self.lr_scale[level] if self.lr_scale else float(2**level)


@register
class VCycle(Technique):
    """Train large, coalesce, train small (faster), de-coalesce + interpolate, continue."""

    name = "vcycle"
    Options = VCycleOptions
    conflicts = ("stacking",)
    order = 30
    options: VCycleOptions

    def __init__(self, options: VCycleOptions) -> None:
        super().__init__(options)
        self.scheme = Scheme(options.width, options.depth, options.pairing)
        self.levels = stage_levels(options.levels)
        self.fractions = options.stage_fractions()
        self.starts = stage_starts(self.fractions)
        self.stage_schedule = STAGE_SCHEDULES.get(options.schedule)
        self.stage = 0
        self.saved: list[dict[str, torch.Tensor]] = []  # finer levels' weights, coarsest last
        # The scheme the saved weights were coalesced with (a resumed run's, from its checkpoint).
        self.saved_scheme: Scheme | None = None
        self.base: ModelConfig | None = None

    @classmethod
    def contract_cases(cls) -> ContractCases:
        return ContractCases(
            acting=("technique.vcycle.fractions=[0.25,0.5,0.25]", "model.positions=learned"),
            disabled=("technique.vcycle.levels=1",),
            misapplied=("technique.vcycle.width=3",),
        )

    @property
    def level(self) -> int:
        return self.levels[self.stage]

    def level_config(self, level: int) -> ModelConfig:
        cfg = self.base
        for _ in range(level):
            cfg = coarse_config(cfg, self.scheme)
        return cfg

    def configure_model(self, model_config: ModelConfig) -> ModelConfig:
        # A resumed run's stage and saved weights come from the checkpoint: a cycle with other
        # levels can lack that stage, or put it on a level with another number of saved models
        # to go back up through (an IndexError mid-run otherwise).
        if self.stage >= len(self.levels) or self.levels[self.stage] != len(self.saved):
            where = (f"ends at stage {len(self.levels)}" if self.stage >= len(self.levels)
                     else f"puts stage {self.stage + 1} on level {self.levels[self.stage]}")
            raise resume_refusal(
                [("technique.vcycle.levels", self.options.levels, "V-cycle")],
                f"the checkpoint is in stage {self.stage + 1} of its V-cycle, on level {len(self.saved)}, "
                f"and these levels' cycle {where}", "resume with the levels the run was saved with")
        if self.saved and self.saved_scheme is not None and self.saved_scheme != self.scheme:
            # The way up de-coalesces with the current scheme and interpolates with the saved
            # finer weights: another pairing (same shapes, so no load would fail) mixes units that
            # never formed a group, and silently spoils the model the run returns to.
            was, now = dataclasses.asdict(self.saved_scheme), dataclasses.asdict(self.scheme)
            raise resume_refusal(
                [(f"technique.vcycle.{key}", now[key], was[key]) for key in changed_keys(was, now)],
                f"the checkpoint is on level {len(self.saved)} of its V-cycle, coalesced with that scheme",
                "resume with the scheme it was saved with, at least until the V-cycle is back on the full "
                "model")
        self.base = model_config
        for level in range(self.options.levels):
            self.level_config(level)  # refuse an impossible scheme before any training
        return self.level_config(self.level)

    def on_step_start(self, state) -> None:
        state.lr_scale *= self.options.level_lr_scale(self.level)
        # Read from the stage index in the technique state and the budget progress, both restored
        # on resume, so a resumed run sets the same learning rates.
        state.lr_progress = self.stage_schedule(state.lr_progress, self.starts[self.stage],
                                                self.fractions[self.stage])

    def on_step_end(self, state) -> None:
        if state.last_step:
            # Nothing would train the next level: the run ends on the level it trained, with the
            # stage and saved weights to leave it on a resume with a larger budget.
            return
        target = stage_at(state.progress, self.fractions)
        # The cycle only moves forward. A resume with a larger budget lowers the progress and can
        # put a finished stage ahead again; requesting the unchanged model then would rebuild the
        # optimizer (and recompile) at every step.
        if target <= self.stage:
            return
        model = state.model
        # The new level's optimizer starts afresh, so the level is left with the weights the run
        # is evaluated with: Schedule-Free's average x, not the point y it computes gradients at
        # (those are back in the old model after the block; the new tensors are copies).
        with evaluation_weights(getattr(state, "optimizer", None), model):
            while self.stage < target:
                here, there = self.levels[self.stage], self.levels[self.stage + 1]
                if there > here:
                    self.saved.append({k: v.to("cpu", copy=True) for k, v in full_state_dict(model).items()})
                    model = coalesce(model, self.scheme)
                else:
                    large = materialize(self.level_config(there), self.saved.pop(), model_device(model))
                    model = interpolate(large, decoalesce(model, self.scheme), self.options.alpha)
                self.stage += 1
        state.request_model(model, None)

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "saved": list(self.saved), "scheme": dataclasses.asdict(self.scheme)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = int(state.get("stage", 0))
        self.saved = list(state.get("saved", []))
        # Checkpoints from before the scheme was recorded: nothing to check against.
        scheme = state.get("scheme")
        self.saved_scheme = Scheme(**scheme) if scheme else None
