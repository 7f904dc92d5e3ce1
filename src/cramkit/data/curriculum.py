"""cramming's sentence-length curriculum: the packed training sequences, globally sorted.

cramming (``cramming/data/curriculum_sorting.py``, ``_sort_tokenized_dataset_by_token`` with the
id of ``"."``, selected by ``ordering: sentence-length-curriculum`` in
``cramming/config/data/the-pile.yaml``) counts the ``"."`` tokens in every packed sequence and
orders *all* sequences by that count, largest first (``np.argsort(counts)[::-1]``): sequences of
many short sentences come first, long-sentence and sentence-free text (lists, tables) last.
cramming's argsort is numpy's default quicksort, whose order among equal counts is unspecified;
here ties keep the packed order, so the result is deterministic.

The split is rewritten once after packing, so the loader, resume and distributed sharding read
it like any other. Memory: one int32 key and one int64 index per sequence (12 bytes; 2.4 MB for
the 200k sequences of 25M tokens at length 128) plus one block of ``_BLOCK_ROWS`` rows; the
tokens stay in the memory-mapped shards. Disk: the unsorted shards and the sorted copy coexist
until the copy is complete.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..errors import DataError
from .dataset import SequenceView
from .packing import ShardWriter

#: The token whose count per sequence is the key (cramming's ``tokenizer.encode(".")[0]``).
SENTENCE_TOKEN = "."
#: Rows read (keys) or gathered (copy) at a time: 64k sequences of 128 uint16 tokens = 16 MB.
_BLOCK_ROWS = 65_536


def sentence_token_id(tok: Tokenizer) -> int:
    """The id ``"."`` encodes to; an error if it is not exactly one token."""
    ids = tok.encode(SENTENCE_TOKEN, add_special_tokens=False).ids
    if len(ids) != 1:
        raise DataError(
            f"ordering=curriculum counts the token '{SENTENCE_TOKEN}', but this tokenizer "
            f"encodes it as {len(ids)} tokens; use ordering=random or source"
        )
    return ids[0]


def sequence_keys(view: SequenceView, token_id: int) -> np.ndarray:
    """Per sequence, how many of its tokens are ``token_id`` (streamed over the shards)."""
    keys = np.empty(len(view), dtype=np.int32)
    for start in range(0, len(view), _BLOCK_ROWS):
        block = view[start : start + _BLOCK_ROWS]
        keys[start : start + len(block)] = (block == token_id).sum(axis=1)
    return keys


def curriculum_order(keys: np.ndarray) -> np.ndarray:
    """Sequence indices by descending key, ties in their packed order (a stable sort)."""
    return np.argsort(-keys.astype(np.int64), kind="stable")


def sort_split(
    folder: Path,
    shards: list[dict],
    order: np.ndarray,
    writer: ShardWriter,
) -> list[dict]:
    """Write the sequences of ``shards`` (in ``folder``) through ``writer`` in ``order``, then
    delete the source shards. Returns the new shards' manifest entries."""
    view = SequenceView(folder, shards, writer.seq_len, writer.dtype)
    if len(order) != len(view):
        raise DataError(f"curriculum order covers {len(order)} of {len(view)} sequences")
    for start in range(0, len(order), _BLOCK_ROWS):
        writer.write(view[order[start : start + _BLOCK_ROWS]])
    new = writer.close()
    del view  # close the memory maps before their files go
    for shard in shards:
        (folder / shard["file"]).unlink()
    return new
