"""``cramkit finetune | evaluate | predict | export`` subcommands.

Each handler returns an exit code; user mistakes raise CramkitError, which ``cramkit.cli`` prints
as one ``error:`` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

from ..configbase import apply_overrides
from ..errors import ConfigError, DataError
from ..utils import accept_late_overrides, write_json


def _config_epilog() -> str:
    from .finetune import FinetuneConfig

    lines = ["fine-tuning options (key=value overrides; defaults are cramming's GLUE-sane):"]
    for f in dataclasses.fields(FinetuneConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {f.name}={default}: {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _finetune_config(overrides: list[str]):
    from .finetune import FinetuneConfig

    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"unexpected argument '{bad[0]}' (options are key=value overrides)")
    # Errors name a key as finetune.KEY, so that spelling is accepted too (it was read as a table
    # 'finetune' and refused as 'finetune.finetune').
    overrides = [o.removeprefix("finetune.") for o in overrides]
    return FinetuneConfig.from_dict(apply_overrides({}, overrides), path="finetune")


def _comma_list(text: str | None) -> list[str] | None:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (None when not given).

    Items are stripped: labels are compared with the stripped values of the file, so " pos"
    could never match, and metric names have no spaces.
    """
    if not text:
        return None
    return [item.strip() for item in text.split(",") if item.strip()]


#: ``finetune``'s file-task flags (argparse dest) -> the :func:`~cramkit.eval.tasks.file_task`
#: keyword each sets and how its text becomes the value. Unset flags are not passed, so the
#: defaults are file_task's own.
_FILE_TASK_OPTIONS: dict[str, tuple[str, Callable]] = {
    "dev": ("dev", str),
    "text_column": ("text_column", str),
    "text_pair_column": ("text_pair_column", str),
    "label_column": ("label_column", str),
    "labels": ("labels", _comma_list),
    "regression": ("is_regression", bool),
    "metrics": ("metrics", _comma_list),
    "positive_label": ("positive_label", str),
}


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune one task (registry name or training file) and report the median over seeds."""
    from .finetune import (
        changed_settings,
        finetune,
        finetune_name,
        finetune_save_dir,
        load_backbone,
        name_clash,
        outputs_owner,
        require_run_dir,
    )
    from .metrics import to_percent
    from .tasks import file_task, load_task

    cfg = _finetune_config(args.overrides)
    given = {dest: getattr(args, dest) for dest in _FILE_TASK_OPTIONS if getattr(args, dest) not in (None, False)}
    options = {}
    # A training file, or a folder holding one: file tasks, which the flags describe.
    if Path(args.task).suffix or Path(args.task).exists():
        options = {kw: convert(given[dest]) for dest, (kw, convert) in _FILE_TASK_OPTIONS.items() if dest in given}
    elif given:  # a registered task: its columns, labels and metrics are fixed, the flags would be lost
        flags = ", ".join("--" + dest.replace("_", "-") for dest in given)
        raise ConfigError(
            f"{flags} apply to a task given as a file; '{args.task}' is a registered "
            "task with its own columns, labels and metrics"
        )
    # Before the task, which may come from the Hub: a mistyped run directory used to surface only
    # after that download (offline, as an error about the Hub that never named the run).
    require_run_dir(args.run_dir)
    task = load_task(args.task, args.data, **options)
    backbone = load_backbone(args.run_dir, random_init=args.random_init)
    name = finetune_name(task.spec.name, args.random_init, cfg.peft)
    out = Path(args.run_dir) / "eval" / f"finetune-{name}.json"
    save_dir = finetune_save_dir(args.run_dir, task.spec.name, args.random_init, cfg.peft) if cfg.save else None
    clash = name_clash([out, *([save_dir] if save_dir else [])], outputs_owner(task, args.random_init, cfg.peft))
    if clash:
        raise ConfigError(clash)
    result = finetune(backbone, task, cfg, save_dir=save_dir)
    # A file task's flags (--dev, --labels, columns...) change the result as much as the config:
    # a rerun with another dev file replaced the result without a note. A flag that repeats
    # file_task's default (--text-column sentence) changes nothing, so it is not recorded: the
    # note would otherwise name it as a setting that differed from the same run without it.
    defaults = {k: p.default for k, p in inspect.signature(file_task).parameters.items()}
    result["task_options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()
                              if v != defaults.get(k, inspect.Parameter.empty)}
    changed = changed_settings(out, result, ("config", "task_options"))
    write_json(out, result)
    init = result["init"]
    print(
        f"{task.spec.name} ({init} init, "
        f"{f'median of {len(cfg.seeds)} seeds' if len(cfg.seeds) > 1 else f'seed {cfg.seeds[0]}'}, "
        f"{result['parameters']['trainable']:,} trainable parameters):"
    )
    for entry, metrics in result["metrics"].items():
        shown = ", ".join(f"{k} {to_percent(v):.2f}" for k, v in metrics.items())
        print(f"  {entry}: {shown}")
    print(f"results: {out}")
    if result.get("saved"):
        print(f"weights (seed {cfg.seeds[0]}): {result['saved']} ({_readers_of_saved(backbone.model_config, cfg)})")
    if changed:
        print(f"note: replaced the result there written with other settings ({', '.join(changed)} differed)")
    return 0


def _readers_of_saved(model_config, cfg) -> str:
    """The commands that use a fine-tune's saved weights: ``cramkit predict`` always, ``cramkit
    export`` only for a fine-tune that is exactly its transformers class (a GPT, a pre-LN BERT or
    mean pooling it refuses; naming it for them sent users to an error)."""
    from ..export import FINETUNED_HF_CLASS, finetuned_mismatches

    if finetuned_mismatches(model_config, cfg):
        return f"cramkit predict; not cramkit export, which writes {FINETUNED_HF_CLASS} fine-tunes only"
    return "cramkit predict, cramkit export"


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run a task suite (GLUE) and write Markdown + JSON into ``RUN_DIR/eval``."""
    from .suite import get_suite, render_markdown

    cfg = _finetune_config(args.overrides)
    runner = get_suite(args.suite)
    tasks = None
    if args.tasks is not None:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:  # an empty list would run, and overwrite, the whole suite's report
            raise ConfigError("--tasks names no task; give a comma-separated list, or leave it out for all")
    report = runner(args.run_dir, args.data, tasks=tasks, cfg=cfg, random_init=args.random_init)
    print(render_markdown(report))
    print(f"written: {report['paths']['markdown']} and {report['paths']['json']}")
    if report.get("replaced_settings"):
        print(f"note: replaced the report there written with other settings "
              f"({', '.join(report['replaced_settings'])} differed)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Label each row of a task file with saved fine-tuned weights; JSON Lines out."""
    from ..utils import atomic_path, paths_overlap
    from .finetuned import load_finetuned
    from .tasks import input_format, iter_inputs

    if not Path(args.input).is_file():  # said before the model loads, as are the next
        raise DataError(f"{args.input}: " + ("a folder: give a file of texts" if Path(args.input).is_dir()
                                             else "file not found"))
    if input_format(args.input) == "txt":
        for flag, given in (("--text-column", args.text_column), ("--text-pair-column", args.text_pair_column)):
            if given is not None:
                raise ConfigError(f"{flag}: {args.input} is a .txt file, one text per line, without columns")
    out = None if args.out is None else Path(args.out)
    if out is not None:
        if not out.name.lower().endswith(".jsonl"):
            raise ConfigError(f"--out {out}: predictions are written as JSON Lines; name the file .jsonl")
        if paths_overlap(out, args.input):
            raise ConfigError(f"--out {out} is the --input file: it would be replaced by the predictions")
    clf = load_finetuned(args.finetuned_dir, device=args.device, run_dir=args.run_dir)
    columns = {k: v for k, v in (("text_column", args.text_column),
                                 ("text_pair_column", args.text_pair_column)) if v is not None}
    if args.text_pair_column is not None and not clf.is_pair:
        raise ConfigError(f"--text-pair-column: task '{clf.task.name}' classifies single texts")
    # A header-less layout (CoLA's) names columns by position; names given here need a header.
    spec = dataclasses.replace(clf.task, **columns, has_header=clf.task.has_header or bool(columns))
    rows = iter_inputs(args.input, spec)
    if out is None:
        _write_predictions(clf, rows, sys.stdout, args.input)
        return 0
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        count = _write_predictions(clf, rows, f, args.input)
    print(f"{count} predictions of {clf.task.name} ({clf.path}) written to {out}")
    return 0


#: Rows read, encoded and scored at a time by `cramkit predict`: memory follows this, not the file.
PREDICT_CHUNK = 4096


def _write_predictions(clf, rows, f, source: str) -> int:
    """Write one JSON line per row of ``rows`` (``(line number, example)``, read from the file
    ``source``) to ``f``, :data:`PREDICT_CHUNK` rows at a time; return how many. No rows is an
    error: an empty output would look like a result."""
    from ..utils import strict_json

    count = 0
    while chunk := list(itertools.islice(rows, PREDICT_CHUNK)):
        logits = clf.logits_of([example for _, example in chunk])
        for (lineno, _), row, prediction in zip(chunk, logits, clf.decode(logits)):
            record = {"line": lineno, "prediction": prediction}
            if not clf.is_regression:
                record["probabilities"] = dict(zip(clf.labels, row.softmax(-1).tolist()))
            f.write(strict_json(record) + "\n")
        count += len(chunk)
    if not count:
        raise DataError(f"{source}: no rows to predict")
    return count


def cmd_export(args: argparse.Namespace) -> int:
    """Export a run's newest checkpoint, or saved fine-tuned weights (transformers layout when
    exact)."""
    from ..export import export

    export(args.run_dir, args.out, format=args.format, overwrite=args.force)
    return 0


def add_parser(subparsers) -> None:
    """Register ``finetune``, ``evaluate``, ``predict`` and ``export`` on the ``cramkit`` parser."""
    from .metrics import METRICS  # light (numpy); the help lists the registry, not a copy of it

    raw = argparse.RawDescriptionHelpFormatter

    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a pretrained run on one downstream task",
        description="Fine-tune RUN_DIR's newest checkpoint (or a random init of its shape) on "
        "a task: a registered name (bbc, cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli) "
        "or a .tsv/.csv/.jsonl training file with named columns. The result goes to "
        "RUN_DIR/eval/finetune-TASK[-PEFT][-random].json; a result there written with other settings (or a file task's other --dev, --labels, columns...) is "
        "replaced, with a note; one of another task whose name comes out the same (reviews-lora.tsv "
        "against reviews.tsv with peft=lora) is refused before fine-tuning.",
        epilog=_config_epilog(),
        formatter_class=raw,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="directory written by cramkit pretrain")
    p.add_argument(
        "--task",
        required=True,
        help="task name, path to a training file, or a folder holding one "
        "train.{tsv,csv,jsonl}[.gz] (dev file beside it); .tsv is split on tabs with no quote "
        "handling, as GLUE needs, so a field that pandas' to_csv(sep='\\t') quoted (one holding "
        "a \") keeps its quotes: write TSVs with quoting=csv.QUOTE_NONE, or use .csv",
    )
    p.add_argument(
        "--data",
        default=None,
        help="GLUE directory (original TSV layout); without it GLUE tasks come from HF datasets",
    )
    p.add_argument(
        "--random-init",
        action="store_true",
        help="start from random weights of the same shape (no-pretraining control)",
    )
    p.add_argument(
        "--dev",
        default=None,
        help="dev file for a file task (default: a sibling dev/validation/valid/test file)",
    )
    p.add_argument("--text-column", default=None, help="file tasks: first text column (default: sentence)")
    p.add_argument("--text-pair-column", default=None, help="file tasks: second text column")
    p.add_argument("--label-column", default=None, help="file tasks: label column (default: label)")
    p.add_argument(
        "--labels",
        default=None,
        help="file tasks: comma-separated label set in class-index order (default: the "
        "distinct labels of the training file, sorted); f1 scores the second one, index 1 "
        "(see --positive-label)",
    )
    p.add_argument(
        "--positive-label",
        default=None,
        metavar="LABEL",
        help="file tasks with two labels: the class f1 scores (it becomes index 1); without it "
        "f1 scores the second label, which for sorted duplicate/not_duplicate is the negative class",
    )
    p.add_argument("--regression", action="store_true", help="file tasks: numeric target")
    p.add_argument(
        "--metrics",
        default=None,
        help=f"file tasks: comma-separated metric names ({', '.join(METRICS)}); the first is "
        "the task's score (default: accuracy, or "
        "pearson,spearman for regression); f1 is binary F1 of label index 1 (see --labels, "
        "--positive-label)",
    )
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help="fine-tuning options")
    p.set_defaults(func=cmd_finetune)
    accept_late_overrides(p)

    p = subparsers.add_parser(
        "evaluate",
        help="fine-tune and score a task suite (GLUE); writes RUN_DIR/eval/",
        description="Fine-tune every available task of the suite found in --data and write a "
        "table per task plus the average to RUN_DIR/eval/glue.md|json (glue-random.* with "
        "--random-init, glue-lora.* with peft=lora; with --tasks the names are added, e.g. glue-cola-rte.md). "
        "The average excludes WNLI and counts MNLI m/mm as two entries.",
        epilog=_config_epilog(),
        formatter_class=raw,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="directory written by cramkit pretrain")
    p.add_argument("--suite", default="glue", help="task suite (default: glue)")
    p.add_argument("--data", required=True, help="directory with the suite's task folders")
    p.add_argument("--tasks", default=None, help="comma-separated subset, e.g. cola,sst2")
    p.add_argument(
        "--random-init",
        action="store_true",
        help="start from random weights of the same shape (no-pretraining control)",
    )
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help="fine-tuning options")
    p.set_defaults(func=cmd_evaluate)
    accept_late_overrides(p)

    p = subparsers.add_parser(
        "predict",
        help="label a file's texts with weights that finetune.save=true kept",
        description="Load the fine-tuned weights in FINETUNED_DIR (RUN_DIR/finetune/TASK[-PEFT][-random]/"
        "seed-N, which `cramkit finetune ... finetune.save=true` writes, or a folder above it holding "
        "one) on the pretraining run they came from, and predict each row of --input: a "
        ".tsv/.csv/.jsonl[.gz] file read as the task's files are, with its text column (and pair "
        "column; a label column is ignored), or for a single-text task a .txt[.gz] file of one text "
        "per line (blank lines skipped). Writes one JSON object per row: its line number, the "
        "prediction (a label name, or a number for regression) and, for classification, each "
        "label's probability; to --out, else to standard output.",
    )
    p.add_argument("finetuned_dir", metavar="FINETUNED_DIR", help="folder of saved fine-tuned weights")
    p.add_argument("--input", required=True, help="texts to label: .tsv, .csv, .jsonl, or .txt with one text per line (each optionally .gz)")
    p.add_argument("--out", default=None, help="JSON Lines file to write (atomically); default: stdout")
    p.add_argument("--text-column", default=None, help="the text column of --input (default: the task's)")
    p.add_argument("--text-pair-column", default=None,
                   help="pair tasks: the second text column of --input (default: the task's)")
    p.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cpu', 'cuda'...")
    p.add_argument("--run-dir", default=None,
                   help="the pretraining run the weights came from, when it is no longer the folder "
                   "they lie in nor where it was when they were saved")
    p.set_defaults(func=cmd_predict)

    p = subparsers.add_parser(
        "export",
        help="export a run for transformers (or cramkit's own format)",
        description="Write RUN_DIR's newest checkpoint to --out. With --format hf, architectures "
        "with an exact transformers counterpart (BertForMaskedLM, GPT2LMHeadModel) load with "
        "Auto classes; others are written in cramkit's format (cramkit.export.load_exported). "
        "Fine-tuned weights (cramkit finetune save=true: RUN_DIR/finetune/TASK/seed-N) that are "
        "exactly BertForSequenceClassification export as one (AutoModelForSequenceClassification), "
        "a PEFT adapter merged in; others are refused with the reasons.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="directory written by cramkit pretrain, or fine-tuned weights (finetune save=true)")
    p.add_argument("--format", default="hf", choices=["hf", "cramkit"], help="output layout (default: hf; architectures without a Hugging Face counterpart are written as cramkit)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--force", action="store_true", help="replace a previous export at --out")
    p.set_defaults(func=cmd_export)
