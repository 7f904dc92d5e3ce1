"""The run configuration: recipes, ``key=value`` overrides and validation.

A recipe is a TOML file shipped in ``cramkit/recipes`` (or any path). It may name a ``base``
recipe to extend, and its ``[model]`` table may name a ``preset`` whose fields it then overrides.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from .budget import Budget
from .configbase import (
    Config,
    apply_overrides,
    check_seed,
    check_types,
    coerce,
    deep_merge,
    did_you_mean,
    field,
)
from .data.config import PrepareConfig
from .distributed.config import MemoryConfig, ParallelConfig
from .errors import ConfigError, UnknownKey, UnknownName, resume_refusal
from .models.config import ModelConfig
from .models.presets import get_preset
from .plugins import unknown_hint
from .schedules import LR_SCHEDULES
from .utils import read_text


@dataclasses.dataclass
class DataSection(Config):
    """Where the training tokens come from."""

    dir: str = field("", help="a prepared data directory (from `cramkit prepare`); empty: prepare from `prepare`")
    prepare: PrepareConfig = field(default_factory=PrepareConfig, help="how to prepare data when `dir` is empty")
    cache_dir: str = field("", help="where prepared data is cached (default: $CRAMKIT_CACHE/data or ~/.cache/cramkit/data)")
    shuffle: Literal["auto", "on", "off"] = field(
        "auto",
        help="permute training sequences every epoch; auto: on unless the data was prepared with "
        "ordering=curriculum or ordering=source, whose order training then keeps (a resumed run "
        "keeps the order it was checkpointed with)",
    )

    def shuffles(self, manifest: dict, checkpointed: bool | None = None) -> bool:
        """Whether the training loader permutes sequences, for data prepared as ``manifest`` says.

        ``checkpointed``: what a resumed run's loader was saved with (None for a new run, or a
        checkpoint that does not say). ``auto`` keeps it; an explicit ``on``/``off`` that differs
        is an error, since the data position counts in the saved order.
        """
        if self.shuffle == "auto":
            if checkpointed is not None:
                return checkpointed
            return manifest.get("config", {}).get("ordering", "random") == "random"
        wanted = self.shuffle == "on"
        if checkpointed is not None and checkpointed != wanted:
            raise resume_refusal([("data.shuffle", self.shuffle, "on" if checkpointed else "off")],
                                 "its data position counts in that order",
                                 "resume with data.shuffle=auto (which keeps it)")
        return wanted


@dataclasses.dataclass
class ObjectiveConfig(Config):
    """The pretraining objective applied to each batch of packed tokens."""

    name: Literal["auto", "mlm", "clm"] = field("auto", help="auto: the architecture's (mlm for bert, clm for gpt); the data must be prepared for it, and a name given must be it")
    mask_rate: float = field(0.15, help="MLM: fraction of tokens selected for prediction")
    mask_fraction: float = field(0.8, help="MLM: selected tokens replaced by [MASK]")
    random_fraction: float = field(0.1, help="MLM: selected tokens replaced by a random token")
    eval_mask_rate: float = field(
        0.15, help="MLM: masking rate of the fixed validation masks, shared by every recipe so that "
        "validation losses of runs with different training mask rates compare")

    def validate(self) -> None:
        for name in ("mask_rate", "eval_mask_rate"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"objective.{name} must be in (0, 1), got {getattr(self, name)}")
        if self.mask_fraction < 0 or self.random_fraction < 0 or self.mask_fraction + self.random_fraction > 1:
            raise ConfigError("objective.mask_fraction + random_fraction must be within [0, 1]")


@dataclasses.dataclass
class TrainConfig(Config):
    """The training loop: budget, batch, precision, logging, evaluation, checkpoints."""

    budget: str = field("10min", help="90s | 10min | 2h | 500steps | 20Mtok | 1e15flops")
    batch_size: int = field(256, help="global batch in sequences at the end of the batch ramp")
    micro_batch: int = field(0, help="sequences per forward/backward; 0 = auto (largest that fits on GPU; 32 on CPU)")
    batch_ramp: float = field(0.0, help="fraction of the budget over which the batch grows linearly to batch_size")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field("auto", help="auto: bf16 on GPUs that support it, else fp32")
    compile: bool = field(False, help="torch.compile the model (falls back to eager with a warning)")
    fp8: bool = field(False, help="FP8 linears via torchao where matrices are large enough to gain (GPU only)")
    clip_grad: float = field(0.0, help="max gradient norm; 0 disables clipping")
    device: str = field("auto", help="auto | cpu | cuda | cuda:N")
    log_every: int = field(10, help="optimizer steps between metric lines")
    eval_every: float = field(0.25, help="validation every this fraction of the budget (0 = only at the end); a new run also evaluates at step 0")
    eval_batches: int = field(20, help="validation micro-batches per evaluation, of the run's first micro-batch (0 = the whole split)")
    checkpoint_every: float = field(0.0, help="checkpoint every this fraction of the budget (0 = only at the end)")
    keep_checkpoints: int = field(2, help="complete checkpoints kept on disk")
    max_nonfinite: int = field(5, help="stop after this many non-finite losses in a row (each is skipped)")
    peak_tflops: float = field(0.0, help="one device's peak for MFU in TFLOP/s (MFU divides by it times the number of ranks); 0 = measured at start-up (bf16 matmul on CUDA, fp16 under fp16, fp32 on CPU)")
    progress_bar: bool = field(True, help="show a live progress bar (only on a terminal)")
    tensorboard: bool = field(True, help="write TensorBoard events when tensorboard is installed")
    plots: bool = field(True, help="at the end, plot the run's losses into RUN/plots/loss-vs-{time,tokens,flops}.png "
                        "when matplotlib is installed (the [plot] or [dev] extra)")

    def validate(self) -> None:
        Budget.parse(self.budget)
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.micro_batch < 0:
            raise ConfigError(f"train.micro_batch must be >= 0, got {self.micro_batch}")
        if not 0.0 <= self.batch_ramp <= 1.0:
            raise ConfigError(f"train.batch_ramp must be in [0, 1], got {self.batch_ramp}")
        for name in ("eval_every", "checkpoint_every"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"train.{name} must be a fraction of the budget in [0, 1]")
        if self.keep_checkpoints < 1:
            raise ConfigError("train.keep_checkpoints must be >= 1")
        if self.log_every < 1:
            raise ConfigError("train.log_every must be >= 1")
        # 0 or less made every read of the counts a failure: a run with only finite losses
        # stopped with "not finite for 0 steps in a row" (on GPUs, at its first log line).
        if self.max_nonfinite < 1:
            raise ConfigError(f"train.max_nonfinite must be >= 1 (non-finite steps in a row that stop the run), "
                              f"got {self.max_nonfinite}")
        if self.clip_grad < 0:  # the trainer clips only above 0: a negative one was silently no clipping
            raise ConfigError(f"train.clip_grad must be >= 0 (0 = no clipping), got {self.clip_grad}")
        if self.eval_batches < 0:
            raise ConfigError("train.eval_batches must be >= 0 (0 = the whole validation split)")
        if self.peak_tflops < 0:
            raise ConfigError(f"train.peak_tflops must be >= 0 (0 = measure it), got {self.peak_tflops}")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got '{self.device}'")


@dataclasses.dataclass
class OptimConfig(Config):
    """Optimizer and its parameter groups."""

    name: str = field("adamw", help="adamw | adamw8bit | lamb | lars | lion | muon | sam | schedulefree | sgd, "
                      "or a plugin's")
    lr: float = field(1e-3, help="peak learning rate")
    betas: tuple[float, float] | None = field(
        None, help="Adam/Lion betas; none: the optimizer's own, (0.9, 0.98) for the Adam-type rules, "
        "(0.9, 0.99) for lion"
    )
    eps: float = field(1e-12, help="Adam epsilon")
    momentum: float = field(0.9, help="SGD momentum (sgd, lars)")
    nesterov: bool | None = field(
        None, help="Nesterov momentum; none: the optimizer's own, on for sgd and muon, heavy-ball for lars"
    )
    weight_decay: float = field(0.01, help="weight decay, never on norms and biases: decoupled for adamw, lion, muon, schedulefree "
                                "and adamw8bit; L2 in the gradient for sgd and lars; inside lamb's trust ratio")
    decay_embeddings: bool = field(True, help="apply weight decay to the embedding matrices and the output projection (an untied decoder)")
    base: str = field("adamw", help="sam: the optimizer SAM wraps (any registered name but sam)")
    sam_rho: float = field(0.05, help="sam: radius of the ascent step")
    sam_every: int = field(1, help="sam: sharpness-aware step every k steps, plain base steps between")
    sam_adaptive: bool = field(False, help="sam: adaptive SAM (ASAM), ascent scaled by w^2 (no eta offset: zeros stay unperturbed; needs a larger sam_rho)")
    muon_lr: float = field(0.02, help="muon: peak learning rate of the hidden matrices (AdamW groups use lr)")
    muon_momentum: float = field(0.95, help="muon: momentum of the orthogonalised update")
    lars_trust: float = field(0.001, help="lars: trust coefficient eta of the layer-wise ratio")
    lr_scaling: Literal["none", "linear", "sqrt"] = field(
        "none", help="scale lr (and muon_lr) by batch_size/base_batch_size (linear) or its sqrt"
    )
    base_batch_size: int = field(256, help="the batch size at which lr was tuned (for lr_scaling)")
    fused: Literal["auto", "on", "off"] = field(
        "auto", help="adamw: the fused kernel (auto: on CUDA); it also skips a non-finite step on the device"
    )

    def validate(self) -> None:
        from .optim import get_factory

        for key in ("name", "base"):  # the message names the field: base is misspelt as often
            try:
                get_factory(getattr(self, key))
            except ConfigError as exc:
                raise type(exc)(f"{key}: {exc}") from None
        if self.name == "sam" and self.base == "sam":
            raise ConfigError("optim.base=sam: SAM cannot wrap itself; choose e.g. optim.base=adamw")
        if self.betas is not None and not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must lie in [0, 1), got {list(self.betas)}")
        if self.lr <= 0 or self.muon_lr <= 0:
            raise ConfigError(f"optim.lr and optim.muon_lr must be positive, got {self.lr}, {self.muon_lr}")
        if self.weight_decay < 0:
            raise ConfigError("optim.weight_decay must be >= 0")
        # Checked here, not left to the optimizers: torch's SGD raised a bare ValueError for a
        # negative momentum after the run directory and data were ready, and a momentum of 1 or
        # more (SGD, LARS, Muon's groups, which no library checks) trained on and diverged.
        for key in ("momentum", "muon_momentum"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"optim.{key} must lie in [0, 1), got {getattr(self, key)}")
        if self.eps < 0:
            raise ConfigError(f"optim.eps must be >= 0, got {self.eps}")
        if self.sam_rho < 0 or self.sam_every < 1:
            raise ConfigError("optim.sam_rho must be >= 0 and optim.sam_every >= 1")
        if self.lars_trust <= 0:
            raise ConfigError(f"optim.lars_trust must be positive, got {self.lars_trust}")
        if self.base_batch_size < 1:
            raise ConfigError(f"optim.base_batch_size must be >= 1, got {self.base_batch_size}")
        if self.fused != "auto" and self.rule != "adamw":  # the fused kernel
            raise ConfigError(f"optim.fused={self.fused} applies to AdamW only (optim.name=adamw, or sam with "
                              f"optim.base=adamw), not optim.name={self.name}; leave it at auto")

    @property
    def rule(self) -> str:
        """The optimizer whose update rule moves the weights: ``base`` under SAM, which wraps it."""
        return self.base if self.name == "sam" else self.name


@dataclasses.dataclass
class ScheduleConfig(Config):
    """Learning-rate schedule, a pure function of budget progress."""

    name: str = field("budget-triangle", help="constant | linear | cosine | one-cycle | budget-triangle")
    warmup: float = field(0.0, help="warm-up fraction of the budget (linear, cosine, constant)")
    # None leaves each schedule its own default: one fixed number here would make one-cycle
    # (0.3, 0.04) and budget-triangle (0.75, 0.25) the same schedule.
    peak_at: float | None = field(
        None, help="where the peak is (one-cycle, budget-triangle); unset = the schedule's own: one-cycle 0.3, budget-triangle 0.75"
    )
    start: float | None = field(
        None, help="starting multiplier of the peak (one-cycle, budget-triangle); unset = one-cycle 0.04, budget-triangle 0.25"
    )
    final: float = field(0.0, help="final multiplier of the peak, in [0, 1]")

    def validate(self) -> None:
        if self.name not in LR_SCHEDULES:  # UnknownName: a plugin's, perhaps, which export needs not
            raise UnknownName(f"schedule.name: unknown schedule '{self.name}'{unknown_hint(self.name, LR_SCHEDULES)}; "
                              f"known: {', '.join(sorted(LR_SCHEDULES))}")
        if not 0.0 <= self.warmup < 1.0 or not (self.peak_at is None or 0.0 < self.peak_at <= 1.0):
            raise ConfigError("schedule.warmup must be in [0, 1) and schedule.peak_at in (0, 1]")
        # A negative multiplier is a negative learning rate: the optimizer then climbs the loss.
        for key in ("start", "final"):
            value = getattr(self, key)
            # optim.lr is the peak: a multiplier above 1 would make it not the peak, and
            # final=100 (a typo for 0.01, say) trained towards NaN without a word.
            if value is not None and not 0 <= value <= 1:
                raise ConfigError(f"schedule.{key} is a multiplier of the peak learning rate and must be in "
                                  f"[0, 1], got {value} (to train at a higher rate, raise optim.lr)")

    def options(self) -> dict[str, float]:
        """Keyword arguments for the schedule function; unset fields keep its defaults."""
        given = {"warmup": self.warmup, "peak_at": self.peak_at, "start": self.start, "final": self.final}
        return {k: v for k, v in given.items() if v is not None}

    def resolved(self) -> dict[str, Any]:
        """``to_dict()`` with each unset field replaced by the schedule's own default, as
        ``config.json`` keeps it: a later change of that default cannot move a resumed run."""
        import inspect

        params = inspect.signature(LR_SCHEDULES[self.name]).parameters
        data = self.to_dict()
        for key, value in data.items():
            if value is None and key in params and params[key].default is not inspect.Parameter.empty:
                data[key] = params[key].default
        return data


@dataclasses.dataclass
class RunConfig(Config):
    """Everything that defines a pretraining run."""

    recipe: str = field("", help="the recipe this run came from")
    description: str = field("", help="one line saying what the recipe is for")
    name: str = field("", help="run name (default: recipe name and a timestamp)")
    out_dir: str = field("runs", help="parent folder of run directories")
    seed: int = field(0, help="seed for initialisation, data order and masking")
    model: ModelConfig = field(default_factory=ModelConfig, help="architecture")
    data: DataSection = field(default_factory=DataSection, help="training data")
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig, help="pretraining objective")
    train: TrainConfig = field(default_factory=TrainConfig, help="training loop")
    optim: OptimConfig = field(default_factory=OptimConfig, help="optimizer")
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, help="learning-rate schedule")
    parallel: ParallelConfig = field(default_factory=ParallelConfig, help="multi-process training under torchrun")
    memory: MemoryConfig = field(default_factory=MemoryConfig, help="activation checkpointing and offloading")
    techniques: list[str] = field(default_factory=list, help="techniques to enable, e.g. [pld,vcycle]")
    technique: dict[str, Any] = field(default_factory=dict, help="per-technique options: technique.NAME.KEY=VALUE")
    finetune_demo: bool = field(False, help="after pretraining, fine-tune on the embedded BBC task (pretrained vs random)")

    def validate(self) -> None:
        from .techniques import validate_technique_options

        check_seed("seed", self.seed)
        validate_technique_options(self.techniques, self.technique)
        # Before a run folder is made or data prepared (these were found only as training began).
        if self.memory.offload_optimizer and self.parallel.strategy != "fsdp":
            raise ConfigError("memory.offload_optimizer needs parallel.strategy=fsdp (FSDP2's CPU offload; "
                              "under torchrun, one process is fine: torchrun --nproc-per-node 1 ...)")
        if self.parallel.strategy == "fsdp":
            from .optim import shard_refusal

            refusal = shard_refusal(self.optim)
            if refusal:
                raise ConfigError(refusal)
        if self.optim.name == "sam" and self.train.precision == "fp16":
            # The trainer refuses it too (for a plugin's closure optimizer), but only at the first
            # step: after the data, the model and the initial evaluation.
            raise ConfigError("optim.name=sam recomputes gradients inside its step, which fp16 loss "
                              "scaling cannot follow; use train.precision=bf16 or fp32")
        mem = self.memory
        if mem.activation_checkpointing == "selective" and mem.checkpoint_every > self.model.layers:
            raise ConfigError(f"memory.checkpoint_every={mem.checkpoint_every} checkpoints no block of a "
                              f"{self.model.layers}-layer model (selective checkpointing recomputes every k-th "
                              "block); choose at most model.layers, or activation_checkpointing=full")

    def resolved(self) -> dict[str, Any]:
        """This config as a run's ``config.json`` records it (and ``cramkit show-config`` prints
        it): ``to_dict()`` with every enabled technique's options written out, defaults included,
        and so the schedule's. A later cramkit with other defaults then resumes the run as it was
        configured (a technique's defaults once moved a resumed stacking run's doublings)."""
        from .techniques import build_techniques

        data = self.to_dict()
        data["schedule"] = self.schedule.resolved()
        built = build_techniques(self.techniques, self.technique)
        data["technique"] = {**data.get("technique", {}), **{t.name: t.options.to_dict() for t in built}}
        return data


# ---------------------------------------------------------------- recipes


def recipe_names() -> list[str]:
    """Names of the recipes shipped with the package."""
    folder = resources.files("cramkit") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


class _NoRecipe(ConfigError):
    """A recipe name or file that does not exist; a recipe whose ``base`` it is adds its own name."""


def _is_file_spec(name_or_path: str) -> bool:
    """Whether a recipe (or base) names a file rather than a shipped recipe.

    A shipped name is always the shipped recipe: a file of that name in the working directory
    (a script called ``demo``) was read as TOML by the README's ``cramkit pretrain demo``;
    ``./demo`` names the file. Anything with a folder in it is a path, even one that is missing.
    """
    if name_or_path in recipe_names():
        return False
    return (name_or_path.endswith(".toml") or Path(name_or_path).expanduser().exists()
            or any(sep in name_or_path for sep in "/\\"))


def _read_recipe(name_or_path: str, seen: tuple[tuple[Path, str], ...] = (),
                 origins: dict[str, str] | None = None) -> dict[str, Any]:
    """A recipe's table with its bases merged in. ``seen``: the chain of recipes whose bases led
    here, each as (its resolved file, the name or path it was given as). ``origins``, when given,
    maps each dotted key to the recipe that set it last (the file an error about it should name)."""
    path = Path(name_or_path).expanduser()  # `~` as the shell would expand it, for a base too
    from_file = _is_file_spec(name_or_path)
    if from_file:
        if path.is_dir():
            raise _NoRecipe(f"recipe file '{name_or_path}' is a folder, not a TOML file")
        if not path.is_file():
            shipped_name = name_or_path.removesuffix(".toml")
            hint = (f" (the shipped recipe is named without .toml: '{shipped_name}')"
                    if shipped_name in recipe_names() else "")
            raise _NoRecipe(f"recipe file '{name_or_path}' does not exist{hint}")
        name, where = path.stem, path.resolve()
    else:
        names = recipe_names()
        if name_or_path not in names:
            raise _NoRecipe(
                f"unknown recipe '{name_or_path}'{did_you_mean(name_or_path, names)}; "
                f"available: {', '.join(names)}"
            )
        shipped = resources.files("cramkit") / "recipes" / f"{name_or_path}.toml"
        name, where = name_or_path, Path(str(shipped)).resolve()
    # Files, not names: a user's demo.toml that bases on the shipped demo is two recipes, and
    # one file reached under two spellings (a name and its path, a symlink) is still one.
    chain = seen + ((where, name_or_path),)
    if where in {earlier for earlier, _ in seen}:
        raise ConfigError(f"recipe '{name_or_path}' extends itself: {' -> '.join(shown for _, shown in chain)}")
    text = read_text(path, ConfigError) if from_file else shipped.read_text()
    try:
        # Windows editors (Notepad) start a UTF-8 file with a byte-order mark, which tomllib
        # refuses as "Invalid statement (at line 1, column 1)": it is no part of the text.
        data = tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe '{name_or_path}' is not valid TOML: {exc}") from None
    base = data.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"recipe '{name_or_path}': base must be a recipe name or path, got {base!r}")
    try:  # each file on its own, so that the error names the file that holds the value
        _check_types(data)
    except ConfigError as exc:
        raise ConfigError(f"recipe '{name_or_path}': {exc}") from None
    looked = ""
    if base and from_file and base not in recipe_names() and not Path(base).expanduser().is_absolute():
        # A relative base path in a recipe file means a file beside it (as includes do), so the
        # recipe works from any working directory; a shipped name or a cwd path still works.
        # Beside it first whatever its form: `base = "common"` names a file `common` there,
        # which _is_file_spec cannot tell from a name while it is looked for in the cwd.
        beside = path.parent / base
        if beside.is_file():
            base = str(beside)
        elif _is_file_spec(base) and not Path(base).expanduser().exists():
            looked = f" (neither beside it, in {path.resolve().parent}, nor in the working directory, {Path.cwd()})"
    own = dict.fromkeys(_dotted_keys(data), name_or_path)
    # A recipe file's own `recipe` (copied from show-config, say) is its label, as `recipe=` on
    # the command line is; it was replaced by the file's name without a word. A base's never
    # labels the recipe that extends it.
    label = data.get("recipe") or name
    if base:
        try:
            inherited = _read_recipe(base, chain, origins)
        except _NoRecipe as exc:  # the file whose base it is: in a chain, the user cannot guess it
            raise ConfigError(f"recipe '{name_or_path}': base: {exc}{looked}") from None
        data = deep_merge(_options_kept(inherited, data), data)
    if origins is not None:  # after the bases' keys: this file's values are the ones used
        origins.update(own)
    data["recipe"] = label
    return data


def _dotted_keys(table: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in table.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += _dotted_keys(value, f"{prefix}{key}.")
    return keys


def _options_kept(inherited: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """``inherited`` without its option tables for the techniques that ``layer``, about to be
    merged over it, leaves out of a ``techniques`` list of its own.

    A recipe or command line that drops a technique from its base's list switches it off; the
    base's options for it would otherwise be refused as options of a technique that is not
    enabled. Options given in ``layer`` itself are kept, so that one for a misspelt or forgotten
    technique there is still an error.
    """
    techniques, tables = layer.get("techniques"), inherited.get("technique")
    if "techniques" not in layer or not isinstance(tables, dict):
        return inherited
    try:
        enabled = coerce(techniques, list[str], "techniques")
    except ConfigError:  # reported, with its path, when the merged config is validated
        return inherited
    return {**inherited, "technique": {name: t for name, t in tables.items() if name in enabled}}


def apply_run_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A run config's dict (a recipe's, or a saved config.json's) with command-line ``key=value``
    overrides applied; a ``techniques=`` among them drops the option tables of the techniques it
    leaves out, as a recipe's own list does to its base's."""
    return apply_overrides(_options_kept(data, apply_overrides({}, overrides)), overrides)


def _check_types(data: dict[str, Any]) -> None:
    """Raise ConfigError for a value of ``data`` (a run config's table, whole or one recipe
    file's part) that is not of its field's type, technique options included."""
    from .techniques import TECHNIQUES

    check_types(RunConfig, data)
    model = data.get("model")
    if isinstance(model, dict) and model.get("preset") not in (None, ""):  # "": no preset
        # Not a ModelConfig field, so check_types passes over it; a recipe file's preset is
        # resolved with the merged config, where its error could no longer name the file.
        get_preset(_preset_name(model["preset"]))
    tables = data.get("technique")
    for name, table in tables.items() if isinstance(tables, dict) else ():
        if name in TECHNIQUES and isinstance(table, dict):  # other names: refused by validation
            check_types(TECHNIQUES[name].Options, table, f"technique.{name}")


def _preset_name(preset: Any) -> str:
    if not isinstance(preset, str):
        raise ConfigError(f"model.preset must be a preset name, got {preset!r}")
    return preset


def _resolve_model(section: dict[str, Any]) -> dict[str, Any]:
    section = dict(section)
    preset = section.pop("preset", None)
    return {**get_preset(_preset_name(preset)), **section} if preset not in (None, "") else section


def load_config(recipe: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a recipe (shipped name or TOML path), apply ``key=value`` overrides (a list of
    strings, e.g. ``["train.budget=20steps"]``), validate."""
    if isinstance(overrides, str):  # read letter by letter: "override 't' is not of the form key=value"
        raise TypeError(f"overrides: give a list of 'key=value' strings, e.g. [{overrides!r}], not a string")
    origins: dict[str, str] = {}
    data = apply_run_overrides(_read_recipe(recipe, origins=origins), overrides)
    # Not strict: each recipe file was checked as it was read, and the overrides' values come
    # as text ("0.5", "yes", "a,b").
    try:
        cfg = config_from_dict(data, strict=False)
        check_run_name(cfg.name)  # before data preparation can take minutes
    except UnknownKey as exc:  # a key from a recipe file: name the file, as a wrong type does
        overridden = any(o.partition("=")[0].strip() == exc.key for o in overrides)
        if exc.key not in origins or overridden:
            raise
        raise UnknownKey(f"recipe '{origins[exc.key]}': {exc}", exc.key) from None
    except ConfigError as exc:  # a value out of range or an unknown name: likewise
        holder = _file_that_set(str(exc), origins, overrides)
        if holder is None:
            raise
        raise type(exc)(f"recipe '{holder}': {exc}") from None
    if not cfg.name and cfg.recipe:  # the run is then named after it (a file's `recipe`, `recipe=`)
        try:
            check_run_name(cfg.recipe)
        except ConfigError:
            raise ConfigError(f"recipe={cfg.recipe!r}: a run without name= is named after its recipe, which must "
                              "then be one folder name (no '/' or '\\', not '.' or '..'); set name=") from None
    return cfg


#: A dotted option path in an error message (``train.batch_size``, ``technique.pld.theta_bar``).
_OPTION_PATH = re.compile(r"\b[a-z_]+(?:\.[a-z_0-9]+)+\b")


def _file_that_set(message: str, origins: dict[str, str], overrides: list[str] | tuple[str, ...]) -> str | None:
    """The user's recipe file that set the option a validation error names first, or None when
    that option came from the command line, a shipped recipe or a default.

    Validation sees the merged config only; in a chain of bases the user had to hunt for the
    file that held ``batch_size = 0``. An override of any option the message names keeps the
    error the command line's, as it was.
    """
    given = {o.partition("=")[0].strip() for o in overrides}
    # A top-level option has no dot: only as the message's first word ("seed must be ...").
    first = re.match(r"[a-z_]+(?![.\w])", message)
    named = ([first.group()] if first else []) + _OPTION_PATH.findall(message)
    # All of them before any file: in "optim.lr and optim.muon_lr must be positive" the override
    # of the second is the cause, though the first is the one a file set.
    if given.intersection(named):
        return None
    for option in named:
        if option in origins:
            return origins[option] if _is_file_spec(origins[option]) else None
    return None


def check_run_name(name: str) -> None:
    """A new run's name must be one folder inside out_dir: one with a path in it ('../x', 'a/b',
    '/tmp/x') would put the run elsewhere than out_dir says. Not part of RunConfig.validate, so
    that runs an older cramkit named so still resume, fine-tune and export."""
    if name in (".", "..") or any(sep in name for sep in "/\\"):
        raise ConfigError(f"name={name!r}: a run name is one folder name inside out_dir (no '/' or "
                          "'\\', not '.' or '..'); set out_dir= to put runs elsewhere")


def config_from_dict(data: dict[str, Any], *, strict: bool = True) -> RunConfig:
    """Build a RunConfig from a (recipe or saved) dict, resolving a model preset.

    Each value must be of its field's type, as a recipe file's must: ``"0.5"`` is no number
    there and ``32.0`` no integer. ``strict=False`` reads text as ``key=value`` overrides give
    it, for a dict with overrides applied, and for a run's config.json (cramkit's own file,
    whose earlier versions kept technique options as given).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"a run config must be a table of options, got {type(data).__name__}")
    if strict:
        _check_types(data)
    data = dict(data)
    if "model" in data:
        if not isinstance(data["model"], dict):
            raise ConfigError("model must be a table of model options")
        data["model"] = _resolve_model(data["model"])
    return RunConfig.from_dict(data)
