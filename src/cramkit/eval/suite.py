"""Suites of downstream tasks (GLUE) run end to end, with Markdown/JSON reports in the run dir.

Reports go to ``RUN_DIR/eval/<suite>.md|json`` (``<suite>-random.*`` for the random-init
control; a named subset of tasks adds their names: ``glue-cola-rte.*``). Metric values in
reports are percentages; the average follows :func:`cramkit.eval.metrics.glue_average` (each
entry's target metric, WNLI excluded, MNLI m and mm as two entries).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..configbase import did_you_mean
from ..errors import ConfigError, CramkitError, DataError
from ..utils import atomic_path, strict_json
from .finetune import (
    Backbone,
    FinetuneConfig,
    changed_settings,
    finetune,
    finetune_config,
    finetune_name,
    finetune_save_dir,
    load_backbone,
    name_clash,
    outputs_owner,
)
from .metrics import EXCLUDED_FROM_AVERAGE, glue_average, metrics_mean, to_percent
from .tasks import (
    TaskSpec,
    get_task,
    glue_available,
    glue_folder,
    glue_missing,
    glue_tasks,
    load_task,
)

Log = Callable[[str], None]


def select_glue_tasks(
    data_dir: str | Path, names: Sequence[str] | None = None
) -> tuple[list[TaskSpec], dict[str, str]]:
    """The GLUE tasks to run and ``{skipped task: reason}``.

    Without ``names``: every registered GLUE task whose train and dev files are in ``data_dir``.
    Named tasks that are unknown or whose files are missing are errors.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: GLUE data directory not found")
    all_glue = glue_tasks()
    if names:
        chosen = []
        for name in names:
            try:
                spec = get_task(name)
            except DataError:  # get_task's error offers a training file, which --tasks does not take
                glue = [s.name for s in all_glue]
                raise DataError(f"unknown GLUE task '{name}'{did_you_mean(name, glue)}; "
                                f"GLUE tasks: {', '.join(glue)}") from None
            if spec.source != "glue":
                raise DataError(
                    f"task '{name}' is not a GLUE task; GLUE tasks: "
                    f"{', '.join(s.name for s in all_glue)}"
                )
            if not glue_available(spec, data_dir):
                found = [s.name for s in all_glue if glue_available(s, data_dir)]
                raise DataError(
                    f"task '{spec.name}': no {'/'.join(glue_missing(spec, data_dir))} file under "
                    f"{glue_folder(spec, data_dir)}; available there: {', '.join(found) or 'none'}"
                )
            if spec not in chosen:  # `--tasks rte,RTE` names one task: fine-tune it once
                chosen.append(spec)
        return chosen, {}
    chosen = [s for s in all_glue if glue_available(s, data_dir)]
    skipped = {
        s.name: f"no {'/'.join(glue_missing(s, data_dir))} file in {glue_folder(s, data_dir)}"
        for s in all_glue
        if s not in chosen
    }
    if not chosen:
        raise DataError(
            f"{data_dir}: no GLUE task with both train and dev files (expected e.g. "
            f"{data_dir}/CoLA/train.tsv and dev.tsv)"
        )
    return chosen, skipped


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-entry scores (percent) and the GLUE average over a list of :func:`finetune` results."""
    entries: dict[str, dict[str, float]] = {}
    for r in results:
        entries.update(r["metrics"])
    return {
        "entries": {e: {k: to_percent(v) for k, v in m.items()} for e, m in entries.items()},
        "scores": {e: to_percent(s) for r in results for e, s in r["scores"].items()},
        "average": to_percent(glue_average(entries)),
        "average_note": "mean of per-entry scores, each entry's target metric (CoLA Matthews, "
        "MRPC and QQP F1, STS-B Pearson, others accuracy); WNLI excluded; MNLI matched and "
        "mismatched count as two entries (cramming's convention)",
        "average_metrics_mean": to_percent(glue_average(entries, metrics_mean)),
    }


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: a table per task, then a summary with the average."""
    lines = [f"# {report['suite'].upper()} evaluation — {report['init']} init", ""]
    lines.append(
        f"Run: `{report['run_dir']}`; seeds {report['seeds']} (median reported); "
        f"{report['seconds']:.0f} s."
    )
    lines.append("")
    for r in report["tasks"]:
        lines += [
            f"## {r['task']}",
            "",
            "| entry | metric | median | per seed |",
            "| --- | --- | ---: | --- |",
        ]
        for entry, metrics in r["metrics"].items():
            for name, value in metrics.items():
                seeds = ", ".join(f"{to_percent(s[entry][name]):.2f}" for s in r["per_seed"])
                lines.append(f"| {entry} | {name} | {to_percent(value):.2f} | {seeds} |")
        lines += [
            "",
            f"{r['train_examples']} training examples, {r['steps']} steps per seed, "
            f"{r['parameters']['trainable']:,} trainable parameters.",
            "",
        ]
        # .get: reports written before the count was recorded have no such key.
        for path, n in (r.get("skipped_rows") or {}).items():
            lines += [f"Skipped {n} malformed row{'s' * (n != 1)} of `{path}`.", ""]
        if r.get("saved"):
            lines += [f"Weights of seed {r['per_seed'][0]['seed']} saved in `{r['saved']}`.", ""]
    summary = report["summary"]
    lines += ["## Summary", "", "| entry | score |", "| --- | ---: |"]
    for entry, score in summary["scores"].items():
        mark = " (not averaged)" if entry in EXCLUDED_FROM_AVERAGE else ""
        lines.append(f"| {entry}{mark} | {score:.2f} |")
    avg = summary["average"]
    lines.append(f"| **average** | **{avg:.2f}** |" if avg is not None else "| average | — |")
    lines += ["", summary["average_note"] + "."]
    if summary.get("average_metrics_mean") is not None:
        lines += [
            "",
            "With each entry scored by the mean of its metrics instead (the GLUE leaderboard's "
            f"convention for MRPC, QQP, STS-B): {summary['average_metrics_mean']:.2f}.",
        ]
    if report.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in report["skipped"].items())]
    # .get: partial reports written before failures were recorded have no "failed".
    said = []
    if report.get("failed"):
        said.append("failed: " + "; ".join(f"{k} ({v})" for k, v in report["failed"].items()))
    if report.get("remaining"):
        said.append("not yet scored: " + ", ".join(report["remaining"]))
    if said:
        lines += ["", "**Partial report**: " + "; ".join(said) + ". The average covers the tasks above only."]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """Write ``stem.json`` and ``stem.md`` atomically into ``out_dir``: both are written in full
    before either replaces its predecessor, so a failure (a full disk) leaves the earlier pair
    as it was rather than a new JSON report beside the old Markdown one."""
    out_dir = Path(out_dir)
    js, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    with atomic_path(js) as js_tmp, atomic_path(md) as md_tmp:
        js_tmp.write_text(strict_json(report, indent=2) + "\n")
        md_tmp.write_text(render_markdown(report))
    return js, md


def evaluate_glue(
    run_dir: str | Path,
    data_dir: str | Path,
    tasks: Sequence[str] | None = None,
    cfg: FinetuneConfig | dict[str, Any] | None = None,
    random_init: bool = False,
    backbone: Backbone | None = None,
    log: Log = print,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune and score every selected GLUE task; write ``RUN_DIR/eval/glue[-PEFT][-random].md|json``.

    Returns the report dict (also written as JSON); ``report["paths"]`` names the files.
    ``on_result`` gets each task's result as soon as it is scored (to save it at once). Until
    the last task is scored, the finished ones are in ``glue….partial.json|md`` beside it (with
    ``remaining``), which the complete report replaces. ``tasks``: a list of GLUE task names, or
    None for every one found (an empty list or a bare string is an error); ``cfg``: as
    :func:`~cramkit.eval.finetune.finetune` takes it.
    """
    cfg = finetune_config(cfg)
    if isinstance(tasks, str):  # read letter by letter: "unknown GLUE task 'r'"
        raise TypeError(f"tasks: give a list of task names, e.g. [{tasks!r}], not a string")
    tasks = None if tasks is None else list(tasks)  # once: a generator would be spent here
    if tasks == []:
        # As --tasks: an empty list read as "every task" would run, and overwrite, the whole
        # suite's report when no task was meant.
        raise ConfigError("tasks names no task; give a list of GLUE task names, or None for all")
    specs, skipped = select_glue_tasks(data_dir, tasks)
    backbone = backbone or load_backbone(run_dir, random_init=random_init)
    # Every task file is read (and validated) before the first fine-tune: a malformed last task
    # must fail in seconds, not after hours spent on the ones before it.
    loaded = []
    for spec in specs:
        try:
            loaded.append((spec, load_task(spec.name, data_dir)))
        except DataError as exc:
            others = [s.name for s in specs if s is not spec]
            if tasks or not others:  # named: the user chose it
                raise
            # Found by looking: a task that is there but malformed stops the suite, which runs
            # every task it finds; say how to run the others meanwhile.
            raise DataError(f"{exc} (fix it, or leave {spec.name} out: --tasks {','.join(others)})") from None
    for spec, _ in loaded if cfg.save else ():  # nor may a save replace another task's weights
        save_dir = finetune_save_dir(run_dir, spec.name, backbone.random_init, cfg.peft)
        clash = name_clash([save_dir], outputs_owner(spec, backbone.random_init, cfg.peft))
        if clash:
            raise ConfigError(clash)
    # A named subset gets a report of its own: `--tasks cola` after a full evaluation must not
    # replace the full report with a one-task one.
    named = [s.name for s in glue_tasks() if s in specs] if tasks else []  # registry order: one name per set
    stem = finetune_name("glue" + "".join(f"-{name}" for name in named), backbone.random_init, cfg.peft)
    eval_dir = Path(run_dir) / "eval"
    start = time.perf_counter()
    results = []

    def report_of(done: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "suite": "glue",
            "run_dir": str(run_dir),
            "init": "random" if backbone.random_init else "pretrained",
            "data_dir": str(data_dir),
            "seeds": list(cfg.seeds),
            "seconds": round(time.perf_counter() - start, 1),
            "skipped": skipped,
            "tasks": done,
            "summary": summarize(done),
            "config": cfg.to_dict(),
        }

    for index, (spec, task) in enumerate(loaded):
        log(f"{spec.name}: fine-tuning ({len(cfg.seeds)} seeds)")
        # finetune.save=true: where `cramkit finetune` puts them (it was silently ignored here).
        save_dir = finetune_save_dir(run_dir, spec.name, backbone.random_init, cfg.peft) if cfg.save else None
        try:
            result = finetune(backbone, task, cfg, save_dir=save_dir)
        except CramkitError as exc:
            if not results:
                raise
            # The partial report said of a task that diverged only "not yet scored", as of an
            # interrupted one, and the error did not say where the tasks before it were.
            partial = report_of(results)
            partial["failed"] = {spec.name: str(exc)}
            partial["remaining"] = [s.name for s, _ in loaded[index + 1:]]
            js, _ = write_report(partial, eval_dir, f"{stem}.partial")
            n = len(results)
            raise type(exc)(f"{exc}; the {n} task{'s' * (n != 1)} scored before {spec.name} "
                            f"{'are' if n != 1 else 'is'} in {js}") from None
        results.append(result)
        if on_result is not None:
            on_result(result)
        scores = ", ".join(f"{e} {to_percent(s):.2f}" for e, s in result["scores"].items())
        log(f"{spec.name}: {scores} ({result['seconds']:.0f} s)")
        if len(results) < len(loaded):
            # Each finished task is on disk at once: a Ctrl-C or a failure in a later task (hours
            # on, in a full suite) used to lose every score. Beside the report, never over it, so
            # that an earlier complete report with other settings survives an interrupted rerun.
            partial = report_of(results)
            partial["remaining"] = [s.name for s, _ in loaded[len(results):]]
            js, _ = write_report(partial, eval_dir, f"{stem}.partial")
            log(f"{len(results)} of {len(loaded)} tasks scored so far: {js}")
    report = report_of(results)
    changed = changed_settings(eval_dir / f"{stem}.json", report)
    js, md = write_report(report, eval_dir, stem)
    for leftover in (eval_dir / f"{stem}.partial.json", eval_dir / f"{stem}.partial.md"):
        leftover.unlink(missing_ok=True)  # the complete report supersedes it
    report["paths"] = {"json": str(js), "markdown": str(md)}
    report["replaced_settings"] = changed  # a report written with other settings was replaced
    return report


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a JSON report written by :func:`evaluate_glue`."""
    return json.loads(Path(path).read_text())


SUITES: dict[str, Callable[..., dict[str, Any]]] = {"glue": evaluate_glue}


def get_suite(name: str) -> Callable[..., dict[str, Any]]:
    """The suite runner called ``name``."""
    try:
        return SUITES[name]
    except KeyError:
        raise DataError(
            f"unknown suite '{name}'{did_you_mean(name, SUITES)}; known: {', '.join(SUITES)}"
        ) from None
