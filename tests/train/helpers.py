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


def interrupted_copy(run: Path, copy: Path, step: int) -> Path:
    """A copy of ``run`` as if it had been stopped right after its step-``step`` checkpoint."""
    import shutil

    from cramkit.train import checkpoint as ckpt

    shutil.copytree(run, copy)
    kept = [p for p in ckpt.list_checkpoints(copy) if p.name == f"step-{step:08d}"]
    if not kept:
        raise AssertionError(f"{run} has no checkpoint at step {step}")
    for path in ckpt.list_checkpoints(copy):
        if path not in kept:
            shutil.rmtree(path)
    (copy / "metrics.jsonl").write_text("")
    return copy
