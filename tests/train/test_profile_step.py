"""benchmarks/profile_step.py: its --smoke mode on the CPU, and its sync and kernel bookkeeping."""

from __future__ import annotations

import gzip
import importlib.util
import json
import warnings
from pathlib import Path

import pytest

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
    with gzip.open(tmp_path / "trace-crammed-bert.json.gz", "rt") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "cpu_op"]
    # Training steps only: the final evaluation's forward (and the checkpoint) used to land in the
    # window, which stayed open until the run returned.
    forward = sum(e["name"] == "aten::_log_softmax" for e in events)
    backward = sum(e["name"] == "aten::_log_softmax_backward_data" for e in events)
    assert forward == backward == prof["steps"] * result["accumulation"]
    # The window holds no logging step, whose loss read would count as a host sync.
    window = result["profile_window"]
    assert len(window["steps"]) == prof["steps"] and not window["logging_steps"]
    assert all((s + 1) % window["log_every"] for s in window["steps"])


def test_profile_window_lies_between_logging_steps():
    ps = _script()
    # gpu_all.sh's defaults: syncs counted up to step 28, 5 profiled steps, a log every 10 steps
    # (steps 29, 39, ... read the loss). 29..33 would include step 29; 30..34 is the first clean run.
    assert ps.profile_window(28, 5, 10) == 30
    assert ps.profile_window(20, 9, 10) == 30  # 9 fit only in 30..38
    assert ps.profile_window(6, 2, 3) == 9  # --smoke: steps 8 and 11 log
    with pytest.raises(ValueError, match="--profile-steps"):
        ps.profile_window(28, 10, 10)


def test_the_probes_own_drain_is_not_counted_as_a_step_sync():
    ps = _script()
    kernel = {"cat": "kernel", "name": "sm90_xmma_gemm", "ts": 0, "dur": 900}
    steps = [{"cat": "user_annotation", "name": f"ProfilerStep#{i}", "ts": 1000 * (i - 1), "dur": 1000}
             for i in (1, 2)]
    drain = {"cat": "user_annotation", "name": ps.DRAIN, "ts": 1900, "dur": 100}
    syncs = [{"cat": "cuda_runtime", "name": "cudaDeviceSynchronize", "ts": 1910, "dur": 80},  # the drain's
             {"cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 500, "dur": 10}]  # a step's own
    s = ps.summarize({"traceEvents": [kernel, *steps, drain, *syncs]}, 2, 16, 1.0, 1.0)
    assert s["sync_api_calls_per_step"] == 0.5


def test_sync_counting_separates_logging_steps():
    ps = _script()

    def warned(n):
        return [warnings.WarningMessage(ps.SYNC_WARNING, UserWarning, "trainer.py", 7) for _ in range(n)]

    # Steps 8..11 with log_every=2: steps 9 and 11 end in a log record (the loss is read there).
    s = ps.sync_summary([warned(0), warned(2), warned(1), warned(2)], 8, 2, True)
    assert s["logging_steps"] == [1, 3] and s["steady_state_total"] == 1
    assert s["sources"] == {"trainer.py:7": 5}


# Kernel names as CUDA traces of cramkit steps spell them (shortened template arguments).
KERNELS = [
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas",
     "matmul"),
    ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_nn", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(Params)", "matmul"),
    ("triton_tem_fused_mm_0", "matmul"),
    ("triton_tem_fused_addmm_gelu_3", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, bf16>>(Params)",
     "attention"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64>>(Params)",
     "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<bf16>::Params)", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0", "attention"),
    # Inductor names fused kernels after the aten ops they absorb, casts (_to_copy) included.
    ("triton_poi_fused__to_copy_add_mul_0", "triton-fused"),
    ("triton_red_fused__to_copy_native_layer_norm_backward_7", "triton-fused"),
    ("triton_per_fused_native_layer_norm_0", "triton-fused"),
    ("triton_poi_fused_fill_zeros_like_2", "triton-fused"),
    ("Memcpy DtoH (Device -> Pinned)", "copies"),
    ("Memcpy HtoD (Pinned -> Device)", "copies"),
    ("Memset (Device)", "copies"),
    ("void at::native::elementwise_kernel<128, 2, at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)>",
     "copies"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1>>",
     "copies"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<TensorListMetadata<4>, "
     "FusedAdamMathFunctor<float, 4, ADAM_MODE::ADAMW, false>>", "optimizer+clip"),
    ("void at::native::multi_tensor_apply_kernel<TensorListMetadata<1>, LpNormFunctor<float, NormType::L2>>",
     "optimizer+clip"),
    ("void at::native::(anonymous namespace)::fused_adamw_kernel", "optimizer+clip"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "communication"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "other kernels"),
]


def test_kernel_categories():
    ps = _script()
    assert {name: ps.category(name) for name, _ in KERNELS} == dict(KERNELS)


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
