"""Tiny pretraining runs shared by the optimizer and initialisation tests."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from train.helpers import interrupted_copy

from cramkit.config import load_config
from cramkit.train import checkpoint as ckpt
from cramkit.train.run import pretrain, resume_config


def tiny_run_config(data_dir: Path, out_dir: Path, *overrides: str, name: str = "run"):
    """A 2-layer hidden-64 BERT on the tiny MLM data, CPU, fp32, no evaluation in the loop."""
    base = [
        f"data.dir={data_dir}", f"out_dir={out_dir}", f"name={name}", "model.preset=tiny",
        "model.vocab_size=512", "model.max_positions=64", "train.budget=10steps",
        "train.batch_size=8", "train.micro_batch=4", "train.eval_every=0", "train.eval_batches=2",
        "train.log_every=1", "train.progress_bar=false", "train.tensorboard=false",
        "train.device=cpu", "train.precision=fp32", "finetune_demo=false", "optim.lr=3e-3",
        "schedule.name=constant", "train.peak_tflops=1",
    ]
    return load_config("demo", base + list(overrides))


def train_losses(run_dir: Path) -> list[float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r.get("type") == "train"]


def weights(run_dir: Path) -> dict:
    return load_file(str(ckpt.latest_checkpoint(run_dir) / "model.safetensors"))


def train_and_resume(data_dir: Path, tmp_path: Path, *overrides: str) -> tuple[dict, dict, dict]:
    """Train 10 steps with a checkpoint at step 6 (dropout on, so RNG state matters too), then
    resume a copy cut back to that checkpoint. Returns the full run's summary (with its training
    losses under ``"losses"``) and both runs' final weights."""
    cfg = tiny_run_config(data_dir, tmp_path, "train.checkpoint_every=0.6", "model.dropout=0.1",
                          *overrides, name="full")
    summary = pretrain(cfg, say=lambda *_: None)
    full = tmp_path / "full"
    cut = interrupted_copy(full, tmp_path / "cut", 6)
    pretrain(resume_config(cut, []), run_dir=cut, resume=True, say=lambda *_: None)
    return {**summary, "losses": train_losses(full)}, weights(full), weights(cut)
