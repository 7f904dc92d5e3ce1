"""GPU benchmark for scaling switches (issue 8): what each switch costs and how far it reaches.

    PYTHONPATH=src python benchmarks/gpu_scale.py                    # both parts, tables last
    PYTHONPATH=src python benchmarks/gpu_scale.py --parts largest    # one part (results accumulate
                                                                     # in $OUT/gpu_scale.json)
    PYTHONPATH=src python benchmarks/gpu_scale.py --smoke            # CPU check of the script

Two tables on one GPU:
1. tokens/s of crammed-bert (micro-batch 128, sequence 128, bf16, eager so that only the switch
   differs) with: nothing, full and selective activation checkpointing, activation offloading,
   optimizer offload (FSDP2 CPU offload, a one-rank process group); then FP8 (torchao float8
   linears, when torchao is installed) against bf16, both compiled (torchao's float8 linears are
   slower than bf16 without compile, pytorch/ao#685, so an eager comparison would say nothing), at
   hidden 768 and 2048;
2. the largest model (parameters) that completes two training steps (micro-batch 128 × 128) with:
   nothing, activation checkpointing (binary search over depth at hidden 4096), optimizer offload,
   both (a few depths, host memory being the bound) — each probe in its own process so an OOM
   cannot poison the next. A search that reaches the end of its list says so (the model may
   fit deeper); one cut by time says that instead: neither is reported as a size that failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time

import torch

SWITCHES = {
    "none": [],
    "ac-full": ["memory.activation_checkpointing=full"],
    "ac-selective-2": ["memory.activation_checkpointing=selective", "memory.checkpoint_every=2"],
    "offload-activations": ["memory.offload_activations=true"],
    "offload-optimizer": ["memory.offload_optimizer=true", "parallel.strategy=fsdp"],
}
# (name, hidden, layers, switches, micro-batch): "compile" and "fp8" are the probe's own switches.
FP8_PAIRS = [
    ("bf16 compiled", 768, 16, ["compile"], 128),
    ("fp8 compiled", 768, 16, ["fp8", "compile"], 128),
    ("bf16 hidden 2048 compiled", 2048, 8, ["compile"], 64),
    ("fp8 hidden 2048 compiled", 2048, 8, ["fp8", "compile"], 64),
]
_OWN = ("fp8", "compile")


def reference_row(name: str) -> str:
    """The switch-cost row that ``name``'s ratio divides by: the same model, batch and compile
    mode without the switch. A ratio over another shape or mode would mix in their effects."""
    if name in SWITCHES:
        return "none"
    if name.startswith("fp8 "):
        return "bf16 " + name.removeprefix("fp8 ")
    return name  # a bf16 compiled row: the reference of its FP8 twin, itself compared with none
LARGEST = {
    "nothing": [],
    "activation checkpointing": ["memory.activation_checkpointing=full"],
    "optimizer offload": ["memory.offload_optimizer=true", "parallel.strategy=fsdp"],
    "both": ["memory.activation_checkpointing=full", "memory.offload_optimizer=true", "parallel.strategy=fsdp"],
}
# The largest-model search varies depth at hidden 4096 (32 heads, GLU FFN: ~168 M parameters per
# block) with micro-batch 128 × 128 tokens, where activations (~2.3 GB per block in bf16) and
# training state (16 bytes per parameter, ~2.7 GB per block) are of the same order, so both
# switches have something to save. The list reaches past what cramkit's estimate fits on a
# 141 GB H200 (nothing: ~26 blocks, checkpointing: ~42), so the search ends on a size that failed.
HIDDEN, LARGEST_MICRO = 4096, 128
DEPTHS = [2, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 56, 64]
# With the optimizer on the CPU, each probe costs CPU Adam steps over billions of parameters, so
# only a few depths are tried, smallest first. Both searches are bounded by host memory (16 bytes
# per parameter: 88 GB at 32 blocks, 110 GB at 40; the H200 machine has 128 GiB) before the GPU
# (offload alone: ~100 GB at 40 blocks). A depth whose host state would not fit is not started
# (see ``--host-gb``): a host out of memory can take more than the probe down with it.
OFFLOAD_DEPTHS = {"optimizer offload": [32, 40], "both": [40, 48]}
# Seconds a probe needs at least: none is started with less left (a cut probe measures nothing).
MIN_START = {"gpu": 30.0, "compile": 90.0, "offload": 120.0}


def _probe_config(hidden: int, layers: int, switches: list[str]):
    from cramkit.config import load_config

    return load_config("crammed-bert", [f"model.hidden={hidden}", f"model.layers={layers}",
                                        f"model.heads={max(1, hidden // 128)}", f"model.intermediate={4 * hidden}",
                                        *(["model.vocab_size=512", "train.device=cpu"] if SMOKE else []),
                                        *[s for s in switches if s not in _OWN]])


def estimate_gb(hidden: int, layers: int, switches: list[str], micro: int) -> float:
    """cramkit's memory estimate (what `cramkit pretrain` prints) for a probe's model, switches
    and micro-batch: recorded beside the measured peak, for the fits and the OOMs alike."""
    from cramkit.distributed.memory import estimate_memory
    from cramkit.models import build_model

    cfg = _probe_config(hidden, layers, switches)
    with torch.device("meta"):
        model = build_model(cfg.model)
    return estimate_memory(model, micro_batch=micro, seq_len=128, precision="bf16",
                           sharded=cfg.parallel.strategy == "fsdp", cfg=cfg.memory)["total_gb"]


def probe(hidden: int, layers: int, switches: list[str], micro: int, steps: int) -> dict:
    """Build, train ``steps`` steps, report tokens/s and peak memory (run in a child process)."""
    from cramkit.distributed import apply_activation_checkpointing, init_parallel, shard_model
    from cramkit.distributed.memory import offload_context
    from cramkit.models import build_model
    from cramkit.models.flops import count_parameters, flops_per_token

    fp8, compiled = "fp8" in switches, "compile" in switches
    cfg = _probe_config(hidden, layers, switches)
    par = init_parallel(cfg.parallel, cfg.train.device)
    device = par.device
    offload = cfg.memory.offload_optimizer
    with torch.device("meta"):
        model = build_model(cfg.model)
    model.to_empty(device="cpu" if offload else device)
    model.init_weights()
    n = count_parameters(model)
    if fp8:
        from cramkit.distributed.fp8 import convert_fp8

        # Every linear, also where the size rule would keep bf16 (most of the 768-wide model).
        convert_fp8(model, device, everything=True)
    apply_activation_checkpointing(model, cfg.memory)
    cuda = device.type == "cuda"
    # bf16 on the GPU. The --smoke check runs in fp32: CPU autocast leaves layer_norm in bf16,
    # which fails on FSDP's bf16 parameters ("mixed dtype (CPU)"); CUDA autocast runs it in fp32.
    model = shard_model(model, par, cfg.parallel, "bf16" if cuda else "fp32", offload)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=not offload)
    if compiled:  # the first step compiles; the median below leaves it out
        model = torch.compile(model)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, cfg.model.vocab_size, (micro, 128), generator=gen).to(device)
    labels = torch.where(torch.rand(micro, 128, generator=gen).to(device) < 0.25, tokens, -100)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        with offload_context(cfg.memory, device), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=tokens, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    step = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    fpt = flops_per_token(cfg.model, 128, 0.25)
    return {"params": n, "tokens_per_s": micro * 128 / step, "tflops": fpt * micro * 128 / step / 1e12,
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0,
            "host_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "loss": float(loss)}


_PORT = [29533]


def run_probe(hidden, layers, switches, micro, steps, timeout=240) -> dict:
    """``probe`` in a child process (for FSDP, in a one-rank process group), so that an OOM or a
    host-memory kill ends only that probe; the error comes back as ``{"error": ...}``. Either way
    the result carries cramkit's memory estimate, ``estimate_gb``."""
    return {**_run_probe(hidden, layers, switches, micro, steps, timeout),
            "estimate_gb": round(estimate_gb(hidden, layers, switches, micro), 2)}


def _run_probe(hidden, layers, switches, micro, steps, timeout) -> dict:
    args = [sys.executable, __file__, "--probe", json.dumps([hidden, layers, switches, micro, steps])]
    if SMOKE:
        args.append("--smoke")
    env = dict(os.environ)
    if any(s.startswith("parallel.strategy=fsdp") for s in switches):
        # The variables torchrun would set, without torchrun: its worker runs in a session of its
        # own, which a timeout here (or the part's `timeout`) would leave running, holding GPU
        # and pinned host memory. The probe is this process's child, so it is killed with it.
        _PORT[0] += 1  # a fresh rendezvous port per probe: the last one may still be in TIME_WAIT
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_PORT[0]), TORCHELASTIC_RUN_ID="gpu-scale-probe")
    if timeout <= 5:
        return {"error": "skipped: out of time"}
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    tail = (proc.stderr or "") + (proc.stdout or "")
    if "OutOfMemory" in tail or "out of memory" in tail:
        return {"error": "OOM"}
    if proc.returncode in (-9, 137) or "SIGKILL" in tail:
        return {"error": "killed (host memory)"}
    # torchrun ends its output with a banner; the child's own exception line says more.
    errors = [line for line in tail.splitlines() if re.search(r"\w+(Error|Exception): ", line)
              and "ChildFailedError" not in line]
    last = errors[-1:] or tail.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    return {"error": last[0].strip()[-300:]}


def _out_of_time(left: float, need: float) -> dict | None:
    """The result of a probe not started because fewer than ``need`` seconds are ``left`` (a
    probe cut by the part's limit would measure nothing), or None when it may start."""
    if left < need and not SMOKE:
        return {"error": f"skipped: out of time ({left:.0f} s left, {need:.0f} s needed)"}
    return None


def _largest_probe(depth: int, switches: list[str], timeout: float, min_start: float = 0.0) -> dict:
    """Two training steps of the largest-model shape at ``depth`` (tiny under --smoke); not
    started with less than ``min_start`` seconds left."""
    r = _out_of_time(timeout, min_start) or run_probe(
        64 if SMOKE else HIDDEN, depth, switches, 4 if SMOKE else LARGEST_MICRO, 2, timeout=timeout)
    print("  ", switches, depth, r, flush=True)
    return r


def _cut(result: dict) -> bool:
    """Whether a probe ended for want of time (says nothing about whether the size fits)."""
    return result.get("error", "").startswith(("skipped", "timeout"))


def host_state_gb(depth: int) -> float:
    """Host memory the offloaded training state of a largest-model probe takes: fp32 parameters,
    gradients and two Adam moments, 16 bytes per parameter."""
    from cramkit.models import build_model
    from cramkit.models.flops import count_parameters

    with torch.device("meta"):
        model = build_model(_probe_config(64 if SMOKE else HIDDEN, depth, []).model)
    return 16 * count_parameters(model) / 1e9


def _no_report(best: dict | None, depth: int, r: dict) -> None:
    pass


def largest_gpu_only(switches: list[str], remaining, report=_no_report) -> dict | None:
    """Binary search over ``DEPTHS`` for the deepest model that trains two steps.

    ``report(best_so_far, depth, probe_result)`` is called after every probe (to save it)."""
    depths = DEPTHS[:2] if SMOKE else DEPTHS
    hidden = 64 if SMOKE else HIDDEN
    lo, hi, best = -1, len(depths), None  # depths[lo] trained, depths[hi] did not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        r = _largest_probe(depths[mid], switches, min(240, remaining()), MIN_START["gpu"])
        if "error" in r:
            if _cut(r):  # out of time: the search ends here, and hi stays what it was
                if best is not None:
                    best["stopped"] = "out of time"
                report(best, depths[mid], r)
                break
            hi = mid
            if best is not None:
                best["next_failed"] = depths[hi]
        else:
            lo, best = mid, {"hidden": hidden, "layers": depths[mid], **r}
            if hi < len(depths):
                best["next_failed"] = depths[hi]
            elif lo == len(depths) - 1:
                best["stopped"] = "end of the list"
        report(best, depths[mid], r)
    return best


def largest_offload(switches: list[str], remaining, depths: list[int], report=_no_report,
                    host_gb: float = float("inf")) -> dict | None:
    """The deepest of ``depths`` that trains, trying them in order until one fails; a depth whose
    offloaded state (:func:`host_state_gb`) exceeds 90 % of ``host_gb`` is not started."""
    best = None
    depths = depths if not SMOKE else [2]
    for i, depth in enumerate(depths):
        need = host_state_gb(depth)
        if need > 0.9 * host_gb:
            r = {"error": f"not started: host memory (state {need:.0f} GB of {host_gb:.0f} GB)",
                 "estimate_gb": round(estimate_gb(HIDDEN, depth, switches, LARGEST_MICRO), 2)}
            print("  ", switches, depth, r, flush=True)
        else:
            r = _largest_probe(depth, switches, min(300, remaining()), MIN_START["offload"])
        if "error" in r:
            if best is not None and _cut(r):
                best["stopped"] = "out of time"
            elif best is not None and r["error"].startswith("not started"):
                best["stopped"] = f"{depth} layers not started: host memory"
            elif best is not None:
                best["next_failed"] = depth
            report(best, depth, r)
            break
        best = {"hidden": 64 if SMOKE else HIDDEN, "layers": depth, **r}
        if i == len(depths) - 1:
            best["stopped"] = "end of the list"
        report(best, depth, r)
    return best


def largest_cells(best: dict) -> tuple[str, str]:
    """The "largest model" and "above it" cells of a search's result. Exact only when the size
    just above failed; a search that stopped (list end, time, host memory) leaves sizes between
    unmeasured, so the true largest is at least the one shown."""
    exact = "next_failed" in best and "stopped" not in best
    above = "; ".join(filter(None, [f"{best['next_failed']} layers failed" if "next_failed" in best else "",
                                    f"stopped: {best['stopped']}" if "stopped" in best else ""]))
    return f"{'' if exact else '≥ '}{best['params'] / 1e9:.2f} B", above or "-"


SMOKE = False


def _mem_total_gb() -> float:
    """MemTotal of /proc/meminfo in GB (inf where there is none)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    ap.add_argument("--parts", default="costs,largest", help="comma list of: costs, largest")
    ap.add_argument("--largest", default=",".join(LARGEST),
                    help=f"comma list of the largest-model searches to run (of: {', '.join(LARGEST)})")
    ap.add_argument("--deadline", type=float, default=560,
                    help="stop starting probes after this many seconds and print what was measured")
    ap.add_argument("--host-gb", type=float, default=0,
                    help="host memory in GB for the offload searches (default: MemTotal; give it where the "
                         "machine's memory grows on demand, as on the H200 machine: 137 = 128 GiB)")
    ap.add_argument("--shared-gpu", default="",
                    help="what else runs on the GPU during the largest-model searches (gpu_all.sh part 6 "
                         "runs the GLUE control beside them): recorded, and their tokens/s are withheld")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script itself")
    args = ap.parse_args()
    global SMOKE
    SMOKE = args.smoke
    if args.probe:
        hidden, layers, switches, micro, steps = json.loads(args.probe)
        print("PROBE " + json.dumps(probe(hidden, layers, switches, micro, steps)), flush=True)
        return
    t_end = time.perf_counter() + args.deadline

    def remaining() -> float:
        return t_end - time.perf_counter()

    parts = set(args.parts.split(","))
    out = os.environ.get("OUT", "gpu-results")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "gpu_scale.json")
    results: dict = json.load(open(path)) if os.path.isfile(path) else {}
    results.update({"device": "cpu" if SMOKE else torch.cuda.get_device_name(),
                    "commit": os.environ.get("CRAMKIT_COMMIT"), "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})

    def save() -> None:
        from cramkit.utils import write_json

        write_json(path, results)

    if "costs" in parts:
        cost = results.setdefault("switch_cost", {})
        plan = [(name, 768, 16, sw, 128) for name, sw in SWITCHES.items()] + FP8_PAIRS
        for name, hidden, layers, switches, micro in plan:
            if SMOKE:  # no FP8 on the CPU, and no compiling in a check of the script
                if "fp8" in switches:
                    continue
                hidden, layers, micro, switches = 64, 2, 4, [s for s in switches if s != "compile"]
            steps = 8 if "compile" in switches else 6
            need = MIN_START["compile"] if "compile" in switches else MIN_START["gpu"]
            cost[name] = _out_of_time(remaining(), need) or run_probe(
                hidden, layers, switches, micro, steps, timeout=min(240, remaining()))
            print(name, cost[name], flush=True)
            save()
    if "largest" in parts:
        results["largest_shared_with"] = args.shared_gpu or None  # not an earlier call's
        largest = results.setdefault("largest", {})
        chosen = [x.strip() for x in args.largest.split(",") if x.strip()]
        unknown = set(chosen) - set(LARGEST)
        if unknown:
            ap.error(f"--largest: unknown {sorted(unknown)}; choose from {', '.join(LARGEST)}")
        probes = results.setdefault("largest_probes", {})
        for name in chosen:
            switches = LARGEST[name]
            probes[name] = []

            def report(best, depth, r, name=name):  # saved after every probe: a cut call keeps them
                largest[name] = best
                probes[name].append({"layers": depth, **r})
                save()

            if name in OFFLOAD_DEPTHS:
                largest[name] = largest_offload(switches, remaining, OFFLOAD_DEPTHS[name], report,
                                                host_gb=args.host_gb or _mem_total_gb())
            else:
                largest[name] = largest_gpu_only(switches, remaining, report)
            save()
    print("\n##### RESULTS #####")
    print(f"device: {results['device']}, {results['date']}\n")
    cost = results.get("switch_cost", {})
    if cost:
        print("× ref: tokens/s over the row of the same workload without the switch (a memory switch over\n"
              "eager 'none', an FP8 row over its bf16 compiled twin); '—' where there is none.\n")
        print("| crammed-bert switch | tokens/s | × ref | peak GB | estimated GB |\n| --- | --- | --- | --- | --- |")
        for name, r in cost.items():
            if "error" in r:
                print(f"| {name} | {r['error']} | | | {r.get('estimate_gb', '-')} |")
            else:
                ref = cost.get(reference_row(name), {}).get("tokens_per_s")
                ratio = f"{r['tokens_per_s'] / ref:.2f}" if ref and reference_row(name) != name else "—"
                print(f"| {name} | {r['tokens_per_s']:,.0f} | {ratio} | {r['peak_gb']:.1f} "
                      f"| {r.get('estimate_gb', '-')} |")
    if results.get("largest"):
        print(largest_tables(results))


def largest_tables(results: dict) -> str:
    """The largest-model table and every probe's outcome; when the searches shared the GPU
    (``largest_shared_with``), a first line says so and the tokens/s column is withheld."""
    shared = results.get("largest_shared_with")
    lines = []
    if shared:
        # A co-tenant takes SMs and memory: tokens/s would read as the switches' cost, and a
        # search may stop a size early; say so where the numbers are, not only in gpu_all.sh.
        lines += [f"The searches shared the GPU with {shared}: tokens/s not shown (not this switch's cost), "
                  "and a size may have failed for the memory it held.", ""]
    lines += ["| switches | largest model that trains | hidden × layers | above it | tokens/s "
              "| GPU peak GB | estimated GB | host peak GB |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results["largest"].items():
        if r:
            size, nxt = largest_cells(r)
            tps = "shared GPU" if shared else f"{r['tokens_per_s']:,.0f}"
            lines.append(f"| {name} | {size} | {r['hidden']} × {r['layers']} | {nxt} | {tps} | {r['peak_gb']:.1f} | "
                         f"{r.get('estimate_gb', '-')} | {r.get('host_peak_gb', 0):.1f} |")
        else:
            lines.append(f"| {name} | none of the sizes tried | | | | | | |")
    # Every probe, the failed ones too: does the estimate say which sizes fit?
    lines += ["", "| switches | layers | estimated GB | outcome |", "| --- | --- | --- | --- |"]
    for name, rows in results.get("largest_probes", {}).items():
        for r in rows:
            outcome = r["error"] if "error" in r else f"trained, peak {r['peak_gb']:.1f} GB"
            lines.append(f"| {name} | {r['layers']} | {r.get('estimate_gb', '-')} | {outcome} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
