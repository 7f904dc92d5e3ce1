"""GPU benchmark for the training techniques (issue 6): time and FLOPs to the baseline's loss.

Runs the ``crammed-bert`` recipe as the baseline and once with each technique (pld, stacking,
vcycle, seqwarmup), all for the same short wall-clock budget on the same English Wikipedia data,
then prints a Markdown table: the training time and FLOPs each run needed to reach the baseline's
final validation loss (linear interpolation in the evaluation log; "not reached" otherwise), its
final validation loss and its tokens/s. JSON goes to ``$OUT/techniques.json`` when ``$OUT`` is
set.

Run on the GPU machine from the repository root (the shards copied into the git-ignored
``.gpu/``); ``--data`` takes either a prepared directory (with ``manifest.json``) or a folder of
raw ``train-*.txt.xz`` shards, which are prepared first (WordPiece 32768, sequence 128):

    PYTHONPATH=src python benchmarks/techniques_gpu.py --data .gpu/enwiki-2015

Five runs of 60 s of training each (plus start-up and 21 evaluations, ~85 s of wall time each),
eager, fit in about 7.5 minutes on an H100 once the data is prepared (prepared data is cached under
``--work`` by fingerprint, so a second invocation skips that). ``--compile`` compiles every run
(warm-up and the recompiles after stacking's and V-cycle's model changes are outside the clock,
but not outside the 9 minutes: then use ``--budget 45s``). Smaller budgets: ``--budget 30s``.
Check it on a CPU in seconds with ``--smoke`` (tiny preset, 8 steps per run). ``--cpu`` is a real
measurement at CPU scale: a 2.4 M-parameter, 8-layer crammed BERT (hidden 128) on the same
enwiki shards with an 8192-token vocabulary, batch 32, 180 s per run (~5 minutes of wall time
each on two cores). It answers the same question as the GPU run for a model 50x smaller, which
is not the question the papers answer; BENCHMARKS.md keeps the two apart.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

# The one "when does the eval log first reach loss X"; `cramkit report` reads runs with it too.
from cramkit.report import reach, read_metrics
from cramkit.train.device import release_memory
from cramkit.utils import append_jsonl, write_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RAW = str(REPO.parent / "shared" / "data" / "pretrain" / "enwiki-2015")

# Options per technique for a ~60 s run of a 16-layer model (a few hundred steps), each the
# reference recipe's where it has one. PLD: theta_bar 0.5 and DeepSpeed's gamma scaled to the
# budget (0.001/step x 200k steps = 200 per unit of progress; 0.001/step over this run's few
# hundred steps would barely move theta). Stacking: Gong et al.'s 3 -> 6 -> 12 schedule as
# fractions of compute (the budget is time), 4 -> 8 -> 16 here.
TECHNIQUE_RUNS: dict[str, list[str]] = {
    "pld": ["techniques=[pld]", "technique.pld.theta_bar=0.5", "technique.pld.gamma=200"],
    "stacking": ["techniques=[stacking]", "technique.stacking.doublings=2",
                 "technique.stacking.at=[0.04,0.15]"],
    "vcycle": ["techniques=[vcycle]", "technique.vcycle.levels=2", "technique.vcycle.width=2",
               "technique.vcycle.depth=2", "technique.vcycle.fractions=[0.05,0.3,0.65]",
               "technique.vcycle.alpha=0.5"],
    "seqwarmup": ["techniques=[seqwarmup]", "technique.seqwarmup.start=32",
                  "technique.seqwarmup.fraction=0.3"],
}


# Per scale: the prepare options beside the GPU's, the model and batch overrides, the default
# budget. Evaluations every 5 % of the budget in every scale (the grid the times are read off).
SCALES: dict[str, dict] = {
    "gpu": {"prepare": {}, "budget": "60s",
            # Batch 256: ~800 optimizer steps in 60 s eager, so the schedules (PLD theta,
            # stacking points, V-cycle stages) play out over many steps.
            "overrides": ["train.batch_size=256", "train.micro_batch=256", "train.batch_ramp=0",
                          "train.log_every=10"]},
    "cpu": {"prepare": {"vocab_size": 8192}, "budget": "180s",
            # ~12k tokens/s eager on two cores: ~520 steps of 32 x 128 in 180 s. Eight layers so
            # that PLD has depth to drop and stacking can go 2 -> 4 -> 8; validation on 640
            # fixed-mask sequences (2.6 s per evaluation, outside the clock).
            "overrides": ["model.hidden=128", "model.layers=8", "model.heads=4",
                          "model.intermediate=512", "train.device=cpu", "train.batch_size=32",
                          "train.micro_batch=32", "train.batch_ramp=0", "train.eval_batches=20",
                          "train.log_every=10"]},
    "smoke": {"prepare": {"vocab_size": 512, "seq_len": 32, "max_docs": 80, "val_fraction": 0.1},
              "budget": "8steps",
              "overrides": ["model.preset=tiny", "model.layers=4", "train.device=cpu",
                            "train.batch_size=16", "train.micro_batch=8", "train.eval_batches=2",
                            "train.log_every=1", "train.batch_ramp=0"]},
}


def prepare_data(source: str, work: Path, scale: str) -> Path:
    """A prepared data directory: ``source`` itself, or prepared from its raw shards."""
    src = Path(source)
    if (src / "manifest.json").is_file():
        return src
    from cramkit.data.config import PrepareConfig
    from cramkit.data.prepare import cached_prepare

    shards = sorted(glob.glob(str(src / "train-*.txt*")))
    if not shards:
        sys.exit(f"error: {src} has neither manifest.json nor train-*.txt[.xz] shards")
    options = {
        "sources": shards, "objective": "mlm", "tokenizer": "wordpiece", "vocab_size": 32768,
        "seq_len": 128, "val_fraction": 0.02, "lowercase": True, "strip_accents": True,
        "ascii_only": True, "seed": 0,
    }
    options.update(SCALES[scale]["prepare"])
    t0 = time.perf_counter()
    # Keyed by the options' fingerprint: a second invocation reuses the prepared shards.
    out = cached_prepare(PrepareConfig.from_dict(options), work / "data", progress=False)
    print(f"prepared {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def base_overrides(data_dir: Path, work: Path, args) -> list[str]:
    from cramkit.data.dataset import TokenDataset

    vocab = TokenDataset.open(data_dir).vocab_size
    common = [
        f"data.dir={data_dir}", f"out_dir={work / 'runs'}", f"model.vocab_size={vocab}",
        # Evaluations every 5 % of the budget (3 s of 60) on the whole validation split: times to
        # the target are read off this grid, so it bounds their resolution (speed-ups ~±5 %).
        f"train.budget={args.budget}", "train.eval_every=0.05", "train.eval_batches=0", "train.checkpoint_every=0",
        "train.progress_bar=false", "train.tensorboard=false", "train.plots=false", "finetune_demo=false",
        f"train.compile={'true' if args.compile else 'false'}", f"seed={args.seed}",
    ]
    return common + SCALES[args.scale]["overrides"]


def smoke_adjust(name: str, overrides: list[str]) -> list[str]:
    """The tiny data has 32-token sequences: start the length warm-up shorter."""
    return [o.replace("seqwarmup.start=32", "seqwarmup.start=8") for o in overrides]


def run_one(name: str, overrides: list[str]) -> dict:
    from cramkit.config import load_config
    from cramkit.train.run import pretrain

    cfg = load_config("crammed-bert", overrides + [f"name={name}"])
    t0 = time.perf_counter()
    summary = pretrain(cfg, say=lambda *a: print(*a, flush=True))
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    run_dir = Path(summary["run_dir"])
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # only the metrics are needed
    summary["evals"] = read_metrics(run_dir / "metrics.jsonl")[1]
    return summary


def _cut_short(r: dict) -> bool:
    """Whether a run stopped before its budget (a time limit's SIGTERM): not a full run."""
    return r.get("stop_reason") not in (None, "budget")


def _num(r: dict, key: str, spec: str) -> str:
    """``r[key]`` formatted, or "-" when the run has no such figure (not a crash)."""
    value = r.get(key)
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def table(results: dict[str, dict], target: float) -> str:
    base = results.get("baseline")
    rows = [
        "| run | time to baseline loss (s) | FLOPs to baseline loss | speed-up (time / FLOPs) "
        "| final val loss | tokens/s | tokens |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    base_t = reach(base["evals"], target, "elapsed") if base else None
    base_f = reach(base["evals"], target, "flops") if base else None
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | failed: {r['error']} | | | | | |")
            continue
        if _cut_short(r):
            name = f"{name} (cut by {r['stop_reason']} at {_num(r, 'train_seconds', '.0f')} s)"
        t, f = reach(r["evals"], target, "elapsed"), reach(r["evals"], target, "flops")
        speed = (f"{base_t / t:.2f}x / {base_f / f:.2f}x"
                 if t and f and base_t and base_f else "-")

        rows.append(
            f"| {name} | {f'{t:.1f}' if t is not None else 'not reached'} | "
            f"{f'{f:.3e}' if f is not None else 'not reached'} | {speed} | "
            f"{_num(r, 'final_val_loss', '.4f')} | {_num(r, 'tokens_per_s', ',.0f')} | {_num(r, 'tokens', ',')} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="", help="prepared dir or folder of raw enwiki shards")
    ap.add_argument("--budget", default="", help="training budget per run (default 60s; --cpu 180s; --smoke 8steps)")
    ap.add_argument("--runs", default="baseline,pld,stacking,vcycle,seqwarmup",
                    help="comma-separated subset of runs")
    ap.add_argument("--work", default="", help="scratch folder (default /tmp/cramkit-techniques)")
    ap.add_argument("--compile", action="store_true", help="torch.compile every run")
    ap.add_argument("--seed", type=int, default=0,
                    help="every run's seed (initialisation, masks): rerun with another to see the noise")
    ap.add_argument("--smoke", action="store_true", help="tiny preset on the CPU, seconds")
    ap.add_argument("--cpu", action="store_true",
                    help="a real CPU-scale measurement (2.4 M parameters, 180 s per run)")
    ap.add_argument("--records", default="",
                    help="append one JSON line per finished run here (default $OUT/techniques_records.jsonl)")
    args = ap.parse_args(argv)
    if args.smoke and args.cpu:
        sys.exit("error: --smoke and --cpu are two scales; choose one")
    args.scale = "smoke" if args.smoke else "cpu" if args.cpu else "gpu"
    args.budget = args.budget or SCALES[args.scale]["budget"]
    work = Path(args.work or "/tmp/cramkit-techniques")
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        torch.set_num_threads(1)
    source = args.data or (str(REPO / ".gpu" / "enwiki-2015") if (REPO / ".gpu" / "enwiki-2015").is_dir()
                           else DEFAULT_RAW)
    data_dir = prepare_data(source, work, args.scale)
    common = base_overrides(data_dir, work, args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    for name in names:  # all checked before the first run
        if name != "baseline" and name not in TECHNIQUE_RUNS:
            sys.exit(f"error: unknown run '{name}'; choose from baseline, {', '.join(TECHNIQUE_RUNS)}")
    out = os.environ.get("OUT")
    records = Path(args.records) if args.records else (Path(out) / "techniques_records.jsonl" if out else None)
    results: dict[str, dict] = {}
    from cramkit.train.runlog import environment

    # Versions with the numbers: the file is read long after the call that wrote it.
    env = environment(torch.device("cpu" if args.scale != "gpu" else "cuda"))

    def save(final: bool) -> dict:
        """techniques.json as it stands, rewritten after every run so a cut call keeps it."""
        base = results.get("baseline", {})
        report = {"budget": args.budget, "compile": args.compile, "seed": args.seed, "data": str(data_dir),
                  "commit": os.environ.get("CRAMKIT_COMMIT"), "torch": torch.__version__, "environment": env,
                  "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  "target_val_loss": None if _cut_short(base) else base.get("final_val_loss"), "complete": final,
                  "runs": results}
        if out:
            write_json(Path(out) / "techniques.json", report, default=str)
        return report

    for name in names:
        extra = TECHNIQUE_RUNS.get(name, [])
        if args.smoke:
            extra = smoke_adjust(name, extra)
        if args.compile and name == "pld":
            # Whole-model compile runs the skip loop eagerly; compiling each block (one shared
            # graph) keeps the blocks fast whatever the skip pattern.
            extra = extra + ["technique.pld.compile_blocks=true"]
        print(f"\n=== {name} ===", flush=True)
        try:
            results[name] = run_one(f"{name}-{stamp}", common + extra)
        except Exception as exc:  # keep going: the other runs still report
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        finally:  # an OOM's tensors must not crowd out the next run
            release_memory()
        if records:  # one line per finished run, appended at once
            append_jsonl(records, {"run": name, **results[name]}, default=str)
        save(final=False)
        if results[name].get("stop_reason") == "signal":
            # The trainer turns SIGTERM (a time limit's `timeout`) into a clean stop of the run;
            # the benchmark must stop too, not start the next run past the limit.
            print(f"{name} stopped by a signal (time limit): cut short; no further runs", flush=True)
            break
    base = results.get("baseline", {})
    target = base.get("final_val_loss")
    print("\n## Techniques: time and FLOPs to the baseline's final validation loss\n")
    print(f"budget {args.budget} per run, {'compiled' if args.compile else 'eager'}, data {data_dir}, "
          f"target = baseline final val loss {target if target is None else f'{target:.4f}'}\n")
    report = save(final=True)
    if _cut_short(base):
        print(f"no comparison: the baseline stopped by {base['stop_reason']} before its budget, so its loss "
              "is no target")
    elif target is not None:
        print(table(results, target))
    return report


if __name__ == "__main__":
    main()
