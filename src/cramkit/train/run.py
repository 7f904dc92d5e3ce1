"""Setting up, running and resuming a pretraining run: the glue around :class:`Trainer`.

Order of construction: technique states → configure_model → build → on_model → weights (on
resume) → device → micro-batch → loader → trainer, whose ``prepare_model`` applies FP8,
activation checkpointing, compile and sharding and then builds the optimizer → optimizer state
(on resume) → first evaluation → training.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import plugins
from ..budget import Budget, Clock, Usage, exhausted, next_due, progress
from ..config import RunConfig, apply_run_overrides, check_run_name, config_from_dict
from ..data.dataset import TokenDataset
from ..data.loader import ShardLoader
from ..data.prepare import cache_folder, cached_prepare
from ..data.tokenizer import padded_vocab_size
from ..distributed import (
    Parallel,
    apply_activation_checkpointing,
    estimate_memory,
    init_parallel,
    shard_model,
)
from ..distributed.memory import activation_switches, advise, offload_context
from ..distributed.parallel import OFFLOAD_NEEDS_TORCHRUN
from ..errors import (
    CheckpointError,
    ConfigError,
    CramkitError,
    DataError,
    TrainingError,
    resume_refusal,
)
from ..models import build_model
from ..models.config import ModelConfig
from ..models.docmask import untrainable_kernel
from ..models.flops import count_parameters, count_parameters_from_config, flops_per_token
from ..models.layers import POSITIONS, Block
from ..objectives import (
    BOUNDARY_TOKENS,
    TRAIN_MASKS,
    VAL_MASKS,
    boundary_token_id,
    build_objective,
    training_objective,
)
from ..optim import (
    build_optimizer,
    evaluation_weights,
    keeps_evaluation_weights,
    optimizer_states,
    whole_tensor_optimizer,
)
from ..optim.optimizers import settings_read
from ..techniques import build_techniques
from ..utils import (
    atomic_path,
    beyond_host_memory,
    changed_keys,
    lock_exclusive,
    missing_folders,
    read_json,
    remove_empty,
    write_json,
)
from . import checkpoint as ckpt
from .device import auto_micro_batch, autocast, measure_peak_flops, resolve_precision
from .energy import EnergyMeter
from .runlog import Progress, RunLog, check_log, environment
from .state import TrainState
from .trainer import Trainer, in_ms, locate_targets


def cache_root(cfg: RunConfig) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    return Path(os.environ.get("CRAMKIT_CACHE", Path.home() / ".cache" / "cramkit")) / "data"


def prepare_data(cfg: RunConfig, say: Callable[[str], None] = print) -> Path:
    """The prepared data directory of a run: ``data.dir``, or prepared (and cached) from sources."""
    if cfg.data.dir:
        return Path(cfg.data.dir)
    # What the data must be for this model is checked before preparing it, which can take
    # minutes and would leave a dataset the run cannot train on in the cache.
    _check_objective(cfg, cfg.data.prepare.objective)
    _check_sequence_length(cfg, cfg.data.prepare.seq_len, "the sequences data.prepare.seq_len asks for",
                           "a shorter data.prepare.seq_len")
    p = cfg.data.prepare
    if p.val_fraction == 0:  # the run's step-0 evaluation would refuse the data once prepared
        raise ConfigError("data.prepare.val_fraction=0 holds no documents out, and pretraining evaluates "
                          "on held-out sequences; set data.prepare.val_fraction > 0 (e.g. 0.01)")
    # A trained byte-level BPE has exactly vocab_size tokens (its 258-token floor aside), or its
    # training fails; WordPiece may keep more (data/tokenizer.py), and a reused file has its own.
    if not p.tokenizer_file and p.tokenizer_kind == "bpe" and p.vocab_size >= 258:
        padded = padded_vocab_size(p.vocab_size)
        if padded != cfg.model.vocab_size:
            raise ConfigError(
                f"data.prepare.vocab_size={p.vocab_size} makes a (padded) vocabulary of {padded}, but "
                f"model.vocab_size is {cfg.model.vocab_size}; set model.vocab_size={padded} or a "
                "matching data.prepare.vocab_size")
    return cached_prepare(p, cache_root(cfg))


def _check_objective(cfg: RunConfig, data_objective: str) -> str:
    """The objective the run trains with: the architecture's, which both ``objective.name`` (when
    set) and the data must be. Data is packed for one objective (MLM frames each sequence
    ``[CLS] ... [SEP]`` with WordPiece; CLM ends documents with the end-of-document token), so
    ``objective.name=clm`` does not make MLM data fit a GPT: it trained on the framing silently."""
    wanted = training_objective(cfg.model)
    asked = cfg.objective.name
    if asked not in ("auto", wanted):
        raise ConfigError(
            f"objective.name={asked}, but model.arch={cfg.model.arch} trains with the {wanted} objective; "
            "leave objective.name=auto"
        )
    if data_objective != wanted:
        raise ConfigError(
            f"model.arch={cfg.model.arch} trains with the {wanted} objective, but the data/objective is "
            f"{data_objective}; prepare the data with objective={wanted}"
        )
    return wanted


def _check_vocab(cfg: RunConfig, dataset: TokenDataset, data_dir: Path) -> None:
    if cfg.model.vocab_size != dataset.vocab_size:
        raise ConfigError(
            f"the tokenizer in {data_dir} has a (padded) vocabulary of {dataset.vocab_size}, but "
            f"model.vocab_size is {cfg.model.vocab_size}; set model.vocab_size={dataset.vocab_size} "
            "or prepare data with a matching vocab_size"
        )


def _check_model_fits_host(model: ModelConfig) -> None:
    """Refuse a model whose fp32 weights (and position tables) exceed this machine's memory: it
    is built on the host first, whatever the device. ``model.hidden=1e12`` failed as the
    allocator's traceback, and ``model.layers=1e12`` built blocks until memory ran out."""
    params = count_parameters_from_config(model)
    table = 0
    if beyond_host_memory(params) is None:  # else even a meta block's sizes can overflow torch's arithmetic
        # A table of max_positions rows may be a buffer, not a parameter: the embedding's, or
        # rotary's cos/sin caches, which every block's attention holds.
        with torch.device("meta"):
            positions = POSITIONS.get(model.positions)(model)
            block = Block(model, model.causal)
        table = sum(b.numel() for b in positions.buffers()) if positions is not None else 0
        table += model.layers * sum(b.numel() for b in block.buffers())
    beyond = beyond_host_memory(params + table)
    if beyond:
        raise ConfigError(
            f"model: {params:,} parameters{f' and {table:,} values of position tables' if table else ''} "
            f"{beyond}; check model.hidden, layers, intermediate, vocab_size, type_vocab_size and max_positions"
        )


def _check_sequence_length(cfg: RunConfig, seq_len: int, what: str, shorter: str) -> None:
    if cfg.model.exceeds_positions(seq_len):
        raise ConfigError(
            f"{what} are {seq_len} tokens long, but model.max_positions is "
            f"{cfg.model.max_positions}; set model.max_positions={seq_len} or {shorter}"
        )


def _check_targets_per_step(cfg: RunConfig, mask_rate: float, seq_len: int) -> None:
    """Refuse a mask rate that leaves most full-size steps with no position to predict: such a
    step logs a loss of 0 and updates with a zero gradient (objective.mask_rate=1e-9 trained on
    nothing and reported a perfect loss)."""
    expected = mask_rate * seq_len * cfg.train.batch_size
    if expected < 1:
        # Each position is drawn on its own: a step has no target with probability (1 - rate)^n,
        # above e^-1 = 37% here ("most" steps only below 0.69 positions per step).
        empty = (1 - mask_rate) ** (seq_len * cfg.train.batch_size)
        raise ConfigError(
            f"objective.mask_rate={mask_rate:g} selects {expected:.2g} positions per step on average "
            f"(train.batch_size={cfg.train.batch_size} sequences of {seq_len} tokens), so {empty:.0%} of "
            f"steps would have nothing to predict; use a mask_rate of at least {1 / (seq_len * cfg.train.batch_size):.2g} "
            "(cramming uses 0.25, BERT 0.15)")


def _with_document_boundary(cfg: RunConfig, dataset: TokenDataset, objective: str) -> RunConfig:
    """Fill ``model.document_boundary_id`` from the data's special tokens when document masking
    is on and the id is unset (the resolved config.json then records it for resume and
    fine-tuning)."""
    if not cfg.model.document_mask or cfg.model.document_boundary_id is not None:
        return cfg
    boundary = boundary_token_id(objective, dataset.special_ids)
    if boundary is None:
        wanted = " or ".join(BOUNDARY_TOKENS.get(objective, ()))
        raise ConfigError(
            f"model.document_mask=true, but the tokenizer of {dataset.path} has no {wanted} "
            "token to end documents; set model.document_boundary_id or model.document_mask=false"
        )
    return cfg.replace(model=cfg.model.replace(document_boundary_id=boundary))


def _objective_options(cfg: RunConfig, name: str, fixed: bool = False) -> dict[str, Any]:
    if name != "mlm":  # CLM is a deterministic shift: nothing to configure or seed
        return {}
    o = cfg.objective
    # Validation masks do not follow the run's seed: runs with other seeds score the same masks.
    return {"mask_rate": o.eval_mask_rate if fixed else o.mask_rate, "mask_prob": o.mask_fraction,
            "random_prob": o.random_fraction, "seed": 0 if fixed else cfg.seed, "fixed": fixed}


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


def _reschedule(state: TrainState, cfg: RunConfig) -> None:
    """Periodic evaluation and checkpoints are due at fractions of the budget; after a resume
    with a larger budget those fractions move, so recompute the next ones from the progress
    under the new budget (for an unchanged budget this gives the saved values)."""
    p = progress(Budget.parse(cfg.train.budget), state.usage)
    for every, attr in ((cfg.train.eval_every, "next_eval"), (cfg.train.checkpoint_every, "next_checkpoint")):
        if every > 0:
            setattr(state, attr, next_due(p, every))


def _private_rng(device: torch.device):
    """Random draws inside this block leave the global RNG (CPU and this GPU) untouched."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def new_run_dir(cfg: RunConfig, made: dict[str, Any] | None = None) -> Path:
    """Create the run directory of a new run; ``made`` records it for :func:`_discard_untrained`.

    The directory is created exclusively: a run that fails early removes its directory, so two
    runs must never share one. The default name (one-second timestamp) gets a ``-2``, ``-3``...
    suffix when taken; an explicit ``name=`` may only be a new or empty folder.
    """
    out_dir = Path(cfg.out_dir)
    # A run that fails before its first step removes its folder, and then these (if empty).
    above = missing_folders(out_dir)
    if not cfg.name:
        base = f"{cfg.recipe or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
        for n in itertools.count(1):
            run_dir = out_dir / (base if n == 1 else f"{base}-{n}")
            try:
                run_dir.mkdir(parents=True)  # exist_ok=False: the exclusive step
            except FileExistsError:
                if run_dir.exists():  # another run's (even while still empty), or a file
                    continue
                raise  # a parent folder is a file: no other name would do better
            break
        existed = False
    else:
        check_run_name(cfg.name)
        run_dir = out_dir / cfg.name
        taken = ConfigError(f"run directory {run_dir} already exists; use --resume {run_dir} or another name=")
        existed = run_dir.is_dir()
        if existed and any(run_dir.iterdir()):
            # A job training in it now (its lock held): neither advice below fits it; "delete it"
            # would remove a live run's folder (one without a checkpoint yet looks stopped).
            probe = lock_run_dir(run_dir, ConfigError(
                f"run directory {run_dir} is in use by another cramkit run (training now); use another "
                "name=, or wait for it to end"))
            if probe is not None:
                os.close(probe)
            if (run_dir / "config.json").is_file() and not ckpt.list_checkpoints(run_dir):
                # --resume, which `taken` offers, refuses a run killed before its first checkpoint
                raise ConfigError(f"run directory {run_dir} already exists, from a run that stopped before its "
                                  f"first checkpoint (nothing to --resume): use another name= or delete it")
            raise taken
        if not existed:
            try:
                run_dir.mkdir(parents=True)
            except FileExistsError:  # made by another run since the check above
                if run_dir.is_dir():
                    raise taken from None
                raise
    # Before it is recorded as this run's (a failed run removes what it recorded): a run that
    # started at the same moment may have made the folder, or found it empty, first.
    lock = lock_run_dir(run_dir, taken if cfg.name else None)
    if made is not None:
        made.update(dir=run_dir, existed=existed, lock=lock, above=above)
    return run_dir


def lock_run_dir(run_dir: Path, taken: ConfigError | None = None) -> int | None:
    """Hold an exclusive ``flock`` on ``run_dir`` for as long as the returned descriptor is open
    (None where locks are unsupported). Two jobs given one ``name=``, or two resumes of one run,
    otherwise both trained into one folder: logs interleaved, each pruning the other's
    checkpoints. The kernel drops the lock when the process ends, however it ends."""
    try:
        return lock_exclusive(run_dir)
    except BlockingIOError:
        raise taken or ConfigError(f"{run_dir} is in use by another cramkit run (resumed or training "
                                   "now); wait for it to end") from None


def _discard_untrained(made: dict[str, Any]) -> None:
    """Remove what a new run that failed before its first optimizer step wrote.

    Such a directory (config.json, no checkpoint) could neither be resumed ("no checkpoints")
    nor reused ("already exists"), and holds nothing worth keeping. A run that took steps keeps
    its directory: its metrics.jsonl shows what went wrong.
    """
    run_dir, state = made.get("dir"), made.get("state")
    if run_dir is None or (state is not None and state.usage.steps > 0):
        return
    if not made["existed"]:
        shutil.rmtree(run_dir, ignore_errors=True)
        remove_empty(made.get("above", []))  # out_dir=new/runs: no empty new/runs left either
        return
    for child in run_dir.iterdir():  # an empty folder the user made: leave it empty
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _undo_config(made: dict[str, Any]) -> None:
    """Put back the ``config.json`` and ``environment.json`` that a resume replaced, and the
    summary it moved aside, when the resume took no step.

    Some overrides are refused only at the first step (a sequence-length warm-up that starts at
    the data's full length): the refused setting would stay in the run's config, and the next
    plain ``--resume`` fail on it again, though the checkpoint never trained with it. Without its
    summary a finished run was reported as unfinished (``cramkit report``), with the MFU of its
    last logged window, and its environment listed a resume that never trained.
    """
    before, state = made.get("config_before"), made.get("state")
    if before is None or state is None or state.usage.steps != made.get("resumed_at"):
        return
    run_dir = made["config_path"].parent
    try:
        with atomic_path(made["config_path"]) as tmp:
            tmp.write_bytes(before)
        if made.get("environment_before") is not None:
            with atomic_path(run_dir / "environment.json") as tmp:
                tmp.write_bytes(made["environment_before"])
        else:  # a run from before the file, or moved away: the resume made it, for itself alone
            (run_dir / "environment.json").unlink(missing_ok=True)
        if made.get("summary_moved") and not (run_dir / "summary.json").exists():
            os.replace(run_dir / SUMMARY_BEFORE_RESUME, run_dir / "summary.json")
    except OSError:  # the resume's own error is the one to report
        pass


def _compiled_parts(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules that a technique's surgery compiled on their own (``Module.compile()``, e.g. pld's
    ``compile_blocks``): they compile lazily, at their first call."""
    return [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]


def _compiler(enabled: bool, warm_up: Callable[[torch.nn.Module], None]):
    def compile_model(model: torch.nn.Module) -> torch.nn.Module:
        # Without train.compile, modules that surgery compiled still compile lazily, at their
        # first call: the warm-up makes that happen here, not in the first steps on the clock.
        parts = [] if enabled else _compiled_parts(model)
        if not enabled and not parts:
            return model
        try:
            compiled = torch.compile(model) if enabled else model
            warm_up(compiled)  # compile now, outside the budget, and surface failures early
            return compiled
        except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {exc}); training in eager mode", stacklevel=2)
            for part in parts:
                part._compiled_call_impl = None
            # A backward that failed to compile (it is lowered lazily, at its first call) left
            # the gradients of the layers it runs after: the first step would add them to its own.
            model.zero_grad(set_to_none=True)
            return model

    return compile_model


def probe_micro_batch(cfg: RunConfig, model: torch.nn.Module | None, make_batch, device: torch.device,
                      precision: str, cap: int, optimizer_bytes: float) -> int:
    """The largest micro-batch that trains ``cfg.model`` on the GPU (:func:`auto_micro_batch`),
    probed on ``model`` (or, when None, on a fresh one: the run starts smaller than it grows).

    The probe trains as the run will, with checkpointed blocks and offloaded activations: a
    larger micro-batch is what a user turns them on for. Checkpointing stays on ``model``; the
    trainer re-applies it, and it leaves checkpointed blocks as they are.
    """
    probe = model if model is not None else build_model(cfg.model).to(device)
    apply_activation_checkpointing(probe, cfg.memory)
    # A compiled backward brings every offloaded activation back at its start (see the warning
    # in pretrain): offloading then saves nothing at the peak, so the probe must not count on it.
    offloads = cfg.memory.offload_activations and not cfg.train.compile
    return auto_micro_batch(probe, make_batch, device, precision, cap, optimizer_bytes,
                            forward_context=lambda: offload_context(cfg.memory, device) if offloads
                            else contextlib.nullcontext())


def resumed_micro_batch(asked: int, before: int | None, saved: int, per_rank_batch: int, ramp_unit: int | None,
                        probe: Callable[[int], int] | None) -> int:
    """The micro-batch a resume trains with.

    The data position counts sequences and the masks follow each sequence, so a resume may change
    the micro-batch (a GPU with less memory) and train the same steps. Only a ``train.micro_batch``
    this resume sets (``asked``, not ``before``, config.json's) replaces the checkpoint's
    (``saved``), as the first run used it: capped at each rank's share of the batch. The one
    config.json keeps (the demo's 32, with batch_size=16 trained as 16) stays whatever the batch
    becomes. The automatic one (0) is probed again where ``probe(cap)`` is given (on a GPU), as
    this GPU may have less memory than the last one: not beyond the checkpoint's unless this
    resume asks for auto anew, so that on the same GPU the run goes on with the micro-batch it
    had, bit for bit; while the batch ramp lasts, within its unit (``ramp_unit``, else None).
    """
    if asked and asked != before:
        return min(asked, per_rank_batch)
    if asked or probe is None:
        return saved
    cap = per_rank_batch if asked != before else math.gcd(saved, per_rank_batch)
    return probe(cap if ramp_unit is None else math.gcd(cap, ramp_unit))


def _model_preparer(cfg: RunConfig, par: Parallel, precision: str, compile_model, unused_parameters: bool = False):
    """FP8 conversion → activation checkpointing → data-parallel wrapper → compile, re-applied
    after every model swap. The wrapper comes before compiling, as PyTorch documents for both:
    ``fully_shard`` changes the module in place and the compiled wrapper runs the sharded module;
    compiling a DDP-wrapped module lets dynamo split the graph at DDP's bucket boundaries
    (DDPOptimizer), so each bucket's all-reduce overlaps the rest of the backward. Compiled first
    and wrapped after, every all-reduce would wait for the whole compiled backward.

    ``unused_parameters``: some technique may leave parameters out of a step (see
    ``Technique.unused_parameters``), which DDP has to be told.
    """

    def prepare(model: torch.nn.Module) -> torch.nn.Module:
        if cfg.train.fp8 and not getattr(model, "_cramkit_fp8", False):
            from ..distributed.fp8 import convert_fp8

            convert_fp8(model, par.device)
            model._cramkit_fp8 = True
        apply_activation_checkpointing(model, cfg.memory)
        wrapped = shard_model(model, par, cfg.parallel, precision, cfg.memory.offload_optimizer,
                              unused_parameters)
        return compile_model(wrapped)

    return prepare


def _full_state(model: torch.nn.Module, optimizer, par: Parallel) -> tuple[dict, dict]:
    """Unsharded weights and optimizer state (collective under FSDP2; cheap otherwise)."""
    if par.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        if not _holds_state(optimizer):
            # torch's getter would first "initialise" it with a step at learning rate 0, which
            # counts: Adam's bias correction and Schedule-Free's step then run one step ahead of
            # a run without this checkpoint. An optimizer has no state after a technique rebuilt
            # it (a V-cycle level, a doubling), when a checkpoint may well fall.
            return _full_weights(model, par), _stateless_optimizer_state(model, optimizer)
        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return ckpt.model_weights(model), optimizer.state_dict()


def _holds_state(optimizer) -> bool:
    """Whether an optimizer keeps any per-parameter state (not so before its first step; some
    leave empty entries behind, e.g. Schedule-Free's ``eval()`` on a fresh one)."""
    return any(optimizer.state.values())


def _stateless_optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """The full optimizer state dict FSDP2's getter writes (parameters named, not numbered), for
    an optimizer without per-parameter state: its group settings alone."""
    names = {param: name for name, param in model.named_parameters()}
    return {"state": {}, "param_groups": [
        {**{key: copy.deepcopy(value) for key, value in group.items() if key != "params"},
         "params": [names[param] for param in group["params"]]}
        for group in optimizer.param_groups]}


def _full_weights(model: torch.nn.Module, par: Parallel) -> dict:
    """Unsharded weights alone (collective under FSDP2), without gathering optimizer state."""
    if par.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return ckpt.model_weights(model)


def _checkpoint_weights(model: torch.nn.Module, optimizer, par: Parallel) -> tuple[dict, dict | None, dict]:
    """``(weights, train_weights, optimizer_state)`` for a checkpoint.

    ``weights`` (``model.safetensors``, what fine-tuning, export and evaluation read) are the
    weights the run is evaluated with. An optimizer that keeps separate evaluation weights
    (Schedule-Free: its ``eval()`` switches the parameters to the averaged x) trains other ones
    (y); those go into ``train_weights`` so that a resume continues exactly, and
    :func:`~cramkit.optim.evaluation_weights` puts y back bit for bit, so a run with checkpoints
    equals one without. ``train_weights`` is None for every other optimizer.
    """
    if not keeps_evaluation_weights(optimizer):
        weights, optim_state = _full_state(model, optimizer, par)
        return weights, None, optim_state
    with evaluation_weights(optimizer, model):
        eval_weights = _full_weights(model, par)
        # On a CPU device those tensors are the parameters themselves, which are about to move.
        eval_weights = {k: v.clone() for k, v in eval_weights.items()}
    weights, optim_state = _full_state(model, optimizer, par)
    return eval_weights, weights, optim_state


def _load_optimizer(model: torch.nn.Module, optimizer, state: dict, par: Parallel) -> None:
    if par.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        # The loader makes an empty state with a step() on zero gradients at lr 0, without a
        # closure, which SAM refuses ("SAM requires closure"); the closure it gets here puts the
        # zero gradients back, as a closure recomputes them.
        closure = getattr(optimizer, "needs_closure", False)
        if closure:
            step = optimizer.step
            optimizer.step = lambda closure=None: step(closure or (lambda: _zero_gradients(optimizer)))
        try:
            # Saved without per-parameter state (before its first step): the loader's empty step
            # would leave its counts behind (Schedule-Free's group step), so the fresh optimizer
            # gets the saved group settings alone, below, as the run that was saved had.
            if any(state["state"].values()):
                set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        finally:
            if closure:
                del optimizer.step  # the class's own again
        # That loader hands the groups' settings back with tuples made lists, which a library may
        # refuse (Muon's Newton-Schulz coefficients: "`weights` must be a preset name, ..."): the
        # saved settings, as optimizer.load_state_dict() restores them without FSDP2.
        for group, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
            group.update({key: value for key, value in saved.items() if key != "params"})
    else:
        optimizer.load_state_dict(state)


def _zero_gradients(optimizer) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)


def _format_mismatch(saved: dict[str, Any], par: Parallel) -> ConfigError | None:
    """The refusal of a resume under FSDP2 that cannot read the checkpoint's optimizer state, or
    None: one saved without FSDP keys it by parameter index, FSDP2's loader by parameter name (it
    failed with a KeyError that blamed another cramkit version). The other way round loads."""
    keys = saved.get("optimizer", {}).get("state", {})
    if par.strategy != "fsdp" or not any(isinstance(k, int) for k in keys):
        return None
    # A single process records strategy "none", which is no value of parallel.strategy; a
    # checkpoint from before strategies were recorded may be either.
    was = {"none": "single-process training", None: "ddp (or single-process) training"}.get(
        saved.get("strategy"), saved.get("strategy"))
    return resume_refusal([("parallel.strategy", "fsdp", was)], "FSDP2 cannot read its optimizer state",
                          "resume it with that strategy (memory.offload_optimizer, which needs FSDP2, then "
                          "stays off)")


def _whole_tensor_optimizer(cfg: RunConfig) -> str | None:
    """``optim.name=...`` (or ``optim.base=...``) where the run's optimizer is one FSDP2 refuses."""
    found = whole_tensor_optimizer(cfg.optim)
    return None if found is None else f"optim.{found[0]}={found[1]}"


def _optimizer_name(cfg: RunConfig) -> str:
    return f"sam({cfg.optim.base})" if cfg.optim.name == "sam" else cfg.optim.name


def _optimizer_mismatch(cfg: RunConfig, saved: dict[str, Any], optimizer) -> ConfigError | None:
    """The refusal of a checkpoint's optimizer state that cannot go on under ``cfg.optim``, or None.

    load_state_dict() accepts another optimizer's state (it takes the saved hyperparameters as
    they are) and the first step then fails, e.g. KeyError 'momentum' for adamw's state under
    sgd, after config.json had been rewritten with the new optimizer. Checkpoints record the
    optimizer; for older ones, each of the new optimizer's group settings must be in the saved
    groups (steps only ever add settings).
    """
    trained, now = saved.get("optim_name"), _optimizer_name(cfg)
    advice = "resume without changing optim.name (or optim.base)"
    if trained is not None:
        return None if trained == now else resume_refusal(
            [("optim.name", now, trained)], f"its saved optimizer state is {trained}'s", advice)
    groups = saved["optimizer"].get("param_groups", [])
    fits = len(groups) == len(optimizer.param_groups) and all(
        set(new) - {"params"} <= set(old) for old, new in zip(groups, optimizer.param_groups))
    return None if fits else resume_refusal(
        [("optim.name", now, "optimizer")], f"its saved state lacks settings that {now} keeps", advice)


def _shared_run_dir(cfg: RunConfig, par: Parallel, run_dir: Path | None, made: dict[str, Any]) -> Path:
    # Rank 0 names and creates the directory (its timestamp); the others use the same path.
    if run_dir is None:
        return Path(par.on_main(lambda: str(new_run_dir(cfg, made)), "creating the run directory"))
    # A resume: never two at once.
    par.on_main(lambda: made.update(lock=lock_run_dir(Path(run_dir))), f"locking {run_dir}")
    return Path(run_dir)


def _shared_data(cfg: RunConfig, par: Parallel, say) -> Path:
    # One rank prepares (and caches); the others then find the result ready (or, on another
    # node without that cache, prepare their own).
    path = par.on_main(lambda: prepare_data(cfg, say), "preparing the data")
    return path if par.is_main else prepare_data(cfg, say)


def pretrain(cfg: RunConfig, run_dir: Path | None = None, resume: bool = False, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``cfg`` in ``run_dir`` (a new one unless ``resume``) and return the run summary.

    Under torchrun every rank calls this; rank 0 alone writes logs and checkpoints. A new run
    that fails (or is interrupted) before its first optimizer step leaves no directory behind.
    ``cfg`` is a RunConfig: :func:`cramkit.config.load_config` (a recipe and overrides) or
    :func:`cramkit.config.config_from_dict` makes one.
    """
    if not isinstance(cfg, RunConfig):  # a recipe's name or a dict was "... has no attribute 'parallel'"
        raise TypeError(f"pretrain: give a RunConfig (cramkit.config.load_config(RECIPE, [OVERRIDES]) "
                        f"or config_from_dict(DICT)), got {type(cfg).__name__}")
    made: dict[str, Any] = {}  # the new run directory and its TrainState, once they exist
    try:
        return _pretrain(cfg, run_dir, resume, say, made)
    except BaseException as exc:
        _discard_untrained(made)
        _undo_config(made)
        if isinstance(exc, torch.OutOfMemoryError):
            raise TrainingError(_out_of_memory(cfg, exc, made, run_dir if resume else made.get("dir"))) from None
        raise
    finally:
        if made.get("lock") is not None:
            os.close(made["lock"])


def _out_of_memory(cfg: RunConfig, exc: torch.OutOfMemoryError, made: dict[str, Any], run_dir: Path | None) -> str:
    """What to do when the GPU ran out of memory while training, the commonest way a run on a
    new GPU or a larger preset ends: a traceback said nothing of the switches that fit it, nor
    that the last checkpoint stands and a resume may take a smaller micro-batch."""
    what = next((line.strip() for line in str(exc).splitlines() if line.strip()), "out of memory")
    micro = made.get("micro_batch")
    switches = activation_switches(cfg.memory)
    if micro != 1:  # None: it ran out before the micro-batch was chosen
        switches.insert(0, f"train.micro_batch={micro // 2}" if micro else "a smaller train.micro_batch")
    if not switches:
        switches = ["parallel.strategy=fsdp across more GPUs, or a smaller model"]
    if run_dir is not None and made.get("state") is not None and ckpt.list_checkpoints(run_dir):
        again = f"resume it from its last checkpoint with cramkit pretrain --resume {run_dir} " + " or ".join(switches)
    else:
        again = "start it again with " + " or ".join(switches)
    return f"the GPU ran out of memory while training{f' (micro-batch {micro})' if micro else ''}: {what[:200]}; {again}"


def _pretrain(cfg: RunConfig, run_dir: Path | None, resume: bool, say: Callable[[str], None],
              made: dict[str, Any]) -> dict[str, Any]:
    par = init_parallel(cfg.parallel, cfg.train.device, cpu_collectives=cfg.memory.offload_optimizer)
    if cfg.train.fp8:  # converted when the trainer prepares the model: after data and announcement
        from ..distributed.fp8 import check_fp8

        check_fp8(par.device)
    if cfg.memory.offload_optimizer and not par.distributed:
        # shard_model says the same, but only once data and run directory were made and announced.
        raise ConfigError(OFFLOAD_NEEDS_TORCHRUN)
    _check_model_fits_host(cfg.model)  # before data preparation, which can take minutes
    if not par.is_main:
        say = lambda *_: None  # noqa: E731
    device = par.device
    precision = resolve_precision(cfg.train.precision, device)
    untrainable = untrainable_kernel(cfg.model.document_mask, cfg.model.document_mask_kernel, device)
    if untrainable:
        raise ConfigError(f"model.{untrainable}")
    data_dir = _shared_data(cfg, par, say)
    dataset = TokenDataset.open(data_dir)
    # The run keeps a copy of the tokenizer: it must be the one the tokens came from. A shard
    # missing or cut short is named here, not when the loader first reaches it.
    dataset.check_files()
    _check_vocab(cfg, dataset, data_dir)
    # Found here, not at the first forward pass (after the run directory was made and announced).
    _check_sequence_length(cfg, dataset.seq_len, f"the sequences in {data_dir}",
                           "prepare data with a shorter seq_len")
    if len(dataset.sequences("val")) == 0:  # found here, not at the step-0 evaluation
        raise DataError(f"{data_dir} has no validation sequences (prepared with val_fraction=0?), and "
                        "pretraining evaluates on them; prepare it with val_fraction > 0")
    objective_name = _check_objective(cfg, dataset.objective)
    # The share of positions with a target, where sparse prediction runs the head (memory, FLOPs):
    # MLM's masked share, nearly every position for CLM (1.0; None would refuse a sparse GPT).
    mask_rate = cfg.objective.mask_rate if objective_name == "mlm" else 1.0
    _check_targets_per_step(cfg, mask_rate, dataset.seq_len)
    cfg = _with_document_boundary(cfg, dataset, objective_name)
    run_dir = _shared_run_dir(cfg, par, run_dir, made)
    if resume:
        _check_same_data(run_dir, dataset, data_dir)
        check_log(run_dir / "metrics.jsonl")  # before anything is written, not at the summary
        environment_before = _saved_environment(run_dir)  # likewise, not when config.json is rewritten
    # Rank 0 alone reports a damaged checkpoint (every rank looks for the newest intact one).
    resume_from = ckpt.latest_checkpoint(run_dir, **({} if par.is_main else {"warn": lambda _: None})) \
        if resume else None
    saved = ckpt.load_state(resume_from) if resume_from else None
    if saved:  # before the model is built and the run is announced (checked again on the clock below)
        _check_budget_left(cfg, Usage(**saved["counters"]["usage"]), run_dir)
    shuffle = cfg.data.shuffles(dataset.manifest, saved["loader"].get("shuffle") if saved else None)

    _seed_everything(cfg.seed)  # the same initial weights on every rank
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
        _load_resumed_weights(model, cfg, run_dir, resume_from)
        if "train_weights" in saved:  # the optimizer's training weights, beside the evaluated ones
            ckpt.apply_weights(model, saved["train_weights"], f"{resume_from}/state.pt")
    model.to(device)
    if par.distributed:  # dropout differs between ranks, as it would across one big batch
        torch.manual_seed(cfg.seed + 7919 * par.rank)

    objective = build_objective(objective_name, dataset, **_objective_options(cfg, objective_name))
    # Validation uses the same masks at every evaluation, so losses are comparable over time.
    eval_objective = build_objective(objective_name, dataset, **_objective_options(cfg, objective_name, fixed=True))

    def make_batch(n: int, first_id: int = 0) -> dict[str, torch.Tensor]:
        tokens = torch.from_numpy(dataset.sequences("train")[:n].astype("int64"))
        if tokens.shape[0] < n:
            tokens = tokens.repeat((n + tokens.shape[0] - 1) // tokens.shape[0], 1)[:n]
        # As the trainer will hand it over, so that compiling sees the same inputs; the sequences
        # get ids first_id.. (masks follow the ids, as the loader's do).
        batch = locate_targets(objective(tokens, first_id), model)
        return {k: v.to(device) for k, v in batch.items()}

    # Techniques may start from a smaller architecture than model.* (stacking starts shallow and
    # grows into it; a V-cycle resumed on a coarse level returns to it). Memory is sized for
    # model.*, the largest the run trains: a micro-batch that fits the first model would run out
    # of memory once the model has grown. Built on the meta device (no memory, no RNG) to count.
    if model_cfg == cfg.model:
        full_model = model
    else:
        with torch.device("meta"):
            full_model = build_model(cfg.model)

    def estimate_for(n: int) -> dict[str, float]:
        return estimate_memory(full_model, micro_batch=n, seq_len=dataset.seq_len, precision=precision,
                               world_size=par.world_size, sharded=par.strategy == "fsdp", cfg=cfg.memory,
                               optimizer_states=optimizer_states(cfg.optim),
                               mask_rate=mask_rate,
                               device_type=device.type, compiled=cfg.train.compile,
                               fsdp_reshard=cfg.parallel.fsdp_reshard, fsdp_param_dtype=cfg.parallel.fsdp_param_dtype)

    # From here on the GPU works for this run: micro-batch probing and compile warm-up cost energy
    # too, so the meter starts before them.
    meter = EnergyMeter(device)
    per_rank_batch = max(1, cfg.train.batch_size // par.world_size)

    def probed(cap: int) -> int:
        with _private_rng(device):
            # The optimizer's own states per device (fewer for Lion or 8-bit states, none on the
            # device with offloading), as the memory estimate counts them.
            n = probe_micro_batch(cfg, model if full_model is model else None, make_batch, device,
                                  precision, cap, estimate_for(1)["optimizer_gb"] * 1e9)
        # The smallest over the ranks: a rank with less free memory must not run another
        # accumulation count than the others (their collectives would no longer pair up).
        n = -int(par.all_max([-float(n)])[0])
        say(f"auto micro-batch: {n} sequences")
        return n

    if saved:
        # Before the micro-batch: each rank's share of the batch, which caps it, follows the
        # number of ranks, so another number made the demo's untouched micro_batch=32 "differ".
        if int(saved.get("world_size", 1)) != par.world_size:
            raise resume_refusal([("ranks", par.world_size, int(saved.get("world_size", 1)))],
                                 "each rank's share of the batch and the data position follow it",
                                 "resume it with the same number of ranks (torchrun --nproc-per-node, "
                                 "--nnodes)")
        saved_micro_batch = int(saved["micro_batch"])
        # The batch ramp grows each rank's batch in steps of the micro-batch the run started
        # with, which is also the unit of the loader's epochs: its state keeps it (that of a
        # checkpoint from before either was recorded names the micro-batch it never changed).
        ramp_unit = ShardLoader.epoch_unit_of(saved["loader"]) or saved_micro_batch
        ramping = cfg.train.batch_ramp > progress(Budget.parse(cfg.train.budget), Usage(**saved["counters"]["usage"]))
        before = read_json(run_dir / "config.json", CheckpointError).get("train", {})
        micro_batch = resumed_micro_batch(cfg.train.micro_batch, before.get("micro_batch"), saved_micro_batch,
                                          per_rank_batch, ramp_unit if ramping else None,
                                          probed if device.type == "cuda" else None)
        if ramping and ramp_unit % micro_batch:
            # The same micro-batch: the ramp came back, by a longer ramp or budget this resume sets.
            changed = ([("train.micro_batch", micro_batch, saved_micro_batch)] if micro_batch != saved_micro_batch
                       else [("train.batch_ramp", cfg.train.batch_ramp, before.get("batch_ramp"))]
                       if cfg.train.batch_ramp != before.get("batch_ramp")
                       else [("train.budget", cfg.train.budget, before.get("budget"))])
            raise resume_refusal(changed, f"the batch ramp, not over yet, grows each rank's batch in steps of "
                                          f"{ramp_unit} sequences (the run's first micro-batch), which must be "
                                          "whole micro-batches",
                                 f"resume with a micro-batch that divides {ramp_unit}, or once the ramp is over")
        if micro_batch != saved_micro_batch:
            say(f"micro-batch {micro_batch} sequences (checkpointed with {saved_micro_batch}): the same steps, "
                "accumulated otherwise")
    elif cfg.train.micro_batch:
        micro_batch = min(cfg.train.micro_batch, per_rank_batch)
    elif device.type == "cuda":
        micro_batch = probed(per_rank_batch)
    else:
        micro_batch = min(32, per_rank_batch)
    if not saved:
        ramp_unit = micro_batch
    made["micro_batch"] = micro_batch  # for the advice should the GPU run out of memory
    if cfg.train.batch_size < par.world_size:  # no micro-batch could help: say what would
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is smaller than the {par.world_size} ranks: "
                          "each rank needs at least one sequence per step; raise the batch size or use fewer ranks")
    if cfg.train.batch_size % par.world_size:  # no micro-batch could help either
        multiple = -(-cfg.train.batch_size // par.world_size) * par.world_size
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} does not split evenly over {par.world_size} "
                          f"ranks; use a multiple of {par.world_size} (e.g. {multiple}) or another number of ranks")
    if cfg.train.batch_size % (micro_batch * par.world_size):
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is not a multiple of micro-batch {micro_batch} × "
            f"{par.world_size} rank(s); choose a batch size that is, or set train.micro_batch")
    estimate = estimate_for(micro_batch)
    if cfg.optim.rule == "schedulefree" and cfg.schedule.name != "constant" and par.is_main:
        chosen = "optim.name=sam, optim.base=schedulefree" if cfg.optim.name == "sam" else "optim.name=schedulefree"
        warnings.warn(f"{chosen} with schedule.name={cfg.schedule.name}: Schedule-Free's "
                      "averaging replaces the decay, so its authors use a constant rate after warm-up; "
                      "set schedule.name=constant (keep schedule.warmup)", stacklevel=2)
    if cfg.train.fp8 and not cfg.train.compile and par.is_main:
        warnings.warn("train.fp8 without train.compile=true: torchao's float8 linears are slower than bf16 in "
                      "eager mode (pytorch/ao#685); set train.compile=true", stacklevel=2)
    if cfg.memory.offload_activations and cfg.train.compile and par.is_main:
        warnings.warn("memory.offload_activations with train.compile=true saves little peak memory: a "
                      "compiled backward brings every offloaded activation back at its start "
                      "(pytorch/pytorch#148222); train eager, or use memory.activation_checkpointing",
                      stacklevel=2)
    if device.type == "cuda":
        advice = advise(estimate, torch.cuda.get_device_properties(device).total_memory / 1e9, cfg.memory,
                        _whole_tensor_optimizer(cfg))
        if advice and par.is_main:
            warnings.warn(advice, stacklevel=2)

    def warm_up(compiled: torch.nn.Module) -> None:
        # Dropout in the warm-up pass must not consume the RNG that resume restored.
        with _private_rng(device):
            compiled.train()
            # Two masks with different numbers of targets: the second makes the compiler generalise
            # over that size (sparse prediction gathers it), so training meets no recompilation.
            batches = [make_batch(micro_batch, first_id) for first_id in (0, micro_batch)]
            # Then the shapes techniques give training batches (a shorter sequence, say), with
            # target positions found anew for the changed labels (locate_targets replaces them).
            batches += [locate_targets(b, model) for t in techniques for b in t.warm_up_batches(batches[0], model)]
            for batch in batches:
                with autocast(device, precision):
                    out = compiled(**batch)
                out.loss.backward()
                compiled.zero_grad(set_to_none=True)

    state = made["state"] = TrainState()
    # Each rank's epoch is a whole number of the run's first micro-batches (so a resume with
    # another micro-batch keeps the epoch plan) and the position counts sequences.
    loader = ShardLoader(dataset, "train", micro_batch, seed=cfg.seed, rank=par.rank, world_size=par.world_size,
                         shuffle=shuffle, epochs=None, transform=objective, pin_memory=device.type == "cuda",
                         epoch_unit=ramp_unit)
    clock = Clock()
    closing = None
    if saved:
        state.load_counters(saved["counters"])
        _reschedule(state, cfg)
        loader.load_state_dict(saved["loader"])
        clock.load_state_dict(saved["clock"])
        closing = _closing_totals(run_dir, state.step) if par.is_main else None
        if objective_name == "mlm" and saved.get("masks") != TRAIN_MASKS and par.is_main:
            warnings.warn(f"{run_dir} was checkpointed by an earlier cramkit that drew MLM masks another way "
                          f"({saved.get('masks') or 'per micro-batch'}, now {TRAIN_MASKS}): the rest of the run "
                          "trains on other masks than the uninterrupted run would have, and its validation "
                          "losses, on other masks too, are not comparable with the earlier ones", stacklevel=2)
        if closing:
            clock.paused_seconds = max(clock.paused_seconds, closing.get("paused_seconds", 0.0))
        rng = saved["rng"]
        _set_rng_state(rng[par.rank % len(rng)] if isinstance(rng, list) else rng, device)
    else:  # the start is evaluated explicitly; periodic work begins one interval in
        state.next_eval = cfg.train.eval_every
        state.next_checkpoint = cfg.train.checkpoint_every

    seq_len = dataset.seq_len
    fpt = lambda m: flops_per_token(m.config, seq_len, mask_rate)  # noqa: E731
    # MFU is the whole system's: the tokens (and FLOPs) counted are every rank's, so the peak is
    # one device's times the number of ranks (PaLM's definition, appendix B).
    peak = (cfg.train.peak_tflops * 1e12 or measure_peak_flops(device, precision)) * par.world_size

    # How many validation sequences each loss averages (the summary records it): eval_batches
    # counts micro-batches, so runs with other micro-batches may average other prefixes. Those
    # of the run's first micro-batch: a resume with another one scores its losses on the same.
    n_val = len(dataset.sequences("val"))
    val_sequences = min(n_val, cfg.train.eval_batches * ramp_unit) if cfg.train.eval_batches else n_val

    def evaluate(m: torch.nn.Module) -> float:
        total, count = 0.0, 0
        seqs = dataset.sequences("val")
        for start in range(0, val_sequences, micro_batch):
            tokens = torch.from_numpy(seqs[start:min(start + micro_batch, val_sequences)].astype("int64"))
            # Ids start..: each sequence's position in the split, so its mask follows the
            # sequence, not the batch it is evaluated in, and is the same at every evaluation.
            batch = {k: v.to(device) for k, v in eval_objective(tokens, start).items()}
            out = m(**batch)
            total += float(out.loss) * int(out.num_targets)
            count += int(out.num_targets)
        if count == 0:
            # The split has sequences (checked above): none of their positions has a target.
            raise ConfigError(f"the validation sequences of {data_dir} have no position to predict: "
                              f"objective.eval_mask_rate={cfg.objective.eval_mask_rate} masks none of "
                              f"{val_sequences} x {dataset.seq_len} tokens; raise it (the default is 0.15)")
        return total / count

    segment = {**environment(device), "world_size": par.world_size, "strategy": par.strategy,
               "memory_estimate": estimate} if par.is_main else {}
    if par.is_main and plugins.recorded():  # what later readers of the run import (plugins.run_plugins)
        segment["plugins"] = plugins.recorded()
    log: RunLog | None = None

    def start_files() -> None:
        nonlocal log
        if not resume:
            write_json(run_dir / "environment.json", segment)
            with atomic_path(run_dir / "tokenizer.json") as tmp:
                shutil.copyfile(dataset.tokenizer_path, tmp)
            write_json(run_dir / "data_manifest.json", dataset.manifest)
        log = RunLog(run_dir, tensorboard=cfg.train.tensorboard, resume_step=state.step if saved else None)

    par.on_main(start_files, "writing the run's files")
    bar = Progress(cfg.train.progress_bar and par.is_main, cfg.recipe or "pretrain")
    # Whatever ends the run (an error, ^C, the budget), the loader's thread, the log's files and
    # the bar are closed here; each close is idempotent, so the normal path may close them
    # earlier, in the order it needs (the loader before the final evaluation, the log before the
    # summary reads it).
    try:
        trainer_ref: list[Trainer] = []

        def save(st: TrainState) -> None:
            tr = trainer_ref[0]
            weights, train_weights, optim_state = _checkpoint_weights(tr.raw_model, st.optimizer, par)
            rng = par.gather(_rng_state(device))
            energy = energy_so_far()

            def write() -> None:
                payload = {
                    "optimizer": optim_state, "counters": st.counters(), "micro_batch": micro_batch,
                    "clock": tr.clock.state_dict(), "loader": loader.state_dict(), "rng": rng,
                    "techniques": {t.name: t.state_dict() for t in techniques}, "scaler": tr.scaler.state_dict(),
                    "world_size": par.world_size, "strategy": par.strategy, "optim_name": _optimizer_name(cfg),
                    "energy_kwh": energy, "peak_flop_seconds": peak_flop_seconds(st),
                    "masks": TRAIN_MASKS if objective_name == "mlm" else None,
                }
                if train_weights is not None:
                    payload["train_weights"] = train_weights
                ckpt.save_checkpoint(run_dir, st.step, weights, payload, keep=cfg.train.keep_checkpoints,
                                     meta={"model_config": tr.raw_model.config.to_dict(), "tokens": st.tokens})

            par.on_main(write, f"writing the checkpoint of step {st.step}")

        n_params = count_parameters(full_model)
        say(f"run: {run_dir}")
        say(f"model: {model_cfg.arch}, {n_params / 1e6:.2f} M parameters; device {device}, {precision}; "
            f"micro-batch {micro_batch} x {par.world_size} rank(s), batch {cfg.train.batch_size}, seq {seq_len}; "
            f"budget {cfg.train.budget}; estimated memory {estimate['total_gb']:.2f} GB per device")
        compile_model = _compiler(cfg.train.compile, warm_up)
        trainer = Trainer(
            cfg=cfg, model=model, optimizer_factory=lambda m: build_optimizer(m, cfg.optim, device, cfg.train.batch_size),
            train_batches=iter(loader), evaluate=evaluate, checkpoint=save,
            log=log.write if log else (lambda record: None), techniques=techniques, device=device,
            precision=precision, micro_batch=micro_batch, ramp_unit=ramp_unit, seq_len=seq_len, flops_per_token=fpt,
            peak_flops=peak, state=state, clock=clock, progress_bar=bar, parallel=par,
            prepare_model=_model_preparer(cfg, par, precision, compile_model,
                                          any(t.unused_parameters for t in techniques)),
            offload=lambda: offload_context(cfg.memory, device),
        )
        trainer_ref.append(trainer)
        if saved:
            refusal = _optimizer_mismatch(cfg, saved, state.optimizer) or _format_mismatch(saved, par)
            if refusal:
                raise refusal
            # The saved groups come back with the peak the run was trained at; the schedule
            # multiplies each group's initial_lr every step, so a resume that sets another
            # optim.lr (muon_lr, lr_scaling) must keep the one this config built.
            peak_lrs = [group["initial_lr"] for group in state.optimizer.param_groups]
            try:
                _load_optimizer(trainer.raw_model, state.optimizer, saved["optimizer"], par)
            except (ValueError, KeyError) as exc:  # e.g. another number of parameter groups
                raise CheckpointError(
                    f"{resume_from}: its optimizer state does not fit optim.name={_optimizer_name(cfg)} as "
                    f"this cramkit builds it ({exc}); it was probably saved by another version: start a "
                    "new run, or resume with the version that wrote it") from None
            for group, peak_lr in zip(state.optimizer.param_groups, peak_lrs, strict=True):
                group["initial_lr"] = peak_lr
            if "scaler" in saved:
                trainer.scaler.load_state_dict(saved["scaler"])
            _check_budget_left(cfg, state.usage, run_dir)

        def record_config() -> None:  # on resume only now, when every piece of saved state has loaded
            if resume:  # put back should this resume fail before its first step (_undo_config)
                env_path = run_dir / "environment.json"
                made.update(config_path=run_dir / "config.json", resumed_at=state.step,
                            config_before=(run_dir / "config.json").read_bytes(),
                            environment_before=env_path.read_bytes() if env_path.is_file() else None)
            write_json(run_dir / "config.json", cfg.resolved())
            if resume:
                _record_resume_environment(run_dir, state.step, segment, environment_before)
            # The run goes on: its summary describes a run that ended, and `cramkit report` would
            # take it for the whole run's while this one trains (or after it was killed). Kept
            # aside for its closing totals, should this resume die before its first checkpoint.
            if (run_dir / "summary.json").exists():
                os.replace(run_dir / "summary.json", run_dir / SUMMARY_BEFORE_RESUME)
                made["summary_moved"] = True

        par.on_main(record_config, "writing config.json")
        # Every rank's GPU, summed, and the segments before a resume from the checkpoint: energy
        # and tokens then both cover the whole run, for an honest kWh per billion tokens.
        # Unknown (None) when a GPU cannot be metered, or an earlier segment was not. A
        # collective: every rank calls it.
        energy_before = saved.get("energy_kwh") if saved else 0.0
        if closing and "energy_kwh" in closing:
            energy_before = closing["energy_kwh"]

        def energy_so_far() -> float | None:
            per_rank = par.gather(meter.kwh())
            if energy_before is None or any(kwh is None for kwh in per_rank):
                return None
            return energy_before + sum(per_rank)

        # The run's MFU divides its FLOPs by each segment's peak times that segment's seconds: a
        # run resumed on another GPU (or after a noisy peak probe) is not judged by the last one.
        # Checkpoints from before this was saved count their seconds at this segment's peak.
        seconds_before = state.usage.seconds
        peak_before = saved.get("peak_flop_seconds", seconds_before * peak) if saved else 0.0

        def peak_flop_seconds(st: TrainState) -> float:
            return peak_before + (st.usage.seconds - seconds_before) * peak

        first_loss = None
        if not resume:
            first_loss = trainer.run_eval()
        # No final checkpoint after a failure (an exception skips the save below): the step in
        # flight had taken batches from the loader without being counted, and under torchrun the
        # healthy ranks would never join the save's collectives. The last periodic checkpoint stands.
        trainer.fit()
        bar.close()
        reshaped = _reshaped(cfg.model, trainer.raw_model.config) if trainer.stop_reason == "budget" else None
        if reshaped and par.is_main:
            warnings.warn(reshaped, stacklevel=2)
        with trainer.clock.paused():
            save(trainer.state)
        loader.close()
        # Also after a stop signal: the checkpoint is written, and the summary's final loss must be
        # the model's, not the last periodic evaluation's (for a run stopped early, step 0's).
        val_loss = trainer.run_eval()
        kwh = energy_so_far()

        def write_summary() -> dict[str, Any]:
            log.finish()
            # The model trained last (the one the final checkpoint holds), not the first one.
            summary = _summary(run_dir, trainer, first_loss, val_loss, count_parameters(trainer.raw_model), peak,
                               peak_flop_seconds(trainer.state))
            summary["val_sequences"] = val_sequences  # `report` notes runs that differ
            if objective_name == "mlm":  # a causal run draws no masks: a label would read as a scheme
                summary["val_masks"] = VAL_MASKS
            else:  # how causal LMs are compared; a masked-LM loss has no such reading
                summary["final_val_perplexity"] = perplexity(val_loss)
            summary["energy_kwh"] = kwh
            summary["kwh_per_billion_tokens"] = kwh / (trainer.state.tokens / 1e9) if kwh and trainer.state.tokens else None
            write_json(run_dir / "summary.json", summary)
            (run_dir / SUMMARY_BEFORE_RESUME).unlink(missing_ok=True)  # this summary counts it all
            if cfg.train.plots:
                _plot_losses(run_dir)
            return summary

        return par.on_main(write_summary, "writing summary.json")
    finally:
        bar.close()
        loader.close()
        if log:
            log.close()


def _plot_losses(run_dir: Path) -> None:
    """``cramkit report RUN --out RUN/plots``'s plots, without its tables (summary.json has the
    numbers). A run that trained to its end is never failed by its plots."""
    from ..report import DEFAULT_AXES, load_run, write_plots

    try:
        write_plots([load_run(run_dir)], run_dir / "plots", DEFAULT_AXES, None)
    except ImportError:  # the optional plot extra; TensorBoard's events hold the curves too
        pass
    except Exception as exc:  # noqa: BLE001 (a plotting library's failure of any kind)
        warnings.warn(f"the loss plots were not written ({type(exc).__name__}: {exc}); "
                      f"`cramkit report {run_dir} --out {run_dir / 'plots'}` retries them", stacklevel=2)


def _saved_environment(run_dir: Path) -> dict[str, Any]:
    """A resumed run's ``environment.json`` (empty when there is none), which the resume adds its
    own entry to: damaged, it is refused before the resume writes anything."""
    path = run_dir / "environment.json"
    advice = "restore it, or move it away to resume without the record of the earlier sessions"
    try:
        env = read_json(path, CheckpointError) if path.exists() else {}  # a directory: "cannot be read"
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {advice}") from None
    if not isinstance(env.get("resumes", []), list):
        raise CheckpointError(f"{path}: 'resumes' is not a list (the file is damaged); {advice}")
    return env


def _record_resume_environment(run_dir: Path, step: int, segment: dict[str, Any], env: dict[str, Any]) -> None:
    """Add the environment of a resume to ``environment.json``'s ``resumes`` (``env``: the file as
    :func:`_saved_environment` read it), by the step it starts from. A resume may run on another
    GPU, torch or cramkit commit, and the file described the first session alone. Entries from the
    step on belong to a timeline this resume abandons."""
    path = run_dir / "environment.json"
    earlier = [r for r in env.get("resumes", []) if isinstance(r, dict) and r.get("step", 0) < step]
    write_json(path, {**env, "resumes": [*earlier, {"step": step, **segment}]})


def _reshaped(configured, ended) -> str | None:
    """What to tell a user whose run spent its budget on another shape than ``model.*``.

    Techniques change the model at budget fractions, after the first step that starts at or past
    one, but never after the step that spends the budget (``state.last_step``): a stage edge at or
    past the last step's start is not crossed, and the run then ends on, say, a V-cycle's coarse
    level. The checkpoint that fine-tuning and export read holds that model,
    which ``summary.json``'s parameter count alone would not make plain.
    """
    fields = [f.name for f in dataclasses.fields(configured)
              if getattr(configured, f.name) != getattr(ended, f.name)]
    if not fields:
        return None
    now = ", ".join(f"{name}={getattr(ended, name)}" for name in fields)
    wanted = ", ".join(f"model.{name}={getattr(configured, name)}" for name in fields)
    return (f"the budget ran out with the model at {now}, not the configured {wanted}: a change of the "
            "model that a technique had scheduled was due at or after the last step's start (nothing would have "
            "trained it), and the final checkpoint (which "
            "fine-tuning and export read) holds the model the run ended with; give the technique's last "
            "stage a larger share of the budget")


def _check_same_data(run_dir: Path, dataset: TokenDataset, data_dir: Path) -> None:
    """A resumed run must read the data it was trained on (``data_manifest.json`` records it).

    Other data with a tokenizer of the same size trains on silently (the run's tokenizer.json
    would then no longer be the one its tokens came from), or fails in the loader with
    "num_sequences=... in the state"; say what is wrong instead.
    """
    path = run_dir / "data_manifest.json"
    if not path.is_file():
        return
    trained, now = read_json(path, CheckpointError), dataset.manifest

    def identity(manifest: dict) -> tuple:
        splits = manifest.get("splits") or {}
        return (manifest.get("tokenizer_sha256"),
                *((splits.get(s) or {}).get("sequences") for s in ("train", "val")))

    if identity(trained) != identity(now):
        # The run's own data may still sit in the cache beside this folder, under its own
        # fingerprint (another cramkit's data format, say, prepares the same options anew).
        cached = _cached_copy(trained, data_dir.parent)
        hint = (f"its data is still at {cached}: resume with data.dir={cached}"
                if cached is not None and cached.resolve() != data_dir.resolve()
                else "resume with that data, or start a new run")
        raise ConfigError(
            f"{data_dir} is not the data {run_dir} was trained on (its tokenizer or sequences differ "
            f"from {path.name}); {hint}"
        )


def _check_budget_left(cfg: RunConfig, usage: Usage, run_dir: Path) -> None:
    if exhausted(Budget.parse(cfg.train.budget), usage):
        raise CramkitError(
            f"{run_dir} already spent its budget of {cfg.train.budget} at step {usage.steps}; "
            f"continue with a larger one, e.g. cramkit pretrain --resume {run_dir} budget=..."
        )


def _summary(run_dir: Path, trainer: Trainer, first_loss, val_loss, n_params: int, peak: float,
             peak_seconds: float) -> dict[str, Any]:
    st = trainer.state
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("type") == "train"]
    if first_loss is None:  # a resumed run: its start was evaluated (and logged) by the first session
        first_loss = next((r.get("val_loss") for r in records if r.get("type") == "eval" and r.get("step") == 0), None)
    seconds = max(st.usage.seconds, 1e-9)
    return {
        "run_dir": str(run_dir),
        "stop_reason": trainer.stop_reason,
        "steps": st.step,
        "tokens": st.tokens,
        "train_seconds": in_ms(st.usage.seconds),  # as the log records it
        "paused_seconds": round(trainer.clock.paused_seconds, 3),
        "flops": st.usage.flops,
        "tokens_per_s": round(st.tokens / seconds, 1),
        "mfu": round(st.usage.flops / peak_seconds, 4) if peak_seconds > 0 else 0.0,
        "peak_flops": peak,
        "parameters": n_params,
        # The first logged step's loss (one step's, after log_every - 1 updates), not step 0's.
        "first_train_loss": train[0]["loss"] if train else None,
        "first_train_step": train[0]["step"] if train else None,
        "last_train_loss": train[-1]["loss"] if train else None,
        "initial_val_loss": first_loss,
        "final_val_loss": val_loss,
        "nonfinite_steps": st.nonfinite_total,
    }


def perplexity(loss: float | None) -> float | None:
    """``exp(loss)`` of a mean next-token loss in nats; None for no loss or a non-finite one,
    which JSON cannot hold (a loss beyond exp's range is a perplexity of inf, also None)."""
    if loss is None or not math.isfinite(loss) or loss > 700:
        return None
    return math.exp(loss)


#: Where a resume puts the summary of the segment before it (``report`` reads only summary.json).
SUMMARY_BEFORE_RESUME = ".summary-before-resume.json"


def _closing_totals(run_dir: Path, step: int) -> dict[str, Any] | None:
    """What the summary of the segment that ended at ``step`` counted after its final checkpoint
    was written: that checkpoint's write and the final evaluation are paused time (and energy)
    the checkpoint itself cannot hold. None when no summary is of that step (a resume from an
    earlier checkpoint than the last) or readable."""
    for name in ("summary.json", SUMMARY_BEFORE_RESUME):  # the second: a resume since died early
        try:
            summary = json.loads((run_dir / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(summary, dict) and summary.get("steps") == step:
            break
    else:
        return None
    out: dict[str, Any] = {}
    if isinstance(summary.get("paused_seconds"), (int, float)):
        out["paused_seconds"] = float(summary["paused_seconds"])
    if "energy_kwh" in summary:  # null: an earlier segment was not metered, and stays unknown
        out["energy_kwh"] = summary["energy_kwh"]
    return out or None


def _load_resumed_weights(model: torch.nn.Module, cfg: RunConfig, run_dir: Path, checkpoint: Path) -> None:
    """Load a checkpoint's weights; when the model's tensors differ from the checkpoint's, say which
    of the user's settings changed since the run was saved (torch names a tensor, which tells a
    user little about which override caused it)."""
    try:
        ckpt.load_weights(model, checkpoint)
    except ckpt.ShapeMismatch as exc:
        saved = read_json(run_dir / "config.json", CheckpointError)
        now = cfg.to_dict()
        changed = [(f"model.{k}", v, saved.get("model", {}).get(k))
                   for k, v in now["model"].items() if saved.get("model", {}).get(k) != v]
        if saved.get("techniques") != now["techniques"]:
            changed.append(("techniques", now["techniques"], saved.get("techniques")))
        was, new = saved.get("technique") or {}, now["technique"]
        changed += [(f"technique.{name}.{key}", new.get(name, {}).get(key), was.get(name, {}).get(key))
                    for name in sorted(set(was) | set(new))
                    for key in changed_keys(was.get(name, {}), new.get(name, {}))]
        advice = "resume without changing the model's shape, or start a new run"
        if changed:
            raise resume_refusal(changed, str(exc), advice, CheckpointError) from None
        raise CheckpointError(f"{exc}; the settings are those the run was saved with, so a technique builds "
                              f"another shape now: {advice}") from None


def resume_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    """The saved config of ``run_dir`` with ``overrides`` applied (e.g. a larger budget), read with
    the plugins the run recorded (:func:`cramkit.plugins.run_plugins`)."""
    with plugins.run_plugins(run_dir):
        return _resume_config(run_dir, overrides)


def _resume_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a cramkit run directory (no config.json)")
    saved = read_json(path, CheckpointError)
    try:  # the file alone first, so that a damaged or edited one is named as the culprit
        # Not strict: cramkit wrote it, and earlier versions kept technique options as given
        # (100.0 for a count), which a run must still resume with.
        trained = config_from_dict(saved, strict=False)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    merged = apply_run_overrides(saved, overrides)
    for key in ("name", "out_dir"):  # the run directory is where it is: a new name would mislabel it
        if str(merged.get(key)) != str(saved.get(key)):
            raise resume_refusal([(key, str(merged.get(key)), str(saved.get(key)))],
                                 f"{run_dir} is the run's directory",
                                 "copy the directory to continue it under another name")
    cfg = config_from_dict(merged, strict=False)  # overrides are text
    if cfg.seed != trained.seed:
        # The loader refused it later, as "loader state does not match: seed=0 in the state".
        raise resume_refusal([("seed", cfg.seed, trained.seed)],
                             "the data order and the masks of the rest of the run follow it",
                             "resume without seed=, or start a new run")
    for key in ARCHITECTURE_SETTINGS:
        was, now = getattr(trained.model, key), getattr(cfg.model, key)
        unread = (key == "rotary_base" and trained.model.positions != "rotary"
                  or key == "norm_eps" and trained.model.norm == "none")
        if was != now and not unread:
            raise resume_refusal([(f"model.{key}", now, was)], "the checkpoint's weights were trained for it",
                                 "resume without it, or start a new run")
    # Only those the optimizer reads: one it ignores (optim.momentum under AdamW) is in no saved
    # group, and the command line warns that the run ignores it, as in a new run.
    reads = settings_read(cfg.optim)
    for key in OPTIMIZER_STATE_SETTINGS:
        was, now = getattr(trained.optim, key), getattr(cfg.optim, key)
        if reads is not None and key not in reads:
            continue
        if was != now and trained.optim.name == cfg.optim.name and trained.optim.base == cfg.optim.base:
            # optimizer.load_state_dict() restores the saved groups' settings over the new ones,
            # so the run would train on with the old value while config.json records the new.
            raise resume_refusal([(f"optim.{key}", now, _shown(was))], "the optimizer's saved state keeps it",
                                 "resume without it, or start a new run (optim.lr, optim.muon_lr and "
                                 "optim.lr_scaling may change)")
    _check_relative_data_dir(run_dir, cfg, trained)
    _check_relative_sources(run_dir, cfg, trained)
    # Against the resolved config: a technique's option added since is as unset as a field.
    unset = _unset_keys(merged, cfg.resolved())
    # A technique this resume switches on was never in config.json: its defaults are chosen now,
    # as in a new run, not missing from an older file.
    added = set(cfg.techniques) - set(saved.get("techniques") or [])
    unset = [(key, value) for key, value in unset
             if not any(key.startswith(f"technique.{name}.") for name in added)]
    if unset and int(os.environ.get("RANK", "0")) == 0:
        shown = ", ".join(f"{key}={json.dumps(value)}" for key, value in unset)
        warnings.warn(f"{path} does not set {shown} (an earlier cramkit wrote it): the run continues with "
                      "this version's defaults, which that one may not have had; give key=value to choose",
                      stacklevel=2)
    # Not written back here: pretrain() records it once the resume has loaded successfully.
    return cfg


def _check_relative_data_dir(run_dir: Path, cfg: RunConfig, trained: RunConfig) -> None:
    """A relative ``data.dir`` in config.json is relative to the folder the run was started from.
    Resumed from another folder it was reported only as "not a prepared dataset (no
    manifest.json; run cramkit prepare)", which sent the user to prepare data the run already has."""
    data_dir = Path(cfg.data.dir) if cfg.data.dir else None
    if data_dir is None or data_dir.is_absolute() or cfg.data.dir != trained.data.dir or data_dir.exists():
        return
    hint = "resume from the folder the run was started in, or give data.dir=PATH"
    # runs/NAME under the starting folder (out_dir/name): the data is probably beside it.
    tail = Path(trained.out_dir or ".") / trained.name if trained.name else None
    run = Path(os.path.abspath(run_dir))
    if tail is not None and not tail.is_absolute() and run.parts[-len(tail.parts):] == tail.parts:
        candidate = Path(*run.parts[:-len(tail.parts)]) / data_dir
        if candidate.is_dir():
            hint = f"resume from {candidate.parents[len(data_dir.parts) - 1]}, or give data.dir={candidate}"
    raise _relative_to_start(run_dir, f"data.dir={cfg.data.dir}", cfg.data.dir, hint)


def _relative_to_start(run_dir: Path, setting: str, path: str, hint: str) -> DataError:
    """The error for a relative ``path`` of config.json's ``setting`` that a resume from another
    folder than the run's first does not find."""
    return DataError(f"{run_dir}/config.json has {setting}, a path relative to the folder the run "
                     f"was started in, and there is no {path} in {Path.cwd()}: {hint}")


def _cached_copy(manifest: dict, root: Path) -> Path | None:
    """The folder under the cache ``root`` that holds the data ``manifest`` (a run's
    data_manifest.json) records, if it is there: it sits under the fingerprint it was prepared with."""
    fp, objective = str(manifest.get("fingerprint", "")), (manifest.get("config") or {}).get("objective")
    cached = cache_folder(root, str(objective), fp) if fp and objective else None
    return cached if cached is not None and cached.is_dir() else None


def _check_relative_sources(run_dir: Path, cfg: RunConfig, trained: RunConfig) -> None:
    """The relative files of ``data.prepare`` (a recipe's ``sources = ["corpus.txt"]``, its
    ``tokenizer_file``) are, as a relative ``data.dir`` is, relative to the folder the run was
    started from, where a resume prepares (or finds in the cache) the same data again. Resumed
    from another folder it failed with "source 'corpus.txt': no such file or folder", naming
    neither the run's config.json nor the data the run was trained on."""
    from ..data.sources import source_reader

    p, was = cfg.data.prepare, trained.data.prepare
    if cfg.data.dir:
        return
    paths = [("data.prepare.sources", spec) for spec in p.sources if spec in was.sources and source_reader(spec) is None]
    if p.tokenizer_file and p.tokenizer_file == was.tokenizer_file:
        paths.append(("data.prepare.tokenizer_file", p.tokenizer_file))
    missing = [(key, spec) for key, spec in paths
               if not Path(spec).expanduser().is_absolute() and not Path(spec).expanduser().exists()]
    if not missing:
        return
    key, spec = missing[0]
    hint = "resume from the folder the run was started in"
    manifest = run_dir / "data_manifest.json"
    cached = _cached_copy(read_json(manifest, CheckpointError), cache_root(trained)) if manifest.is_file() else None
    if cached is not None:
        hint += f", or give data.dir={cached} (the data it was trained on)"
    raise _relative_to_start(run_dir, f"{key} entry '{spec}'", spec, hint)


#: Model settings that change what the weights compute but not their shapes, so that loading the
#: checkpoint cannot catch a change (as it catches model.hidden): 4 heads' weights loaded as 8 heads,
#: and config.json then told export and fine-tuning of an architecture that was never trained.
ARCHITECTURE_SETTINGS = ("arch", "heads", "norm_position", "norm", "norm_eps", "activation", "positions",
                         "rotary_base", "embedding_scale")


#: Optimizer settings held in its parameter groups, which a checkpoint's state brings back.
OPTIMIZER_STATE_SETTINGS = ("betas", "eps", "momentum", "nesterov", "weight_decay", "decay_embeddings",
                            "sam_rho", "sam_adaptive", "muon_momentum", "lars_trust")


def _shown(value: Any) -> Any:
    # None is a setting left to the optimizer (betas=None: its own pair), which "null" hides.
    return "optimizer's default" if value is None else value


def _unset_keys(given: dict[str, Any], full: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """The settings of ``full`` (dotted, with their values) that ``given`` does not name: fields
    added since an older cramkit wrote a run's config.json, which a resume fills with defaults."""
    out = []
    for key, value in full.items():
        if isinstance(value, dict) and isinstance(given.get(key, {}), dict):  # a section: its fields
            out += _unset_keys(given.get(key, {}), value, f"{prefix}{key}.")
        elif key not in given:
            out.append((prefix + key, value))
    return out
