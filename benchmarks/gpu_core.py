"""GPU benchmark for the core trainer (issue 4) and downstream evaluation (issue 5), one call.

1. prepares the English Wikipedia shards (WordPiece 32768, sequence 128, as cramming);
2. times training steps of cramkit's crammed-bert next to Hugging Face BertForMaskedLM
   (bert-base shape), both compiled, bf16, fused AdamW, in this process (``cramkit bench``);
3. pretrains the crammed-bert recipe on those shards for a short wall-clock budget;
4. fine-tunes the result and a randomly initialised twin on the GLUE tasks present (optional).

Run on the GPU machine from the repository root (data copied into the git-ignored ``.gpu/``):

    PYTHONPATH=src python benchmarks/gpu_core.py --enwiki .gpu/enwiki-2015 --glue .gpu/glue

It prints Markdown tables last and writes JSON under $OUT (or ./gpu-results).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
import traceback
from pathlib import Path

import torch


def stage(name):
    def deco(fn):
        def run(*args, **kwargs):
            print(f"\n=== {name} ===", flush=True)
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            except Exception:  # keep going: later stages still report
                traceback.print_exc()
                out = None
            print(f"=== {name}: {time.perf_counter() - t0:.1f} s ===", flush=True)
            return out

        return run

    return deco


# --smoke: the same stages at tiny sizes on the CPU, to check the script before GPU time is spent.
SMOKE = False


@stage("prepare enwiki")
def prepare_enwiki(src: str, out: Path) -> Path:
    from cramkit.data.config import PrepareConfig
    from cramkit.data.prepare import prepare

    cfg = PrepareConfig.from_dict(
        {
            "sources": sorted(glob.glob(f"{src}/train-*.txt.xz")),
            "objective": "mlm",
            "tokenizer": "wordpiece",
            "vocab_size": 32768,
            "seq_len": 128,
            "val_fraction": 0.02,
            "lowercase": True,
            "strip_accents": True,
            "ascii_only": True,
            "seed": 0,
            **({"vocab_size": 1024, "max_docs": 60} if SMOKE else {}),
        }
    )
    return prepare(cfg, out, progress=False)


@stage("throughput: cramkit vs Hugging Face")
def throughput(results: dict) -> str:
    from cramkit.bench import bench_target, table
    from cramkit.train.device import measure_peak_flops

    device = torch.device("cpu" if SMOKE else "cuda")
    precision = "fp32" if SMOKE else "bf16"
    peak = measure_peak_flops(device, precision)
    size = "tiny" if SMOKE else None
    rows = []
    for target, rate in (
        ("hf-bert:bert-base", 0.15),
        ("cramkit:bert-base", 0.15),
        ("cramkit:crammed-bert", 0.25),
    ):
        target = f"{target.split(':')[0]}:{size}" if size else target
        try:
            r = bench_target(
                target,
                batch=8 if SMOKE else 256,
                seq_len=128,
                steps=2 if SMOKE else 30,
                warmup=1 if SMOKE else 8,
                device=device,
                precision=precision,
                compile=not SMOKE,
                mask_rate=rate,
                peak=peak,
            )
            rows.append(r)
            print(r, flush=True)
        except Exception:
            traceback.print_exc()
        torch.cuda.empty_cache()
    results["throughput"] = [r.__dict__ for r in rows]
    results["peak_flops"] = peak
    return table(rows, peak, "cpu" if SMOKE else torch.cuda.get_device_name())


@stage("pretrain crammed-bert on enwiki")
def pretrain_crammed(data_dir: Path, runs: Path, seconds: int, results: dict) -> Path | None:
    from cramkit.config import load_config
    from cramkit.train.run import pretrain

    # REFERENCE.md's 150-second comparison used batch 1024 without a ramp; a 8192 batch would
    # leave a few-minute run with only dozens of optimizer steps.
    cfg = load_config(
        "crammed-bert",
        [
            f"data.dir={data_dir}",
            f"out_dir={runs}",
            "name=crammed",
            f"train.budget={seconds}s",
            "train.batch_size=1024",
            "train.batch_ramp=0",
            "train.eval_every=0.1",
            "train.eval_batches=40",
            "train.checkpoint_every=0",
            "train.progress_bar=false",
            "train.log_every=20",
            *(
                [
                    "model.preset=tiny",
                    "model.vocab_size=1024",
                    "train.compile=false",
                    "train.batch_size=16",
                    "train.micro_batch=8",
                    "train.eval_batches=2",
                ]
                if SMOKE
                else []
            ),
        ],
    )
    summary = pretrain(cfg)
    results["pretrain"] = summary
    evals = [json.loads(x) for x in (runs / "crammed" / "metrics.jsonl").read_text().splitlines()]
    results["pretrain_evals"] = [e for e in evals if e["type"] == "eval"]
    return runs / "crammed"


@stage("GLUE: pretrained vs random init")
def glue(run_dir: Path, glue_dir: str, results: dict) -> str:
    from cramkit.eval.finetune import evaluate_suite  # provided by the evaluation module

    tables = []
    for random_init in (False, True):
        report = evaluate_suite(run_dir, glue_dir, random_init=random_init)
        results["glue_random" if random_init else "glue"] = report["json"]
        tables.append(report["markdown"])
    return "\n\n".join(tables)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--enwiki", default=".gpu/enwiki-2015")
    ap.add_argument("--glue", default=".gpu/glue")
    ap.add_argument("--work", default="/tmp/cramkit-gpu")
    ap.add_argument(
        "--seconds", type=int, default=150, help="pretraining budget (wall-clock, training only)"
    )
    ap.add_argument(
        "--skip", default="", help="comma list of stages to skip: throughput,pretrain,glue"
    )
    ap.add_argument(
        "--smoke", action="store_true", help="tiny sizes on the CPU: checks the script itself"
    )
    args = ap.parse_args()
    global SMOKE
    SMOKE = args.smoke
    skip = set(filter(None, args.skip.split(",")))
    out = Path(os.environ.get("OUT", "gpu-results"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    results: dict = {
        "device": "cpu" if SMOKE else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    data = prepare_enwiki(args.enwiki, work / "enwiki")
    if data:
        manifest = json.loads((data / "manifest.json").read_text())
        results["data"] = {
            "splits": manifest.get("splits"),
            "filter_stats": manifest.get("filter_stats"),
            "prepare_seconds": manifest.get("seconds"),
        }
    tp = throughput(results) if "throughput" not in skip else None
    run_dir = (
        pretrain_crammed(data, work / "runs", args.seconds, results)
        if data and "pretrain" not in skip
        else None
    )
    glue_tables = glue(run_dir, args.glue, results) if run_dir and "glue" not in skip else None
    (out / "gpu_core.json").write_text(json.dumps(results, indent=2, default=str))
    print("\n\n##### RESULTS #####")
    print(json.dumps({k: results.get(k) for k in ("device", "torch", "date", "data")}, default=str))
    if tp:
        print(tp)
    if "pretrain" in results:
        s = results["pretrain"]
        print(
            f"\npretrain: {s['steps']} steps, {s['tokens']:,} tokens in {s['train_seconds']} s, "
            f"{s['tokens_per_s']:,.0f} tokens/s, MFU {s['mfu']:.1%}, val loss {s['initial_val_loss']:.3f} -> "
            f"{s['final_val_loss']:.3f}"
        )
        print("| elapsed s | tokens | val loss |\n| --- | --- | --- |")
        for e in results["pretrain_evals"]:
            print(f"| {e['elapsed']:.0f} | {e['tokens']:,} | {e['val_loss']:.3f} |")
    if glue_tables:
        print(glue_tables)


if __name__ == "__main__":
    main()
