"""`cramkit report`: reach interpolation, tables and JSON from real tiny runs, plots, bad input."""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
from train.helpers import tiny_config

from cramkit.cli import main
from cramkit.errors import RunError
from cramkit.report import build_report, load_run, load_runs, markdown, reach, write_report

# ------------------------------------------------------------------------------ interpolation

LOG = [
    {"val_loss": 8.0, "elapsed": 0.0, "tokens": 0, "flops": 0.0, "step": 0},
    {"val_loss": 6.0, "elapsed": 10.0, "tokens": 1000, "flops": 100.0, "step": 10},
    {"val_loss": 4.0, "elapsed": 20.0, "tokens": 3000, "flops": 300.0, "step": 20},
]


@pytest.mark.parametrize("key, expected", [("elapsed", 15.0), ("tokens", 2000.0), ("flops", 200.0),
                                           ("step", 15.0)])
def test_reach_interpolates_linearly_between_the_evaluations_around_the_crossing(key, expected):
    assert reach(LOG, 5.0, key) == expected


def test_reach_edge_cases():
    assert reach(LOG, 6.0) == 10.0  # exactly at an evaluation
    assert reach(LOG, 8.5) == 0.0  # already there at the first evaluation
    assert reach(LOG, 3.0) is None  # never reached
    assert reach([], 5.0) is None
    # The first crossing counts, not a later one after the loss rose again.
    bumpy = [{"val_loss": 8.0, "elapsed": 0.0}, {"val_loss": 5.5, "elapsed": 10.0},
             {"val_loss": 6.5, "elapsed": 20.0}, {"val_loss": 4.0, "elapsed": 30.0}]
    assert reach(bumpy, 6.0) == 8.0
    # A log without the field (written before it existed) gives no answer rather than a guess.
    assert reach([{"val_loss": 8.0, "elapsed": 0.0}, {"val_loss": 4.0, "elapsed": 1.0}], 5.0, "flops") is None
    # No line to follow from a non-finite loss: the evaluation that reached the target counts.
    assert reach([{"val_loss": math.nan, "elapsed": 0.0}, {"val_loss": 4.0, "elapsed": 7.0}], 5.0) == 7.0


# ------------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def runs(tiny_mlm_data, tmp_path_factory):
    """Two finished 12-step runs at different learning rates, and an unfinished copy of one."""
    from cramkit.train.run import pretrain

    out = tmp_path_factory.mktemp("runs")
    for name, lr in (("fast", "3e-3"), ("slow", "3e-4")):
        cfg = tiny_config(tiny_mlm_data, out, "train.budget=12steps", "train.eval_every=0.25",
                          f"optim.lr={lr}", name=name)
        pretrain(cfg, say=lambda *_: None)
    # As if killed after step 6: no summary, and the log stops mid-run.
    shutil.copytree(out / "fast", out / "killed")
    (out / "killed" / "summary.json").unlink()
    metrics = out / "killed" / "metrics.jsonl"
    kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= 6]
    metrics.write_text("\n".join(kept) + "\n")
    return out


def test_table_and_json_from_two_real_runs(runs, tmp_path):
    report = write_report([runs / "fast", runs / "slow"], tmp_path / "report")
    fast, slow = report["runs"]
    summaries = [json.loads((runs / n / "summary.json").read_text()) for n in ("fast", "slow")]
    assert report["target_val_loss"] == max(s["final_val_loss"] for s in summaries)
    for row, summary in zip((fast, slow), summaries):
        assert row["status"] == "budget" and row["recipe"] == "demo"
        assert row["steps"] == 12 and row["tokens"] == summary["tokens"]
        assert row["parameters"] == summary["parameters"] and row["mfu"] == summary["mfu"]
        assert row["final_val_loss"] == summary["final_val_loss"]
        # The target is the worst final loss, so both runs reach it, within their budget.
        assert 0 < row["to_target"]["tokens"] <= summary["tokens"]
        assert 0 < row["to_target"]["flops"] <= summary["flops"]
        assert 0 < row["to_target"]["time"] <= summary["train_seconds"]
    assert json.loads((tmp_path / "report" / "report.json").read_text()) == report
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| fast | budget | demo |" in table and "| slow | budget | demo |" in table
    assert f"Target validation loss {report['target_val_loss']:.4f}" in table
    assert "energy kWh" not in table  # no run measured energy (no GPU)
    assert report["notes"] == [] and "**Note:**" not in table  # one objective, one tokenizer


def test_runs_whose_losses_are_not_comparable_say_so(runs, tiny_clm_data, tmp_path):
    """A masked-LM loss next to a causal-LM one (or over another vocabulary) made a common target
    and 'time to target' without a word of warning."""
    from cramkit.train.run import pretrain

    pretrain(tiny_config(tiny_clm_data, tmp_path, "train.budget=4steps", name="gpt", arch="gpt"),
             say=lambda *_: None)
    report = write_report([runs / "fast", tmp_path / "gpt"], tmp_path / "report", axes=[])
    assert len(report["notes"]) == 2
    assert "different objectives (clm, mlm)" in report["notes"][0]
    assert "different tokenizers" in report["notes"][1]
    assert "**Note:** the runs train different objectives" in (tmp_path / "report" / "report.md").read_text()


def test_runs_that_average_validation_over_different_sequences_say_so(tiny_mlm_data, tmp_path):
    """train.eval_batches counts micro-batches: two runs of the same recipe with micro-batches 2
    and 4 averaged their losses over different prefixes of the validation split, silently."""
    from cramkit.train.run import pretrain

    for name, micro in (("small", 2), ("large", 4)):
        pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps", f"train.micro_batch={micro}",
                             "train.eval_batches=1", name=name), say=lambda *_: None)
    report = build_report(load_runs([tmp_path / "small", tmp_path / "large"]))
    assert report["notes"] == ["the runs average their validation losses over different numbers of sequences "
                               "(2, 4; train.eval_batches counts micro-batches: on the same data, "
                               "train.eval_batches=0 evaluates the whole split in every run)"]
    # A run from before summaries recorded the mask scheme: its losses used other masks.
    summary = json.loads((tmp_path / "small" / "summary.json").read_text())
    del summary["val_masks"], summary["val_sequences"]
    (tmp_path / "small" / "summary.json").write_text(json.dumps(summary))
    notes = build_report(load_runs([tmp_path / "small", tmp_path / "large"]))["notes"]
    assert len(notes) == 1 and notes[0].startswith("the runs drew their validation masks differently")


def test_causal_runs_record_no_mask_scheme_and_are_not_told_they_drew_masks(tiny_clm_data, tmp_path):
    """A causal run draws no validation masks: its summary labelled one, so a causal run from
    before the label was recorded was reported as having "drawn its masks differently"."""
    from cramkit.train.run import pretrain

    for name in ("old", "new"):
        pretrain(tiny_config(tiny_clm_data, tmp_path, "train.budget=2steps", name=name, arch="gpt"),
                 say=lambda *_: None)
    summary = json.loads((tmp_path / "new" / "summary.json").read_text())
    assert "val_masks" not in summary and summary["val_sequences"]
    old = tmp_path / "old" / "summary.json"
    old.write_text(json.dumps({k: v for k, v in json.loads(old.read_text()).items() if k != "val_masks"}))
    assert build_report(load_runs([tmp_path / "old", tmp_path / "new"]))["notes"] == []


def test_a_target_no_run_reaches_and_an_unfinished_run(runs, tmp_path):
    report = build_report(load_runs([runs / "fast", runs / "killed"]), target=0.5)
    fast, killed = report["runs"]
    assert fast["to_target"] == {"time": None, "tokens": None, "flops": None, "steps": None}
    assert killed["status"] == "unfinished" and killed["steps"] == 6
    assert killed["parameters"] is None  # only a summary records it
    evals = [json.loads(line) for line in (runs / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert killed["final_val_loss"] == [e for e in evals if e["type"] == "eval"][-1]["val_loss"]
    table = markdown({**report, "plots": [], "plots_skipped": None})
    assert "| killed | unfinished |" in table and "not reached" in table


def test_a_run_killed_before_its_first_evaluation_has_no_final_loss_and_sets_no_target(runs, tmp_path):
    """Its only evaluation is step 0's, of the untrained model: reported as its final loss, it
    became the default target (the worst final loss), which every run reached at 0."""
    shutil.copytree(runs / "fast", tmp_path / "early")
    (tmp_path / "early" / "summary.json").unlink()
    metrics = tmp_path / "early" / "metrics.jsonl"
    kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= 2]
    metrics.write_text("\n".join(kept) + "\n")
    report = build_report(load_runs([runs / "fast", tmp_path / "early"]))
    fast, early = report["runs"]
    assert early["status"] == "unfinished" and early["steps"] == 2 and early["final_val_loss"] is None
    assert report["target_val_loss"] == json.loads((runs / "fast" / "summary.json").read_text())["final_val_loss"]
    assert fast["to_target"]["tokens"] > 0 and early["to_target"]["tokens"] is None
    assert "| early | unfinished | demo | - | 2 |" in markdown({**report, "plots": [], "plots_skipped": None})


def test_plots_are_written_with_matplotlib(runs, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    report = write_report([runs / "fast", runs / "killed"], out, axes=["time", "flops", "steps"])
    assert report["plots"] == ["loss-vs-time.png", "loss-vs-flops.png", "loss-vs-steps.png"]
    assert report["plots_skipped"] is None
    for name in report["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries behind


def test_without_matplotlib_the_table_is_written_and_plots_are_skipped(runs, tmp_path, monkeypatch, capsys):
    # A None entry in sys.modules makes the import fail, as if the extra were not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "report"
    assert main(["report", str(runs / "fast"), str(runs / "slow"), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "plots skipped: matplotlib is not installed" in captured.err
    assert "Traceback" not in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]
    assert "Plots skipped: matplotlib is not installed" in (out / "report.md").read_text()


def test_cli_prints_the_table_or_the_json(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(runs / "fast"), str(runs / "slow"), "--out", str(out), "--x", "tokens"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("# cramkit run comparison") and "| fast |" in captured.out
    assert str(out / "report.md") in captured.err
    assert main(["report", str(runs / "fast"), str(runs / "slow"), "--out", str(out), "--format", "json",
                 "--target", "7.0"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["target_val_loss"] == 7.0 and printed["target_source"] == "given with --target"
    assert printed == json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("target", ["0", "-1"])
def test_a_target_no_loss_can_reach_is_refused(tmp_path, capsys, target):
    """--target -1 wrote a report whose every run had "not reached" the target."""
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--target", target]) == 2
    assert capsys.readouterr().err == (
        f"error: --target must be above 0 (a validation loss is a cross-entropy), got {float(target)}\n")
    assert not (tmp_path / "out").exists()


def test_same_named_runs_are_told_apart(runs, tmp_path):
    shutil.copytree(runs / "fast", tmp_path / "other" / "fast")
    names = [r.name for r in load_runs([runs / "fast", tmp_path / "other" / "fast", runs / "fast"])]
    assert len(set(names)) == 3 and names[1] == "other/fast"


# ------------------------------------------------------------------------------- bad input


def _broken_copy(runs, tmp_path, lines: list[str] | None = None):
    run = tmp_path / "broken"
    shutil.copytree(runs / "fast", run)
    if lines is not None:
        (run / "metrics.jsonl").write_text("".join(lines))
    return run


def test_bad_inputs_are_one_line_errors_naming_the_path_and_line(runs, tmp_path, capsys):
    good = (runs / "fast" / "metrics.jsonl").read_text().splitlines(keepends=True)
    cases = [
        (tmp_path / "missing", "is not a cramkit run directory (no such directory)"),
        (tmp_path, "is not a cramkit run directory (no config.json)"),
        (_broken_copy(runs, tmp_path / "a", []), "metrics.jsonl: no training or evaluation records"),
        (_broken_copy(runs, tmp_path / "b", good[:2] + ["{not json\n"] + good[2:]),
         "metrics.jsonl line 3: not valid JSON"),
        (_broken_copy(runs, tmp_path / "c", good[:1] + ['{"type": "eval", "step": 1}\n']),
         "metrics.jsonl line 2: eval record without a numeric 'tokens'"),
        (_broken_copy(runs, tmp_path / "d", good[:1] + ["[1, 2]\n"]),
         "metrics.jsonl line 2: expected a JSON object, got list"),
    ]
    for path, message in cases:
        assert main(["report", str(runs / "slow"), str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and str(path) in err, err
        assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # nothing is written when an input is bad
    run = _broken_copy(runs, tmp_path / "e")
    (run / "summary.json").write_text('{"steps": 12,\n "tokens": }')
    with pytest.raises(RunError, match=r"summary.json line 2: not valid JSON"):
        load_run(run)


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.json", "summary.json"])
def test_a_binary_run_file_is_a_one_line_error(runs, tmp_path, capsys, name):
    run = _broken_copy(runs, tmp_path / "run")
    (run / name).write_bytes(b'{"type": "train"}\n\xff\xfe\x00\x01')  # e.g. a disk error
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {run / name} line 2: not UTF-8 text (the file is damaged or binary)\n"
    assert not (tmp_path / "out").exists()


def test_a_truncated_last_line_of_a_killed_run_is_skipped_with_a_warning(runs, tmp_path):
    good = (runs / "fast" / "metrics.jsonl").read_text().splitlines(keepends=True)
    run = _broken_copy(runs, tmp_path, good + ['{"type": "train", "st'])
    with pytest.warns(UserWarning, match="ignoring a truncated last line"):
        loaded = load_run(run)
    assert len(loaded.train) + len(loaded.evals) == len(good)


def test_a_resumed_log_keeps_the_latest_record_of_each_step(runs, tmp_path):
    good = (runs / "fast" / "metrics.jsonl").read_text().splitlines(keepends=True)
    evals = [line for line in good if json.loads(line)["type"] == "eval"]
    # Resumed from the step-6 checkpoint after logging up to step 12: steps 9 and 12 come again.
    again = [json.dumps({**json.loads(line), "val_loss": 1.0}) + "\n"
             for line in evals if json.loads(line)["step"] > 6]
    run = _broken_copy(runs, tmp_path, good + again)
    loaded = load_run(run)
    steps = [e["step"] for e in loaded.evals]
    assert steps == sorted(set(steps)) and loaded.evals[-1]["val_loss"] == 1.0


def test_json_is_strict_even_for_a_diverged_run():
    from cramkit.report import as_json

    assert json.loads(as_json({"runs": [{"final_val_loss": math.nan, "to_target": {"time": 1.5}}]})) == {
        "runs": [{"final_val_loss": None, "to_target": {"time": 1.5}}]}


def test_reach_reads_a_null_loss_as_not_finite():
    """metrics.jsonl and benchmark stores hold a diverged evaluation's loss as null (strict JSON)."""
    from cramkit.report import reach

    evals = [{"elapsed": 0.0, "val_loss": None}, {"elapsed": 10.0, "val_loss": 5.0},
             {"elapsed": 20.0, "val_loss": None}, {"elapsed": 30.0, "val_loss": 3.0}]
    assert reach(evals, 5.5) == 10.0  # no line from a null loss: the evaluation that reached it
    assert reach(evals, 4.0) == 30.0
    assert reach(evals[:3], 4.0) is None


def test_a_summary_older_than_the_log_is_an_unfinished_run(runs, tmp_path):
    """A run resumed past its summary (a resume by an older cramkit left it there, and was
    killed) was reported with the old summary's status, steps and final loss."""
    shutil.copytree(runs / "fast", tmp_path / "resumed")
    metrics = tmp_path / "resumed" / "metrics.jsonl"
    last = [json.loads(line) for line in metrics.read_text().splitlines()][-1]
    later = {**last, "type": "eval", "step": 20, "val_loss": 1.25, "elapsed": last["elapsed"] + 1}
    metrics.write_text(metrics.read_text() + json.dumps(later) + "\n")
    row = build_report(load_runs([tmp_path / "resumed"]))["runs"][0]
    assert row["status"] == "unfinished" and row["steps"] == 20 and row["final_val_loss"] == 1.25


def test_runs_scored_on_other_validation_data_or_masks_say_so(runs, tmp_path):
    """Another sequence length of the same corpus and tokenizer, or another eval_mask_rate, made
    a common target without a note."""
    for name in ("other-data", "other-masks"):
        shutil.copytree(runs / "fast", tmp_path / name)
    manifest = json.loads((tmp_path / "other-data" / "data_manifest.json").read_text())
    manifest["splits"]["val"]["shards"][0]["sha256"] = "0" * 64
    (tmp_path / "other-data" / "data_manifest.json").write_text(json.dumps(manifest))
    config = json.loads((tmp_path / "other-masks" / "config.json").read_text())
    config["objective"]["eval_mask_rate"] = 0.25
    (tmp_path / "other-masks" / "config.json").write_text(json.dumps(config))
    assert build_report(load_runs([runs / "fast", tmp_path / "other-data"]))["notes"] == [
        "the runs score different validation data (their data manifests list other validation shards: "
        "another corpus, sequence length or preparation): their losses are not comparable"]
    assert build_report(load_runs([runs / "fast", tmp_path / "other-masks"]))["notes"] == [
        "the runs mask different shares of the validation tokens (objective.eval_mask_rate 0.15, 0.25): "
        "a masked-LM loss depends on it"]
    assert build_report(load_runs([runs / "fast", runs / "slow"]))["notes"] == []
