"""GPU energy through NVML: the sustainability half of efficiency, reported per run.

NVML's total-energy counter (millijoules since the driver loaded; Volta and newer) is read at the
start and end of the run, so no sampling thread is needed. Unavailable without an NVIDIA GPU or
the ``nvidia-ml-py`` package; then the run summary says so instead of inventing a number.
"""

from __future__ import annotations

import os

import torch


def _nvml_index(cuda_index: int) -> int:
    """NVML's index of CUDA device ``cuda_index``. NVML numbers every GPU of the machine and
    ignores ``CUDA_VISIBLE_DEVICES``: under ``CUDA_VISIBLE_DEVICES=3`` (a Slurm job's GPU) CUDA's
    device 0 is NVML's 3, and reading NVML's 0 would meter another job's GPU."""
    try:  # torch maps it (integer lists, UUIDs, MIG); private, hence the fallback
        return int(torch.cuda._get_nvml_device_index(torch.device("cuda", cuda_index)))
    except Exception:
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if cuda_index < len(visible) and visible[cuda_index].isdigit():
            return int(visible[cuda_index])
        return cuda_index


class EnergyMeter:
    """Energy used by this process's GPU between construction and :meth:`kwh`."""

    def __init__(self, device: torch.device) -> None:
        self._handle = None
        self._start = 0
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(_nvml_index(index))
            self._start = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except Exception:  # no NVML, an old GPU, or a container without the counter
            self._handle = None

    @property
    def available(self) -> bool:
        return self._handle is not None

    def kwh(self) -> float | None:
        """kWh since construction; None when unavailable. Read at every checkpoint, so a driver
        hiccup must not end the run: a failed read is "not measured", and stays so."""
        if self._handle is None:
            return None
        try:
            import pynvml

            millijoules = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) - self._start
        except Exception:
            self._handle = None
            return None
        return millijoules / 3.6e9
