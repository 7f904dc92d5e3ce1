"""benchmarks/optimizers.py's report: runs from different GPUs are never merged into one row."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "optimizers.py"
_spec = importlib.util.spec_from_file_location("optimizers_bench", _path)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _record(optimizer, lr, loss, device):
    return {"optimizer": optimizer, "lr_key": "optim.lr", "lr": lr, "val_loss": loss, "steps": 10,
            "tokens": 100, "train_seconds": 15.0, "curve": [(0.0, 9.0), (15.0, loss)], "device": device}


def test_best_runs_are_kept_per_device_when_records_come_from_several():
    """Finishing an H100 sweep on an H200 used to pick one best per optimizer across both cards."""
    records = [_record("adamw", 1e-3, 6.5, "H100"), _record("adamw", 2e-3, 6.7, "H100"),
               _record("adamw", 1e-3, 6.4, "H200"), _record("lion", 1e-4, 6.6, "H200")]
    best = bench.best_per_optimizer(records)
    assert [(b["optimizer"], b["device"], b["lr"]) for b in best] == [
        ("adamw", "H200", 1e-3), ("adamw", "H100", 1e-3), ("lion", "H200", 1e-4)]
    table = bench.table(records)
    assert "| adamw [H100] | lr=0.001 | 6.500 | 0.001: 6.500, 0.002: 6.700 |" in table
    assert "| adamw [H200] | lr=0.001 | 6.400 | 0.001: 6.400 |" in table


def test_one_device_keeps_plain_names():
    records = [_record("adamw", 1e-3, 6.5, "H100"), _record("adamw", 2e-3, 6.4, "H100")]
    assert [b["lr"] for b in bench.best_per_optimizer(records)] == [2e-3]
    assert "| adamw | lr=0.002 | 6.400 |" in bench.table(records)


def test_a_run_cut_by_the_time_limit_is_no_optimizers_best_and_is_marked():
    """gpu_all.sh's limit stops the sweep's last run with SIGTERM (stop_reason "signal"): its
    loss, from a fraction of the budget, entered the table as that optimizer's result unmarked,
    and could be picked as the best LR over runs that trained for the whole budget."""
    full = _record("adamw", 1e-3, 6.5, "H100") | {"stop_reason": "budget"}
    cut = _record("adamw", 2e-3, 6.4, "H100") | {"stop_reason": "signal", "train_seconds": 4.2}
    alone = _record("lion", 1e-4, 7.9, "H100") | {"stop_reason": "signal", "train_seconds": 3.0}
    best = bench.best_per_optimizer([full, cut, alone])
    assert [(b["optimizer"], b["lr"]) for b in best] == [("adamw", 1e-3), ("lion", 1e-4)]
    table = bench.table([full, cut, alone])
    assert "| adamw | lr=0.001 | 6.500 | 0.001: 6.500, 0.002: 6.400 (cut at 4.2 s) |" in table
    assert "| lion | lr=0.0001 | 7.900 (cut at 3.0 s) |" in table
