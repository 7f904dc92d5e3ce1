"""Helpers for the data-pipeline tests: synthetic corpora, small configs, shared-data paths."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cramkit.data.config import PrepareConfig

# tests/data/conftest.py -> parents[2] is the checkout; shared/ lives beside it.
SHARED_DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()
ENWIKI_TRAIN0 = SHARED_DATA / "pretrain" / "enwiki-2015" / "train-00.txt.xz"

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "du", "an", "or", "el"]


def synthetic_docs(n_docs: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English documents (title line + paragraph lines)."""
    rng = random.Random(seed)
    words = sorted({"".join(rng.choices(_SYLLABLES, k=rng.randint(1, 3))) for _ in range(400)})
    docs = []
    for d in range(n_docs):
        lines = [f"Title {d} {rng.choice(words).capitalize()}"]
        for _ in range(rng.randint(1, 4)):
            sentences = []
            for _ in range(rng.randint(1, 5)):
                sent = " ".join(rng.choices(words, k=rng.randint(3, 14)))
                sentences.append(sent.capitalize() + rng.choice([".", ".", "!", "?"]))
            lines.append(" ".join(sentences))
        docs.append("\n".join(lines))
    return docs


def write_corpus(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def small_cfg(sources, **over) -> PrepareConfig:
    base = dict(
        sources=[str(s) for s in sources],
        vocab_size=256,
        min_frequency=1,
        seq_len=32,
        val_fraction=0.05,
        ordering="source",
    )
    base.update(over)
    return PrepareConfig.from_dict(base)


def require_shared(path: Path = SHARED_DATA) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path}: the project's shared data folder is not beside this checkout")
    return path
