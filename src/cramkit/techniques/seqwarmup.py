"""Sequence-length warm-up (Li, Zhang & He, "The Stability-Efficiency Dilemma", NeurIPS 2022).

Training sequences start short and grow linearly with budget progress to the data's full length
over the first ``fraction`` of the budget: length(t) = start + (full - start) * t / fraction,
rounded down to a multiple of ``multiple`` (8 keeps tensor-core friendly shapes), never below
``start`` rounded the same way, never above the full length.

Each micro-batch is truncated to its first ``length`` positions (``input_ids``, ``labels`` and
any other [B, L] tensor). The trainer counts ``input_ids.numel()`` after this hook, so the
tokens (and a token budget) count only what the model saw; ``flops_per_token`` charges attention
at the current length.

MLM framing: packed MLM sequences are ``[CLS] body [SEP]``. A truncated sequence keeps its
``[CLS]`` and gets ``[SEP]`` written into its last position (with no loss taken there), so short
sequences look like the full ones; the token it replaces is simply not seen. This needs the
dataset's ``[SEP]`` id, taken from the last column of the untruncated batch. CLM sequences are
cut without change: the last kept position still predicts a real next token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..configbase import Config, field
from ..errors import ConfigError
from .base import ContractCases, Technique, register


@dataclasses.dataclass
class SeqWarmupOptions(Config):
    """Sequence-length warm-up."""

    start: int = field(16, help="sequence length at the start of training")
    fraction: float = field(0.3, help="budget fraction over which the length grows to full (0 = off)")
    multiple: int = field(8, help="lengths are rounded down to a multiple of this")

    def validate(self) -> None:
        if self.multiple < 1:
            raise ConfigError(f"technique.seqwarmup.multiple must be >= 1, got {self.multiple}")
        if self.start < self.multiple:
            raise ConfigError(
                f"technique.seqwarmup.start ({self.start}) must be at least multiple ({self.multiple})"
            )
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"technique.seqwarmup.fraction must be in [0, 1], got {self.fraction}")


def warmup_length(progress: float, full: int, start: int, fraction: float, multiple: int = 8) -> int:
    """Training sequence length at budget progress ``progress`` (see the module docstring)."""
    if fraction <= 0 or progress >= fraction or start >= full:
        return full
    raw = start + (full - start) * progress / fraction
    floor = max(multiple, start // multiple * multiple)
    return int(min(full, max(floor, int(raw) // multiple * multiple)))


def truncate(batch: dict[str, torch.Tensor], length: int, sep_id: int | None = None,
             ignore_index: int = -100) -> dict[str, torch.Tensor]:
    """The first ``length`` positions of every [B, L] tensor; with ``sep_id``, MLM framing is
    restored by writing ``[SEP]`` (and no label) into the last kept position."""
    full = batch["input_ids"].shape[1]
    # A copy, not .contiguous(): with one row the slice is already contiguous, so contiguous()
    # would return a view and the [SEP]/-100 writes below would change the caller's batch.
    out = {k: (v[:, :length].clone(memory_format=torch.contiguous_format)
               if v.ndim >= 2 and v.shape[1] == full else v)
           for k, v in batch.items()}
    if sep_id is not None and length < full:
        out["input_ids"][:, -1] = sep_id
        if "labels" in out:
            out["labels"][:, -1] = ignore_index
    return out


def _framing_sep(batch: dict[str, torch.Tensor], model: torch.nn.Module | None) -> int | None:
    """The ``[SEP]`` id that ends every row of an MLM batch, or None (CLM, or no common end)."""
    if model is None or model.config.causal:
        return None
    # Packed MLM rows all end in [SEP]; reading it off the batch avoids needing the tokenizer
    # here. Without a common last token there is no framing to restore.
    last = batch["input_ids"][:, -1]
    return int(last[0]) if bool((last == last[0]).all()) else None


@register
class SequenceLengthWarmup(Technique):
    """Train on short sequences first, growing to the full length."""

    name = "seqwarmup"
    Options = SeqWarmupOptions
    order = 10  # truncate before any technique that reads the batch shape
    options: SeqWarmupOptions

    def __init__(self, options: SeqWarmupOptions) -> None:
        super().__init__(options)
        self.full: int | None = None
        self.length: int | None = None

    @classmethod
    def contract_cases(cls) -> ContractCases:
        return ContractCases(
            acting=("technique.seqwarmup.start=8", "technique.seqwarmup.fraction=0.8"),
            disabled=("technique.seqwarmup.fraction=0",),
            misapplied=("technique.seqwarmup.start=64", "technique.seqwarmup.fraction=0.5"),
        )

    def on_batch(self, batch: dict[str, torch.Tensor], state) -> dict[str, torch.Tensor]:
        ids = batch["input_ids"]
        full = int(ids.shape[1])
        o = self.options
        if o.fraction > 0 and o.start >= full:
            raise ConfigError(
                f"seqwarmup: start length {o.start} is not shorter than the data's sequence "
                f"length {full}; lower technique.seqwarmup.start"
            )
        self.full = full
        self.length = warmup_length(state.progress, full, o.start, o.fraction, o.multiple)
        if self.length >= full:
            return batch
        return truncate(batch, self.length, _framing_sep(batch, state.model))

    def warm_up_batches(self, batch: dict[str, torch.Tensor], model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
        # Every length from start to full would otherwise recompile once inside the budget (the
        # second length seen makes the sequence dimension dynamic); the shortest one does it here.
        full, o = int(batch["input_ids"].shape[1]), self.options
        length = warmup_length(0.0, full, o.start, o.fraction, o.multiple)
        return [truncate(batch, length, _framing_sep(batch, model))] if length < full else []

    def flops_per_token(self, base: float, state) -> float:
        if self.full is None or self.length is None or self.length >= self.full:
            return base
        cfg = state.model.config
        return base - 12.0 * cfg.layers * cfg.hidden * (self.full - self.length)

    def state_dict(self) -> dict[str, Any]:
        return {}  # the length is a pure function of progress
