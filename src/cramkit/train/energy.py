"""GPU energy through NVML: the sustainability half of efficiency, reported per run.

NVML's total-energy counter (millijoules since the driver loaded; Volta and newer) is read at the
start and end of the run, so no sampling thread is needed. Unavailable without an NVIDIA GPU or
the ``nvidia-ml-py`` package; then the run summary says so instead of inventing a number.
"""

from __future__ import annotations

import torch


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
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
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
