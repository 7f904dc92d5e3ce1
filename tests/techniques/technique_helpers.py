"""Shared helpers for the technique tests: tiny run configs, reading run outputs, and an
independent count of the FLOPs a training step ran."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from cramkit.objectives import IGNORE_INDEX
from cramkit.train import checkpoint as ckpt
from cramkit.train.trainer import Trainer

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


def charged_flops(run_dir: Path) -> list[float]:
    """The FLOPs the trainer charged each step (``flops`` in metrics.jsonl, step by step);
    needs ``train.log_every=1``."""
    records = metrics(run_dir)
    return [b["flops"] - a["flops"] for a, b in zip([{"flops": 0.0}, *records], records)]


# CPU attention is an op that FlopCounterMode does not count by default. It is counted as the
# model-FLOP convention that flops.py follows counts it: the two L x L products forward
# (FlopCounterMode's own formula), twice that backward. FlopCounterMode's formula for the GPU
# kernels' backward adds the recomputed scores, which are hardware FLOPs, not model FLOPs.
_aten = torch.ops.aten
CPU_ATTENTION = {
    _aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *a, **kw: 2 * sdpa_flop_count(q, k, v),
}


def counting_train_step(counted: list[float]):
    """``Trainer.train_step``, counting the matrix-product FLOPs of every forward and backward
    pass of the step (both of SAM's); each step's count goes into ``counted``.

    FLOP accounting charges the LM head for the expected share of targets (the masking rate); a
    step's random masks hold a few more or fewer, each ``6 * hidden * vocab`` (plus
    ``6 * hidden * hidden`` for a head transform) per pass: taken out of the count here.
    Activation checkpointing's recomputed forward passes are hardware FLOPs, which this counts
    and the accounting (model FLOPs) does not.
    """
    original = Trainer.train_step

    def train_step(self, batches):
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
            loss = original(self, batches)
        flops = float(counter.get_total_flops())
        cfg = self.raw_model.config
        if cfg.sparse_prediction:  # the targets this step's masks drew, against the expected share
            targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
            tokens = sum(b["input_ids"].numel() for b in batches)
            head = cfg.hidden * (cfg.vocab_size + (cfg.hidden if cfg.head_transform else 0))
            flops -= self.passes * 6 * head * (targets - self.cfg.objective.mask_rate * tokens)
        counted.append(flops)
        return loss

    return train_step
