"""Turning task examples into token ids with a run's ``tokenizers.Tokenizer``.

Special tokens are added here rather than by the tokenizer's post-processor, so that MLM and
causal tokenizers, with or without a post-processor, produce the same layouts:

- masked-LM (BERT-style): ``[CLS] a [SEP]`` and ``[CLS] a [SEP] b [SEP]``;
- causal (GPT-style): ``a <eod>`` and ``a <sep|eod> b <eod>``; the head pools the last real token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from ..data.tokenizer import encoding_copy
from ..errors import CheckpointError, DataError
from ..utils import read_json

# Vocabulary spellings tried when a run has no data manifest (first match wins).
_SPECIAL_SPELLINGS: dict[str, tuple[str, ...]] = {
    "pad": ("[PAD]", "<pad>", "<|pad|>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
    "cls": ("[CLS]", "<cls>", "<s>"),
    "sep": ("[SEP]", "<sep>", "</s>"),
    "mask": ("[MASK]", "<mask>"),
    "eod": ("<|endoftext|>", "[EOD]", "<eod>", "</s>"),
}


@dataclasses.dataclass
class SpecialIds:
    """Ids of the special tokens a tokenizer has (None where it has none)."""

    pad: int | None = None
    unk: int | None = None
    cls: int | None = None
    sep: int | None = None
    mask: int | None = None
    eod: int | None = None

    @classmethod
    def from_vocab(cls, tokenizer) -> SpecialIds:
        """Find special tokens by their usual spellings in the tokenizer's vocabulary."""
        found = {}
        for name, spellings in _SPECIAL_SPELLINGS.items():
            found[name] = next(
                (i for s in spellings if (i := tokenizer.token_to_id(s)) is not None), None
            )
        return cls(**found)

    @classmethod
    def for_run(cls, run_dir: str | Path, tokenizer) -> SpecialIds:
        """From ``run_dir/data_manifest.json`` → ``special_ids``, else from the vocabulary."""
        manifest = Path(run_dir) / "data_manifest.json"
        if manifest.is_file():
            ids = read_json(manifest, CheckpointError).get("special_ids") or {}
            if not isinstance(ids, dict):
                raise CheckpointError(f"{manifest}: special_ids is not a table of token ids")
            known = {f.name for f in dataclasses.fields(cls)}
            if ids:
                return cls(**{k: v for k, v in ids.items() if k in known})
        return cls.from_vocab(tokenizer)


@dataclasses.dataclass
class Encoded:
    """Token ids of one example (no padding) and its target."""

    ids: list[int]
    label: int | float


class TaskEncoder:
    """Encodes (text, text_pair) with a ``tokenizers.Tokenizer`` into truncated id sequences."""

    def __init__(self, tokenizer, special: SpecialIds, seq_len: int, causal: bool) -> None:
        # Pretraining's packing copy: special-token spellings inside a text ("[SEP]", or "</s>"
        # in scraped HTML) are text, since matched as tokens they would add separators or end
        # marks that the layout below does not have; the framing is added here, not by a
        # post-processor. A copy, so that the caller's tokenizer is left as it is.
        # Without the tokenizer's own padding and truncation: both are done here, to seq_len.
        self.tokenizer = encoding_copy(tokenizer)
        self.seq_len = seq_len
        self.causal = causal
        if causal:
            end = special.eod if special.eod is not None else special.sep
            self.prefix: list[int] = []
            self.middle = (
                [special.sep if special.sep is not None else end] if end is not None else []
            )
            self.suffix = [end] if end is not None else []
        else:
            if special.cls is None or special.sep is None:
                raise DataError(
                    "the tokenizer has no [CLS]/[SEP] tokens (and the run's data_manifest.json "
                    "names none); cannot build BERT-style inputs"
                )
            self.prefix, self.middle, self.suffix = [special.cls], [special.sep], [special.sep]
        self.pad_id = next((i for i in (special.pad, special.eod, 0) if i is not None), 0)

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, examples: Sequence) -> list[Encoded]:
        """Encode examples (objects with ``text``, ``text_pair``, ``label``)."""
        first = self._ids([e.text for e in examples])
        pairs = [e.text_pair is not None for e in examples]
        second_texts = [e.text_pair for e in examples if e.text_pair is not None]
        second = iter(self._ids(second_texts)) if second_texts else iter(())
        out = []
        for ex, a, has_pair in zip(examples, first, pairs):
            if has_pair:
                b = next(second)
                budget = self.seq_len - len(self.prefix) - len(self.middle) - len(self.suffix)
                a, b = truncate_pair(a, b, budget)
                ids = self.prefix + a + self.middle + b + self.suffix
            else:
                budget = self.seq_len - len(self.prefix) - len(self.suffix)
                ids = self.prefix + a[: max(budget, 0)] + self.suffix
            out.append(Encoded(ids, ex.label))
        return out

    def collate(self, batch: Sequence[Encoded], regression: bool) -> dict[str, torch.Tensor]:
        """Right-pad a batch to its longest member (not to seq_len: cheaper on short tasks)."""
        width = max(len(e.ids) for e in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, e in enumerate(batch):
            ids[row, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
            mask[row, : len(e.ids)] = 1
        dtype = torch.float32 if regression else torch.long
        labels = torch.tensor([e.label for e in batch], dtype=dtype)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def truncate_pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Cut a pair to ``budget`` tokens longest-first, as HF tokenizers' ``longest_first`` does:
    the shorter text (``a`` on a tie) keeps at most half the budget, the other the rest."""
    budget = max(budget, 0)
    la, lb = len(a), len(b)
    if la + lb > budget:
        # Exactly tokenizers' rule, so that an exported tokenizer (tokenizer(a, b,
        # truncation=True)) feeds the classifier the inputs it was trained on: with an odd
        # budget the text that was longer keeps the extra token.
        if la <= lb:
            la = min(la, budget // 2)
            lb = budget - la
        else:
            lb = min(lb, budget // 2)
            la = budget - lb
    return list(a[:la]), list(b[:lb])
