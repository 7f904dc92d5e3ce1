"""Progressive layer dropping (Zhang & He, "Accelerating Training of Transformer-Based Language
Models with Progressive Layer Dropping", NeurIPS 2020).

Each pre-LN block becomes *switchable*: in training it is either skipped entirely (its input is
passed on unchanged, and neither of its sub-layers runs) or kept, and then both residual branches
(attention and feed-forward outputs, not the skip path) are scaled by 1/p so the expected update
matches the full network. Evaluation (``model.eval()``) always runs the full depth, unscaled.

Schedules are functions of budget progress t in [0, 1]:

- theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar, the global keep probability;
- keep probability of block l (1-based, L blocks) = 1 - (l / L) * (1 - theta(t)), the paper's
  linear-in-depth rule: the bottom block is almost always kept, the top one with theta(t).

DeepSpeed's reference model (DeepSpeedExamples ``bing_bert``) indexes the rule from 0 instead:
its bottom block is always kept and its top one with theta + (1 - theta)/L; cramkit follows the
paper's 1-based formula (16 blocks at theta 0.5: 11.75 expected blocks here, 12.25 there).

``gamma`` is per unit of progress. DeepSpeed's PLD recipe uses gamma = 0.001 per optimizer step
over 200k steps; per unit of progress that is 0.001 * 200k = 200, the default here, which brings
theta within 1 % of theta_bar by 2.3 % of the budget. For another run length T (in steps) the
same per-step rate is gamma = 0.001 * T.

Decisions are per batch: one draw per block per optimizer step, shared by every sequence and
every micro-batch of that step. DeepSpeed draws per forward pass, i.e. per micro-batch; one draw
per step keeps gradient accumulation equal to the big batch (every micro-batch trains the same
network) and a step's FLOPs exact. The draws come from a generator seeded by ``(seed, step)``, so
a resumed run makes the same decisions, and the global RNG (dropout, masking) is untouched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import torch
from torch import nn

from ..configbase import Config, field
from ..errors import ConfigError
from ..models.config import ModelConfig
from ..models.flops import count_parameters_from_config
from ..models.layers import Block
from .base import ContractCases, Technique, register


@dataclasses.dataclass
class PLDOptions(Config):
    """Progressive layer dropping."""

    theta_bar: float = field(0.5, help="limit of the keep probability of the top block (1 = off)")
    gamma: float = field(
        200.0,
        help="decay rate per unit of budget progress (DeepSpeed's recipe: 0.001 per step x 200k "
        "steps)",
    )
    seed: int = field(0, help="seed of the drop decisions (combined with the step number)")
    compile_blocks: bool = field(
        False,
        help="torch.compile each block on its own, so that changing skip patterns cost no "
        "recompilation (compiled in the warm-up, outside the budget; meant for a GPU, with or "
        "without train.compile)",
    )

    def validate(self) -> None:
        if not 0.0 < self.theta_bar <= 1.0:
            raise ConfigError(f"technique.pld.theta_bar must be in (0, 1], got {self.theta_bar}")
        if self.gamma < 0:
            raise ConfigError(f"technique.pld.gamma must be >= 0, got {self.gamma}")


def theta(progress: float, theta_bar: float, gamma: float) -> float:
    """Global keep probability at budget progress ``progress``."""
    return (1.0 - theta_bar) * math.exp(-gamma * progress) + theta_bar


def keep_probabilities(progress: float, layers: int, theta_bar: float, gamma: float) -> list[float]:
    """Keep probability of each block, bottom first: 1 - (l/L)(1 - theta(t)), l = 1..L."""
    top = theta(progress, theta_bar, gamma)
    return [1.0 - (i + 1) / layers * (1.0 - top) for i in range(layers)]


def expected_layers(progress: float, layers: int, theta_bar: float, gamma: float) -> float:
    """Expected number of executed blocks per step."""
    return sum(keep_probabilities(progress, layers, theta_bar, gamma))


def _seed(seed: int, step: int) -> int:
    digest = hashlib.blake2b(repr(("pld", seed, step)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_keep(probabilities: list[float], seed: int, step: int) -> list[bool]:
    """Which blocks run at ``step``: Bernoulli draws from a generator seeded by (seed, step)."""
    gen = torch.Generator().manual_seed(_seed(seed, step))
    draws = torch.rand(len(probabilities), generator=gen, dtype=torch.float64)
    return [bool(d < p) for d, p in zip(draws.tolist(), probabilities)]


class SwitchableBlock(Block):
    """A pre-LN block whose residual branches are multiplied by ``pld_scale`` (1/p when kept).

    The scale is a 0-d buffer updated in place, so a compiled block never recompiles for it.
    """

    pld_scale: torch.Tensor

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        scale = self.pld_scale if self.training else None
        # The branch gains (model.residual_scale=scalar; Identity otherwise) are part of the
        # branch, as in Block.forward: leaving them out would train and evaluate another function
        # than the plain model that loads the checkpoint (skipinit's zero gains, never learned).
        y = self.gain1(self.drop1(self.attn(self.norm1(x), attn_mask)))
        x = x + (y if scale is None else y * scale)
        y = self.gain2(self.drop2(self.ffn(self.norm2(x))))
        return x + (y if scale is None else y * scale)


class SkippableLayers(nn.ModuleList):
    """The model's block list; in training mode iteration yields only the kept blocks, so a
    dropped block is never called and costs nothing."""

    pld_keep: list[bool] | None = None

    def _kept_blocks(self) -> list[nn.Module]:
        modules = list(self._modules.values())
        if not self.training or self.pld_keep is None:
            return modules
        return [m for m, keep in zip(modules, self.pld_keep) if keep]

    # _kept_blocks outside torch.compile's graph (the choice changes every step). Made by
    # _skippable, not at import: torch.compiler.disable imports dynamo, over a second of
    # start-up for every cramkit command, `--help` included.
    _kept: Any = None

    def __iter__(self):
        return iter(self._kept())


def _skippable(layers: nn.ModuleList) -> None:
    """Turn ``layers`` into :class:`SkippableLayers` in place (every parameter, its name and its
    optimizer slot stay)."""
    if SkippableLayers._kept is None:
        SkippableLayers._kept = torch.compiler.disable(SkippableLayers._kept_blocks)
    layers.__class__ = SkippableLayers


@register
class ProgressiveLayerDropping(Technique):
    """Skip whole pre-LN blocks at random, more often near the top and later in training."""

    name = "pld"
    Options = PLDOptions
    order = 50  # after growth (stacking, V-cycle), so it applies to the grown model
    options: PLDOptions

    def __init__(self, options: PLDOptions) -> None:
        super().__init__(options)
        self.model: nn.Module | None = None
        self.keep: list[bool] = []
        self.seq_len: int | None = None

    @classmethod
    def contract_cases(cls) -> ContractCases:
        return ContractCases(
            acting=("model.layers=4", "technique.pld.theta_bar=0.3", "technique.pld.gamma=5"),
            disabled=("technique.pld.theta_bar=1.0",),
            misapplied=("model.norm_position=post", "model.final_norm=false"),
        )

    @property
    def unused_parameters(self) -> bool:  # type: ignore[override]
        """A dropped block's parameters get no gradient in that step; switched off, none is
        dropped, and DDP need not search for unused parameters every step."""
        return not self.off

    @property
    def off(self) -> bool:
        """Whether every block is kept at every step (theta(t) = 1: ``theta_bar=1`` or
        ``gamma=0``)."""
        return self.options.theta_bar >= 1.0 or self.options.gamma == 0

    def on_model(self, model: nn.Module) -> nn.Module:
        cfg = model.config
        if cfg.norm_position != "pre":
            raise ConfigError(
                "pld needs pre-LN blocks (model.norm_position=pre): skipping a post-LN block "
                "would also skip its normalisation of the residual stream"
            )
        self.model = model
        if self.off:
            # Every block is kept at scale 1: no surgery, so the run is the plain model's also
            # compiled (the skip loop runs outside the compiled graph and splits it).
            return model
        layers = model.layers
        if not isinstance(layers, SkippableLayers):
            _skippable(layers)
        for block in layers._modules.values():
            if not isinstance(block, Block):
                raise ConfigError(f"pld: unexpected block type {type(block).__name__}")
            if not isinstance(block, SwitchableBlock):
                block.__class__ = SwitchableBlock
                device = next(block.parameters()).device
                block.register_buffer("pld_scale", torch.ones((), device=device), persistent=False)
                if self.options.compile_blocks:
                    block.compile()
        return model

    def on_step_start(self, state) -> None:
        model = state.model if state.model is not None else self.model
        o = self.options
        if self.off:  # on_model left the model as it was
            return
        layers = model.layers
        probs = keep_probabilities(state.progress, len(layers), o.theta_bar, o.gamma)
        self.keep = sample_keep(probs, o.seed, state.step)
        layers.pld_keep = self.keep
        with torch.no_grad():
            for block, p in zip(layers._modules.values(), probs):
                block.pld_scale.fill_(1.0 / p)

    def on_batch(self, batch: dict[str, torch.Tensor], state) -> dict[str, torch.Tensor]:
        # Remembered for the FLOP count: the length after any earlier technique's truncation.
        self.seq_len = int(batch["input_ids"].shape[1])
        return batch

    def flops_per_token(self, base: float, state) -> float:
        model = state.model if state.model is not None else self.model
        if model is None or not self.keep or self.seq_len is None:
            return base
        dropped = self.keep.count(False)
        return base - dropped * block_flops_per_token(model.config, self.seq_len)

    def state_dict(self) -> dict[str, Any]:
        return {}  # decisions are a pure function of (seed, step, progress)


def block_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of one block (flops.py's accounting, one layer's share)."""
    one = dataclasses.replace(cfg, layers=1)
    none = dataclasses.replace(cfg, layers=0)
    params = count_parameters_from_config(one, True) - count_parameters_from_config(none, True)
    return float(6 * params + 12 * seq_len * cfg.hidden)
