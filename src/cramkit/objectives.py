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

An objective is called as ``objective(tokens, seq_ids)``: ``tokens`` a LongTensor ``[B, L]`` and
``seq_ids`` each sequence's identity, a LongTensor ``[B]`` of non-negative ids (ShardLoader hands
over ``epoch * num_sequences + row``: which sequence of the split, on which pass over it), or an
int: the id of the first of ``B`` consecutive sequences (``start`` for ``split[start:start + B]``).
CLM ignores it. MLM masks each sequence as a pure function of ``(seed, its id, position)``: a
counter-based hash (:func:`_uniform_bits`), with no generator state, so a sequence gets the same
mask in a micro-batch of 2 or of 256, at any position in it, on any rank of any number of ranks,
and after a resume; it gets another mask on the next pass over the data (dynamic masking).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch

from .errors import ConfigError, DataError

IGNORE_INDEX = -100
#: How validation masks are drawn, recorded in each run's summary: ``cramkit report`` notes runs
#: scored under another scheme (before it: "per-sequence, seed 0", generator draws for blocks of
#: 64 sequences; before that, one draw per batch, with the run's seed).
VAL_MASKS = "per-sequence hash, seed 0"
#: How training masks are drawn, recorded in each MLM checkpoint: a resume of a checkpoint drawn
#: under another scheme (before it: none recorded, generator draws per micro-batch) trains on
#: other masks than the uninterrupted run would have, and its validation losses change scheme.
TRAIN_MASKS = "per-sequence hash"
_M32 = 0xFFFFFFFF


def _seed_from(*parts: Any) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective integer hash of 32-bit values held in int64 (Wellons' hash-prospector
    ``[16 21f0aaad 15 735a2d97 15]``). Both multipliers are below 2**31, so no product of a
    32-bit value reaches 2**63: int64 arithmetic never overflows, on any device."""
    x = x ^ (x >> 16)  # a new tensor: the rest works in place, never on the caller's
    x.mul_(0x21F0AAAD).bitwise_and_(_M32)
    x ^= x >> 15
    x.mul_(0x735A2D97).bitwise_and_(_M32)
    x ^= x >> 15
    return x


def _row_keys(keys: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """32-bit keys ``[S, B]`` for ``B`` sequences in each of ``S`` streams, from 63-bit stream keys
    ``[S, 1]`` and 64-bit ids ``[B]``. Ids that differ only in their low 32 bits (every id below
    2**32) never share a key within a stream."""
    lo = _mix32((seq_ids & _M32) ^ (keys & _M32))
    return _mix32(lo ^ _mix32((seq_ids >> 32) ^ (keys >> 32)))


def _position_keys(length: int) -> torch.Tensor:
    return _mix32(torch.arange(length, dtype=torch.long) ^ 0x5BD1E995)


def _uniform_bits(row_keys: torch.Tensor, position_keys: torch.Tensor) -> torch.Tensor:
    """32 uniform bits (int64 in [0, 2**32)) for each (row key, position key) pair, elementwise
    with broadcasting."""
    return _mix32(row_keys ^ position_keys)


def _threshold(p: float) -> int:
    """``bits < _threshold(p)`` holds with probability ``p`` (to 2**-32) for uniform 32-bit bits."""
    return min(1 << 32, max(0, round(p * (1 << 32))))


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
    """BERT-style masking; see the module docstring. Three independent hash streams, keyed by
    ``(seed, fixed, stream)``: one selects positions, one picks [MASK] / random / unchanged for the
    selected ones, one picks the random token; the last two are computed for the positions that
    need them only. ``fixed=True`` is for validation: another salt, and the caller passes each
    sequence's position in the split, so every evaluation scores the same masks, whatever the
    batch size (a run's validation uses seed 0, so runs with other seeds score them too).
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
        self._keys = torch.tensor([[_seed_from("mlm-hash", seed, fixed, stream)]
                                   for stream in ("select", "action", "token")])
        self._select = _threshold(mask_rate)
        self._mask = _threshold(mask_prob)
        self._random = _threshold(mask_prob + random_prob)

    def __call__(self, tokens: torch.Tensor, seq_ids: torch.Tensor | int = 0) -> dict[str, torch.Tensor]:
        tokens = tokens.long()
        batch, length = tokens.shape
        if isinstance(seq_ids, torch.Tensor):
            seq_ids = seq_ids.long().reshape(-1)
            if len(seq_ids) != batch:
                raise ValueError(f"{len(seq_ids)} sequence ids for a batch of {batch} sequences")
        else:
            seq_ids = int(seq_ids) + torch.arange(batch, dtype=torch.long)
        positions = _position_keys(length)
        select_keys, action_keys, token_keys = _row_keys(self._keys, seq_ids)
        selected = _uniform_bits(select_keys[:, None], positions[None, :]) < self._select
        selected &= ~torch.isin(tokens, self.special)
        flat = selected.reshape(-1).nonzero().squeeze(1)
        rows, cols = flat // length, flat % length
        action = _uniform_bits(action_keys[rows], positions[cols])
        inputs = tokens.reshape(-1).clone()
        inputs[flat[action < self._mask]] = self.mask_id
        swap = (action >= self._mask) & (action < self._random)
        bits = _uniform_bits(token_keys[rows[swap]], positions[cols[swap]])
        inputs[flat[swap]] = self.random_pool[(bits * len(self.random_pool)) >> 32]
        inputs = inputs.view(batch, length)
        labels = torch.where(selected, tokens, torch.full_like(tokens, IGNORE_INDEX))
        return {"input_ids": inputs, "labels": labels}


class CausalLM:
    """Next-token labels that never cross a document boundary; see the module docstring."""

    def __init__(self, special_ids: dict[str, int | None]):
        eod = boundary_token_id("clm", special_ids)
        if eod is None:
            raise DataError("the dataset's tokenizer has no end-of-document token; clm needs one")
        self.eod = int(eod)
        self.pad = special_ids.get("pad")

    def __call__(self, tokens: torch.Tensor, seq_ids: torch.Tensor | int = 0) -> dict[str, torch.Tensor]:
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


#: Objective name -> builder ``(dataset, **options) -> callable(tokens, seq_ids)`` (see the module
#: docstring for ``seq_ids``).
OBJECTIVES: dict[str, Callable[..., Any]] = {"mlm": _mlm, "clm": _clm}


def build_objective(name: str, dataset, **options: Any) -> Callable[[torch.Tensor, torch.Tensor | int], dict]:
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
