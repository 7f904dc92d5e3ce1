"""Shared helpers for the technique tests: tiny run configs and reading run outputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from safetensors.torch import load_file

from cramkit.train import checkpoint as ckpt

_spec = importlib.util.spec_from_file_location(
    "_cramkit_train_helpers", Path(__file__).resolve().parents[1] / "train" / "helpers.py"
)
_train_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_train_helpers)
tiny_config = _train_helpers.tiny_config
interrupted_copy = _train_helpers.interrupted_copy


def quiet(*_):
    return None


def weights(run_dir: Path) -> dict:
    return load_file(str(ckpt.latest_checkpoint(run_dir) / "model.safetensors"))


def metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]
