"""Where a training step's time goes, and whether it waits for the device (issue #9).

    python benchmarks/profile_step.py                      # crammed-bert on the GPU, ~2-3 min on an H100
    python benchmarks/profile_step.py --models crammed-bert,gpt-small
    python benchmarks/profile_step.py --smoke              # tiny model on the CPU, seconds (exercises the logic)

Each model is trained by ``cramkit.train.run.pretrain`` itself, the code behind ``cramkit pretrain``
(same model construction, compile warm-up, fused AdamW, pinned prefetching loader, trainer loop),
on synthetic token shards of the recipe's sequence length and vocabulary, with a step budget. Only
the ``Trainer`` class is swapped for a subclass that marks step boundaries:

1. warm-up steps;
2. ``--sync-steps`` steps under ``torch.cuda.set_sync_debug_mode("warn")``: every operation that
   makes the host wait for the GPU issues a warning, counted per step and by source line. Steps
   that end in a log record (``train.log_every``) read the loss once on purpose; every other step
   must count 0;
3. ``--profile-steps`` steps under ``torch.profiler``: CUDA time by category (matmul, attention,
   inductor-fused triton kernels, other kernels, optimizer and clipping, copies, communication),
   idle gaps (the device span minus the time any kernel ran), the 15 longest kernels, and what
   removing each kind of overhead would give in MFU. The window is the first run of steps after
   the sync-counting ones that holds no logging step (so ``--profile-steps`` must be below
   ``--log-every``), starts and ends with the device drained, and closes one step before the run
   ends: the final evaluation and checkpoint stay outside it.

Written under ``--out`` (default ``$OUT``, else ``./profile-out``): ``profile-<model>.json`` (the
summary) and ``trace-<model>.json.gz`` (open in https://ui.perfetto.dev or chrome://tracing).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import cramkit.train.run as run_module
from cramkit.config import load_config
from cramkit.train.device import release_memory
from cramkit.train.trainer import Trainer
from cramkit.utils import strict_json, write_json

SYNC_WARNING = "called a synchronizing CUDA operation"
# The probe's own waits for the device at the window's edges; not the training step's syncs.
DRAIN = "profile_step: drain the device"
# Runtime calls that block the host until the device (or a stream) catches up.
SYNC_APIS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}
# First match wins; names are lower-cased kernel names (or aten op names in --smoke). Inductor
# names a fused kernel after the aten ops it absorbs (triton_poi_fused__to_copy_add_0), so the
# Triton class comes before copies; its matmul templates (triton_tem_) are caught as matmul first.
CATEGORIES = [
    ("communication", ("nccl", "gloo", "all_reduce", "allreduce")),
    ("optimizer+clip", ("adam", "multi_tensor_apply", "foreach", "lpnorm", "clip_grad")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "scaled_dot_product", "mha")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "triton_tem", "sm90_", "sm80_", "ampere_",
                "aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul")),
    ("triton-fused", ("triton_",)),
    ("copies", ("memcpy", "memset", "copy", "aten::to", "aten::_to_copy", "fill")),
    ("other kernels", ("",)),
]
# Optional second model: the GPT recipe (CLM data).
RECIPES = {"crammed-bert": ("crammed-bert", "mlm"), "gpt-small": ("gpt-small", "clm")}


def category(name: str) -> str:
    low = name.lower()
    for cat, patterns in CATEGORIES:
        if any(p in low for p in patterns):
            return cat
    return "other kernels"


# ----------------------------------------------------------------------------------- data
def synthetic_dataset(folder: Path, objective: str, seq_len: int, vocab: int, train_rows: int,
                      val_rows: int) -> Path:
    """Random token shards in cramkit's prepared-data format (shapes are what matter here)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if objective == "mlm":
        special = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4, "eod": None}
    else:
        special = {"pad": None, "unk": None, "cls": None, "sep": None, "mask": None, "eod": 0}
    splits = {}
    for split, rows in (("train", train_rows), ("val", val_rows)):
        tokens = rng.integers(5, vocab, size=(rows, seq_len), dtype=np.uint16)
        if objective == "mlm":  # packed MLM rows are framed [CLS] ... [SEP]
            tokens[:, 0], tokens[:, -1] = 2, 3
        else:  # documents of ~300 tokens
            tokens[rng.random((rows, seq_len)) < 1 / 300] = 0
        name = f"{split}-00000.bin"
        tokens.tofile(folder / name)
        splits[split] = {"docs": rows, "sequences": rows, "tokens": rows * seq_len,
                         "shards": [{"file": name, "sequences": rows, "shape": [rows, seq_len], "sha256": ""}]}
    # pretrain only copies the tokenizer file into the run directory.
    (folder / "tokenizer.json").write_text("{}")
    manifest = {"format": "cramkit-tokens", "format_version": 1, "fingerprint": "synthetic",
                "objective": objective, "tokenizer_kind": "synthetic", "seq_len": seq_len, "dtype": "uint16",
                "vocab_size": vocab, "tokenizer_vocab_size": vocab, "special_ids": special,
                "tokenizer_file": "tokenizer.json", "tokenizer_sha256": "", "splits": splits}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


# ----------------------------------------------------------------------------------- phases
def is_logging_step(step: int, log_every: int) -> bool:
    """Whether the step with index ``step`` ends in a log record (its loss is read on the host)."""
    return (step + 1) % log_every == 0


def profile_window(after: int, steps: int, log_every: int) -> int:
    """The first step of the earliest ``steps`` consecutive steps, each past ``after``, none of
    them a logging step: a logging step's loss read would show as a sync of every step."""
    if steps >= log_every:
        raise ValueError(f"--profile-steps ({steps}) must be below --log-every ({log_every}): "
                         "a longer window always holds a logging step")
    first = after + 1  # the step before the window is the profiler's warm-up
    while any(is_logging_step(s, log_every) for s in range(first, first + steps)):
        first += 1
    return first


class Probe:
    """Step boundaries (at each ``train_step`` entry): sync counting, then profiling."""

    def __init__(self, warmup: int, sync_steps: int, profile_steps: int, log_every: int, device: torch.device,
                 caught: list, trace_path: Path) -> None:
        self.sync_start, self.sync_end = warmup, warmup + sync_steps
        self.first = profile_window(self.sync_end, profile_steps, log_every)
        # The profiler starts one step early (its warm-up); the window closes at the prof.step()
        # on entering step `close`, which must therefore run.
        self.prof_start, self.close = self.first - 1, self.first + profile_steps
        self.profile_steps, self.log_every = profile_steps, log_every
        self.device, self.caught, self.trace_path = device, caught, trace_path
        self.per_step: list[list] = []
        self.mark = 0
        self.prof = None
        self.closing = False
        self.trainer: Trainer | None = None

    @property
    def total_steps(self) -> int:
        return self.close + 1

    @property
    def window(self) -> dict:
        steps = list(range(self.first, self.close))
        return {"steps": steps, "log_every": self.log_every,
                "logging_steps": [s for s in steps if is_logging_step(s, self.log_every)]}

    def before_step(self, step: int) -> None:
        if self.sync_start < step <= self.sync_end:  # close the previous step's window
            self.per_step.append([w for w in self.caught[self.mark:] if SYNC_WARNING in str(w.message)])
        self.mark = len(self.caught)
        if step == self.sync_start and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.set_sync_debug_mode("warn")
        if step == self.sync_end and self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        if step == self.prof_start:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(
                activities=acts, on_trace_ready=self._save,
                schedule=torch.profiler.schedule(wait=0, warmup=1, active=self.profile_steps, repeat=1))
            self.prof.start()
        elif self.prof is not None and step in (self.first, self.close):
            # ProfilerStep ranges are host time, which runs ahead of the device: the window
            # starts with no earlier step's kernels queued and its last step ends when they ran.
            self._drain()
            self.closing = step == self.close
            self.prof.step()
            if self.closing:
                self.prof.stop()
                self.prof = None
        elif self.prof is not None:
            self.prof.step()

    def _drain(self) -> None:
        if self.device.type == "cuda":
            with torch.profiler.record_function(DRAIN):
                torch.cuda.synchronize(self.device)

    def finish(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        if self.prof is not None:  # the run stopped inside the window: no trace is written
            self.prof.stop()
            self.prof = None

    def _save(self, prof) -> None:
        if self.closing:
            prof.export_chrome_trace(str(self.trace_path))


def probed_trainer(probe: Probe) -> type[Trainer]:
    class ProbedTrainer(Trainer):
        def train_step(self, batches):
            probe.trainer = self
            probe.before_step(self.state.step)
            return super().train_step(batches)

    return ProbedTrainer


# ----------------------------------------------------------------------------------- analysis
def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def _leaf_cpu_ops(events: list[dict]) -> list[dict]:
    """CPU ops with no other op inside them (their self time is their time): the --smoke stand-in
    for kernels, since a CPU run has none."""
    ops = sorted((e for e in events if e.get("cat") == "cpu_op" and "dur" in e),
                 key=lambda e: (e.get("tid"), e["ts"], -e["dur"]))
    leaves = []
    for i, e in enumerate(ops):
        nxt = ops[i + 1] if i + 1 < len(ops) else None
        inside = nxt is not None and nxt.get("tid") == e.get("tid") and nxt["ts"] < e["ts"] + e["dur"]
        if not inside:
            leaves.append(e)
    return leaves


def summarize(trace: dict, steps: int, tokens_per_step: int, flops_per_token: float, peak: float) -> dict:
    events = [e for e in trace.get("traceEvents", []) if isinstance(e, dict)]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    source = "cuda kernels"
    if not kernels:
        kernels, source = _leaf_cpu_ops(events), "cpu ops (no GPU)"
    steps_marked = [e for e in events if str(e.get("name", "")).startswith("ProfilerStep#") and "dur" in e
                    and e.get("cat") in ("user_annotation", "cpu_instant_event", "python_function", None)]
    busy = _union([(e["ts"], e["ts"] + e["dur"]) for e in kernels]) / 1e3  # ms
    span = (max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)) / 1e3 if kernels else 0.0
    wall = sum(e["dur"] for e in steps_marked) / 1e3 if steps_marked else span
    by_cat: dict[str, float] = {}
    by_name: dict[str, list] = {}
    for e in kernels:
        ms = e["dur"] / 1e3
        by_cat[category(e["name"])] = by_cat.get(category(e["name"]), 0.0) + ms
        row = by_name.setdefault(e["name"], [0, 0.0])
        row[0] += 1
        row[1] += ms
    drains = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == DRAIN and "dur" in e]
    runtime = [e for e in events if e.get("cat") == "cuda_runtime"
               and not any(s <= e["ts"] <= end for s, end in drains)]
    sync_calls = sum(1 for e in runtime if e.get("name") in SYNC_APIS)
    pageable = sum(1 for e in kernels if "pageable" in str(e.get("name", "")).lower())
    step_ms = wall / steps
    tps = tokens_per_step / (step_ms / 1e3) if step_ms > 0 else 0.0

    def mfu(ms_per_step: float) -> float:
        return flops_per_token * tokens_per_step / (ms_per_step / 1e3) / peak if ms_per_step > 0 and peak else 0.0

    idle = max(span - busy, 0.0)
    matmul_attn = (by_cat.get("matmul", 0.0) + by_cat.get("attention", 0.0)) / steps
    return {
        "source": source, "steps": steps, "tokens_per_step": tokens_per_step,
        "step_ms_wall": round(step_ms, 3), "device_span_ms_per_step": round(span / steps, 3),
        "device_busy_ms_per_step": round(busy / steps, 3), "idle_gap_ms_per_step": round(idle / steps, 3),
        "host_overhead_ms_per_step": round(max(wall - span, 0.0) / steps, 3),
        "tokens_per_s": round(tps, 1), "mfu": round(mfu(step_ms), 4),
        "mfu_if_no_idle": round(mfu(busy / steps), 4),
        "mfu_if_only_matmul_and_attention": round(mfu(matmul_attn), 4),
        "by_category_ms_per_step": {k: round(v / steps, 3) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n, "calls": c, "ms_per_step": round(ms / steps, 3),
                         "share_of_busy": round(ms / busy, 4) if busy else 0.0}
                        for n, (c, ms) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:15]],
        "sync_api_calls_per_step": round(sync_calls / steps, 2),
        "pageable_copies_per_step": round(pageable / steps, 2),
    }


def report(name: str, s: dict, syncs: dict, window: dict) -> str:
    steps = window["steps"]
    kind = ("none of them a logging step" if not window["logging_steps"]
            else f"logging steps among them: {window['logging_steps']}")
    lines = [f"## {name}: {s['source']}, {s['steps']} profiled steps of {s['tokens_per_step']:,} tokens "
             f"(steps {steps[0]}-{steps[-1]}, {kind}; log every {window['log_every']})", "",
             f"step {s['step_ms_wall']} ms wall, device span {s['device_span_ms_per_step']} ms, busy "
             f"{s['device_busy_ms_per_step']} ms, idle gaps {s['idle_gap_ms_per_step']} ms; "
             f"{s['tokens_per_s']:,.0f} tokens/s, MFU {s['mfu']:.1%} (no idle: {s['mfu_if_no_idle']:.1%}; "
             f"matmul+attention only: {s['mfu_if_only_matmul_and_attention']:.1%})",
             f"host syncs: {syncs['summary']}; sync API calls in the trace {s['sync_api_calls_per_step']}/step "
             f"({kind}), pageable copies {s['pageable_copies_per_step']}/step", "",
             "| category | ms / step | share of step |", "| --- | --- | --- |"]
    step = s["step_ms_wall"] or 1.0
    for cat, ms in s["by_category_ms_per_step"].items():
        lines.append(f"| {cat} | {ms} | {ms / step:.1%} |")
    lines.append(f"| idle gaps (span - busy) | {s['idle_gap_ms_per_step']} | {s['idle_gap_ms_per_step'] / step:.1%} |")
    lines.append(f"| host only (wall - span) | {s['host_overhead_ms_per_step']} | "
                 f"{s['host_overhead_ms_per_step'] / step:.1%} |")
    lines += ["", "| kernel | category | calls | ms / step | share of busy |", "| --- | --- | --- | --- | --- |"]
    for k in s["top_kernels"]:
        short = k["name"] if len(k["name"]) <= 90 else k["name"][:87] + "..."
        lines.append(f"| `{short}` | {category(k['name'])} | {k['calls']} | {k['ms_per_step']} | "
                     f"{k['share_of_busy']:.1%} |")
    return "\n".join(lines)


def sync_summary(per_step: list[list], first_step: int, log_every: int, measurable: bool) -> dict:
    counts = [len(w) for w in per_step]
    logged = [i for i in range(len(counts)) if is_logging_step(first_step + i, log_every)]
    steady = [c for i, c in enumerate(counts) if i not in logged]
    where: dict[str, int] = {}
    for ws in per_step:
        for w in ws:
            key = f"{w.filename}:{w.lineno}"
            where[key] = where.get(key, 0) + 1
    text = (f"{sum(steady)} in {len(steady)} steady steps, {sum(c for i, c in enumerate(counts) if i in logged)} in "
            f"{len(logged)} logging steps" if measurable else "not measurable without CUDA")
    return {"measurable": measurable, "per_step": counts, "logging_steps": logged, "steady_state_total": sum(steady),
            "steady_state_per_step": round(sum(steady) / max(len(steady), 1), 3), "sources": where, "summary": text}


# ----------------------------------------------------------------------------------- driver
def profile_model(name: str, args, out: Path, device: torch.device) -> dict:
    recipe, objective = RECIPES[name]
    work = Path(tempfile.mkdtemp(prefix=f"profile-{name}-"))
    try:
        base = load_config(recipe, [])
        seq_len, vocab = base.data.prepare.seq_len, base.model.vocab_size
        overrides = []
        if args.smoke:
            seq_len, vocab = 32, 512
            overrides += [f"model.preset={'tiny' if objective == 'mlm' else 'tiny-gpt'}", "model.vocab_size=512",
                          "model.max_positions=64", "train.compile=false", "train.device=cpu",
                          "train.precision=fp32", "optim.fused=on"]
        mb, acc = args.micro_batch, args.accumulation
        warm = args.warmup_steps
        trace_path = work / f"trace-{name}.json"
        caught: list = []
        probe = Probe(warm, args.sync_steps, args.profile_steps, args.log_every, device, caught, trace_path)
        rows = max(mb, 1) * acc * 16
        data = synthetic_dataset(work / "data", objective, seq_len, vocab, rows, max(mb, 1) * 2)
        overrides += [f"data.dir={data}", f"out_dir={work}", "name=run", f"train.budget={probe.total_steps}steps",
                      f"train.micro_batch={mb}", f"train.batch_size={max(mb, 1) * acc}", "train.batch_ramp=0",
                      "train.eval_every=0", "train.checkpoint_every=0", "train.eval_batches=1",
                      f"train.log_every={args.log_every}", "train.progress_bar=false", "train.tensorboard=false", "train.plots=false",
                      "finetune_demo=false", f"seed={args.seed}"]
        if args.peak_tflops:
            overrides.append(f"train.peak_tflops={args.peak_tflops}")
        cfg = load_config(recipe, overrides + list(args.set))
        if cfg.train.log_every != args.log_every:  # the window was placed between --log-every's steps
            raise ValueError("set the logging interval with --log-every, not --set train.log_every")
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught_now, mock.patch.object(run_module, "Trainer",
                                                                                   probed_trainer(probe)):
            warnings.simplefilter("always")
            probe.caught = caught_now
            try:
                summary = run_module.pretrain(cfg, say=lambda *_: None)
            finally:
                probe.finish()
        for w in caught_now:  # hand on what the run itself warned about (compile fallbacks, ...)
            if SYNC_WARNING not in str(w.message):
                print(f"warning from the run: {w.category.__name__}: {str(w.message)[:300]}", file=sys.stderr)
        trainer = probe.trainer
        tokens_per_step = max(mb, 1) * acc * seq_len
        if not trace_path.exists():
            raise RuntimeError(f"the run stopped before step {probe.close}, inside the profiled window")
        trace = json.loads(trace_path.read_text())
        s = summarize(trace, args.profile_steps, tokens_per_step, trainer._fpt, trainer.peak_flops)
        syncs = sync_summary(probe.per_step, probe.sync_start, args.log_every, device.type == "cuda")
        result = {"model": name, "recipe": recipe, "device": _device_name(device), "torch": torch.__version__,
                  "commit": os.environ.get("CRAMKIT_COMMIT"),
                  "precision": trainer.precision, "compiled": hasattr(trainer.model, "_orig_mod"),
                  "micro_batch": mb, "accumulation": acc, "seq_len": seq_len, "vocab": vocab,
                  "optimizer": type(trainer.state.optimizer).__name__,
                  "fused_optimizer": bool(getattr(trainer.state.optimizer, "_step_supports_amp_scaling", False)),
                  "peak_tflops": round(trainer.peak_flops / 1e12, 1), "flops_per_token": trainer._fpt,
                  "seconds_total": round(time.perf_counter() - t0, 1), "run_mfu": summary.get("mfu"),
                  "syncs": syncs, "profile_window": probe.window, "profile": s}
        with open(trace_path, "rb") as src, gzip.open(out / f"trace-{name}.json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        (out / f"profile-{name}.json").write_text(strict_json(result, indent=2))
        print(report(name, s, syncs, probe.window), flush=True)
        print(f"\n{name}: {result['seconds_total']} s in all (compile, eval and checkpoint included); "
              f"compiled={result['compiled']}, {result['optimizer']} fused={result['fused_optimizer']}\n", flush=True)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="crammed-bert", help=f"comma-separated, of {', '.join(RECIPES)}")
    p.add_argument("--micro-batch", type=int, default=128, help="sequences per micro-batch (0: pretrain's auto)")
    p.add_argument("--accumulation", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--warmup-steps", type=int, default=8)
    p.add_argument("--sync-steps", type=int, default=20)
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--log-every", type=int, default=10, help="train.log_every (a logged step reads the loss once)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="MFU denominator (0: measured, as pretrain does)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], help="extra KEY=VALUE overrides of the recipe")
    p.add_argument("--out", default=os.environ.get("OUT", "profile-out"))
    p.add_argument("--smoke", action="store_true", help="tiny model, CPU, no compile: checks this script in seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.micro_batch, args.accumulation = min(args.micro_batch, 4), min(args.accumulation, 2)
        args.warmup_steps, args.sync_steps, args.profile_steps = 2, 4, 2
        # 3, not 2: a window of 2 steps fits between logging steps only then.
        args.log_every, args.peak_tflops = 3, args.peak_tflops or 1.0
    if args.profile_steps >= args.log_every:  # checked before any model is built
        p.error(f"--profile-steps ({args.profile_steps}) must be below --log-every ({args.log_every}): "
                "a longer window always holds a logging step")
    device = torch.device("cpu") if args.smoke else torch.device("cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device; use --smoke to check the script on the CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in names:  # all checked before the first model runs
        if name not in RECIPES:
            p.error(f"unknown model {name}; choose from {', '.join(RECIPES)}")
    results, failed = [], []
    for name in names:
        try:
            results.append(profile_model(name, args, out, device))
        except Exception as exc:  # noqa: BLE001 - one model's OOM or compile error ends only that model
            traceback.print_exc()
            failed.append({"model": name, "error": f"{type(exc).__name__}: {str(exc)[:500]}"})
        finally:
            release_memory()
        # Rewritten after every model: a call cut short keeps the models that finished.
        write_json(out / "profile-summary.json", results + failed)
    bad = [r["model"] for r in results if r["syncs"]["measurable"] and r["syncs"]["steady_state_total"]]
    if bad:
        print(f"host-device syncs in steady-state steps of: {', '.join(bad)} (see syncs.sources)", file=sys.stderr)
    if failed:
        print(f"failed: {', '.join(f['model'] for f in failed)}", file=sys.stderr)
    return 1 if bad or failed else 0


if __name__ == "__main__":
    sys.exit(main())
