"""benchmarks/profile_step.py: its --smoke mode on the CPU, and its sync and kernel bookkeeping."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "profile_step.py"


def _script():
    spec = importlib.util.spec_from_file_location("profile_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_mode_writes_trace_and_summary(tmp_path):
    ps = _script()
    assert ps.main(["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "profile-crammed-bert.json").read_text())
    assert (tmp_path / "trace-crammed-bert.json.gz").stat().st_size > 0
    prof = result["profile"]
    assert prof["steps"] == 2 and prof["step_ms_wall"] > 0 and prof["top_kernels"]
    assert result["fused_optimizer"] and not result["syncs"]["measurable"]
    assert len(result["syncs"]["per_step"]) == 4  # every sync-counting step was closed


def test_sync_counting_separates_logging_steps():
    ps = _script()

    def warned(n):
        return [warnings.WarningMessage(ps.SYNC_WARNING, UserWarning, "trainer.py", 7) for _ in range(n)]

    # Steps 8..11 with log_every=2: steps 9 and 11 end in a log record (the loss is read there).
    s = ps.sync_summary([warned(0), warned(2), warned(1), warned(2)], 8, 2, True)
    assert s["logging_steps"] == [1, 3] and s["steady_state_total"] == 1
    assert s["sources"] == {"trainer.py:7": 5}


def test_kernel_categories():
    ps = _script()
    assert ps.category("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN") == "matmul"
    assert ps.category("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert ps.category("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>") == "attention"
    assert ps.category("triton_per_fused_native_layer_norm_0") == "triton-fused"
    assert ps.category("void at::native::(anonymous namespace)::fused_adamw_kernel") == "optimizer+clip"
    assert ps.category("Memcpy HtoD (Pinned -> Device)") == "copies"
    assert ps.category("ncclDevKernel_AllReduce_Sum_f32_RING_LL") == "communication"


def test_a_failing_model_is_recorded_and_the_next_still_runs(tmp_path, monkeypatch):
    ps = _script()

    def fake(name, args, out, device):
        if name == "crammed-bert":
            raise RuntimeError("CUDA out of memory (simulated)")
        return {"model": name, "syncs": {"measurable": False, "steady_state_total": 0}}

    monkeypatch.setattr(ps, "profile_model", fake)
    assert ps.main(["--smoke", "--models", "crammed-bert,gpt-small", "--out", str(tmp_path)]) == 1
    saved = json.loads((tmp_path / "profile-summary.json").read_text())
    assert saved == [{"model": "gpt-small", "syncs": {"measurable": False, "steady_state_total": 0}},
                     {"model": "crammed-bert", "error": "RuntimeError: CUDA out of memory (simulated)"}]
