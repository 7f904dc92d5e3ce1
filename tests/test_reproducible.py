"""The same command twice, in fresh processes, gives the same data, the same losses and the same
weights: what a user needs before comparing two runs that differ in one setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TIMINGS = {"elapsed", "tokens_per_s", "mfu", "memory_gb", "seconds", "time"}


def _pretrain(*roots: Path) -> list[Path]:
    """``cramkit pretrain demo`` on the embedded corpus, one process per root (at the same time,
    each with another hash seed), each preparing the data afresh into its own cache; a step
    budget, so that the schedule does not follow the clock."""
    procs = []
    for i, root in enumerate(roots):
        env = {**os.environ, "CRAMKIT_CACHE": str(root / "cache"), "PYTHONHASHSEED": str(i + 1),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
        args = ["pretrain", "demo", "budget=12steps", f"out_dir={root / 'runs'}", "name=run",
                "finetune_demo=false", "train.progress_bar=false", "train.tensorboard=false",
                "train.plots=false", "train.eval_every=0.5", "train.eval_batches=2"]
        procs.append(subprocess.Popen([sys.executable, "-m", "cramkit", *args], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
    finally:  # a timeout or a failed first run leaves no pretrain running on past the test
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return [root / "runs" / "run" for root in roots]


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def test_the_same_command_twice_trains_the_same_run(tmp_path):
    a, b = _pretrain(tmp_path / "a", tmp_path / "b")
    data_a, data_b = (next((tmp_path / x / "cache" / "data").iterdir()) for x in "ab")
    assert data_a.name == data_b.name  # the same fingerprint
    for name in ("tokenizer.json", "train-00000.bin", "val-00000.bin"):
        assert (data_a / name).read_bytes() == (data_b / name).read_bytes(), name
    records = _records(a)
    assert records == _records(b)
    assert sum(r["type"] == "eval" for r in records) >= 2 and records[-1]["step"] >= 10
    (ckpt_a,), (ckpt_b,) = ((run / "checkpoints").iterdir() for run in (a, b))
    wa, wb = load_file(ckpt_a / "model.safetensors"), load_file(ckpt_b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
