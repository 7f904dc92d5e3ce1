"""Training objectives: batches of packed token ids -> ``{"input_ids", "labels"}``.

* ``mlm``: BERT masking. Each non-special position is selected with probability ``mask_rate``;
  a selected position becomes ``[MASK]`` with probability ``mask_prob`` (0.8), a random token
  with ``random_prob`` (0.1), else stays unchanged. ``labels`` hold the original id at selected
  positions and -100 elsewhere, so the loss covers only selected positions. Random tokens are
  drawn from the tokenizer's real, non-special vocabulary (never the padding rows added to reach
  a multiple of 64).
* ``clm``: ``input_ids = tokens``; ``labels[t] = tokens[t + 1]``, with -100 at the last position,
  wherever the input token is the end-of-document separator (predicting the first token of the
  next, unrelated document from the separator is not a learnable target), and at pad positions.
  The last token of a document does predict the separator, so models learn to end documents.

Both are deterministic given ``(seed, index)``: the random draws come from a ``torch.Generator``
seeded from them, so resuming a run reproduces the masks exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch

from .errors import ConfigError, DataError

IGNORE_INDEX = -100
# Validation masks are drawn for this many consecutive sequences at a time (see MaskedLM).
_FIXED_BLOCK = 64
#: How validation masks are drawn, recorded in each run's summary: ``cramkit report`` notes runs
#: scored under another scheme (before it: one draw per batch, with the run's seed).
VAL_MASKS = "per-sequence, seed 0"


def _seed_from(*parts: Any) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def target_index(labels: torch.Tensor) -> torch.Tensor:
    """Flat positions (into ``labels.reshape(-1)``) of the labelled tokens, in increasing order:
    the ``target_index`` a sparse-prediction model accepts (``TransformerLM.forward``). Computed
    from CPU labels it costs no host-device synchronisation; the trainer adds it to each
    micro-batch after the techniques' ``on_batch`` hooks, so it always matches the labels."""
    return (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def _special_set(special_ids: dict[str, int | None]) -> list[int]:
    return sorted({int(v) for v in special_ids.values() if v is not None})


#: Objective name -> the special tokens that end a document in its packed data, first present
#: wins (see cramkit.data.packing): MLM data separates documents with [SEP]; CLM data ends each
#: with the end-of-document token, or [SEP] for a tokenizer that has none.
BOUNDARY_TOKENS: dict[str, tuple[str, ...]] = {"mlm": ("sep",), "clm": ("eod", "sep")}


def training_objective(model_cfg) -> str:
    """The objective a model of ``model_cfg`` (a ModelConfig) trains with: ``clm`` for a causal
    architecture, which may only see earlier tokens, ``mlm`` for one that attends both ways."""
    return "clm" if model_cfg.causal else "mlm"


def boundary_token_id(objective: str, special_ids: dict[str, int | None]) -> int | None:
    """The id of the token that ends a document in ``objective``'s packed sequences, or None
    when the tokenizer has none of the candidates."""
    for name in BOUNDARY_TOKENS.get(objective, ()):
        if special_ids.get(name) is not None:
            return int(special_ids[name])
    return None


class MaskedLM:
    """BERT-style masking; see the module docstring. ``fixed=True`` is for validation: ``index``
    is then the position of the batch's first sequence in the split, and each sequence's mask
    depends only on ``(seed, its position)``, with a salt distinct from training. Every evaluation
    scores the same masks, and so do runs that evaluate with other batch sizes (a mask drawn over
    the whole batch would differ between a micro-batch of 256 and one of 1024).
    """

    def __init__(
        self,
        special_ids: dict[str, int | None],
        vocab_size: int,
        *,
        mask_rate: float = 0.15,
        mask_prob: float = 0.8,
        random_prob: float = 0.1,
        seed: int = 0,
        fixed: bool = False,
    ):
        if special_ids.get("mask") is None:
            raise DataError("the dataset's tokenizer has no [MASK] token; mlm needs one")
        if not 0.0 < mask_rate < 1.0:
            raise ConfigError(f"mask_rate: {mask_rate} is not in (0, 1)")
        if mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1.0:
            raise ConfigError(
                f"mask_prob ({mask_prob}) + random_prob ({random_prob}) must be within [0, 1]"
            )
        self.mask_id = int(special_ids["mask"])
        self.special = torch.tensor(_special_set(special_ids), dtype=torch.long)
        keep = torch.ones(vocab_size, dtype=torch.bool)
        keep[self.special] = False
        self.random_pool = torch.nonzero(keep).flatten()
        if len(self.random_pool) == 0:
            raise DataError("no non-special tokens to draw random replacements from")
        self.mask_rate, self.mask_prob, self.random_prob = mask_rate, mask_prob, random_prob
        self.seed, self.fixed = seed, fixed

    def __call__(self, tokens: torch.Tensor, index: int = 0) -> dict[str, torch.Tensor]:
        tokens = tokens.long()
        if self.fixed and len(tokens):
            # Draws per block of _FIXED_BLOCK sequences at fixed positions of the split, sliced to
            # this batch: a sequence's mask is the same in any batch, at one generator per block.
            first, start = divmod(int(index), _FIXED_BLOCK)
            last = (int(index) + len(tokens) - 1) // _FIXED_BLOCK
            blocks = [self._draws((_FIXED_BLOCK, *tokens.shape[1:]), b) for b in range(first, last + 1)]
            select, action, pick = (torch.cat(d)[start:start + len(tokens)] for d in zip(*blocks))
        else:
            select, action, pick = self._draws(tokens.shape, int(index))
        candidate = ~torch.isin(tokens, self.special)
        selected = (select < self.mask_rate) & candidate
        to_mask = selected & (action < self.mask_prob)
        to_random = (
            selected & (action >= self.mask_prob) & (action < self.mask_prob + self.random_prob)
        )
        inputs = tokens.clone()
        inputs[to_mask] = self.mask_id
        inputs[to_random] = self.random_pool[pick[to_random]]
        labels = torch.where(selected, tokens, torch.full_like(tokens, IGNORE_INDEX))
        return {"input_ids": inputs, "labels": labels}

    def _draws(self, shape: torch.Size, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Uniforms that select positions, uniforms that pick the action, random-token picks."""
        gen = torch.Generator().manual_seed(_seed_from("mlm", self.seed, self.fixed, index))
        return (torch.rand(shape, generator=gen), torch.rand(shape, generator=gen),
                torch.randint(len(self.random_pool), shape, generator=gen))


class CausalLM:
    """Next-token labels that never cross a document boundary; see the module docstring."""

    def __init__(self, special_ids: dict[str, int | None]):
        eod = boundary_token_id("clm", special_ids)
        if eod is None:
            raise DataError("the dataset's tokenizer has no end-of-document token; clm needs one")
        self.eod = int(eod)
        self.pad = special_ids.get("pad")

    def __call__(self, tokens: torch.Tensor, index: int = 0) -> dict[str, torch.Tensor]:
        tokens = tokens.long()
        labels = torch.full_like(tokens, IGNORE_INDEX)
        labels[:, :-1] = tokens[:, 1:]
        no_target = tokens == self.eod
        if self.pad is not None:
            no_target |= tokens == self.pad
            labels[labels == self.pad] = IGNORE_INDEX
        labels[no_target] = IGNORE_INDEX
        return {"input_ids": tokens, "labels": labels}


def _mlm(dataset, **options: Any) -> MaskedLM:
    vocab = getattr(dataset, "tokenizer_vocab_size", None) or dataset.vocab_size
    return MaskedLM(dataset.special_ids, vocab, **options)


def _clm(dataset, **options: Any) -> CausalLM:
    if options:
        raise ConfigError(f"clm takes no options, got {sorted(options)}")
    return CausalLM(dataset.special_ids)


#: Objective name -> builder ``(dataset, **options) -> callable(tokens, index)``.
OBJECTIVES: dict[str, Callable[..., Any]] = {"mlm": _mlm, "clm": _clm}


def build_objective(name: str, dataset, **options: Any) -> Callable[[torch.Tensor, int], dict]:
    """The objective ``name`` for ``dataset`` (a TokenDataset or a path to one).

    MLM options: ``mask_rate``, ``mask_prob``, ``random_prob``, ``seed``, ``fixed``.
    """
    from .configbase import did_you_mean

    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective '{name}'{did_you_mean(name, OBJECTIVES)}")
    if not hasattr(dataset, "special_ids"):
        from .data.dataset import TokenDataset

        dataset = TokenDataset.open(dataset)
    try:
        return OBJECTIVES[name](dataset, **options)
    except TypeError as exc:
        raise ConfigError(f"objective '{name}': {exc}") from None
