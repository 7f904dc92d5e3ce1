"""benchmarks/gpu_core.py's time-to-quality line (issue 9): what it compares, and when it refuses."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_core.py"
_spec = importlib.util.spec_from_file_location("gpu_core", _path)
gpu_core = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_core)


def _run(curve, stop="budget"):
    evals = [{"elapsed": t, "val_loss": loss, "flops": t * 1e15} for t, loss in curve]
    return {"summary": {"final_val_loss": curve[-1][1], "train_seconds": curve[-1][0], "stop_reason": stop},
            "evals": evals}


def test_both_runs_are_timed_off_their_evaluation_grids_with_the_bracketing_evaluations():
    original = _run([(0, 9.0), (75, 7.5), (150, 7.0)])
    crammed = _run([(0, 9.0), (30, 7.5), (45, 6.5), (150, 4.0)])
    line = gpu_core.time_to_target(original, crammed)
    assert "bert-original 150 s (between evaluations at 75-150 s)" in line
    assert "crammed-bert 38 s (between evaluations at 30-45 s)" in line  # 30 + 15 * 0.5 / 1.0
    assert line.endswith(f"crammed-bert {150 / 37.5:.2f}x faster")


def test_a_2018_run_cut_short_sets_no_target():
    """The cut run's loss became the target and its shortened time the baseline: a "4x faster"
    from a run that never used its budget."""
    line = gpu_core.time_to_target(_run([(0, 9.0), (40, 8.0)], stop="signal"), _run([(0, 9.0), (150, 4.0)]))
    assert line.startswith("no time-to-quality comparison: bert-original stopped by signal at 40 s")


def test_a_crammed_run_that_misses_the_target_says_so_and_whether_it_was_cut():
    line = gpu_core.time_to_target(_run([(0, 9.0), (150, 7.0)]), _run([(0, 9.0), (60, 7.5)], stop="signal"))
    assert "crammed-bert not reached in 60 s (stopped by signal)" in line and "faster" not in line


def test_a_diverged_run_reloaded_from_the_store_still_formats():
    """The store is strict JSON: a diverged run's losses come back as null, and the next call
    on a warm machine printed its table with them (f"{None:.3f}" is a TypeError)."""
    import json
    import math

    original = _run([(0, 7.0), (150, 6.4)])
    crammed = _run([(0, 7.0), (60, float("nan")), (150, float("nan"))])
    from cramkit.utils import strict_json

    stored = json.loads(strict_json({"pretrain_original": original, "pretrain_crammed": crammed}))
    assert stored["pretrain_crammed"]["summary"]["final_val_loss"] is None
    back = gpu_core._nan_losses(stored)
    assert math.isnan(back["pretrain_crammed"]["summary"]["final_val_loss"])
    assert f"{back['pretrain_crammed']['evals'][1]['val_loss']:.3f}" == "nan"
    assert "crammed-bert not reached" in gpu_core.time_to_target(back["pretrain_original"], back["pretrain_crammed"])


def test_cpu_scale_overrides_make_valid_configs_of_one_shape_for_both_recipes(tiny_mlm_data):
    """A misspelt key in the --cpu overrides would surface only minutes into a benchmark."""
    from cramkit.config import load_config

    shapes = {}
    for name, (recipe, extra) in gpu_core.RECIPES.items():
        cfg = load_config(recipe, [f"data.dir={tiny_mlm_data}", *extra, *gpu_core.CPU_OVERRIDES,
                                   gpu_core.CPU_BATCH[name]])
        model = cfg.model
        shapes[name] = (model.hidden, model.layers, model.heads, model.intermediate, model.vocab_size)
        assert cfg.train.device == "cpu" and not cfg.train.compile
    assert shapes["crammed"] == shapes["original"] == (128, 8, 4, 512, 8192)


def test_a_learning_rate_sweep_of_the_2018_recipe_sets_the_target_at_its_best():
    """--original-lrs: the lowest final loss among the runs that used their budget is the target;
    a run cut short or diverged is passed over, however low its last loss."""
    runs = {"original@1e-4": _run([(0, 9.0), (150, 8.0)]), "original@1e-3": _run([(0, 9.0), (150, 7.2)]),
            "original@3e-3": _run([(0, 9.0), (150, float("nan"))]),
            "original@1e-2": _run([(0, 9.0), (40, 6.0)], stop="signal")}
    assert gpu_core.best_original(runs) == "original@1e-3"
    assert gpu_core.best_original({"original": _run([(0, 9.0), (40, 8.0)], stop="signal")}) == "original"


def test_throughput_rows_are_saved_as_each_is_timed_and_a_failed_target_is_a_row(monkeypatch):
    """The stage stored its rows only when all four were timed: part 1's time limit (330 s for
    four compiled targets) stopping the fourth lost the three already measured from
    gpu_core.json, and a target that raised left the table one row short without a word."""
    import cramkit.bench as bench
    import cramkit.train.device as device

    def fake(target, **kwargs):
        if target.startswith("hf-gpt2"):
            raise RuntimeError("CUDA out of memory")
        return bench.Result(target, 1.0, kwargs["batch"], kwargs["seq_len"], 100.0, 1.0, 0.5, None, 1.0, False)

    monkeypatch.setattr(gpu_core, "SMOKE", True)
    monkeypatch.setattr(bench, "bench_target", fake)
    monkeypatch.setattr(device, "measure_peak_flops", lambda *a: 1e12)
    results = {"throughput": [{"target": "from an earlier call"}], "throughput_table": "old"}
    saved = []
    table = gpu_core.throughput(results, lambda: saved.append(
        ([r["target"] for r in results["throughput"]], [f["target"] for f in results["throughput_failed"]])))
    assert saved == [(["hf-bert:tiny"], []), (["hf-bert:tiny", "cramkit:tiny"], []),
                     (["hf-bert:tiny", "cramkit:tiny"], ["hf-gpt2:tiny-gpt"]),
                     (["hf-bert:tiny", "cramkit:tiny", "cramkit:tiny-gpt"], ["hf-gpt2:tiny-gpt"])]
    assert "| hf-gpt2:tiny-gpt | failed: RuntimeError: CUDA out of memory |" in table


def test_the_results_file_names_the_transformers_version_beside_torchs(monkeypatch):
    """gpu_core.json recorded torch's version only, while its throughput rows are ratios over
    Hugging Face transformers models, whose version moves them as much."""
    from importlib import metadata

    monkeypatch.setattr(gpu_core, "SMOKE", True)
    monkeypatch.setenv("CRAMKIT_COMMIT", "abc1234")
    header = gpu_core.run_header()
    assert header["commit"] == "abc1234" and header["torch"]
    assert header["environment"]["packages"]["transformers"] == metadata.version("transformers")
