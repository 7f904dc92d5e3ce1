"""Packing token streams into fixed-length sequences, written as raw memory-mappable shards.

Layout of a sequence:

* CLM: documents concatenated, each followed by the end-of-document token, cut every ``seq_len``
  tokens (a document may continue in the next sequence).
* MLM: documents concatenated with ``[SEP]`` between consecutive documents, cut every
  ``seq_len - 2`` tokens, each piece framed ``[CLS] piece [SEP]``. Long documents continue in
  the next sequence; a between-documents ``[SEP]`` that falls on a cut starts the next piece
  (``[CLS] [SEP] ...``), which keeps the stream, and so the token accounting, exact.

The last partial sequence of a split is padded with the pad token (``last_sequence=pad``, the
default, so no token is lost) or dropped (``drop``); both are counted in the split's stats.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

# Emit full sequences once this many are pending: amortises np.concatenate without holding much.
_EMIT_EVERY = 256


def token_dtype(padded_vocab: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if padded_vocab <= 65536 else np.uint32)


class ShardWriter:
    """Appends ``[n, seq_len]`` blocks to ``{split}-NNNNN.bin`` files of a bounded size."""

    def __init__(
        self, folder: Path, split: str, seq_len: int, dtype: np.dtype, seqs_per_shard: int
    ):
        self.folder, self.split, self.seq_len, self.dtype = folder, split, seq_len, dtype
        self.seqs_per_shard = max(1, seqs_per_shard)
        self.shards: list[dict] = []
        self._file = None
        self._rows = 0
        self._sha = None

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.folder / name, "wb")
        self._sha = hashlib.sha256()
        self._rows = 0
        self.shards.append({"file": name})

    def _close_current(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self.shards[-1].update(
            sequences=self._rows, shape=[self._rows, self.seq_len], sha256=self._sha.hexdigest()
        )
        self._file = None

    def write(self, seqs: np.ndarray) -> None:
        seqs = np.ascontiguousarray(seqs, dtype=self.dtype)
        while len(seqs):
            if self._file is None:
                self._open()
            take = seqs[: self.seqs_per_shard - self._rows]
            data = take.tobytes()
            self._file.write(data)
            self._sha.update(data)
            self._rows += len(take)
            seqs = seqs[len(take) :]
            if self._rows == self.seqs_per_shard:
                self._close_current()

    def close(self) -> list[dict]:
        self._close_current()
        return self.shards


class Packer:
    """Turns a stream of tokenized documents into framed fixed-length sequences."""

    def __init__(
        self,
        writer: ShardWriter,
        seq_len: int,
        objective: str,
        special_ids: dict[str, int | None],
        last_sequence: str = "pad",
    ):
        self.writer, self.seq_len, self.objective = writer, seq_len, objective
        self.last_sequence = last_sequence
        self.pad = special_ids["pad"]
        if objective == "mlm":
            self.cls, self.sep = special_ids["cls"], special_ids["sep"]
            self.content = seq_len - 2
            self.boundary = np.array([self.sep], dtype=np.uint32)
        else:
            self.content = seq_len
            self.boundary = np.array([special_ids["eod"]], dtype=np.uint32)
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self.stats = dict(
            docs=0,
            sequences=0,
            tokens=0,
            content_tokens=0,
            separator_tokens=0,
            framing_tokens=0,
            pad_tokens=0,
            dropped_tokens=0,
        )

    def add(self, tokens: np.ndarray) -> None:
        """Append one document's token ids."""
        if self.objective == "mlm":
            if self.stats["docs"]:
                self._push(self.boundary)
                self.stats["separator_tokens"] += 1
            self._push(tokens)
        else:
            self._push(tokens)
            self._push(self.boundary)
            self.stats["separator_tokens"] += 1
        self.stats["docs"] += 1
        self.stats["content_tokens"] += len(tokens)
        if self._pending_len >= self.content * _EMIT_EVERY:
            self._emit()

    def _push(self, arr: np.ndarray) -> None:
        self._pending.append(arr)
        self._pending_len += len(arr)

    def _frame(self, body: np.ndarray) -> np.ndarray:
        n = len(body)
        if self.objective == "clm":
            return body
        out = np.empty((n, self.seq_len), dtype=body.dtype)
        out[:, 0] = self.cls
        out[:, 1:-1] = body
        out[:, -1] = self.sep
        self.stats["framing_tokens"] += 2 * n
        return out

    def _emit(self, final: bool = False) -> None:
        if not self._pending:
            return
        buf = np.concatenate(self._pending)
        n = len(buf) // self.content
        body = buf[: n * self.content].reshape(n, self.content)
        rest = buf[n * self.content :]
        if n:
            self._write(self._frame(body))
        self._pending = [rest] if len(rest) else []
        self._pending_len = len(rest)
        if final and len(rest):
            if self.last_sequence == "drop":
                self.stats["dropped_tokens"] += len(rest)
            else:
                padded = np.full(self.content, self.pad, dtype=buf.dtype)
                padded[: len(rest)] = rest
                self.stats["pad_tokens"] += self.content - len(rest)
                self._write(self._frame(padded[None, :]))
            self._pending, self._pending_len = [], 0

    def _write(self, seqs: np.ndarray) -> None:
        self.writer.write(seqs)
        self.stats["sequences"] += len(seqs)
        self.stats["tokens"] += seqs.size

    def finish(self) -> dict:
        """Flush (pad or drop the tail) and return the split's stats including its shards."""
        self._emit(final=True)
        # A dropped tail may contain separator tokens too; keep the accounting exact by
        # recording everything that reached the shards in ``tokens``.
        shards = self.writer.close()
        return {**self.stats, "shards": shards}
