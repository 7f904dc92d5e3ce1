"""Builders for tiny, fast pretraining configs used across trainer tests."""

from __future__ import annotations

from pathlib import Path

from cramkit.config import load_config


def tiny_overrides(data_dir: Path, out_dir: Path, *overrides: str, name: str = "run", arch: str = "bert") -> list[str]:
    """The ``key=value`` overrides of the demo recipe that :func:`tiny_config` applies, for a
    command line (``cramkit pretrain demo ...``)."""
    preset = "tiny" if arch == "bert" else "tiny-gpt"
    base = [
        f"data.dir={data_dir}", f"out_dir={out_dir}", f"name={name}", f"model.preset={preset}",
        "model.vocab_size=512", "model.max_positions=64", "train.budget=8steps", "train.batch_size=8",
        "train.micro_batch=4", "train.eval_every=0", "train.eval_batches=2", "train.log_every=1",
        "train.progress_bar=false", "train.tensorboard=false", "train.plots=false", "train.device=cpu", "finetune_demo=false",
        "optim.lr=3e-3", "objective.name=auto",
    ]
    return base + list(overrides)


def tiny_config(data_dir: Path, out_dir: Path, *overrides: str, name: str = "run", arch: str = "bert"):
    return load_config("demo", tiny_overrides(data_dir, out_dir, *overrides, name=name, arch=arch))


# Techniques acting within a 6-step run, for the multi-process tests: layer dropping from the
# second step on (theta(0) = 1 keeps all blocks), two depth doublings, a V-cycle down (after
# step 3) and up (after step 5, so that the last step trains the full model: a change due in
# the last step is not made, state.last_step).
TECHNIQUE_RUNS = {
    "pld": ("model.layers=4", "techniques=[pld]", "technique.pld.theta_bar=0.2", "technique.pld.gamma=20"),
    "stacking": ("model.layers=4", "techniques=[stacking]", "technique.stacking.at=[0.3,0.6]"),
    "vcycle": ("techniques=[vcycle]", "technique.vcycle.fractions=[0.25,0.4,0.35]"),
}


def interrupted_copy(run: Path, copy: Path, step: int) -> Path:
    """A copy of ``run`` as if it had been stopped right after its step-``step`` checkpoint."""
    import shutil

    from cramkit.train import checkpoint as ckpt

    shutil.copytree(run, copy)
    kept = [p for p in ckpt.list_checkpoints(copy) if p.name == f"step-{step:08d}"]
    if not kept:
        raise AssertionError(f"{run} has no checkpoint at step {step}")
    for path in ckpt.list_checkpoints(copy):
        if path not in kept:
            shutil.rmtree(path)
    (copy / "metrics.jsonl").write_text("")
    return copy


def signal_at(step: int, sig: int, rank: int | None = None):
    """A context in which this process sends itself ``sig`` right after logging step ``step``
    (on ``rank`` only, under torchrun), as a user's ^C or a scheduler's SIGTERM would arrive
    mid-run. Needs ``train.log_every=1``."""
    import os
    from unittest import mock

    import torch.distributed as dist

    from cramkit.train.trainer import Trainer

    original = Trainer._log_train

    def log_then_signal(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        here = rank is None or (dist.is_initialized() and dist.get_rank() == rank)
        if self.state.step == step and here:
            os.kill(os.getpid(), sig)
        return out

    return mock.patch.object(Trainer, "_log_train", log_then_signal)


def on_built_model(monkeypatch, fn) -> None:
    """Make ``pretrain`` call ``fn(model)`` on each model it builds, before it is sharded."""
    import cramkit.train.run as run_module
    from cramkit.models import build_model as real_build  # not an earlier call's wrapped one

    def build(cfg):
        model = real_build(cfg)
        fn(model)
        return model

    monkeypatch.setattr(run_module, "build_model", build)


def on_training_forward(monkeypatch, hook) -> None:
    """Make ``pretrain``'s models call ``hook(n, kwargs, out)`` after each training forward pass
    (``n`` = 1, 2, ... counts training calls only); the output passes on as ``hook`` leaves it."""
    calls = {"n": 0}

    def wrap(model):
        forward = model.forward

        def wrapped(*args, **kwargs):
            out = forward(*args, **kwargs)
            if model.training:
                calls["n"] += 1
                hook(calls["n"], kwargs, out)
            return out

        model.forward = wrapped

    on_built_model(monkeypatch, wrap)


def poison_training_loss(monkeypatch, bad) -> None:
    """Make ``pretrain``'s models return a NaN training loss on the forward calls ``n`` (1, 2, ...,
    counting training calls only) for which ``bad(n)`` is true."""

    def poison(n, kwargs, out):
        if bad(n):
            out.loss = out.loss * float("nan")

    on_training_forward(monkeypatch, poison)


def poison_training_gradient(monkeypatch, bad, module: str = "layers.0.ffn.down") -> None:
    """Make ``pretrain``'s models put an inf into one element of ``module``'s weight gradient
    on the training forward calls ``n`` (1, 2, ..., of that module) for which ``bad(n)`` is true;
    the loss stays finite. The hook is on the weight as the forward pass uses it (under FSDP2 the
    gathered one), so the inf is there before DDP all-reduces or FSDP2 reduce-scatters it."""

    def attach(model):
        calls = {"n": 0}

        def before_forward(mod, args):
            if not mod.training:
                return
            calls["n"] += 1
            if bad(calls["n"]):
                pending = [True]  # once: under DDP the hook stays on the weight for later steps

                def poison(grad):
                    if pending and pending.pop():
                        grad = grad.clone()
                        grad.view(-1)[0] = float("inf")
                    return grad

                mod.weight.register_hook(poison)

        model.get_submodule(module).register_forward_pre_hook(before_forward)

    on_built_model(monkeypatch, attach)
