"""``prepare``: text sources -> tokenizer + packed token shards + ``manifest.json``.

One streaming pass (after a bounded pass that trains the tokenizer) reads documents, tokenizes
them in batches (normalisation is part of the tokenizer, so it runs inside ``encode_batch`` on all
cores), filters (length floor, exact de-duplication, compressibility),
carves the validation split by document, orders the training documents and packs both splits into
shards (a curriculum then re-sorts the packed training sequences). Memory is bounded by
``batch_docs``, ``order_buffer_tokens`` (random ordering), a set of 8-byte digests (one per
distinct document) and, for a curriculum, 12 bytes per training sequence.

Filters, in order, each counted (documents, tokens, characters) in the manifest's
``filter_stats``: ``weight_zero`` (a fractional source weight dropped it), ``too_short`` (fewer
than ``min_chars`` characters of source text), ``empty`` (no tokens: the normalisation left
nothing but whitespace, e.g. a Chinese article under ``ascii_only``), ``duplicate`` (exact
duplicate: the 8-byte blake2b digest of the normalised document's token ids was seen before, so
documents whose normalised text is identical always match), ``compressibility`` (tokens /
characters of the normalised text above ``max_token_ratio``).

The compressibility filter is cramming's ``remove_trash`` (``cramming/data/
pretraining_preparation.py``, ``len(tokens) < trash_cutoff * len(text)`` kept), with two
differences: the tokens are the corpus's own tokenizer's (cramming's default asks albert-base-v2;
its ``remove_trash: self`` option uses the corpus's own, as here), and the characters are those
of the normalised text, so that text ``ascii_only`` deletes does not dilute the ratio (325
Chinese characters that fold to a few commas and digits would otherwise pass at 0.03).

Ordering (training split only; validation stays in source order):

* ``source``: as read.
* ``random``: seeded shuffle of documents within buffers of ``order_buffer_tokens`` tokens; the
  loader additionally shuffles sequences per epoch.
* ``curriculum``: cramming's sentence-length curriculum (``cramming/data/curriculum_sorting.py``,
  see :mod:`cramkit.data.curriculum`): documents are packed in source order, then *all* packed
  training sequences are sorted once, globally, by descending count of ``"."`` tokens (ties in
  packed order) and the training shards rewritten in that order. ``cramkit pretrain`` keeps this
  order (and ``source``'s) unless ``data.shuffle=on``; a ``ShardLoader`` of your own needs
  ``shuffle=False`` for it.

The output is built in a hidden temporary folder beside ``out_dir`` and renamed into place at the
end, with the manifest written last, so an interrupted run never leaves something that looks done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import queue
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import DataError
from ..utils import (
    atomic_dir,
    changed_keys,
    first_on_machine,
    lock_exclusive,
    looked_in,
    paths_overlap,
    read_json,
    refuse_current_folder,
    sha256_file,
    write_json,
)
from .config import PrepareConfig
from .packing import Packer, ShardWriter, token_dtype
from .sources import Doc, Source, iter_documents, open_sources, sources_fingerprint, total_bytes
from .tokenizer import (
    BPE_SPECIALS,
    PIECE_CHARS,
    WORDPIECE_SPECIALS,
    build_normalizer,
    encoding_copy,
    id_count,
    load_tokenizer,
    normalised_length,
    padded_vocab_size,
    special_ids,
    text_pieces,
    train_tokenizer,
)

# In the fingerprint, so a change of what the same options produce rebuilds cached data. 2: the
# global sequence-level curriculum, the compressibility ratio over normalised characters and the
# "empty" filter. 3: WordPiece vocabularies numbered deterministically (other ids than before).
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
#: The manifest's ``format``: it alone marks a folder as a dataset prepare wrote.
MANIFEST_FORMAT = "cramkit-tokens"
TOKENIZER = "tokenizer.json"


def _output_options(cfg: PrepareConfig) -> dict[str, Any]:
    """``cfg`` as a dict, with the options that cannot change the output at their defaults.

    So that a batch size for encoding, or the training options of a tokenizer that is reused
    rather than trained, neither refuses a prepared folder nor prepares the data again; and
    since they are set to the defaults, every other config keeps the fingerprint it had.
    """
    unused = ["batch_docs"]
    if cfg.tokenizer_file:
        unused += ["tokenizer", "vocab_size", "min_frequency", "tokenizer_sample_mb"]
    if not _ORDERINGS[cfg.ordering].shuffle_documents:
        unused.append("order_buffer_tokens")
    defaults = PrepareConfig().to_dict()
    return {**cfg.to_dict(), **{key: defaults[key] for key in unused}}


def _check_tokenizer_file(cfg: PrepareConfig) -> None:
    path = Path(cfg.tokenizer_file)
    if cfg.tokenizer_file and not path.is_file():
        raise DataError(f"tokenizer_file '{cfg.tokenizer_file}': no such file{looked_in(path)}")


def fingerprint(cfg: PrepareConfig, sources: list[Source] | None = None) -> str:
    """sha256 of the config (the options that change the output), the inputs' (path, size,
    mtime) and the format version."""
    _check_tokenizer_file(cfg)  # cached_prepare fingerprints first: its hash read the file unchecked
    sources = sources if sources is not None else open_sources(cfg)
    inputs = sources_fingerprint(sources)
    if cfg.tokenizer_file:
        inputs.append(["tokenizer_file", sha256_file(cfg.tokenizer_file)])
    blob = json.dumps(
        {"format": FORMAT_VERSION, "config": _output_options(cfg), "inputs": inputs}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _log(msg: str) -> None:
    # Under torchrun one process per machine reports: the others reuse what it prepared (or wait
    # for it on the cache's lock) and would repeat its lines once per GPU.
    if first_on_machine():
        print(msg, file=sys.stderr, flush=True)


def prepare(
    cfg: PrepareConfig,
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    progress: bool | None = None,
) -> Path:
    """Build (or reuse, when the manifest's fingerprint matches) a dataset folder.

    A folder holding a dataset prepared from other inputs or options is an error unless
    ``force`` (then it is rebuilt). ``progress=None`` shows a bar only on a terminal.
    """
    out_dir = Path(out_dir)
    _check_tokenizer_file(cfg)
    sources = open_sources(cfg)
    _check_out_dir(out_dir, sources)
    fp = fingerprint(cfg, sources)
    old = _existing_dataset(out_dir)
    if old is not None and not force:
        if old.get("fingerprint") != fp:
            raise DataError(
                f"{out_dir} already holds a dataset prepared from {_difference(old, cfg)}; use "
                "--force to rebuild it or choose another --out"
            )
        damage = _damage(out_dir)
        if damage is None:
            _log(f"reusing {out_dir} (same inputs and options)")
            return out_dir
        # Reused, it would fail every run that reads it, and so would each "prepare it again".
        warnings.warn(f"{out_dir} is damaged ({damage}); preparing it again", stacklevel=2)
    refuse_current_folder(out_dir, DataError, "data")
    with atomic_dir(out_dir) as tmp:  # the manifest last, the whole directory at once
        manifest = _build(cfg, sources, tmp, fp, progress)
        write_json(tmp / MANIFEST, manifest)
    _log(_summary(manifest, out_dir))
    return out_dir


def _existing_dataset(out_dir: Path) -> dict | None:
    """The manifest of the cramkit dataset in ``out_dir``; None for an absent or empty folder.

    Anything else is refused, with or without ``force``: a folder without a manifest, or whose
    ``manifest.json`` is not a cramkit-tokens object (a web app's, a binary or damaged file), is
    someone's data, not a dataset to rebuild, so the message does not suggest --force (it used
    to, and --force then deleted the folder)."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return None
    manifest_path = out_dir / MANIFEST
    refuse = "choose another --out (--force only rebuilds a dataset)"
    if not manifest_path.exists():
        raise DataError(f"{out_dir} exists, is not empty and is not a cramkit dataset; {refuse}")
    try:
        manifest = read_json(manifest_path, DataError)
    except DataError as exc:
        raise DataError(f"{out_dir} is not a cramkit dataset ({exc}); {refuse}") from None
    # The same test TokenDataset.open makes: only this marks the folder as prepare's.
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(
            f"{out_dir} is not a cramkit dataset ({manifest_path} is not a {MANIFEST_FORMAT} "
            f"manifest); {refuse}"
        )
    return manifest


def _damage(out_dir: Path) -> str | None:
    """What is wrong with the files of the dataset in ``out_dir`` (a shard missing or not of
    its size, the tokenizer missing or not the one the shards were encoded with, a field
    missing); None when a run can read them: TokenDataset's own checks."""
    from .dataset import DamagedDataset, TokenDataset  # dataset imports this module

    try:
        TokenDataset.open(out_dir).check_files()
    except DamagedDataset as exc:
        return exc.problem
    except OSError as exc:  # unreadable: someone's permissions, not damage to repair
        raise DataError(f"{exc.filename}: cannot be read ({exc.strerror})") from None
    return None


def _check_out_dir(out_dir: Path, sources: list[Source]) -> None:
    """Refuse an ``out_dir`` that ``force`` would destroy user data by replacing: a file, or a
    folder that holds (or lies inside) a source. "Exists and is not a cramkit dataset; use
    --force" is what such a folder first gets, and following that advice must not delete the
    corpus."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir} exists and is not a directory; choose another --out")
    for source in sources:
        for path in source.paths():
            if paths_overlap(out_dir, path):
                raise DataError(
                    f"--out {out_dir} overlaps the source '{source.spec}'; choose an --out "
                    "outside the sources"
                )


def cache_folder(cache_root: str | os.PathLike, objective: str, fp: str) -> Path:
    """Where :func:`cached_prepare` keeps the data of ``objective`` with fingerprint ``fp``."""
    return Path(cache_root) / f"{objective}-{fp[:16]}"


def cached_prepare(cfg: PrepareConfig, cache_root: str | os.PathLike, **kwargs: Any) -> Path:
    """``prepare`` into ``cache_root/<objective>-<fingerprint[:16]>`` (reused when present).

    Runs that start together (a sweep) and need the same data would each prepare it and then
    fail each other's final rename; under a lock on the cache entry the first prepares it and
    the others wait, then reuse it.
    """
    out = cache_folder(cache_root, cfg.objective, fingerprint(cfg))
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out.parent / f".{out.name}.lock", out):
        return prepare(cfg, out, **kwargs)


@contextlib.contextmanager
def _exclusive(lock_file: Path, out: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock_file`` for the block (none where flock is unavailable:
    prepare unlocked, as before)."""
    flags = os.O_RDWR | os.O_CREAT
    try:
        fd = lock_exclusive(lock_file, open_flags=flags)
    except BlockingIOError:
        _log(f"waiting for another process preparing {out} ...")
        fd = lock_exclusive(lock_file, open_flags=flags, wait=True)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _difference(old: dict, cfg: PrepareConfig) -> str:
    old_cfg = old.get("config", {})
    new_cfg = cfg.to_dict()
    keys = changed_keys(old_cfg, new_cfg)
    if keys:
        shown = ", ".join(f"{k}={old_cfg.get(k)!r} (now {new_cfg.get(k)!r})" for k in keys[:5])
        return f"other options: {shown}"
    if old.get("format_version") != FORMAT_VERSION:
        return (f"the same options by an older cramkit (data format {old.get('format_version')}, "
                f"now {FORMAT_VERSION}: what the same options produce changed)")
    return "other input files (sizes or modification times changed)"


# --------------------------------------------------------------------------------------------


def _sample_texts(cfg: PrepareConfig) -> Iterator[str]:
    for doc in iter_documents(cfg):
        if doc.repeat and len(doc.text) >= cfg.min_chars:
            yield doc.text


def _get_tokenizer(cfg: PrepareConfig):
    if cfg.tokenizer_file:
        tok = load_tokenizer(cfg.tokenizer_file)
        _check_reused_normalisation(cfg, tok)
        return tok
    return train_tokenizer(_sample_texts(cfg), cfg)


def _check_reused_normalisation(cfg: PrepareConfig, tok) -> None:
    """A reused tokenizer normalises with its own normaliser: switches that ask for another
    normalisation would be recorded in the manifest but not applied, so they are an error."""
    wanted = build_normalizer(cfg)
    if wanted is None:  # nothing asked for: the file's normalisation, whatever it is
        return
    if tok.normalizer is None or tok.normalizer.__getstate__() != wanted.__getstate__():
        on = ", ".join(f"{k}=true" for k, v in cfg.normalisation().items() if v)
        raise DataError(
            f"{on} asks for another normalisation than tokenizer_file '{cfg.tokenizer_file}' "
            "applies (a reused tokenizer normalises as it was trained); drop these options or "
            "train a new tokenizer"
        )


def _batches(docs: Iterator[Doc], size: int) -> Iterator[list[Doc]]:
    """Batches of documents read by a background thread.

    Reading (decompression, line splitting, UTF-8 checks) is Python work that holds the GIL;
    ``encode_batch`` releases it, so the next batch is read while the current one is encoded.
    """
    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            batch: list[Doc] = []
            for doc in docs:
                batch.append(doc)
                if len(batch) >= size:
                    if not put(batch):
                        return
                    batch = []
            if put(batch):
                put(None)
        except BaseException as exc:  # re-raised in the consumer, with its message intact
            put(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            if item:
                yield item
    finally:
        stop.set()
        thread.join()


def _encode(encoder, texts: list[str]) -> list[list[int] | np.ndarray]:
    """Each text's token ids (no special tokens); a long text is encoded a few pieces at a time
    (see :func:`text_pieces`) into a uint32 array, so memory follows the piece, not the
    document (a list holds 36 bytes per token)."""
    out: list[list[int] | np.ndarray] = [[] for _ in texts]
    short = [i for i, text in enumerate(texts) if len(text) <= PIECE_CHARS]
    encodings = encoder.encode_batch_fast([texts[i] for i in short], add_special_tokens=False)
    for i, enc in zip(short, encodings):
        out[i] = enc.ids  # .ids builds a new list on every access
    for i, text in enumerate(texts):
        if len(text) > PIECE_CHARS:
            parts, pieces = [], text_pieces(text, PIECE_CHARS)
            while group := list(itertools.islice(pieces, _PIECES_AT_ONCE)):
                encodings = encoder.encode_batch_fast(group, add_special_tokens=False)
                parts += [np.asarray(enc.ids, dtype=np.uint32) for enc in encodings]
            out[i] = np.concatenate(parts)
    return out


#: Pieces of one long text encoded in one call (in parallel).
_PIECES_AT_ONCE = 8


class _Orderer:
    """Feeds training documents to the packer: as read, or (``random``) shuffled a bounded
    buffer of ``order_buffer_tokens`` tokens at a time."""

    def __init__(self, cfg: PrepareConfig, packer: Packer):
        self.cfg, self.packer = cfg, packer
        self.shuffle = _ORDERINGS[cfg.ordering].shuffle_documents
        self.buffer: list[np.ndarray] = []
        self.tokens = 0
        self.flushes = 0

    def add(self, tokens: np.ndarray) -> None:
        if not self.shuffle:
            self.packer.add(tokens)
            return
        self.buffer.append(tokens)
        self.tokens += len(tokens)
        if self.tokens >= self.cfg.order_buffer_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        rng = np.random.default_rng((self.cfg.seed, 2, self.flushes))
        for i in rng.permutation(len(self.buffer)):
            self.packer.add(self.buffer[i])
        self.buffer, self.tokens = [], 0
        self.flushes += 1


def _curriculum(tmp: Path, info: dict, writer: ShardWriter, encoder) -> dict:
    """Sort the packed training split as cramming's sentence-length curriculum does."""
    # Imported here: curriculum reads shards through dataset, which imports this module.
    from .curriculum import (
        SENTENCE_TOKEN,
        curriculum_order,
        sentence_token_id,
        sequence_keys,
        sort_split,
    )
    from .dataset import SequenceView

    token_id = sentence_token_id(encoder)
    keys = sequence_keys(SequenceView(tmp, info["shards"], writer.seq_len, writer.dtype), token_id)
    order = curriculum_order(keys)
    info["shards"] = sort_split(tmp, info["shards"], order, writer)
    return {
        "key": f"count of the token '{SENTENCE_TOKEN}' (id {token_id}) per packed sequence",
        "direction": "descending (most first), ties in packed order",
        "reference": "cramming/data/curriculum_sorting.py (_sort_tokenized_dataset_by_token)",
        "key_first": int(keys[order[0]]),
        "key_last": int(keys[order[-1]]),
        "key_mean": round(float(keys.mean()), 3),
    }


@dataclasses.dataclass(frozen=True)
class _Ordering:
    """How one ``ordering`` value orders the training split."""

    description: str
    shuffle_documents: bool = False
    #: Re-sorts the packed split (tmp, split info, a writer for the new shards, encoder) and
    #: returns what the manifest records about it; None: the packed order stays.
    sort_sequences: Callable[[Path, dict, ShardWriter, Any], dict] | None = None


_ORDERINGS: dict[str, _Ordering] = {
    "source": _Ordering("documents in source order"),
    "random": _Ordering("documents shuffled within buffers of order_buffer_tokens tokens",
                        shuffle_documents=True),
    "curriculum": _Ordering("packed sequences sorted globally (sentence-length curriculum)",
                            sort_sequences=_curriculum),
}


def _new_stats() -> dict[str, dict[str, int]]:
    steps = ("read", "weight_zero", "too_short", "empty", "duplicate", "compressibility", "kept")
    return {s: {"docs": 0, "tokens": 0, "chars": 0} for s in steps}


def _count(stats: dict, step: str, text: str, n_tokens: int) -> None:
    stats[step]["docs"] += 1
    stats[step]["tokens"] += n_tokens
    stats[step]["chars"] += len(text)


def _progress_bar(cfg: PrepareConfig, sources: list[Source], progress: bool | None):
    from tqdm import tqdm

    enabled = sys.stderr.isatty() if progress is None else progress
    return tqdm(
        total=None if cfg.max_docs else total_bytes(sources),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="prepare",
        file=sys.stderr,
        disable=not enabled,
        dynamic_ncols=True,
    )


def _build(cfg: PrepareConfig, sources: list[Source], tmp: Path, fp: str, progress) -> dict:
    t0 = time.time()
    tok = _get_tokenizer(cfg)
    tok.save(str(tmp / TOKENIZER))
    ids = special_ids(tok)
    _check_specials(cfg, ids)
    n_vocab = id_count(tok)
    padded = padded_vocab_size(n_vocab)
    dtype = token_dtype(padded)
    encoder = encoding_copy(tok)
    seqs_per_shard = max(1, cfg.shard_tokens // cfg.seq_len)

    def writer(split: str) -> ShardWriter:
        return ShardWriter(tmp, split, cfg.seq_len, dtype, seqs_per_shard)

    def packer(split: str) -> Packer:
        return Packer(writer(split), cfg.seq_len, cfg.objective, ids, cfg.last_sequence)

    ordering = _ORDERINGS[cfg.ordering]
    # A split that is re-sorted after packing is packed under another name first, so the final
    # train-NNNNN.bin files are only ever the sorted ones.
    train = packer("unsorted-train" if ordering.sort_sequences else "train")
    val = packer("val")
    chars_floor, chars = normalised_length(encoder.normalizer, cfg)
    orderer = _Orderer(cfg, train)
    stats = _new_stats()
    seen: set[bytes] = set()
    split_rng = np.random.default_rng((cfg.seed, 1))
    pending: list[Any] = []  # one document held back so the last can go to val if val is empty
    n_val = 0
    repeated = {"docs": 0, "tokens": 0}

    def dispatch(item, to_val: bool) -> None:
        nonlocal n_val
        tokens, text, repeat = item
        if to_val:
            val.add(tokens)
            n_val += 1
            return
        for _ in range(repeat):
            orderer.add(tokens)
        if repeat > 1:
            repeated["docs"] += repeat - 1
            repeated["tokens"] += (repeat - 1) * len(tokens)

    def handle(batch: list[Doc]) -> None:
        for doc, ids_list in zip(batch, _encode(encoder, [doc.text for doc in batch])):
            text = doc.text
            n = len(ids_list)
            _count(stats, "read", text, n)
            if doc.repeat == 0:
                _count(stats, "weight_zero", text, n)
                continue
            if len(text) < cfg.min_chars:
                _count(stats, "too_short", text, n)
                continue
            if n == 0:
                _count(stats, "empty", text, n)
                continue
            tokens = np.asarray(ids_list, dtype=np.uint32)
            if cfg.dedup:
                digest = hashlib.blake2b(tokens.tobytes(), digest_size=8).digest()
                if digest in seen:
                    _count(stats, "duplicate", text, n)
                    continue
                seen.add(digest)
            if cfg.max_token_ratio:
                # The normalised text's characters: the tokens were counted on it, and raw
                # characters that normalisation deletes (non-ASCII under ascii_only) would
                # make junk look compressible. The floor settles most documents without
                # normalising them a second time.
                limit = cfg.max_token_ratio
                if n > limit * chars_floor(text) and n > limit * chars(text):
                    _count(stats, "compressibility", text, n)
                    continue
            _count(stats, "kept", text, n)
            to_val = bool(split_rng.random() < cfg.val_fraction)
            if pending:
                dispatch(*pending.pop())
            pending.append(((tokens, text, doc.repeat), to_val))

    bar = _progress_bar(cfg, sources, progress)
    n_docs = 0
    try:
        for batch in _batches(iter_documents(cfg, sources), cfg.batch_docs):
            handle(batch)
            n_docs += len(batch)
            bar.update(sum(doc.nbytes for doc in batch))
            bar.set_postfix(docs=n_docs, refresh=False)
    finally:
        bar.close()
    if pending:
        item, to_val = pending.pop()
        dispatch(item, to_val or (cfg.val_fraction > 0 and n_val == 0))
    orderer.flush()
    if stats["kept"]["docs"] == 0:
        hint = ""
        if stats["compressibility"]["docs"]:
            # Tokens per character grow as the vocabulary shrinks: 0.25 is cramming's cut-off
            # for a 32768 WordPiece vocabulary.
            hint = (f"; max_token_ratio={cfg.max_token_ratio} dropped each document with more tokens "
                    "per character than that, and a smaller vocabulary makes more tokens per character: "
                    "raise max_token_ratio (0 = off) or vocab_size")
        raise DataError(f"no documents left after filtering ({_filter_line(stats)}){hint}")
    if train.stats["docs"] == 0:
        raise DataError(
            f"no training documents left: only {stats['kept']['docs']} document(s) after "
            "filtering and val_fraction > 0 needs at least 2"
        )
    splits = {"train": train.finish(), "val": val.finish()}
    if splits["train"]["sequences"] == 0:
        raise DataError(
            f"the training split has {train.stats['content_tokens']} tokens, fewer than one "
            f"sequence of seq_len={cfg.seq_len} (last_sequence=drop); lower seq_len or add text"
        )
    if splits["val"]["docs"] and splits["val"]["sequences"] == 0:
        # The held-out documents were all dropped: pretraining would stop at its first evaluation.
        raise DataError(
            f"the validation split has {val.stats['content_tokens']} tokens ({n_val} document(s)), "
            f"fewer than one sequence of seq_len={cfg.seq_len} (last_sequence=drop); raise "
            "val_fraction, lower seq_len or use last_sequence=pad"
        )
    train_order: dict[str, Any] = {"ordering": cfg.ordering, "description": ordering.description}
    if ordering.sort_sequences:
        train_order.update(ordering.sort_sequences(tmp, splits["train"], writer("train"), encoder))
    stats["repeated"] = repeated
    import tokenizers

    return {
        "format": MANIFEST_FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "objective": cfg.objective,
        "tokenizer_kind": cfg.tokenizer_kind if not cfg.tokenizer_file else "file",
        "seq_len": cfg.seq_len,
        "dtype": dtype.name,
        "vocab_size": padded,
        "tokenizer_vocab_size": n_vocab,
        "special_ids": ids,
        "tokenizer_file": TOKENIZER,
        "tokenizer_sha256": sha256_file(tmp / TOKENIZER),
        "splits": splits,
        "filter_stats": stats,
        "train_order": train_order,
        "config": cfg.to_dict(),
        "inputs": sources_fingerprint(sources),
        "seconds": round(time.time() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"cramkit": __version__, "tokenizers": tokenizers.__version__},
    }


def _check_specials(cfg: PrepareConfig, ids: dict[str, int | None]) -> None:
    # CLM data uses its pad token only to fill the last sequence (packing.Packer): a reused GPT-2
    # style tokenizer with <|endoftext|> alone prepares with last_sequence=drop.
    needed = ("pad", "cls", "sep", "mask") if cfg.objective == "mlm" else (
        ("pad", "eod") if cfg.last_sequence == "pad" else ("eod",))
    missing = [r for r in needed if ids[r] is None]
    if missing:
        spellings = ", ".join(
            f"{r} {' or '.join(n for n in (WORDPIECE_SPECIALS.get(r), BPE_SPECIALS.get(r)) if n)}"
            for r in missing)
        drop = " to pad its last sequence (or set last_sequence=drop)" if missing == ["pad"] and cfg.objective == "clm" else ""
        raise DataError(
            f"the tokenizer has no {'/'.join(missing)} token ({spellings}), needed for "
            f"objective={cfg.objective}{drop}"
        )


def _filter_line(stats: dict) -> str:
    return ", ".join(
        f"{step}: {v['docs']} docs / {v['tokens']} tokens"
        for step, v in stats.items()
        if step not in ("kept",)
    )


def _summary(manifest: dict, out_dir: Path) -> str:
    s = manifest["splits"]
    f = manifest["filter_stats"]
    removed = ", ".join(
        f"{step} {f[step]['docs']} docs / {f[step]['tokens']} tokens"
        for step in ("weight_zero", "too_short", "empty", "duplicate", "compressibility")
        if f[step]["docs"]
    )
    return (
        f"prepared {out_dir}: read {f['read']['docs']} docs; removed: {removed or 'none'}; "
        f"train {s['train']['docs']} docs / {s['train']['sequences']} sequences, "
        f"val {s['val']['docs']} docs / {s['val']['sequences']} sequences; "
        f"seq_len {manifest['seq_len']}, vocab {manifest['tokenizer_vocab_size']} "
        f"(padded {manifest['vocab_size']}), {manifest['seconds']} s"
    )
