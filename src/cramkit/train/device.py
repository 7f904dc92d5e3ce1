"""Device, precision, peak throughput and automatic micro-batch sizing."""

from __future__ import annotations

import contextlib
import gc
import time
import warnings
from collections.abc import Callable

import torch

from ..errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:  # torch's own message lists twenty device types, most not ours
        dev = None
    # torch knows meta, mps, xpu...: cramkit runs on none of them (meta failed as a traceback at
    # the first .item(), mps where torch was built without it).
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device '{name}' is not understood; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        # Not "train.device": fine-tuning (device=) and bench (--device) come here too.
        raise ConfigError(f"device '{name}' needs CUDA, but no CUDA device is available")
    return dev


def resolve_precision(name: str, device: torch.device, setting: str = "train.precision") -> str:
    """``auto`` is bf16 on GPUs that support it, fp32 elsewhere (CPU autocast rarely pays off).
    ``setting``: where ``name`` came from, as the error names it (bench's is a flag)."""
    if name != "auto":
        if name == "fp16" and device.type != "cuda":
            raise ConfigError(f"{setting}=fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """The autocast context for a precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def measure_peak_flops(device: torch.device, precision: str) -> float:
    """FLOP/s of a large matmul: the MFU denominator. On CUDA an 8192³ bf16 matmul (also for
    fp32 runs, so that MFU is against the usual bf16 peak) or fp16 under fp16; on a CPU 512³ fp32.

    A measured peak is honest about what this device delivers (docs/references.md measured 794 TFLOP/s
    for bf16 on the H100, below the datasheet's 989).
    """
    if device.type == "cuda":
        n, dtype = 8192, torch.bfloat16 if precision in ("bf16", "fp32") else torch.float16
    else:
        n, dtype = 512, torch.float32
    # A private generator: measuring must not move the global RNG that dropout draws from.
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(2):
        a @ b
    sync(device)
    # The best of several short trials: a peak is what the device can do, and one trial that
    # shares the processor with something else (a CPU most of all) would understate it, and
    # overstate every MFU of the run (a README demo once printed "MFU 231%").
    reps, trials = (10, 3) if device.type == "cuda" else (5, 7)
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * reps / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_gb(device: torch.device) -> float | None:
    """Peak allocated device memory so far (GB); None (not measured) on CPU, where 0.0 would read
    as a measured zero."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
    return None


def auto_micro_batch(model, make_batch, device: torch.device, precision: str, cap: int, optimizer_bytes: float,
                     forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> int:
    """Largest power-of-two micro-batch that divides ``cap`` (the per-rank batch, which the
    micro-batch must divide) and whose forward+backward fits on the GPU.

    ``make_batch(n)`` returns a device batch of ``n`` sequences; ``optimizer_bytes`` is reserved
    for optimizer state not yet allocated; each forward runs inside ``forward_context()`` (the
    run's activation offloading, say), as training will. Cramming's pitfall — a small
    micro-batch silently under-filling a big GPU — is why this runs by default on GPU.
    """
    total = torch.cuda.get_device_properties(device).total_memory
    best, n = 0, 1
    while n <= cap and cap % n == 0:
        out = loss = None
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            with forward_context(), autocast(device, precision):
                out = model(**make_batch(n))
            loss, out = out.loss, None  # as the trainer does: no logits held through backward
            loss.backward()
            peak = torch.cuda.max_memory_allocated(device)
            del loss
            model.zero_grad(set_to_none=True)
            if peak + optimizer_bytes > 0.9 * total:
                break
            best = n
        except torch.OutOfMemoryError:
            out = loss = None  # free the failed trial's graph before the next command runs
            model.zero_grad(set_to_none=True)
            break
        n *= 2
    torch.cuda.empty_cache()
    # The run's logged peak memory starts here, not at the probe's largest (maybe failed) trial.
    torch.cuda.reset_peak_memory_stats(device)
    if best == 0:
        warnings.warn("not even one sequence fits in GPU memory; trying micro_batch=1 anyway", stacklevel=2)
        best = 1
    return best


def release_memory() -> None:
    """Free what a finished or failed run left behind before the next one in the same process:
    unreachable tensors (an out-of-memory error's traceback holds on to them), then the CUDA
    cache, so the next run starts from an empty device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
