"""Fixtures for the data-pipeline tests: synthetic corpora, a tiny prepared dataset, shared data."""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest
from data_helpers import ENWIKI_TRAIN0, require_shared, small_cfg, synthetic_docs, write_corpus

from cramkit.data.prepare import prepare


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("synth") / "corpus.txt", synthetic_docs(300))


@pytest.fixture(scope="session")
def synth_mlm(tmp_path_factory, synth_corpus) -> Path:
    """MLM dataset from the synthetic corpus: a few hundred sequences of 32 tokens."""
    out = tmp_path_factory.mktemp("prepared") / "mlm"
    return prepare(small_cfg([synth_corpus]), out, progress=False)


@pytest.fixture(scope="session")
def enwiki_slice(tmp_path_factory) -> Path:
    """The first 200 documents of enwiki train-00 written to a temporary .txt file."""
    require_shared(ENWIKI_TRAIN0)
    docs, cur = [], []
    with lzma.open(ENWIKI_TRAIN0, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                cur.append(line.rstrip("\n"))
            elif cur:
                docs.append("\n".join(cur))
                cur = []
                if len(docs) == 200:
                    break
    return write_corpus(tmp_path_factory.mktemp("enwiki") / "enwiki-200.txt", docs)
