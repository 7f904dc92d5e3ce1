"""Compare pretraining runs: a Markdown table, the same numbers as JSON, and loss plots.

``cramkit report RUN_DIR [RUN_DIR ...]`` reads the run directories that ``cramkit pretrain``
writes (``config.json``, ``metrics.jsonl``, ``summary.json``) and writes into ``--out``:

- ``report.md``: one row per run (recipe, parameters, steps, tokens, training seconds, tokens/s,
  MFU, final validation loss, energy when measured) and the training time, tokens and FLOPs each
  run needed to reach a common target validation loss;
- ``report.json``: the same numbers, unrounded;
- ``loss-vs-AXIS.png``: validation and training loss against time, tokens, FLOPs (or steps), one
  curve per run (needs the ``plot`` extra, matplotlib; without it the plots are skipped and the
  report says so).

The target loss is, unless ``--target`` names one, the worst final validation loss among the runs,
so that every run reaches it; the time (tokens, FLOPs) to it is read off each run's evaluation log
by :func:`reach`, the one implementation of "when does the eval log first reach loss X" that the
benchmark scripts use too. A run without ``summary.json`` (still training, or killed) is reported
and plotted from its metrics and marked "unfinished".

This module imports neither torch nor matplotlib at import time, so the benchmark scripts and the
CLI can use it cheaply.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, RunError
from .utils import atomic_path, read_json, read_text, strict_json


@dataclass(frozen=True)
class Axis:
    """A quantity that runs can be compared along: its field in metrics records, and a label."""

    key: str
    label: str


# The x axes a report can plot against, by CLI name; ``key`` is the field in metrics.jsonl.
AXES: dict[str, Axis] = {
    "time": Axis("elapsed", "training time (s, evaluation and checkpoints excluded)"),
    "tokens": Axis("tokens", "training tokens"),
    "flops": Axis("flops", "training FLOPs"),
    "steps": Axis("step", "optimizer steps"),
}
DEFAULT_AXES = ("time", "tokens", "flops")

PLOT_HINT = "matplotlib is not installed (pip install 'cramkit[plot]')"


def reach(evals: Sequence[Mapping[str, Any]], target: float, key: str = "elapsed") -> float | None:
    """``key`` (``elapsed``, ``tokens``, ``flops`` or ``step``) at which an evaluation log first
    reaches validation loss ``target``, or None if it never does.

    ``evals`` are eval records in log order. Between the last evaluation above the target and the
    first at or below it, the loss is taken to fall linearly in ``key``; a log already at the target
    on its first evaluation reaches it there. None also when a record up to the crossing lacks
    ``key`` (a log from before that field existed), rather than guessing.
    """
    previous, previous_loss = None, math.nan
    for record in evals:
        if key not in record:
            return None
        loss = record["val_loss"]
        if loss is None:  # strict JSON's stand-in for a non-finite loss
            loss = math.nan
        if loss <= target:
            # previous is above target (or it would have returned), so the span is positive; a
            # non-finite previous loss leaves no line to follow: take the evaluation that reached it.
            if previous is None or not math.isfinite(previous_loss):
                return float(record[key])
            frac = (previous_loss - target) / (previous_loss - loss)
            return float(previous[key] + frac * (record[key] - previous[key]))
        previous, previous_loss = record, loss
    return None


# --------------------------------------------------------------------------------------- runs


# Fields each record type must carry as numbers for the report to use it.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "train": ("step", "tokens", "elapsed", "loss"),
    "eval": ("step", "tokens", "elapsed", "val_loss"),
}
#: Losses: a diverged step's is NaN, which metrics.jsonl holds as null.
NULLABLE_FIELDS = ("loss", "val_loss")


def nan_for_null(record: dict[str, Any], fields: Sequence[str] = NULLABLE_FIELDS) -> dict[str, Any]:
    """``record``, changed in place: each of ``fields`` that is null (strict JSON's stand-in for
    a non-finite number) is NaN again, so it compares and formats as the number it was."""
    for f in fields:
        if f in record and record[f] is None:
            record[f] = math.nan
    return record


@dataclass
class Run:
    """One run directory as the report sees it: its config, summary (None when unfinished) and the
    train and eval records of ``metrics.jsonl``."""

    name: str
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any] | None
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    #: What a validation loss is measured in: ``(objective, tokenizer sha256)`` from the run's copy
    #: of the data manifest (None for either that it does not record).
    loss_scale: tuple[str | None, str | None] = (None, None)
    #: What it is measured on: the sha256 of each validation shard the manifest lists (None when
    #: it lists none).
    val_data: tuple[str, ...] | None = None

    @property
    def finished(self) -> bool:
        return self.summary is not None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _keep_latest(records: list[dict[str, Any]], record: dict[str, Any]) -> None:
    """Append ``record``; a step at or before the last one means the run was resumed from an
    earlier checkpoint, and the records it re-trains over are superseded."""
    while records and records[-1]["step"] >= record["step"]:
        records.pop()
    records.append(record)


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The (train, eval) records of a ``metrics.jsonl``, in step order.

    A malformed line is a RunError naming the file and line, except a final line without its
    newline: a run killed in mid-write leaves one, and the rest of its log is still good.
    """
    lines = read_text(path, RunError).split("\n")
    kept: dict[str, list[dict[str, Any]]] = {kind: [] for kind in REQUIRED_FIELDS}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # the split leaves "" last whenever the file ends in "\n"
                warnings.warn(f"{path} line {number}: ignoring a truncated last line", stacklevel=2)
                continue
            raise RunError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise RunError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
        kind = record.get("type", "train")
        if kind not in REQUIRED_FIELDS:  # record types the report does not use
            continue
        nan_for_null(record)
        missing = [f for f in REQUIRED_FIELDS[kind] if not _is_number(record.get(f))]
        if missing:
            raise RunError(f"{path} line {number}: {kind} record without a numeric '{missing[0]}'")
        _keep_latest(kept[kind], record)
    if not kept["train"] and not kept["eval"]:
        raise RunError(f"{path}: no training or evaluation records")
    return kept["train"], kept["eval"]


def load_run(path: str | Path) -> Run:
    """Read one run directory; anything that is not a readable cramkit run is a RunError."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path} is not a cramkit run directory (no such directory)")
    for required in ("config.json", "metrics.jsonl"):
        if not (path / required).is_file():
            raise RunError(f"{path} is not a cramkit run directory (no {required})")
    config = read_json(path / "config.json", RunError)
    summary = read_json(path / "summary.json", RunError) if (path / "summary.json").is_file() else None
    train, evals = read_metrics(path / "metrics.jsonl")
    if summary is not None and _is_number(summary.get("steps")) and \
            max(r["step"] for r in train + evals) > summary["steps"]:
        # A resume went on past it (cramkit before the resume removed it, or a copy put back):
        # the run is its metrics', and unfinished.
        summary = None
    manifest = read_json(path / "data_manifest.json", RunError) if (path / "data_manifest.json").is_file() else {}
    scale = (manifest.get("objective"), manifest.get("tokenizer_sha256")) if isinstance(manifest, dict) else (None, None)
    return Run(path.resolve().name, path, config, summary, train, evals, scale, _val_shards(manifest))


def _val_shards(manifest: Any) -> tuple[str, ...] | None:
    try:
        shards = tuple(str(s["sha256"]) for s in manifest["splits"]["val"]["shards"])
    except (KeyError, TypeError):
        return None
    return shards or None


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Load every run; runs sharing a directory name are told apart by their parent's name."""
    runs = [load_run(p) for p in paths]
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.path.resolve().parent.name}/{run.name}"
    seen: dict[str, int] = {}
    for run in runs:  # the same directory twice, or equal parent/name pairs
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name} #{seen[run.name]}"
    return runs


# ------------------------------------------------------------------------------------- numbers


def _final_val_loss(run: Run) -> float | None:
    """A finished run's final validation loss; an unfinished run's latest one after step 0.

    Step 0's scores the untrained model: a run killed before its first periodic evaluation has
    no loss of what it trained to, and taking the initial one made the default target the
    untrained loss, which every run "reached" at 0 s, 0 tokens and 0 FLOPs.
    """
    if run.summary is not None and _is_number(run.summary.get("final_val_loss")):
        return float(run.summary["final_val_loss"])
    trained = [e for e in run.evals if e["step"] > 0]
    return float(trained[-1]["val_loss"]) if trained else None


def run_row(run: Run, target: float | None) -> dict[str, Any]:
    """The report's numbers for one run.

    A finished run's come from its summary; an unfinished run's from its last metrics records
    (its MFU is then the last logged window's, not the whole run's).
    """
    s = run.summary or {}
    last = max(run.train + run.evals, key=lambda r: (r["step"], r["elapsed"]))
    tokens = s.get("tokens", last["tokens"])
    seconds = s.get("train_seconds", last["elapsed"])
    tokens_per_s = s.get("tokens_per_s", tokens / seconds if seconds else None)
    mfu = s.get("mfu") if run.finished else (run.train[-1].get("mfu") if run.train else None)
    to_target = {name: (reach(run.evals, target, axis.key) if target is not None else None)
                 for name, axis in AXES.items()}
    return {
        "name": run.name,
        "path": str(run.path),
        "status": s.get("stop_reason", "finished") if run.finished else "unfinished",
        "recipe": run.config.get("recipe"),
        "parameters": s.get("parameters"),
        "steps": s.get("steps", last["step"]),
        "tokens": tokens,
        "train_seconds": seconds,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "final_val_loss": _final_val_loss(run),
        "energy_kwh": s.get("energy_kwh"),
        "to_target": to_target,
    }


def default_target(runs: Sequence[Run]) -> float | None:
    """The worst (highest) final validation loss among the runs: every run reaches it."""
    finals = [f for f in map(_final_val_loss, runs) if f is not None and math.isfinite(f)]
    return max(finals) if finals else None


def build_report(runs: Sequence[Run], target: float | None = None) -> dict[str, Any]:
    """The numbers of a comparison: the target loss, how it was chosen, and one row per run."""
    if target is None:
        target, source = default_target(runs), "the worst final validation loss among the runs"
    else:
        source = "given with --target"
    return {
        "target_val_loss": target,
        "target_source": source,
        "runs": [run_row(run, target) for run in runs],
        "notes": comparability_notes(runs),
    }


def comparability_notes(runs: Sequence[Run]) -> list[str]:
    """Why the runs' losses may not be comparable: a masked-LM loss is not a causal-LM loss, and
    losses over different vocabularies are in different units."""
    notes = []
    objectives = {r.loss_scale[0] for r in runs} - {None}
    if len(objectives) > 1:
        notes.append(f"the runs train different objectives ({', '.join(sorted(objectives))}): their "
                      "validation losses, and the common target, are not comparable")
    sizes = {r.summary.get("val_sequences") for r in runs if r.summary} - {None}
    if len(sizes) > 1:
        notes.append(f"the runs average their validation losses over different numbers of sequences "
                     f"({', '.join(f'{n:,}' for n in sorted(sizes))}; train.eval_batches counts micro-batches: "
                     "on the same data, train.eval_batches=0 evaluates the whole split in every run)")
    # Causal runs draw no masks and record no scheme: left out. A masked-LM run from before the
    # field records none either, and counts (so does a run whose data manifest is lost).
    schemes = {r.summary.get("val_masks") for r in runs if r.summary and r.loss_scale[0] != "clm"}
    if len(schemes) > 1:
        notes.append("the runs drew their validation masks differently (runs from before cramkit recorded "
                     "summary.json's val_masks drew them per batch, with the run's seed): their validation "
                     "losses differ by mask sampling as well")
    tokenizers = {r.loss_scale[1] for r in runs} - {None}
    if len(tokenizers) > 1:
        notes.append("the runs use different tokenizers: a loss per token of one vocabulary is not a "
                     "loss per token of another")
    elif len({r.val_data for r in runs} - {None}) > 1:  # the same vocabulary, other text or lengths
        notes.append("the runs score different validation data (their data manifests list other validation "
                     "shards: another corpus, sequence length or preparation): their losses are not comparable")
    rates = {_eval_mask_rate(r) for r in runs if r.loss_scale[0] == "mlm"} - {None}
    if len(rates) > 1:
        notes.append(f"the runs mask different shares of the validation tokens (objective.eval_mask_rate "
                     f"{', '.join(f'{x:g}' for x in sorted(rates))}): a masked-LM loss depends on it")
    return notes


def _eval_mask_rate(run: Run) -> float | None:
    objective = run.config.get("objective")
    rate = objective.get("eval_mask_rate") if isinstance(objective, dict) else None
    return float(rate) if _is_number(rate) else None


# ----------------------------------------------------------------------------------- rendering


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


def _reached(value: float | None, spec: str) -> str:
    return "not reached" if value is None else f"{value:{spec}}"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the target, the comparison table, and where the plots are."""
    rows = report["runs"]
    energy = any(r["energy_kwh"] is not None for r in rows)
    header = ["run", "status", "recipe", "params", "steps", "tokens", "train s", "tokens/s", "MFU",
              "final val loss", *(["energy kWh"] if energy else []),
              "time to target (s)", "tokens to target", "FLOPs to target"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        to = r["to_target"]
        cells = [
            r["name"], r["status"], r["recipe"] or "-", _fmt(r["parameters"], ","), _fmt(r["steps"], ","),
            _fmt(r["tokens"], ","), _fmt(r["train_seconds"], ".1f"), _fmt(r["tokens_per_s"], ",.0f"),
            _fmt(r["mfu"], ".1%"), _fmt(r["final_val_loss"], ".4f"),
            *([_fmt(r["energy_kwh"], ".4g")] if energy else []),
            _reached(to["time"], ".1f"), _reached(to["tokens"], ",.0f"), _reached(to["flops"], ".3e"),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    target = report["target_val_loss"]
    intro = (f"Target validation loss {target:.4f} ({report['target_source']}); the time, tokens and "
             "FLOPs to reach it are interpolated linearly between evaluations."
             if target is not None else "No run has a validation loss, so there is no target loss.")
    out = ["# cramkit run comparison", "", intro, ""]
    out += [f"**Note:** {note}." for note in report.get("notes", [])] + ([""] if report.get("notes") else [])
    out += [*lines, ""]
    if report.get("plots"):
        out += ["Plots: " + ", ".join(f"[{p}]({p})" for p in report["plots"]), ""]
    if report.get("plots_skipped"):
        out += [f"Plots skipped: {report['plots_skipped']}.", ""]
    return "\n".join(out)


def as_json(report: dict[str, Any]) -> str:
    """The report as strict JSON text."""
    return strict_json(report, indent=2) + "\n"


# Renderers by --format name; every one is also written to the output folder.
FORMATS: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "md": ("report.md", markdown),
    "json": ("report.json", as_json),
}


# --------------------------------------------------------------------------------------- plots


def _interpolate(x: float, xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Piecewise-linear ``y(x)`` through increasing ``xs``; None outside their range."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            span = xs[i] - xs[i - 1]
            frac = (x - xs[i - 1]) / span if span > 0 else 1.0
            return ys[i - 1] + frac * (ys[i] - ys[i - 1])
    return ys[0]


def curve(run: Run, records: Sequence[Mapping[str, Any]], key: str, loss: str) -> tuple[list, list]:
    """(x, loss) points of ``records`` along ``key``.

    Training records carry no FLOPs; where a record lacks ``key`` it is read off the eval records
    (and the summary's totals) as a function of tokens, which is exact while FLOPs per token stay
    constant between two evaluations. Points beyond the last known value are left out rather than
    extrapolated.
    """
    anchors = [(e["tokens"], e[key]) for e in run.evals if _is_number(e.get(key))]
    if run.summary and _is_number(run.summary.get(key)) and _is_number(run.summary.get("tokens")):
        anchors.append((run.summary["tokens"], run.summary[key]))
    anchors.sort()
    xs, ys = [], []
    for record in records:
        x = record[key] if _is_number(record.get(key)) else _interpolate(
            record["tokens"], [a[0] for a in anchors], [a[1] for a in anchors])
        if x is not None:
            xs.append(x)
            ys.append(record[loss])
    return xs, ys


def write_plots(runs: Sequence[Run], out: Path, axes: Sequence[str], target: float | None) -> list[str]:
    """Write ``loss-vs-AXIS.png`` for each axis (validation loss left, training loss right) and
    return the file names. Raises ImportError without matplotlib."""
    # The optional `plot` extra. A bare Figure needs no pyplot, so no global state or GUI backend.
    from matplotlib.figure import Figure

    colors = [f"C{i % 10}" for i in range(len(runs))]
    written = []
    for name in axes:
        axis = AXES[name]
        fig = Figure(figsize=(11, 4.2), layout="constrained")
        val_ax, train_ax = fig.subplots(1, 2)
        for run, color in zip(runs, colors):
            style = "-" if run.finished else "--"
            label = run.name if run.finished else f"{run.name} (unfinished)"
            vx, vy = curve(run, run.evals, axis.key, "val_loss")
            if vx:
                val_ax.plot(vx, vy, style, color=color, marker="o", markersize=3, label=label)
            tx, ty = curve(run, run.train, axis.key, "loss")
            if tx:
                train_ax.plot(tx, ty, style, color=color, label=label)
        if target is not None:
            val_ax.axhline(target, color="0.5", linestyle=":", linewidth=1, label=f"target {target:.4f}")
        for ax, title in ((val_ax, "validation loss"), (train_ax, "training loss")):
            ax.set_title(title)
            ax.set_xlabel(axis.label)
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize="small")
        filename = f"loss-vs-{name}.png"
        with atomic_path(out / filename) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        written.append(filename)
    return written


# -------------------------------------------------------------------------------------- output


def write_report(run_dirs: Sequence[str | Path], out: str | Path, axes: Sequence[str] = DEFAULT_AXES,
                 target: float | None = None) -> dict[str, Any]:
    """Load ``run_dirs``, write the plots, ``report.md`` and ``report.json`` into ``out`` (each
    atomically), and return the report. ``plots_skipped`` says why when there are no plots."""
    if target is not None and not math.isfinite(target):
        raise ConfigError(f"--target must be a finite loss, got {target}")
    if target is not None and target <= 0:  # no cross-entropy reaches it: every run "not reached"
        raise ConfigError(f"--target must be above 0 (a validation loss is a cross-entropy), got {target}")
    unknown = [a for a in axes if a not in AXES]
    if unknown:
        raise ConfigError(f"unknown axis '{unknown[0]}'; choose from {', '.join(AXES)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    axes = list(dict.fromkeys(axes))  # `--x time --x time` is one plot
    runs = load_runs(run_dirs)
    report = build_report(runs, target)
    out.mkdir(parents=True, exist_ok=True)
    try:
        report["plots"], report["plots_skipped"] = write_plots(runs, out, axes, report["target_val_loss"]), None
    except ImportError:
        report["plots"], report["plots_skipped"] = [], PLOT_HINT
    for filename, render in FORMATS.values():
        with atomic_path(out / filename) as tmp:
            tmp.write_text(render(report))
    return report


def add_parser(sub) -> None:
    """Register ``cramkit report``."""
    p = sub.add_parser(
        "report",
        help="compare runs: a table, JSON and loss plots",
        description=(
            "Compare pretraining runs: write report.md, report.json and loss-vs-AXIS.png into "
            "--out. The target loss (default: the worst final validation loss among the runs) is "
            "reached at the time, tokens and FLOPs interpolated linearly between evaluations."
        ),
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by `cramkit pretrain`")
    p.add_argument("--out", default="cramkit-report", help="output folder (default: ./cramkit-report)")
    p.add_argument("--x", dest="axes", action="append", choices=list(AXES), metavar="AXIS",
                   help=f"x axis of the plots, one of {', '.join(AXES)}; repeat for several "
                        f"(default: {', '.join(DEFAULT_AXES)})")
    p.add_argument("--format", default="md", choices=list(FORMATS),
                   help="what to print: the Markdown table or the JSON (both are written)")
    p.add_argument("--target", type=float, default=None, metavar="LOSS",
                   help="target validation loss (default: the worst final one among the runs)")
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    report = write_report(args.runs, args.out, args.axes or DEFAULT_AXES, args.target)
    print(FORMATS[args.format][1](report), end="")
    files = [name for name, _ in FORMATS.values()] + report["plots"]
    # Status lines on stderr keep stdout a clean table or JSON document for piping.
    print(f"wrote {', '.join(str(Path(args.out) / f) for f in files)}", file=sys.stderr)
    if report["plots_skipped"]:
        print(f"plots skipped: {report['plots_skipped']}", file=sys.stderr)
    return 0
