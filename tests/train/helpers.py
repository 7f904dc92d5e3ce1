"""Builders for tiny, fast pretraining configs used across trainer tests."""

from __future__ import annotations

from pathlib import Path

from cramkit.config import load_config


def tiny_config(data_dir: Path, out_dir: Path, *overrides: str, name: str = "run", arch: str = "bert"):
    preset = "tiny" if arch == "bert" else "tiny-gpt"
    base = [
        f"data.dir={data_dir}", f"out_dir={out_dir}", f"name={name}", f"model.preset={preset}",
        "model.vocab_size=512", "model.max_positions=64", "train.budget=8steps", "train.batch_size=8",
        "train.micro_batch=4", "train.eval_every=0", "train.eval_batches=2", "train.log_every=1",
        "train.progress_bar=false", "train.tensorboard=false", "train.device=cpu", "finetune_demo=false",
        "optim.lr=3e-3", "objective.name=auto",
    ]
    return load_config("demo", base + list(overrides))
