"""CPU throughput and peak memory of ``cramkit prepare`` next to raw ``tokenizers`` encoding.

Usage (from the repo root):

    PYTHONPATH=src python benchmarks/prepare_throughput.py [--files 5] [--sample-mb 32]

Runs, each ``prepare`` in its own subprocess so its peak RSS can be read (``os.wait4``):

1. ``prepare`` of the first ``--files`` enwiki-2015 train shards (xz, decompressed on the fly),
   including WordPiece training on the first ``--sample-mb`` MB;
2. the same with that tokenizer reused (``tokenizer_file``): the streaming pipeline alone
   (read, normalise, tokenize, filter, order, pack, write);
3. the pipeline on the first shard only, to show peak memory does not grow with corpus size;
4. in this process, ``Tokenizer.encode_batch_fast`` on the same documents, already in memory;
5. in this process, what the compressibility filter (``max_token_ratio``) adds: normalising every
   document a second time to count its characters, against the ASCII floor
   (``cramkit.data.tokenizer.normalised_length``) that settles most documents without it.

Prints a Markdown table. Needs ../shared/data beside the checkout.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENWIKI = (REPO / ".." / "shared" / "data" / "pretrain" / "enwiki-2015").resolve()

CHILD = """
import json, sys, time
from cramkit.data.config import PrepareConfig
from cramkit.data.prepare import prepare
cfg = PrepareConfig.from_dict(json.loads(sys.argv[1]))
t = time.perf_counter()
prepare(cfg, sys.argv[2], progress=False)
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def run_child(cfg: dict, out: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one prepare in a subprocess.

    ``os.wait4`` returns that child's own rusage; ``getrusage(RUSAGE_CHILDREN)`` would give the
    maximum over every child so far.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(cfg), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout = proc.stdout.read()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed:\n{stderr}")
    seconds = json.loads(stdout.strip().splitlines()[-1])["seconds"]
    return seconds, usage.ru_maxrss / 1024  # KiB on Linux


def read_docs(files: list[Path]) -> list[str]:
    docs, cur = [], []
    for f in files:
        with lzma.open(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    cur.append(line.rstrip("\n"))
                elif cur:
                    docs.append("\n".join(cur))
                    cur = []
        if cur:
            docs.append("\n".join(cur))
            cur = []
    return docs


def time_normalised_length(tok, options: dict, docs: list[str]) -> tuple[float, float]:
    """Seconds to count every document's normalised characters exactly, and by the floor."""
    from cramkit.data.config import PrepareConfig
    from cramkit.data.tokenizer import normalised_length

    cfg = PrepareConfig.from_dict(options)
    floor, exact = normalised_length(tok.normalizer, cfg)
    seconds = []
    for count in (exact, floor):
        t = time.perf_counter()
        for doc in docs:
            count(doc)
        seconds.append(time.perf_counter() - t)
    return seconds[0], seconds[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=5, help="enwiki train shards to use (1-6)")
    ap.add_argument("--sample-mb", type=float, default=32.0, help="tokenizer training sample")
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    files = sorted(ENWIKI.glob("train-*.txt.xz"))[: args.files]
    if not files:
        print(f"error: no enwiki shards under {ENWIKI}", file=sys.stderr)
        return 2
    base = {
        "sources": [str(f) for f in files],
        "vocab_size": args.vocab_size,
        "seq_len": args.seq_len,
        "tokenizer_sample_mb": args.sample_mb,
        "lowercase": True,
        "strip_accents": True,
        "ordering": "random",
        "val_fraction": 0.005,
    }
    with tempfile.TemporaryDirectory(prefix="cramkit-bench-") as tmp:
        tmp = Path(tmp)
        t_full, peak_full = run_child(base, tmp / "full")
        manifest = json.loads((tmp / "full" / "manifest.json").read_text())
        tok_file = tmp / "full" / "tokenizer.json"
        reuse = {**base, "tokenizer_file": str(tok_file)}
        t_pipe, peak_pipe = run_child(reuse, tmp / "reuse")
        # The same pipeline on one shard: peak memory should not grow with corpus size.
        one = {**reuse, "sources": base["sources"][:1]}
        t_one, peak_one = run_child(one, tmp / "one")
        one_mb = sum(len(d.encode("utf-8")) for d in read_docs(files[:1])) / 1e6

        docs = read_docs(files)
        raw_mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_file))
        t = time.perf_counter()
        n_tokens = 0
        for i in range(0, len(docs), 256):
            enc = tok.encode_batch_fast(docs[i : i + 256], add_special_tokens=False)
            n_tokens += sum(len(e.ids) for e in enc)
        t_raw = time.perf_counter() - t
        t_exact, t_floor = time_normalised_length(tok, base, docs)

    tokens = sum(manifest["splits"][s]["content_tokens"] for s in ("train", "val"))
    rows = [
        ("prepare, incl. tokenizer training", t_full, peak_full, tokens),
        ("prepare, tokenizer reused (pipeline only)", t_pipe, peak_pipe, tokens),
        ("raw tokenizers encode_batch_fast (in memory)", t_raw, None, n_tokens),
    ]
    print(f"# {len(files)} enwiki shards, {raw_mb:.1f} MB of UTF-8 text, {len(docs)} documents")
    print(f"# python {platform.python_version()}, cpus {os.cpu_count()}, {platform.processor()}")
    print("| step | seconds | MB/s | tokens/s | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|")
    for name, secs, peak, ntok in rows:
        peak_s = f"{peak:.0f}" if peak is not None else "-"
        print(f"| {name} | {secs:.1f} | {raw_mb / secs:.2f} | {ntok / secs:,.0f} | {peak_s} |")
    print(
        f"# memory vs corpus size: 1 shard ({one_mb:.1f} MB) pipeline-only peak RSS "
        f"{peak_one:.0f} MB in {t_one:.1f} s; {len(files)} shards ({raw_mb:.1f} MB) {peak_pipe:.0f} MB"
    )
    print(f"# compressibility filter's character count over the same documents, one core: "
          f"normalising again {t_exact:.2f} s, ASCII floor {t_floor:.3f} s")
    print(f"# tokens: prepare {tokens:,} (after normalisation), raw {n_tokens:,}")
    print(f"# filter stats: {json.dumps(manifest['filter_stats'])}")
    print(f"# splits: { {s: v['sequences'] for s, v in manifest['splits'].items()} } sequences")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
