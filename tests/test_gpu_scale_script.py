"""benchmarks/gpu_scale.py: the largest-model searches report every probe as it ends."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_scale.py"
_spec = importlib.util.spec_from_file_location("gpu_scale", _path)
gpu_scale = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_scale)


def test_binary_search_reports_each_probe_and_ends_at_the_deepest_that_trains(monkeypatch):
    def fake(hidden, layers, switches, micro, steps, timeout=240):
        return {"params": layers, "tokens_per_s": 1.0, "peak_gb": 1.0} if layers <= 12 else {"error": "OOM"}

    monkeypatch.setattr(gpu_scale, "run_probe", fake)
    seen = []
    best = gpu_scale.largest_gpu_only([], lambda: 100.0, lambda b, d, r: seen.append((d, dict(b or {}), r)))
    assert (best["layers"], best["next_failed"]) == (12, 14)
    assert [d for d, _, _ in seen] == [14, 6, 10, 12]  # every probe reported, in order
    assert seen[1][1]["layers"] == 6 and seen[1][1]["next_failed"] == 14  # the best so far, saved


def test_offload_search_reports_the_failure_that_ends_it(monkeypatch):
    monkeypatch.setattr(gpu_scale, "run_probe", lambda h, layers, *a, **k: (
        {"params": layers, "tokens_per_s": 1.0, "peak_gb": 1.0} if layers < 32 else {"error": "killed (host memory)"}))
    seen = []
    best = gpu_scale.largest_offload([], lambda: 100.0, [24, 32], lambda b, d, r: seen.append((d, r)))
    assert (best["layers"], best["next_failed"]) == (24, 32)
    assert [d for d, _ in seen] == [24, 32] and seen[-1][1] == {"error": "killed (host memory)"}


def test_every_probe_carries_the_memory_estimate_even_when_it_fails(monkeypatch):
    monkeypatch.setattr(gpu_scale, "_run_probe", lambda *a, **k: {"error": "OOM"})
    at_4, at_8 = (gpu_scale.run_probe(1024, n, ["memory.activation_checkpointing=full"], 16, 2) for n in (4, 8))
    assert at_4["error"] == "OOM" and 0 < at_4["estimate_gb"] < at_8["estimate_gb"]
    offload = ["memory.offload_optimizer=true", "parallel.strategy=fsdp"]
    # Offloading moves parameters, gradients and optimizer state to the host: far less estimated.
    assert gpu_scale.run_probe(1024, 8, offload, 16, 2)["estimate_gb"] < at_8["estimate_gb"] / 2
