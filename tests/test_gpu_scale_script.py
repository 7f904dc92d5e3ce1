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
    monkeypatch.setattr(gpu_scale, "DEPTHS", [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 24, 28, 32])
    seen = []
    best = gpu_scale.largest_gpu_only([], lambda: 100.0, lambda b, d, r: seen.append((d, dict(b or {}), r)))
    assert (best["layers"], best["next_failed"]) == (12, 14)
    assert [d for d, _, _ in seen] == [14, 6, 10, 12]  # every probe reported, in order
    assert seen[1][1]["layers"] == 6 and seen[1][1]["next_failed"] == 14  # the best so far, saved


def test_offload_search_reports_the_failure_that_ends_it(monkeypatch):
    monkeypatch.setattr(gpu_scale, "run_probe", lambda h, layers, *a, **k: (
        {"params": layers, "tokens_per_s": 1.0, "peak_gb": 1.0} if layers < 32 else {"error": "killed (host memory)"}))
    seen = []
    best = gpu_scale.largest_offload([], lambda: 1000.0, [24, 32], lambda b, d, r: seen.append((d, r)))
    assert (best["layers"], best["next_failed"]) == (24, 32)
    assert [d for d, _ in seen] == [24, 32] and seen[-1][1] == {"error": "killed (host memory)"}


def test_every_probe_carries_the_memory_estimate_even_when_it_fails(monkeypatch):
    monkeypatch.setattr(gpu_scale, "_run_probe", lambda *a, **k: {"error": "OOM"})
    at_4, at_8 = (gpu_scale.run_probe(1024, n, ["memory.activation_checkpointing=full"], 16, 2) for n in (4, 8))
    assert at_4["error"] == "OOM" and 0 < at_4["estimate_gb"] < at_8["estimate_gb"]
    offload = ["memory.offload_optimizer=true", "parallel.strategy=fsdp"]
    # Offloading moves parameters, gradients and optimizer state to the host: far less estimated.
    assert gpu_scale.run_probe(1024, 8, offload, 16, 2)["estimate_gb"] < at_8["estimate_gb"] / 2


def _fits_up_to(limit, error="OOM"):
    def fake(hidden, layers, switches, micro, steps, timeout=240):
        return {"params": layers, "tokens_per_s": 1.0, "peak_gb": 1.0} if layers <= limit else {"error": error}
    return fake


def test_a_search_that_reaches_the_end_of_its_list_says_so_rather_than_naming_a_failure(monkeypatch):
    monkeypatch.setattr(gpu_scale, "DEPTHS", [2, 4, 8, 16])
    monkeypatch.setattr(gpu_scale, "run_probe", _fits_up_to(100))
    best = gpu_scale.largest_gpu_only([], lambda: 100.0)
    assert best["layers"] == 16 and "next_failed" not in best and best["stopped"] == "end of the list"


def test_a_probe_cut_by_time_ends_the_search_without_counting_as_too_large(monkeypatch):
    """A timeout used to set the upper bound: "24 trains, 28 failed" when 28 fits."""
    monkeypatch.setattr(gpu_scale, "DEPTHS", [2, 4, 8, 16, 32])
    calls = []

    def fake(hidden, layers, switches, micro, steps, timeout=240):
        calls.append(layers)
        return {"error": "timeout after 240 s"} if layers == 16 else {"params": layers, "tokens_per_s": 1.0,
                                                                        "peak_gb": 1.0}
    monkeypatch.setattr(gpu_scale, "run_probe", fake)
    best = gpu_scale.largest_gpu_only([], lambda: 100.0)
    assert calls == [8, 16] and best["layers"] == 8
    assert "next_failed" not in best and best["stopped"] == "out of time"
    # With less left than a probe needs, none is started at all.
    calls.clear()
    assert gpu_scale.largest_gpu_only([], lambda: 10.0) is None and calls == []


def test_an_offload_depth_whose_state_would_not_fit_the_host_is_not_started(monkeypatch):
    started = []
    monkeypatch.setattr(gpu_scale, "run_probe", lambda h, layers, *a, **k: started.append(layers) or {
        "params": layers, "tokens_per_s": 1.0, "peak_gb": 1.0})
    host = gpu_scale.host_state_gb(32) / 0.9 + 1  # room for 32 blocks' state, not for 40
    best = gpu_scale.largest_offload([], lambda: 1000.0, [32, 40], host_gb=host)
    assert started == [32] and best["layers"] == 32 and "next_failed" not in best
    assert best["stopped"] == "40 layers not started: host memory"


def test_the_one_rank_fsdp_probe_is_a_direct_child_not_a_torchrun_worker(monkeypatch):
    """torchrun starts its worker in a session of its own: a timeout killed torchrun and left the
    worker holding GPU and pinned host memory for the next probe."""
    seen = {}

    def fake_run(args, **kw):
        seen.update(args=args, env=kw["env"])
        raise gpu_scale.subprocess.TimeoutExpired(args, kw["timeout"])
    monkeypatch.setattr(gpu_scale.subprocess, "run", fake_run)
    r = gpu_scale._run_probe(64, 2, ["memory.offload_optimizer=true", "parallel.strategy=fsdp"], 4, 2, 60)
    assert r == {"error": "timeout after 60 s"}
    assert "torch.distributed.run" not in seen["args"] and seen["args"][1].endswith("gpu_scale.py")
    assert seen["env"]["WORLD_SIZE"] == "1" and seen["env"]["RANK"] == "0" and "MASTER_PORT" in seen["env"]


def test_the_table_gives_an_exact_size_only_when_the_next_one_failed():
    """A search that found a failure, then ran out of time between, read "largest 16, next 64
    failed" although 32 was never measured."""
    cells = gpu_scale.largest_cells
    assert cells({"params": 4e9, "layers": 24, "next_failed": 28}) == ("4.00 B", "28 layers failed")
    assert cells({"params": 4e9, "next_failed": 64, "stopped": "out of time"}) == (
        "≥ 4.00 B", "64 layers failed; stopped: out of time")
    assert cells({"params": 4e9, "stopped": "end of the list"}) == ("≥ 4.00 B", "stopped: end of the list")


def test_switch_cost_ratios_divide_by_the_same_workload_without_the_switch():
    """The "× none" column divided the compiled FP8 rows and the hidden-2048 ones by the eager
    768 × 16 row: compile, shape and batch effects mixed into the switch's cost."""

    assert gpu_scale.reference_row("ac-full") == "none"
    for name, hidden, layers, switches, micro in gpu_scale.FP8_PAIRS:
        if "fp8" in switches:
            ref = next(p for p in gpu_scale.FP8_PAIRS if p[0] == gpu_scale.reference_row(name))
            assert ref[1:3] == (hidden, layers) and ref[4] == micro and ref[3] == ["compile"]
        else:
            assert gpu_scale.reference_row(name) == name  # no ratio of its own


def test_largest_model_tokens_per_s_measured_beside_the_glue_control_are_withheld():
    """gpu_all.sh part 6 runs the GLUE control on the same GPU as the largest-model searches;
    their table printed tokens/s as if each switch had the GPU to itself."""
    best = {"hidden": 4096, "layers": 8, "params": 1.4e9, "tokens_per_s": 12345.0, "peak_gb": 60.0,
            "estimate_gb": 61.0, "host_peak_gb": 9.0, "next_failed": 12}
    results = {"largest": {"nothing": best}, "largest_probes": {"nothing": [{"layers": 8, **best}]}}
    assert "| 12,345 |" in gpu_scale.largest_tables(results)
    shared = gpu_scale.largest_tables({**results, "largest_shared_with": "the GLUE control"})
    assert shared.startswith("The searches shared the GPU with the GLUE control")
    assert "12,345" not in shared and "| shared GPU |" in shared
