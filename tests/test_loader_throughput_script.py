"""benchmarks/loader_throughput.py: the timing logic on a small dataset, without preparing enwiki."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "loader_throughput.py"
_spec = importlib.util.spec_from_file_location("loader_throughput_bench", _path)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_a_prepared_dataset_is_timed_and_compared_with_the_gpu_rate(tiny_mlm_data, tmp_path, capsys):
    out = tmp_path / "loader.json"
    assert bench.main(["--data", str(tiny_mlm_data), "--batch", "4", "--seconds", "0.2",
                       "--gpu-tokens-per-s", "1000", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["batches_timed"] > 0
    assert result["loader_tokens_per_s"] == result["loader_sequences_per_s"] * result["seq_len"]
    assert result["margin"] == result["loader_tokens_per_s"] / 1000
    assert "x the GPU's 1,000 tokens/s" in capsys.readouterr().out
