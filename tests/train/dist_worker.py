"""Run under torchrun by test_distributed.py: several 2-rank scenarios in one launch."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import (  # noqa: E402
    TECHNIQUE_RUNS,
    interrupted_copy,
    poison_training_gradient,
    signal_at,
    tiny_config,
)

from cramkit.distributed.parallel import init_parallel, leave_process_group  # noqa: E402
from cramkit.train import checkpoint as ckpt  # noqa: E402
from cramkit.train.run import pretrain, resume_config  # noqa: E402


def losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"]


def sharded_overflow_agrees() -> list[float]:
    """fp16 under FSDP2 uses torch's plain GradScaler (trainer.py): an overflow in one rank's
    gradient shard must make every rank skip the step and halve its scale alike, else the ranks'
    shards and scales drift apart. torch's DTensor dispatch max-reduces ``found_inf`` over the
    mesh; this checks that it still does, with a CPU scaler standing in for the CUDA one."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4, bias=False)
    fully_shard(layer)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(layer(torch.ones(2, 4)).sum()).backward()
    if dist.get_rank() == 0:
        layer.weight.grad.to_local()[0, 0] = float("inf")
    before = layer.weight.full_tensor().clone()
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    return [float(torch.equal(before, layer.weight.full_tensor())), scaler.get_scale()]


# Each optimizer that runs on FSDP2's shards, in the settings whose sharded path differs: SAM's
# ascent (a norm over every rank's shards), ASAM's, SAM's plain steps between; Muon's
# Newton-Schulz on whole (and fused) matrices; Schedule-Free's state. (SAM around Muon is left
# out: Newton-Schulz in bf16 turns the rounding-level difference of SAM's norm over shards into
# ~1e-4 in the weights within 2 steps, as it does DDP's all-reduce against one process.)
SHARDED_OPTIMIZERS = {
    "adamw": [], "sgd": [], "lion": [], "muon": [], "schedulefree": ["schedule.name=constant"],
    "sam": [], "asam": ["optim.name=sam", "optim.sam_adaptive=true"],
    "sam-every-2": ["optim.name=sam", "optim.sam_every=2"],
}


def sharded_optimizers_agree() -> dict[str, list[float]]:
    """Per optimizer of :data:`SHARDED_OPTIMIZERS`, the largest difference between the weights of
    a model sharded by FSDP2 and those of the whole model on each rank, after each of 4 steps.

    Both ranks train on the same batch, so FSDP2's averaged gradient is the whole model's: any
    difference is the optimizer's (a norm, or a Newton-Schulz, taken over a shard instead of the
    whole). After step 2 the sharded optimizer is rebuilt from its state as a checkpoint holds it
    (gathered, through a weights-only file), as a resumed run does."""
    import io

    from cramkit.config import load_config
    from cramkit.distributed.config import ParallelConfig
    from cramkit.distributed.parallel import Parallel, shard_model
    from cramkit.models import build_model
    from cramkit.models.presets import preset_config
    from cramkit.optim import build_optimizer
    from cramkit.train.run import _full_state, _load_optimizer

    cpu = torch.device("cpu")
    par = Parallel(dist.get_rank(), 2, dist.get_rank(), "fsdp", cpu, launched=True)
    x = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": x, "labels": torch.roll(x, -1, 1)}

    def step(model, opt) -> None:
        model(**batch).loss.backward()
        if getattr(opt, "needs_closure", False):
            def closure():
                opt.zero_grad()
                loss = model(**batch).loss
                loss.backward()
                return loss.detach()
            opt.step(closure)
        else:
            opt.step()
        opt.zero_grad()

    out = {}
    for case, overrides in SHARDED_OPTIMIZERS.items():
        name = [] if any(o.startswith("optim.name=") for o in overrides) else [f"optim.name={case}"]
        optim = load_config("demo", [*name, *overrides, "parallel.strategy=fsdp"]).optim  # not refused
        torch.manual_seed(0)
        # No biases: the key bias has no gradient but rounding noise, which Adam scales to whole
        # steps, so SAM's rounding-level difference in its norm would show there as lr-sized.
        config = preset_config("tiny-gpt", vocab_size=512, max_positions=64, bias=False)
        whole, sharded = build_model(config), build_model(config)
        sharded.load_state_dict(whole.state_dict())
        shard_model(sharded, par, ParallelConfig(strategy="fsdp"), "fp32")
        opts = [build_optimizer(m, optim, cpu, 8) for m in (whole, sharded)]
        diffs = []
        for n in range(4):
            if n == 2:  # rank 0 gathers the state, every rank reads the file
                buffer = io.BytesIO()
                torch.save(_full_state(sharded, opts[1], par)[1], buffer)
                saved = [buffer.getvalue()]
                dist.broadcast_object_list(saved, src=0)
                opts[1] = build_optimizer(sharded, optim, cpu, 8)
                _load_optimizer(sharded, opts[1], torch.load(io.BytesIO(saved[0]), weights_only=True), par)
            step(whole, opts[0])
            step(sharded, opts[1])
            diffs.append(max(float((a.detach().full_tensor() - b.detach()).abs().max())
                             for a, b in zip(sharded.parameters(), whole.parameters(), strict=True)))
        out[case] = diffs
    return out


def nonfinite_gradient(data: Path, out: Path, strategy: str) -> None:
    """Rank 1 alone gets an inf in one element of one weight's gradient at step 2 (before DDP's
    all-reduce / FSDP2's reduce-scatter), under train.clip_grad: every rank must skip that step,
    with the skip decided on the host (for-loop AdamW) and on the device (fused AdamW). Each
    rank writes what it counted and its final weights (FSDP2's gathered) for the test."""
    from unittest import mock

    import pytest
    from safetensors.torch import save_file

    from cramkit.train.trainer import Trainer

    fit, trainers, counted = Trainer.fit, [], {}

    def keep(self):
        trainers.append(self)
        return fit(self)

    for fused in ("off", "on"):
        name = f"{strategy}-fused-{fused}"
        cfg = tiny_config(data, out, "train.budget=4steps", "train.micro_batch=0", "train.clip_grad=1.0",
                          f"optim.fused={fused}", f"parallel.strategy={strategy}", name=name, arch="gpt")
        with pytest.MonkeyPatch.context() as mp, mock.patch.object(Trainer, "fit", keep):
            poison_training_gradient(mp, lambda n: n == 2 and dist.get_rank() == 1)
            pretrain(cfg, say=lambda *_: None)
        trainer = trainers.pop()
        weights = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                   for k, v in trainer.raw_model.state_dict().items()}
        # Cloned: the tied head and embedding share one tensor, which safetensors refuses.
        save_file({k: v.detach().clone() for k, v in weights.items()},
                  out / f"{name}-weights-{dist.get_rank()}.safetensors")
        steps = sorted({float(s["step"]) for s in trainer.state.optimizer.state.values()})
        counted[name] = {"steps": trainer.state.step, "nonfinite": trainer.state.nonfinite_total,
                         "optimizer_steps": steps}
    (out / f"rank-{dist.get_rank()}.json").write_text(json.dumps(counted))


def rank0_failures(data: Path, out: Path) -> None:
    """Work rank 0 does alone fails (or outlasts the process group's timeout, here 8 s): the
    other rank must stop at once with a one-line error, not wait in a collective rank 0 never
    joins. Rank 0 stays in the group meanwhile (as a program that catches the error would), so a
    rank left waiting would time out, not lose its connection. Each rank writes what happened."""
    import datetime
    import time
    from unittest import mock

    import cramkit.train.run as run_module

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=8))
    rank = dist.get_rank()
    if rank == 0:
        (out / "taken").mkdir(parents=True)
        (out / "taken" / "file").write_text("")
    dist.barrier()
    real_prepare = run_module.prepare_data

    def slow_prepare(*args, **kwargs):
        time.sleep(10 if rank == 0 else 0)
        return real_prepare(*args, **kwargs)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(out / "ckpt"))

    scenarios = {
        "bad-source": (["data.dir=", f"data.prepare.sources=[{out}/missing.txt]", "data.prepare.seq_len=32",
                        f"data.cache_dir={out}/cache"],
                       None),
        "name-taken": ([], None),
        "checkpoint-write": (["train.budget=4steps", "train.checkpoint_every=0.5"],
                             mock.patch.object(ckpt, "save_checkpoint", full_disk) if rank == 0 else None),
        "slow-prepare": (["train.budget=2steps"], mock.patch.object(run_module, "prepare_data", slow_prepare)),
    }
    results = {}
    for name, (overrides, patch) in scenarios.items():
        cfg = tiny_config(data, out, *overrides, name="taken" if name == "name-taken" else name)
        start = time.monotonic()
        try:
            with patch or mock.patch.dict({}):
                pretrain(cfg, say=lambda *_: None)
            results[name] = ["ok", ""]
        except BaseException as exc:  # noqa: BLE001 - recorded for the test to judge
            results[name] = [type(exc).__name__, str(exc)]
        results[name].append(time.monotonic() - start)
        mine = out / f"{name}-rank-{rank}.json"
        mine.write_text(json.dumps(results[name]))
        if rank == 0:  # until rank 1 has reported: rank 0 stays in the group meanwhile
            other = out / f"{name}-rank-1.json"
            deadline = time.monotonic() + 30
            while not other.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
    (out / f"rank-{rank}.json").write_text(json.dumps(results))


def resume_micro_batch(data: Path, out: Path) -> None:
    """Micro-batch 4 of each rank's 4 sequences (batch 8), interrupted at step 3 of 6 and resumed
    with micro-batch 2 under DDP and 1 under FSDP2 (a GPU with less memory). Each rank saves the
    tokens of every step it trains, per run, for the test to compare."""
    from unittest import mock

    from cramkit.train.trainer import Trainer

    real, seen = Trainer.train_step, []

    def recording(self, batches):
        seen.append(torch.cat([b["input_ids"] for b in batches]))
        return real(self, batches)

    rank = int(os.environ["RANK"])  # the process group starts with the first run
    common = ("train.budget=6steps", "train.checkpoint_every=0.5", "train.micro_batch=4", "optim.name=sgd",
              "optim.lr=0.05")
    with mock.patch.object(Trainer, "train_step", recording):
        for strategy, micro in (("ddp", 2), ("fsdp", 1)):
            pretrain(tiny_config(data, out, *common, f"parallel.strategy={strategy}", name=strategy),
                     say=lambda *_: None)
            torch.save(seen[:], out / f"{strategy}-steps-{rank}.pt")
            seen.clear()
            if rank == 0:
                interrupted_copy(out / strategy, out / f"{strategy}-cut", 3)
            dist.barrier()
            cut = out / f"{strategy}-cut"
            pretrain(resume_config(cut, [f"train.micro_batch={micro}"]), run_dir=cut, resume=True, say=lambda *_: None)
            torch.save(seen[:], out / f"{strategy}-cut-steps-{rank}.pt")
            seen.clear()


def main() -> None:
    if sys.argv[1] == "rank0-failures":
        rank0_failures(Path(sys.argv[2]), Path(sys.argv[3]))
        leave_process_group(clean=True)
        return
    if sys.argv[1] == "resume-micro-batch":
        resume_micro_batch(Path(sys.argv[2]), Path(sys.argv[3]))
        leave_process_group(clean=True)
        return
    if sys.argv[1] == "nonfinite-gradient":
        nonfinite_gradient(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
        leave_process_group(clean=True)
        return
    data, out, mlm_data = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    quiet = {"say": lambda *_: None}
    # Micro-batch 2 of each rank's 4 sequences: gradient accumulation under DDP (no_sync) and
    # FSDP2 (a reduce-scatter per micro-batch) must still equal one process's single batch.
    common = ("train.budget=6steps", "train.micro_batch=2", "train.checkpoint_every=0.5", "train.keep_checkpoints=3",
              "train.peak_tflops=0.1")
    results = {}
    for strategy in ("ddp", "fsdp"):
        cfg = tiny_config(data, out, *common, f"parallel.strategy={strategy}", name=strategy, arch="gpt")
        summary = pretrain(cfg, **quiet)
        results[strategy] = {"steps": summary["steps"], "tokens": summary["tokens"], "mfu": summary["mfu"],
                             "flops": summary["flops"], "train_seconds": summary["train_seconds"]}
    # Fused AdamW: non-finite skips decided on the device from the all-reduced loss.
    for strategy in ("ddp", "fsdp"):
        cfg = tiny_config(data, out, "train.budget=6steps", "train.micro_batch=0", "optim.fused=on",
                          f"parallel.strategy={strategy}", name=f"{strategy}-fused", arch="gpt")
        pretrain(cfg, **quiet)
    # Progressive layer dropping leaves the dropped blocks' parameters out of a step (DDP must be
    # told); stacking and the V-cycle build new models from FSDP2's sharded ones.
    technique_runs = [("pld", "ddp"), ("pld", "fsdp"), ("stacking", "fsdp"), ("vcycle", "fsdp")]
    for technique, strategy in technique_runs:
        cfg = tiny_config(data, out, "train.budget=6steps", "train.micro_batch=0", *TECHNIQUE_RUNS[technique],
                          f"parallel.strategy={strategy}", name=f"{strategy}-{technique}", arch="gpt")
        pretrain(cfg, **quiet)
    # Many pretrain() calls in one process share one control group (each group holds sockets
    # and threads of its own).
    results["control_reused"] = init_parallel(cfg.parallel, "cpu").control is init_parallel(cfg.parallel, "cpu").control
    rank = dist.get_rank()
    if rank == 0:
        results["technique_losses"] = {f"{t} {s}": losses(out / f"{s}-{t}") for t, s in technique_runs}
        results["ddp"]["losses"] = losses(out / "ddp")
        results["fsdp"]["losses"] = losses(out / "fsdp")
        results["fused_losses"] = {s: losses(out / f"{s}-fused") for s in ("ddp", "fsdp")}
        # Resume from the 2-rank checkpoints at step 3, in copies (FSDP2's state was gathered
        # to full tensors and must scatter back).
        interrupted_copy(out / "ddp", out / "cut", 3)
        interrupted_copy(out / "fsdp", out / "fsdp-cut", 3)
    dist.barrier()
    pretrain(resume_config(out / "cut", []), run_dir=out / "cut", resume=True, **quiet)
    pretrain(resume_config(out / "fsdp-cut", []), run_dir=out / "fsdp-cut", resume=True, **quiet)
    # FSDP2 on the crammed-style BERT (scaled sinusoidal positions: one-element parameters).
    bert = tiny_config(mlm_data, out, "train.budget=2steps", "train.micro_batch=0", "parallel.strategy=fsdp",
                       name="fsdp-bert", arch="bert")
    results["fsdp_bert_steps"] = pretrain(bert, **quiet)["steps"]
    # MLM under DDP, micro-batch 2 of each rank's 4 sequences: each sequence keeps the mask it
    # gets in one process's batch of 8, so the curve is one process's.
    pretrain(tiny_config(mlm_data, out, "train.budget=4steps", "train.micro_batch=2", "parallel.strategy=ddp",
                         name="ddp-mlm", arch="bert"), **quiet)
    # A stop signal that reaches one rank only (rank 1, after step 3): every rank stops at the
    # same step, with no rank left waiting in a collective.
    cfg = tiny_config(data, out, "train.budget=10steps", "train.micro_batch=0", name="signalled", arch="gpt")
    with signal_at(3, signal.SIGTERM, rank=1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        signalled = pretrain(cfg, **quiet)
    results["signalled"] = [signalled["stop_reason"], signalled["steps"]]
    # A wall-clock budget: ranks' clocks differ, yet all must stop at the same step.
    cfg = tiny_config(data, out, "train.budget=1.5s", "train.micro_batch=0", name="timed", arch="gpt")
    summary = pretrain(cfg, **quiet)
    steps = [None, None]
    dist.all_gather_object(steps, summary["steps"])
    overflow = [None, None]
    dist.all_gather_object(overflow, sharded_overflow_agrees())
    optimizers = sharded_optimizers_agree()
    if rank == 0:
        results["sharded_optimizers"] = optimizers
        results["timed_steps"] = steps
        results["sharded_overflow"] = overflow
        results["signalled_checkpoint"] = ckpt.latest_checkpoint(out / "signalled").name
        results["resumed_losses"] = losses(out / "cut")
        results["fsdp_resumed_losses"] = losses(out / "fsdp-cut")
        results["ddp_mlm_losses"] = losses(out / "ddp-mlm")
        for name in ("cut", "ddp", "fsdp", "fsdp-cut"):
            results[f"{name}_weights"] = str(ckpt.latest_checkpoint(out / name) / "model.safetensors")
        (out / "results.json").write_text(json.dumps(results))
    leave_process_group(clean=True)  # what `cramkit pretrain` does on exit
    (out / f"threads-{rank}.json").write_text(json.dumps(gloo_threads()))


def gloo_threads() -> list[str]:
    """The names of this process's threads that gloo process groups run (Linux; else none)."""
    tasks = Path("/proc/self/task")
    names = []
    for tid in os.listdir(tasks) if tasks.is_dir() else []:
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
    return [n for n in names if "gloo" in n]


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
