"""``TokenDataset``: read access to a prepared dataset folder (manifest + memory-mapped shards)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..utils import looked_in, read_json, sha256_file
from .prepare import MANIFEST, MANIFEST_FORMAT

_MANIFEST_KEYS = ("objective", "seq_len", "dtype", "vocab_size", "tokenizer_vocab_size", "special_ids",
                  "tokenizer_file", "splits")


class DamagedDataset(DataError):
    """A prepared dataset whose files do not match its manifest, or whose manifest is damaged.
    ``problem`` says what is wrong without the advice, for callers that act on it themselves
    (prepare rebuilds such a dataset)."""

    def __init__(self, problem: str, advice: str = "prepare the data again") -> None:
        super().__init__(f"{problem}; {advice}")
        self.problem = problem


class SequenceView:
    """An indexable ``[N, seq_len]`` view over one split's memory-mapped shards.

    ``view[i]`` is one sequence, ``view[indices]`` (an integer array) a stacked copy; rows are
    numpy arrays of the stored dtype.
    """

    def __init__(self, folder: Path, shards: list[dict], seq_len: int, dtype: np.dtype):
        self.seq_len = seq_len
        self.dtype = dtype
        self._maps = []
        for shard in shards:
            path = folder / shard["file"]
            rows = int(shard["sequences"])
            expected = rows * seq_len * dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise DamagedDataset(f"{path}: missing or truncated shard (expected {expected} bytes)")
            self._maps.append(np.memmap(path, dtype=dtype, mode="r", shape=(rows, seq_len)))
        self._starts = np.cumsum([0] + [len(m) for m in self._maps])

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.seq_len)

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            i = int(index) + (len(self) if index < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"sequence {index} out of range for {len(self)}")
            s = int(np.searchsorted(self._starts, i, side="right")) - 1
            return np.asarray(self._maps[s][i - self._starts[s]])
        if isinstance(index, slice):
            index = np.arange(len(self))[index]
        idx = np.asarray(index, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sequence index out of range for {len(self)}")
        out = np.empty((len(idx), self.seq_len), dtype=self.dtype)
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1
        for s in np.unique(shard_of):
            sel = shard_of == s
            out[sel] = self._maps[s][idx[sel] - self._starts[s]]
        return out


def tokenizer_matches(path: str | os.PathLike, manifest: dict[str, Any]) -> bool:
    """Whether the tokenizer file at ``path`` has the sha256 that ``manifest`` records
    (``tokenizer_sha256``: a dataset's manifest, or the copy a run keeps as data_manifest.json).

    A manifest that records none (older data) cannot tell a swapped tokenizer, so it passes.
    """
    recorded = manifest.get("tokenizer_sha256")
    return not recorded or sha256_file(path) == recorded


class TokenDataset:
    """A prepared dataset: manifest fields plus the shards of each split."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._views: dict[str, SequenceView] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> TokenDataset:
        """Open a folder written by :func:`cramkit.data.prepare.prepare`."""
        path = Path(path)
        mpath = path / MANIFEST
        if not path.exists():  # a misspelt or relative data.dir: "no manifest.json" sent users to prepare it
            raise DataError(f"{path}: no such folder{looked_in(path)}")
        if not mpath.is_file():
            raise DataError(f"{path}: not a prepared dataset (no {MANIFEST}; run cramkit prepare)")
        manifest = read_json(mpath, DataError)
        if manifest.get("format") != MANIFEST_FORMAT:
            raise DataError(f"{mpath}: not a cramkit token dataset manifest")
        # Every property below reads one of these; a KeyError later would be a traceback.
        missing = [key for key in _MANIFEST_KEYS if key not in manifest]
        if missing:
            raise DamagedDataset(f"{mpath}: damaged manifest (no {', '.join(missing)})")
        return cls(path, manifest)

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def vocab_size(self) -> int:
        """Vocabulary size padded to a multiple of 64 (the embedding rows a model should use)."""
        return int(self.manifest["vocab_size"])

    @property
    def tokenizer_vocab_size(self) -> int:
        """Real tokens in the tokenizer (ids at or above this are padding rows)."""
        return int(self.manifest["tokenizer_vocab_size"])

    @property
    def objective(self) -> str:
        return self.manifest["objective"]

    @property
    def special_ids(self) -> dict[str, int | None]:
        return dict(self.manifest["special_ids"])

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest["tokenizer_file"]

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def _split(self, split: str) -> dict:
        try:
            return self.manifest["splits"][split]
        except KeyError:
            raise DataError(f"{self.path}: no split '{split}' (splits: {self.splits})") from None

    def num_sequences(self, split: str) -> int:
        return int(self._split(split)["sequences"])

    def sequences(self, split: str) -> SequenceView:
        """The memory-mapped ``[N, seq_len]`` sequences of ``split``."""
        if split not in self._views:
            info = self._split(split)
            self._views[split] = SequenceView(
                self.path, info["shards"], self.seq_len, np.dtype(self.manifest["dtype"])
            )
        return self._views[split]

    def load_tokenizer(self):
        """The ``tokenizers.Tokenizer`` saved with the data."""
        from .tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_path)

    def check_tokenizer(self) -> None:
        """The tokenizer file exists and is the one the shards were encoded with (its sha256 as
        the manifest records it), so a swapped or damaged tokenizer.json is caught before use."""
        path = self.tokenizer_path
        if not path.is_file():
            raise DamagedDataset(f"{path}: missing (the dataset's tokenizer)")
        if not tokenizer_matches(path, self.manifest):
            raise DamagedDataset(
                f"{path} is not the tokenizer this data was encoded with (its sha256 differs from "
                f"{self.path / MANIFEST}'s)", "restore it or prepare the data again"
            )

    def check_files(self) -> None:
        """The tokenizer and every split's shards are there and whole (by size; :meth:`verify`
        reads checksums) and the manifest's fields are of usable types: a
        :class:`DamagedDataset` names the first thing that is not. One sha256 of the tokenizer
        and a stat per shard."""
        try:
            self.check_tokenizer()
            for split in self.splits:
                self.sequences(split)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DamagedDataset(f"{self.path / MANIFEST}: damaged manifest ({type(exc).__name__}: {exc})") from None

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest (slow on big data)."""
        for split in self.splits:
            for shard in self._split(split)["shards"]:
                if sha256_file(self.path / shard["file"]) != shard["sha256"]:
                    raise DataError(f"{self.path / shard['file']}: sha256 does not match manifest")

    def __repr__(self) -> str:
        counts = {s: self.num_sequences(s) for s in self.splits}
        return f"TokenDataset({self.path}, objective={self.objective}, seq_len={self.seq_len}, {counts})"
