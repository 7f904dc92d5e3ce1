"""Does the data path keep up with the GPU? Sequences per second of the training loader (issue #9).

    PYTHONPATH=src python benchmarks/loader_throughput.py                  # ~1 minute with preparing
    PYTHONPATH=src python benchmarks/loader_throughput.py --data PREPARED_DIR --seconds 20
    PYTHONPATH=src python benchmarks/loader_throughput.py --smoke          # seconds: exercises the logic

What the trainer's data path does per batch, timed on its own, on the CPU:

1. the loader's background thread: read a micro-batch of packed sequences from the memory-mapped
   shards, draw the masked-LM masks (crammed-bert's objective: 25 % masking, 80/10/10) and hand
   it over; measured as the rate at which a consumer that does nothing else receives batches;
2. the main thread's share: the targets' positions for sparse prediction (``locate_targets``)
   and the target count the step's loss weighting needs, per batch.

Against the rate a GPU consumes (``--gpu-tokens-per-s``, default 547,486: crammed-bert at 256 x
128 on the H100, BENCHMARKS.md), the margin says how many times over the loader keeps up. Without
``--data``, the first enwiki training shard is prepared with crammed-bert's data settings into
``--work`` (reused when there).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

from cramkit.config import load_config
from cramkit.data.dataset import TokenDataset
from cramkit.data.loader import ShardLoader
from cramkit.objectives import build_objective, target_index
from cramkit.utils import write_json

REPO = Path(__file__).resolve().parents[1]
ENWIKI = REPO.parent / "shared" / "data" / "pretrain" / "enwiki-2015"


def prepared(args, recipe) -> Path:
    if args.data:
        return Path(args.data)
    from cramkit.data.config import PrepareConfig
    from cramkit.data.prepare import prepare

    shard = ENWIKI / "train-00.txt.xz"
    if not shard.is_file():
        sys.exit(f"error: no {shard}; pass --data PREPARED_DIR")
    # crammed-bert's data settings (WordPiece 32768, lowercase ASCII, sequence 128, curriculum order).
    data = recipe.data.prepare.to_dict() | {"sources": [str(shard)]}
    if args.smoke:
        data |= {"vocab_size": 1024, "max_docs": 40, "tokenizer_sample_mb": 1.0, "max_token_ratio": 0.0}
    return prepare(PrepareConfig.from_dict(data), Path(args.work) / ("smoke" if args.smoke else "enwiki-00"),
                   progress=False)


def loader_rate(dataset: TokenDataset, objective, batch: int, seconds: float) -> tuple[float, int]:
    """Batches per second a consumer that does nothing else receives, after a warm-up batch."""
    loader = ShardLoader(dataset, "train", batch, seed=0, epochs=None, transform=objective)
    try:
        next(loader)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            next(loader)
            n += 1
        return n / (time.perf_counter() - start), n
    finally:
        loader.close()


def main_thread_seconds(dataset: TokenDataset, objective, batch: int, repeats: int) -> float:
    """Seconds per batch of what the trainer's own thread does with a batch before the device."""
    batches = [objective(torch.from_numpy(dataset.sequences("train")[i * batch:(i + 1) * batch].astype("int64")),
                         i * batch) for i in range(4)]  # ids: the sequences' rows
    start = time.perf_counter()
    for i in range(repeats):
        labels = batches[i % 4]["labels"]
        target_index(labels)
        int((labels != -100).sum())
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="", help="a prepared dataset (default: prepare enwiki's first shard)")
    ap.add_argument("--work", default="/tmp/cramkit-loader", help="where to prepare it")
    ap.add_argument("--batch", type=int, default=256, help="sequences per micro-batch")
    ap.add_argument("--seconds", type=float, default=20.0, help="time the loader for this long")
    ap.add_argument("--gpu-tokens-per-s", type=float, default=547_486.0,
                    help="what the GPU consumes (default: crammed-bert on the H100, BENCHMARKS.md)")
    ap.add_argument("--json", default="", help="also write the result here")
    ap.add_argument("--smoke", action="store_true", help="a tiny dataset and a second of timing")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.seconds = 8, 1.0
    cfg = load_config("crammed-bert")
    dataset = TokenDataset.open(prepared(args, cfg))
    o = cfg.objective
    objective = build_objective("mlm", dataset, mask_rate=o.mask_rate, mask_prob=o.mask_fraction,
                                random_prob=o.random_fraction, seed=0)
    rate, batches = loader_rate(dataset, objective, args.batch, args.seconds)
    main_s = main_thread_seconds(dataset, objective, args.batch, 10 if args.smoke else 200)
    tokens = rate * args.batch * dataset.seq_len
    result = {
        "date": datetime.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "torch": torch.__version__, "batch": args.batch, "seq_len": dataset.seq_len,
        "batches_timed": batches, "loader_sequences_per_s": rate * args.batch, "loader_tokens_per_s": tokens,
        "main_thread_ms_per_batch": main_s * 1e3, "gpu_tokens_per_s": args.gpu_tokens_per_s,
        "margin": tokens / args.gpu_tokens_per_s,
        # The share of a GPU step (at that rate) the main thread spends on the batch.
        "main_thread_share_of_gpu_step": main_s / (args.batch * dataset.seq_len / args.gpu_tokens_per_s),
    }
    print(f"{args.batch} x {dataset.seq_len} batches, {batches} timed in {args.seconds:g} s on "
          f"{result['cores']} cores ({result['cpu']}), torch {torch.__version__}")
    print(f"loader thread: {result['loader_sequences_per_s']:,.0f} sequences/s = {tokens:,.0f} tokens/s, "
          f"{result['margin']:.1f}x the GPU's {args.gpu_tokens_per_s:,.0f} tokens/s")
    print(f"main thread: {result['main_thread_ms_per_batch']:.2f} ms per batch, "
          f"{result['main_thread_share_of_gpu_step']:.1%} of a GPU step at that rate")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
