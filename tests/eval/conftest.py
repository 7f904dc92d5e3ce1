"""Fixtures for evaluation tests: tiny run directories built on the fly (no pretraining)."""

from __future__ import annotations

import pytest

from .helpers import GLUE_DIR, make_run_dir, train_wordpiece


@pytest.fixture(scope="session")
def bbc_task():
    from cramkit.eval.tasks import load_task

    return load_task("bbc")


@pytest.fixture(scope="session")
def bbc_tokenizer(bbc_task):
    return train_wordpiece([e.text for e in bbc_task.train], vocab_size=1024)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, bbc_tokenizer):
    """A tiny crammed-BERT run directory (random weights) with a WordPiece tokenizer."""
    from cramkit.models.presets import preset_config

    cfg = preset_config("tiny", vocab_size=1024)
    return make_run_dir(tmp_path_factory.mktemp("run") / "tiny", cfg, bbc_tokenizer)


@pytest.fixture
def glue_dir():
    if not GLUE_DIR.is_dir():
        pytest.skip(f"shared GLUE data not found at {GLUE_DIR} (expected <repo>/../shared/data)")
    return GLUE_DIR
