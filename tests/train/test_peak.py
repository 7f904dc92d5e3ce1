"""The MFU denominator: a measured peak that one disturbed trial does not drag down."""

from __future__ import annotations

import torch

import cramkit.train.device as device_module


def test_peak_is_the_best_trial_not_a_disturbed_one(monkeypatch):
    """A trial that shares the processor with other work is slow; the peak must come from the
    undisturbed ones, or every MFU of the run is overstated by the same factor."""
    ticks = iter([0.0, 10.0] + [t for i in range(1, 20) for t in (100.0 * i, 100.0 * i + 1.0)])
    monkeypatch.setattr(device_module.time, "perf_counter", lambda: next(ticks))
    peak = device_module.measure_peak_flops(torch.device("cpu"), "fp32")
    # The first trial took 10 s, every other 1 s: the peak is the 1-second rate.
    assert peak == 2 * 512**3 * 5 / 1.0
