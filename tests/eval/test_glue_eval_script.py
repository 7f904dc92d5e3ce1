"""benchmarks/glue_eval.py: --records appends each task's scores as soon as it is scored."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

_path = Path(__file__).resolve().parents[2] / "benchmarks" / "glue_eval.py"
_spec = importlib.util.spec_from_file_location("glue_eval", _path)
glue_eval = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(glue_eval)


def _task(root: Path, name: str, labels: tuple[str, str]) -> None:
    rows = ["index\tsentence1\tsentence2\tlabel"] + [
        f"{i}\tthe film {i}\tthe match\t{labels[i % 2]}" for i in range(12)
    ]
    (root / name).mkdir(parents=True)
    (root / name / "train.tsv").write_text("\n".join(rows) + "\n")
    (root / name / "dev.tsv").write_text("\n".join(rows[:5]) + "\n")


def test_records_hold_each_task_then_the_summary(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    _task(tmp_path / "glue", "RTE", ("not_entailment", "entailment"))
    _task(tmp_path / "glue", "WNLI", ("0", "1"))
    records = tmp_path / "out" / "glue_random.jsonl"
    argv = [str(run), "--data", str(tmp_path / "glue"), "--seeds", "1", "--inits", "random",
            "--records", str(records), "progress=false", "device=cpu", "epochs=1", "pooling=mean"]
    assert glue_eval.main(argv) == 0
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert [(x["init"], x.get("task")) for x in lines] == [("random", "rte"), ("random", "wnli"), ("random", None)]
    assert "scores" in lines[0] and "summary" in lines[-1]
