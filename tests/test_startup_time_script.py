"""benchmarks/startup_time.py: one start of this checkout, its table and JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "startup_time.py"
_spec = importlib.util.spec_from_file_location("startup_time_bench", _path)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_one_start_is_timed_and_tabled(tmp_path, capsys):
    out = tmp_path / "startup.json"
    assert bench.main(["--runs", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["seconds"]) == ["this"] and 0 < result["seconds"]["this"][0] < 120
    table = capsys.readouterr().out
    assert "| this | " in table and " | 1.00 | " in table
    with pytest.raises(SystemExit, match="expected LABEL=PATH"):
        bench.main(["--src", f"nowhere={tmp_path}"])
