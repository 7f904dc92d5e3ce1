"""Peak memory of a training step on the CPU, against the estimate cramkit prints before training
(issue #8), and what dropping the model's output before backward saves.

    PYTHONPATH=src python benchmarks/memory_cpu.py                 # ~3 minutes on 2 cores
    PYTHONPATH=src python benchmarks/memory_cpu.py --layers 12 --json memory.json
    PYTHONPATH=src python benchmarks/memory_cpu.py --smoke         # seconds: exercises the logic

For each preset at its real width, vocabulary and sequence length (depth cut to ``--layers`` to
keep CPU time down; the estimate is linear in depth), in fp32 and under bf16 autocast, with no
activation checkpointing and with full checkpointing: one forward and backward (the gradients
already there, as after a run's first step) measured by ``cramkit.train.cpu_memory.peak_bytes``
(glibc's allocator sampled after every operator: the CPU's max_memory_allocated), beside the
estimate's activations plus autocast's weight copies. ``held`` repeats the step keeping the
model's output (its logits) alive through backward, as the trainer did before it dropped it.

Activation offloading is not measured here: on the CPU, host memory is the memory measured (the
tests simulate it by saving to files, ``tests/train/test_memory.py``). Linux with glibc only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import sys

import torch

from cramkit.bench import synthetic_batch
from cramkit.distributed.config import MemoryConfig
from cramkit.distributed.memory import apply_activation_checkpointing, estimate_memory
from cramkit.models import build_model
from cramkit.models.presets import preset_config
from cramkit.train.cpu_memory import peak_bytes
from cramkit.train.trainer import locate_targets
from cramkit.utils import write_json

# preset -> (sequence length, micro-batch): the recipes' sequence lengths, batches of a few
# thousand tokens.
SHAPES = {"crammed-bert": (128, 16), "bert-base": (128, 16), "gpt2-small": (512, 4)}
SMOKE = {"crammed-bert": (32, 2)}


def measure(name: str, layers: int, precision: str, mode: str, shapes: dict, vocab: int | None) -> dict:
    seq, batch = shapes[name]
    changes = {"layers": layers} | ({"vocab_size": vocab} if vocab else {})
    cfg = dataclasses.replace(preset_config(name), **changes)
    torch.manual_seed(0)
    model = build_model(cfg)
    memory = MemoryConfig(activation_checkpointing=mode)
    apply_activation_checkpointing(model, memory)
    # cramkit bench's synthetic batch, with the target positions the trainer hands the model.
    inputs = locate_targets(synthetic_batch(cfg.arch, cfg.vocab_size, batch, seq), model)
    half = precision == "bf16"

    def step(hold: bool):
        def run():
            with torch.autocast("cpu", torch.bfloat16, enabled=half):
                out = model(**inputs)
            loss = out.loss
            if not hold:
                del out  # as the trainer does
            loss.backward()
        return run

    measured = peak_bytes(step(hold=False))
    held = peak_bytes(step(hold=True))
    est = estimate_memory(model, micro_batch=batch, seq_len=seq, precision=precision, cfg=memory, device_type="cpu")
    estimated = (est["activations_gb"] + est["weight_copies_gb"]) * 1e9
    return {"preset": name, "layers": layers, "vocab": cfg.vocab_size, "seq": seq, "micro_batch": batch,
            "precision": precision, "checkpointing": mode, "measured_mb": measured / 1e6,
            "estimate_mb": estimated / 1e6, "ratio": estimated / measured, "held_output_mb": held / 1e6}


def table(rows: list[dict]) -> str:
    lines = ["| preset | batch × seq | precision | checkpointing | measured peak MB | estimate MB | estimate / measured "
             "| peak holding the output MB |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['preset']} ({r['layers']} layers, vocab {r['vocab']}) | {r['micro_batch']} × {r['seq']} | "
                     f"{r['precision']} | {r['checkpointing']} | {r['measured_mb']:.0f} | {r['estimate_mb']:.0f} | "
                     f"{r['ratio']:.2f} | {r['held_output_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4, help="blocks per model (the presets' width and vocabulary stay)")
    ap.add_argument("--presets", default=",".join(SHAPES), help="comma-separated, from " + ", ".join(SHAPES))
    ap.add_argument("--json", default="", help="also write the rows here")
    ap.add_argument("--smoke", action="store_true", help="one tiny case: checks the script, measures nothing useful")
    args = ap.parse_args(argv)
    shapes, vocab = (SMOKE, 512) if args.smoke else (SHAPES, None)
    names = list(shapes) if args.smoke else [n.strip() for n in args.presets.split(",") if n.strip()]
    unknown = [n for n in names if n not in shapes]
    if unknown:
        ap.error(f"unknown preset(s) {unknown}; choose from {list(shapes)}")
    rows = []
    try:
        for name in names:
            for precision in ("fp32", "bf16"):
                for mode in ("none", "full"):
                    rows.append(measure(name, 2 if args.smoke else args.layers, precision, mode, shapes, vocab))
                    print(f"{name} {precision} {mode}: {rows[-1]['ratio']:.2f}", file=sys.stderr, flush=True)
    except RuntimeError as exc:  # off glibc
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()}\n")
    print(table(rows))
    if args.json:
        write_json(args.json, {"torch": torch.__version__, "date": datetime.date.today().isoformat(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
