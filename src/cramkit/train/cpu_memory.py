"""The peak memory of a piece of CPU work: what ``torch.cuda.max_memory_allocated`` is on a GPU.

CPU tensors come from the C allocator, which keeps no peak; glibc's ``mallinfo2`` reports what
is handed out now, and sampling it after every operator (a dispatch mode) gives the peak. It
checks the memory estimate on a machine without a GPU (tests, ``benchmarks/memory_cpu.py``).

On a CPU without bf16 matrix kernels (AVX2 only: no AVX-512 BF16 or AMX), a bf16 matrix product
runs about 25 times slower than in fp32 (0.33 s for 512 x 768 x 768 on one thread), which made a
bf16 training step take a minute. There the measured products are computed in fp32 and rounded
to bf16: the same output tensor, and the fp32 copies are freed inside the operator, before the
sample that follows it, as a kernel's own workspace is.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def malloc_in_use() -> Callable[[], int] | None:
    """A function giving the bytes glibc's malloc has handed out (the main arena's chunks and
    the mmapped ones), or None off glibc 2.33+."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _Info

    def in_use() -> int:
        info = mallinfo2()
        return info.hblkhd + info.uordblks

    return in_use


_PRODUCTS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)


def _via_fp32(func, args, kwargs):
    """``func`` (mm or addmm) of bf16 tensors, computed in fp32 and rounded back."""
    wide = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
    return func(*wide, **kwargs).to(torch.bfloat16)


def _bf16_matrix_kernels() -> bool:
    """Whether bf16 matrix products run on oneDNN's bf16 kernels here. The query is an operator
    that only a build with oneDNN registers (elsewhere torch.ops.mkldnn has no such attribute,
    and peak_bytes failed for every dtype); with oneDNN switched off, products take the slow
    path too."""
    mkldnn = torch.backends.mkldnn
    if not (mkldnn.is_available() and mkldnn.enabled):
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class _PeakAfterEachOp(TorchDispatchMode):
    def __init__(self, in_use: Callable[[], int]):
        super().__init__()
        self.in_use, self.peak = in_use, 0
        self.widen = not _bf16_matrix_kernels()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.widen and func in _PRODUCTS and args[1].dtype == torch.bfloat16:  # mm(a, b), addmm(c, a, b)
            out = _via_fp32(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        self.peak = max(self.peak, self.in_use())
        return out


def peak_bytes(step: Callable[[], object]) -> int:
    """Bytes above the starting point at the highest point of ``step()``, sampled after every
    operator. ``step`` runs twice and the second run is measured, so that what the first one
    leaves for good (gradients, optimizer state, one-time imports) is part of the starting
    point, as after a training run's first step. One thread keeps every allocation where
    mallinfo2 sees it (the main arena, or mmapped); RuntimeError off glibc."""
    in_use = malloc_in_use()
    if in_use is None:
        raise RuntimeError("measuring CPU peak memory needs glibc's mallinfo2 (Linux, glibc 2.33 or later)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # The first run under a dispatch mode too: entering one the first time in a process
        # imports what the mode machinery needs (sympy and mpmath among them, about 25 MB of
        # interpreter memory that stays), which would otherwise count as the step's peak.
        with _PeakAfterEachOp(in_use):
            step()
        gc.collect()  # or a reference cycle collected during the step could lower the peak below the start
        peak = _PeakAfterEachOp(in_use)
        start = in_use()
        with peak:
            step()
        return peak.peak - start
    finally:
        torch.set_num_threads(threads)
