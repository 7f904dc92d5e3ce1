"""benchmarks/memory_cpu.py: its smoke run measures, estimates and tabulates one tiny case."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from cramkit.train.cpu_memory import malloc_in_use

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_cpu.py"
_spec = importlib.util.spec_from_file_location("memory_cpu_bench", _path)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.skipif(malloc_in_use() is None, reason="the CPU peak needs glibc's mallinfo2")
def test_smoke_run_writes_a_row_per_case(tmp_path, capsys):
    assert bench.main(["--smoke", "--json", str(tmp_path / "m.json")]) == 0
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert [(r["precision"], r["checkpointing"]) for r in rows] == [
        ("fp32", "none"), ("fp32", "full"), ("bf16", "none"), ("bf16", "full")]
    for r in rows:
        # (At this size the peaks are a few MB and allocator noise: no comparison between them.)
        assert r["measured_mb"] > 0 and r["held_output_mb"] > 0
        assert r["ratio"] == pytest.approx(r["estimate_mb"] / r["measured_mb"])
    assert "| crammed-bert (2 layers, vocab 512) | 2 × 32 | fp32 | none |" in capsys.readouterr().out


def test_unknown_presets_are_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        bench.main(["--presets", "crammed-bert,bert-huge"])
    assert exc.value.code == 2
