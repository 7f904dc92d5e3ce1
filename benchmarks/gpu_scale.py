"""GPU benchmark for scaling switches (issue 8): what each switch costs and how far it reaches.

    PYTHONPATH=src python benchmarks/gpu_scale.py            # everything, tables printed last
    PYTHONPATH=src python benchmarks/gpu_scale.py --quick    # fewer sizes

Two tables on one GPU:
1. tokens/s of crammed-bert (micro-batch 128, sequence 128, bf16, compiled off so that only the
   switch differs) with: nothing, full and selective activation checkpointing, activation
   offloading, optimizer offload (FSDP2 CPU offload, one process under torchrun), FP8 (torchao
   float8 linears, when torchao is installed), and FP8 vs bf16 at hidden 2048;
2. the largest model (parameters) that completes training steps with: nothing, activation
   checkpointing, optimizer offload, both — each probe in its own process so an OOM cannot
   poison the next.
"""

from __future__ import annotations

import argparse
import json
import os
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
    "fp8": ["fp8"],
}
LARGEST = {
    "nothing": [],
    "activation checkpointing": ["memory.activation_checkpointing=full"],
    "optimizer offload": ["memory.offload_optimizer=true", "parallel.strategy=fsdp"],
    "both": ["memory.activation_checkpointing=full", "memory.offload_optimizer=true", "parallel.strategy=fsdp"],
}
# (hidden, layers): about 12·L·h² parameters plus a 32768-token embedding.
LADDER = [(2048, 24), (2560, 32), (3072, 32), (4096, 24), (4096, 32), (5120, 32), (5120, 40), (6144, 40), (6144, 48)]


def probe(hidden: int, layers: int, switches: list[str], micro: int, steps: int) -> dict:
    """Build, train ``steps`` steps, report tokens/s and peak memory (run in a child process)."""
    from cramkit.config import load_config
    from cramkit.distributed import apply_activation_checkpointing, init_parallel, shard_model
    from cramkit.distributed.memory import offload_context
    from cramkit.models import build_model
    from cramkit.models.flops import count_parameters, flops_per_token

    fp8 = "fp8" in switches
    overrides = [s for s in switches if s != "fp8"]
    cfg = load_config("crammed-bert", [f"model.hidden={hidden}", f"model.layers={layers}",
                                       f"model.heads={max(1, hidden // 128)}", f"model.intermediate={4 * hidden}",
                                       *overrides])
    par = init_parallel(cfg.parallel, "auto")
    device = par.device
    offload = cfg.memory.offload_optimizer
    with torch.device("meta"):
        model = build_model(cfg.model)
    model.to_empty(device="cpu" if offload else device)
    model.init_weights()
    n = count_parameters(model)
    if fp8:
        from cramkit.distributed.fp8 import convert_fp8

        # min_dim=0: also measure FP8 where the size rule would refuse it (the 768-wide model).
        convert_fp8(model, device, min_dim=0)
    apply_activation_checkpointing(model, cfg.memory)
    model = shard_model(model, par, cfg.parallel, "bf16", offload)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=not offload)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, cfg.model.vocab_size, (micro, 128), generator=gen).to(device)
    labels = torch.where(torch.rand(micro, 128, generator=gen).to(device) < 0.25, tokens, -100)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with offload_context(cfg.memory, device), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    fpt = flops_per_token(cfg.model, 128, 0.25)
    return {"params": n, "tokens_per_s": micro * 128 / step, "tflops": fpt * micro * 128 / step / 1e12,
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9, "loss": float(loss)}


def run_probe(hidden, layers, switches, micro, steps, timeout=240) -> dict:
    args = [sys.executable, __file__, "--probe", json.dumps([hidden, layers, switches, micro, steps])]
    if any(s.startswith("parallel.strategy=fsdp") for s in switches):
        args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", "29533",
                *args[1:]]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=os.environ)
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    tail = (proc.stderr or proc.stdout)[-400:]
    return {"error": "OOM" if "OutOfMemory" in tail or "out of memory" in tail else tail.strip().splitlines()[-1:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.probe:
        hidden, layers, switches, micro, steps = json.loads(args.probe)
        print("PROBE " + json.dumps(probe(hidden, layers, switches, micro, steps)), flush=True)
        return
    out = os.environ.get("OUT", "gpu-results")
    os.makedirs(out, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    cost = {}
    for name, switches in SWITCHES.items():
        cost[name] = run_probe(768, 16, switches, 128, 6)
        print(name, cost[name], flush=True)
    cost["bf16 hidden 2048"] = run_probe(2048, 8, [], 64, 6)
    cost["fp8 hidden 2048"] = run_probe(2048, 8, ["fp8"], 64, 6)
    print(cost, flush=True)
    results["switch_cost"] = cost
    largest = {}
    ladder = LADDER[::2] if args.quick else LADDER
    for name, switches in LARGEST.items():
        best = None
        for hidden, layers in ladder:
            r = run_probe(hidden, layers, switches, 8, 3)
            print(name, hidden, layers, r, flush=True)
            if "error" in r:
                break
            best = {"hidden": hidden, "layers": layers, **r}
        largest[name] = best
    results["largest"] = largest
    with open(os.path.join(out, "gpu_scale.json"), "w") as f:
        json.dump(results, f, indent=2)
    print("\n##### RESULTS #####")
    print(f"device: {results['device']}, {results['date']}\n")
    print("| crammed-bert switch | tokens/s | × none | peak GB |\n| --- | --- | --- | --- |")
    base = cost["none"].get("tokens_per_s", 0) or 1
    for name, r in cost.items():
        if "error" in r:
            print(f"| {name} | {r['error']} | | |")
        else:
            print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f} | {r['peak_gb']:.1f} |")
    print("\n| switches | largest model that trains | hidden × layers | tokens/s | peak GB |\n| --- | --- | --- | --- | --- |")
    for name, r in largest.items():
        if r:
            print(f"| {name} | {r['params'] / 1e9:.2f} B | {r['hidden']} × {r['layers']} | {r['tokens_per_s']:,.0f} | {r['peak_gb']:.1f} |")
        else:
            print(f"| {name} | none of the ladder | | | |")


if __name__ == "__main__":
    main()
