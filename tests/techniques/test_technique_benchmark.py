"""The GPU techniques benchmark runs end to end in --smoke mode, and reads eval logs right."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_path = Path(__file__).resolve().parents[2] / "benchmarks" / "techniques_gpu.py"
_spec = importlib.util.spec_from_file_location("techniques_gpu", _path)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_reach_interpolates_between_evaluations():
    evals = [{"val_loss": 8.0, "elapsed": 0.0, "flops": 0.0},
             {"val_loss": 6.0, "elapsed": 10.0, "flops": 100.0},
             {"val_loss": 4.0, "elapsed": 20.0, "flops": 300.0}]
    assert bench.reach(evals, 5.0, "elapsed") == pytest.approx(15.0)
    assert bench.reach(evals, 5.0, "flops") == pytest.approx(200.0)
    assert bench.reach(evals, 8.5, "elapsed") == 0.0
    assert bench.reach(evals, 3.0, "elapsed") is None


def test_smoke_run_prints_a_table_and_writes_json(tiny_mlm_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    report = bench.main(["--smoke", "--data", str(tiny_mlm_data), "--work", str(tmp_path),
                         "--budget", "4steps"])
    assert set(report["runs"]) == {"baseline", "pld", "stacking", "vcycle", "seqwarmup"}
    assert all("error" not in r for r in report["runs"].values()), report["runs"]
    text = capsys.readouterr().out
    assert "| baseline |" in text and "| vcycle |" in text
    saved = json.loads((tmp_path / "out" / "techniques.json").read_text())
    assert saved["target_val_loss"] == report["runs"]["baseline"]["final_val_loss"]
    assert saved["complete"]
    # One line per run, appended as each ends (a call cut at its time limit keeps them).
    lines = (tmp_path / "out" / "techniques_records.jsonl").read_text().splitlines()
    assert [json.loads(line)["run"] for line in lines] == list(report["runs"])


def test_a_failing_run_is_saved_at_once_and_the_rest_go_on(tiny_mlm_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    seen = []

    def fake(name, overrides):
        # Each earlier run is already on disk when the next one starts.
        seen.append(len((tmp_path / "out" / "techniques_records.jsonl").read_text().splitlines())
                    if (tmp_path / "out" / "techniques_records.jsonl").exists() else 0)
        if name.startswith("pld"):
            raise RuntimeError("CUDA out of memory (simulated)")
        return {"final_val_loss": None, "evals": [], "tokens_per_s": None, "tokens": None}

    monkeypatch.setattr(bench, "run_one", fake)
    report = bench.main(["--smoke", "--data", str(tiny_mlm_data), "--work", str(tmp_path),
                         "--runs", "pld,baseline,vcycle"])
    assert seen == [0, 1, 2]
    # The file names the versions it was measured with, not only the commit.
    saved = json.loads((tmp_path / "out" / "techniques.json").read_text())
    assert saved["torch"] and "torch" in saved["environment"]["packages"]
    assert report["runs"]["pld"] == {"error": "RuntimeError: CUDA out of memory (simulated)"}
    assert set(report["runs"]) == {"pld", "baseline", "vcycle"}


def test_table_prints_a_run_without_figures_instead_of_crashing():
    evals = [{"val_loss": 8.0, "elapsed": 0.0, "flops": 0.0}, {"val_loss": 6.0, "elapsed": 10.0, "flops": 9.0}]
    base = {"evals": evals, "final_val_loss": 6.0, "tokens_per_s": 100.0, "tokens": 1000}
    text = bench.table({"baseline": base, "pld": {"evals": evals, "final_val_loss": None}}, 6.0)
    assert "| pld | 10.0 | 9.000e+00 | 1.00x / 1.00x | - | - | - |" in text


def test_a_run_stopped_by_sigterm_ends_the_benchmark(tiny_mlm_data, tmp_path, monkeypatch):
    # The trainer turns SIGTERM (gpu_all.sh's `timeout`) into a clean stop of the run; the
    # benchmark used to go on with the next run, past the device call's limit.
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    started = []

    def fake(name, overrides):
        started.append(name)
        return {"final_val_loss": 7.0, "evals": [], "stop_reason": "signal"}

    monkeypatch.setattr(bench, "run_one", fake)
    report = bench.main(["--smoke", "--data", str(tiny_mlm_data), "--work", str(tmp_path)])
    assert len(started) == 1 and list(report["runs"]) == ["baseline"]
    line = json.loads((tmp_path / "out" / "techniques_records.jsonl").read_text())
    assert line["stop_reason"] == "signal"


def test_a_run_cut_by_the_time_limit_is_marked_in_the_table():
    """A cut run read as a full one: "not reached" or a final loss from a shorter run."""
    evals = [{"val_loss": 8.0, "elapsed": 0.0, "flops": 0.0}, {"val_loss": 6.0, "elapsed": 10.0, "flops": 9.0}]
    base = {"evals": evals, "final_val_loss": 6.0, "stop_reason": "budget"}
    cut = {"evals": evals[:1], "final_val_loss": 8.0, "stop_reason": "signal", "train_seconds": 4.0}
    text = bench.table({"baseline": base, "vcycle": cut}, 6.0)
    assert "| vcycle (cut by signal at 4 s) | not reached |" in text
    assert "| baseline | 10.0 |" in text


@pytest.mark.parametrize("scale", ["gpu", "cpu"], ids=["gpu-scale", "cpu-scale"])
def test_every_run_of_each_scale_is_a_valid_config(tiny_mlm_data, tmp_path, scale):
    """A bad override (or a V-cycle width the scale's shape cannot halve) fails before training,
    not minutes into a benchmark whose earlier runs already spent the time."""
    from cramkit.config import load_config
    from cramkit.models import build_model
    from cramkit.techniques import build_techniques

    args = bench.argparse.Namespace(scale=scale, budget="60s", compile=False, seed=3)
    common = bench.base_overrides(tiny_mlm_data, tmp_path, args)
    for name, extra in {"baseline": [], **bench.TECHNIQUE_RUNS}.items():
        cfg = load_config("crammed-bert", common + extra + [f"name={name}"])
        assert cfg.train.batch_ramp == 0 and cfg.seed == 3
        if scale == "cpu":
            assert (cfg.train.device, cfg.model.hidden, cfg.model.layers) == ("cpu", 128, 8)
            # The shapes the techniques build from it (the V-cycle's coarse level, stacking's
            # shallow start) exist; a ConfigError here would come minutes into the benchmark.
            model_cfg = cfg.model
            for t in build_techniques(cfg.techniques, cfg.technique):
                model_cfg = t.configure_model(model_cfg)
            build_model(model_cfg)


def test_smoke_and_cpu_are_two_scales(tmp_path):
    with pytest.raises(SystemExit, match="choose one"):
        bench.main(["--smoke", "--cpu", "--work", str(tmp_path)])
