"""Setting up, running and resuming a pretraining run: the glue around :class:`Trainer`.

Order of construction (DESIGN.md): technique states → configure_model → build → on_model →
weights (on resume) → device → compile → optimizer (+ state on resume) → loader → trainer.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..budget import Clock, exhausted
from ..config import RunConfig, config_from_dict
from ..configbase import apply_overrides
from ..data.dataset import TokenDataset
from ..data.loader import ShardLoader
from ..data.prepare import cached_prepare
from ..errors import CheckpointError, ConfigError, CramkitError
from ..models import build_model
from ..models.flops import count_parameters, flops_per_token
from ..objectives import build_objective
from ..optim import build_optimizer
from ..techniques import build_techniques
from ..utils import write_json
from . import checkpoint as ckpt
from .device import auto_micro_batch, measure_peak_flops, resolve_device, resolve_precision
from .runlog import Progress, RunLog, environment
from .state import TrainState
from .trainer import Trainer

OBJECTIVE_FOR_ARCH = {"bert": "mlm", "gpt": "clm"}


def cache_root(cfg: RunConfig) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    return Path(os.environ.get("CRAMKIT_CACHE", Path.home() / ".cache" / "cramkit")) / "data"


def prepare_data(cfg: RunConfig, say: Callable[[str], None] = print) -> Path:
    """The prepared data directory of a run: ``data.dir``, or prepared (and cached) from sources."""
    if cfg.data.dir:
        return Path(cfg.data.dir)
    return cached_prepare(cfg.data.prepare, cache_root(cfg))


def _objective_name(cfg: RunConfig, dataset: TokenDataset) -> str:
    name = cfg.objective.name if cfg.objective.name != "auto" else dataset.objective
    wanted = OBJECTIVE_FOR_ARCH.get(cfg.model.arch)
    if wanted and name != wanted:
        raise ConfigError(
            f"model.arch={cfg.model.arch} trains with the {wanted} objective, but the data/objective is {name}; "
            f"prepare the data with objective={wanted}"
        )
    return name


def _check_vocab(cfg: RunConfig, dataset: TokenDataset, data_dir: Path) -> None:
    if cfg.model.vocab_size != dataset.vocab_size:
        raise ConfigError(
            f"the tokenizer in {data_dir} has a (padded) vocabulary of {dataset.vocab_size}, but "
            f"model.vocab_size is {cfg.model.vocab_size}; set model.vocab_size={dataset.vocab_size} "
            "or prepare data with a matching vocab_size"
        )


def _objective_options(cfg: RunConfig, name: str, fixed: bool = False) -> dict[str, Any]:
    if name != "mlm":  # CLM is a deterministic shift: nothing to configure or seed
        return {}
    o = cfg.objective
    return {"mask_rate": o.mask_rate, "mask_prob": o.mask_fraction, "random_prob": o.random_fraction,
            "seed": cfg.seed, "fixed": fixed}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(x) for x in state["python"]), state["python_pos"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def new_run_dir(cfg: RunConfig) -> Path:
    name = cfg.name or f"{cfg.recipe or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.out_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run directory {run_dir} already exists; use --resume {run_dir} or another name=")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _compiler(enabled: bool, warm_up: Callable[[torch.nn.Module], None]):
    def compile_model(model: torch.nn.Module) -> torch.nn.Module:
        if not enabled:
            return model
        try:
            compiled = torch.compile(model)
            warm_up(compiled)  # compile now, outside the budget, and surface failures early
            return compiled
        except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {exc}); training in eager mode", stacklevel=2)
            return model

    return compile_model


def pretrain(cfg: RunConfig, run_dir: Path | None = None, resume: bool = False, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``cfg`` in ``run_dir`` (a new one unless ``resume``) and return the run summary."""
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    data_dir = prepare_data(cfg, say)
    dataset = TokenDataset.open(data_dir)
    _check_vocab(cfg, dataset, data_dir)
    objective_name = _objective_name(cfg, dataset)

    if run_dir is None:
        run_dir = new_run_dir(cfg)
    run_dir = Path(run_dir)
    resume_from = ckpt.latest_checkpoint(run_dir, warn=say) if resume else None
    saved = ckpt.load_state(resume_from) if resume_from else None

    _seed_everything(cfg.seed)
    techniques = build_techniques(cfg.techniques, cfg.technique)
    if saved:
        for t in techniques:
            t.load_state_dict(saved["techniques"].get(t.name, {}))
    model_cfg = cfg.model
    for t in techniques:
        model_cfg = t.configure_model(model_cfg)
    model = build_model(model_cfg)
    for t in techniques:
        model = t.on_model(model)
    if resume_from:
        ckpt.load_weights(model, resume_from)
    model.to(device)

    objective = build_objective(objective_name, dataset, **_objective_options(cfg, objective_name))
    # Validation uses the same masks at every evaluation, so losses are comparable over time.
    eval_objective = build_objective(objective_name, dataset, **_objective_options(cfg, objective_name, fixed=True))

    def make_batch(n: int) -> dict[str, torch.Tensor]:
        tokens = torch.from_numpy(dataset.sequences("train")[:n].astype("int64"))
        if tokens.shape[0] < n:
            tokens = tokens.repeat((n + tokens.shape[0] - 1) // tokens.shape[0], 1)[:n]
        return {k: v.to(device) for k, v in objective(tokens, 0).items()}

    if saved:
        micro_batch = int(saved["micro_batch"])
    elif cfg.train.micro_batch:
        micro_batch = min(cfg.train.micro_batch, cfg.train.batch_size)
    elif device.type == "cuda":
        params = count_parameters(model)
        micro_batch = auto_micro_batch(model, make_batch, device, precision, cfg.train.batch_size, optimizer_bytes=8 * params)
        say(f"auto micro-batch: {micro_batch} sequences")
    else:
        micro_batch = min(32, cfg.train.batch_size)

    def warm_up(compiled: torch.nn.Module) -> None:
        compiled.train()
        from .device import autocast

        with autocast(device, precision):
            out = compiled(**make_batch(micro_batch))
        out.loss.backward()
        compiled.zero_grad(set_to_none=True)

    optimizer_factory = lambda m: build_optimizer(m, cfg.optim, device)  # noqa: E731
    state = TrainState()
    optimizer = optimizer_factory(model)
    loader = ShardLoader(dataset, "train", micro_batch, seed=cfg.seed, transform=objective)
    clock_state = None
    if saved:
        optimizer.load_state_dict(saved["optimizer"])
        state.load_counters(saved["counters"])
        loader.load_state_dict(saved["loader"])
        clock_state = saved["clock"]
        _set_rng_state(saved["rng"], device)
    state.optimizer = optimizer

    seq_len = dataset.seq_len
    mask_rate = cfg.objective.mask_rate if objective_name == "mlm" else None
    fpt = lambda m: flops_per_token(m.config, seq_len, mask_rate)  # noqa: E731
    peak = cfg.train.peak_tflops * 1e12 or measure_peak_flops(device, precision)

    def evaluate(m: torch.nn.Module) -> float:
        total, count = 0.0, 0
        seqs = dataset.sequences("val")
        n = len(seqs)
        limit = cfg.train.eval_batches * micro_batch if cfg.train.eval_batches else n
        for i, start in enumerate(range(0, min(n, limit), micro_batch)):
            tokens = torch.from_numpy(seqs[start:start + micro_batch].astype("int64"))
            batch = {k: v.to(device) for k, v in eval_objective(tokens, i).items()}
            out = m(**batch)
            total += float(out.loss) * int(out.num_targets)
            count += int(out.num_targets)
        return total / max(count, 1)

    if not resume:
        write_json(run_dir / "config.json", cfg.to_dict())
        write_json(run_dir / "environment.json", environment(device))
        shutil.copyfile(dataset.tokenizer_path, run_dir / "tokenizer.json")
        write_json(run_dir / "data_manifest.json", dataset.manifest)
    log = RunLog(run_dir, tensorboard=cfg.train.tensorboard)
    bar = Progress(cfg.train.progress_bar, cfg.recipe or "pretrain")

    trainer_ref: list[Trainer] = []

    def save(st: TrainState) -> None:
        tr = trainer_ref[0]
        payload = {
            "optimizer": st.optimizer.state_dict(),
            "counters": st.counters(),
            "micro_batch": micro_batch,
            "clock": tr.clock.state_dict(),
            "loader": loader.state_dict(),
            "rng": _rng_state(device),
            "techniques": {t.name: t.state_dict() for t in techniques},
            "scaler": tr.scaler.state_dict(),
        }
        ckpt.save_checkpoint(run_dir, st.step, tr.raw_model, payload, keep=cfg.train.keep_checkpoints,
                             meta={"model_config": tr.raw_model.config.to_dict(), "tokens": st.tokens})

    clock = Clock()
    if clock_state:
        clock.load_state_dict(clock_state)
    n_params = count_parameters(model)
    say(f"run: {run_dir}")
    say(f"model: {model_cfg.arch}, {n_params / 1e6:.2f} M parameters; device {device}, {precision}; "
        f"micro-batch {micro_batch}, batch {cfg.train.batch_size}, seq {seq_len}; budget {cfg.train.budget}")
    trainer = Trainer(
        cfg=cfg, model=model, optimizer_factory=optimizer_factory, train_batches=iter(loader),
        evaluate=evaluate, checkpoint=save, log=log.write, techniques=techniques, device=device,
        precision=precision, micro_batch=micro_batch, seq_len=seq_len, flops_per_token=fpt,
        peak_flops=peak, state=state, clock=clock,
        compile_model=_compiler(cfg.train.compile, warm_up), progress_bar=bar,
    )
    trainer_ref.append(trainer)
    if resume and exhausted(trainer.budget, state.usage):
        loader.close()
        raise CramkitError(
            f"{run_dir} already spent its budget of {cfg.train.budget} at step {state.step}; "
            f"continue with a larger one, e.g. cramkit pretrain --resume {run_dir} budget=..."
        )
    if saved and "scaler" in saved:
        trainer.scaler.load_state_dict(saved["scaler"])
    first_loss = None
    try:
        if not resume:
            first_loss = trainer.run_eval()
        trainer.fit()
    finally:
        bar.close()
        with trainer.clock.paused():
            save(trainer.state)
        loader.close()
    val_loss = trainer.run_eval() if trainer.stop_reason == "budget" else trainer.state.extra.get("val_loss")
    log.close()
    summary = _summary(run_dir, trainer, first_loss, val_loss, n_params, peak)
    write_json(run_dir / "summary.json", summary)
    return summary


def _summary(run_dir: Path, trainer: Trainer, first_loss, val_loss, n_params: int, peak: float) -> dict[str, Any]:
    st = trainer.state
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("type") == "train"]
    seconds = max(st.usage.seconds, 1e-9)
    return {
        "run_dir": str(run_dir),
        "stop_reason": trainer.stop_reason,
        "steps": st.step,
        "tokens": st.tokens,
        "train_seconds": round(st.usage.seconds, 3),
        "paused_seconds": round(trainer.clock.paused_seconds, 3),
        "flops": st.usage.flops,
        "tokens_per_s": round(st.tokens / seconds, 1),
        "mfu": round(st.usage.flops / seconds / peak, 4) if peak else 0.0,
        "peak_flops": peak,
        "parameters": n_params,
        "first_train_loss": train[0]["loss"] if train else None,
        "last_train_loss": train[-1]["loss"] if train else None,
        "initial_val_loss": first_loss,
        "final_val_loss": val_loss,
        "nonfinite_steps": st.nonfinite_total,
    }


def resume_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    """The saved config of ``run_dir`` with ``overrides`` applied (e.g. a larger budget)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a cramkit run directory (no config.json)")
    data = apply_overrides(json.loads(path.read_text()), overrides)
    cfg = config_from_dict(data)
    if overrides:
        write_json(path, cfg.to_dict())
    return cfg
