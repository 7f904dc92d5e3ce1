"""Fine-tuning a pretrained (or randomly initialised) cramkit model on a downstream task.

Defaults are cramming's "GLUE-sane" recipe (docs/references.md): 5 epochs, batch 16, AdamW lr 4e-5,
betas (0.9, 0.98), eps 1e-6, no weight decay, cosine decay after 10 % warmup, sequence length
128, dropout 0.1 during fine-tuning, several seeds with the per-metric median reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..configbase import Config, check_seed, did_you_mean, field
from ..errors import CheckpointError, ConfigError, CramkitError, TrainingError
from ..optim import parameter_groups
from ..train.device import autocast, resolve_device, resolve_precision
from ..utils import atomic_dir, beyond_host_memory, changed_keys
from .adapters import (
    PEFT_METHODS,
    PeftOptions,
    apply_peft,
    parameter_counts,
    scaling_parameters,
)
from .encoding import Encoded, SpecialIds, TaskEncoder
from .heads import POOLERS, SequenceClassifier, resolve_pooling
from .metrics import compute_metrics, median_metrics, task_score, to_percent
from .tasks import TaskData, TaskSpec, subsample


@dataclasses.dataclass
class FinetuneConfig(Config):
    """Downstream fine-tuning options (cramming's GLUE-sane defaults)."""

    epochs: float = field(5.0, help="passes over the training set (fractions allowed)")
    batch_size: int = field(16, help="training sequences per optimizer step")
    eval_batch_size: int = field(64, help="sequences per evaluation forward pass")
    lr: float = field(4e-5, help="peak AdamW learning rate")
    betas: tuple[float, float] = field((0.9, 0.98), help="AdamW betas")
    eps: float = field(1e-6, help="AdamW epsilon")
    weight_decay: float = field(
        0.0, help="AdamW weight decay, never on norms, biases and IA3's scaling vectors"
    )
    schedule: Literal["cosine", "linear", "constant"] = field(
        "cosine", help="learning-rate decay after warmup"
    )
    warmup: float = field(0.1, help="fraction of the steps spent warming the LR up from 0")
    grad_clip: float = field(0.0, help="clip the gradient norm to this value (0 = no clipping)")
    seq_len: int = field(128, help="longest tokenised input; pairs are trimmed longest-first")
    dropout: float = field(0.1, help="dropout of the encoder's residual branches and the head")
    attention_dropout: float = field(0.1, help="dropout on attention probabilities")
    pooling: Literal["auto", "cls", "mean", "last"] = field(
        "auto", help="sequence summary: 'auto' = cls for BERT-style, last token for GPT-style"
    )
    head_width: int = field(
        0,
        help="width of the head's dense + tanh layer; 0 = the model's hidden size (BERT's "
        "pooler), 1024 = cramming's crammed-BERT head",
    )
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2, 3, 4],
        help="one fine-tuning run per seed; reports the per-metric median",
    )
    max_train_examples: int | None = field(
        None, help="train on a seeded random subset of at most this many examples"
    )
    max_eval_examples: int | None = field(
        None, help="evaluate on a seeded random subset of at most this many examples"
    )
    precision: Literal["auto", "fp32", "bf16"] = field(
        "auto", help="'auto' = bf16 autocast on CUDA, fp32 elsewhere"
    )
    device: str = field("auto", help="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1' ...")
    peft: Literal["none", "lora", "loha", "ia3"] = field(
        "none", help="parameter-efficient method through HF peft; 'none' trains every weight"
    )
    peft_rank: int = field(8, help="LoRA / LoHa rank")
    peft_alpha: float = field(16.0, help="LoRA / LoHa scaling alpha (> 0; the update is scaled by alpha / rank)")
    peft_dropout: float = field(0.0, help="LoRA dropout / LoHa module dropout")
    peft_targets: list[str] | None = field(
        None,
        help="name suffixes of the linear layers inside the blocks that get adapters; none = "
        "the method's own: "
        + "; ".join(f"{name} {','.join(m.default_targets)}" for name, m in PEFT_METHODS.items())
        + " (IA3 scales the output of attn.qkv, fused: keys, values and queries too; and the "
        "input of ffn.down, the feed-forward intermediate)",
    )
    save: bool = field(
        False,
        help="save the fine-tuned weights of the first seed (only adapter + head with peft) "
        "to RUN_DIR/finetune/TASK[-PEFT][-random]/seed-N/, with finetune_config.json, owner.json "
        "(task, its source, init, PEFT method: another task's folder of the same name is not replaced) "
        "and classifier.json (label order, text columns...), which `cramkit predict` and "
        "cramkit.eval.load_finetuned reload them with",
    )
    progress: bool = field(True, help="show tqdm progress bars")

    def validate(self) -> None:
        """Check ranges a user can get wrong."""
        # peft_alpha=0 scales every LoRA / LoHa update to 0: the adapters never trained, and the
        # result (the head alone) was reported as the method's.
        positive = ("epochs", "batch_size", "eval_batch_size", "lr", "eps", "seq_len", "peft_rank", "peft_alpha")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"finetune.{name} must be positive, got {getattr(self, name)}")
        # As pretraining's optim and train sections check them: AdamW refused a negative decay or
        # a beta outside [0, 1) with a traceback, and a negative clip was silently no clipping.
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"finetune.betas must lie in [0, 1), got {list(self.betas)}")
        if self.weight_decay < 0:
            raise ConfigError(f"finetune.weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip < 0:
            raise ConfigError(f"finetune.grad_clip must be >= 0 (0 = no clipping), got {self.grad_clip}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"finetune.warmup must be in [0, 1), got {self.warmup}")
        for name in ("dropout", "attention_dropout", "peft_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"finetune.{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.seeds:
            raise ConfigError("finetune.seeds must name at least one seed")
        for i, seed in enumerate(self.seeds):  # as pretraining's seed: 2**64 was torch's traceback
            check_seed(f"finetune.seeds[{i}]", seed)
        twice = next((s for i, s in enumerate(self.seeds) if s in self.seeds[:i]), None)
        if twice is not None:  # the same run again, counted twice in the median
            raise ConfigError(f"finetune.seeds names seed {twice} twice: a seed gives the same run each time, "
                              "and the median would count it twice")
        if self.seq_len < 4:
            raise ConfigError(f"finetune.seq_len must be at least 4, got {self.seq_len}")
        if self.head_width < 0:
            raise ConfigError(f"finetune.head_width must be >= 0 (0 = hidden), got {self.head_width}")
        for name in ("max_train_examples", "max_eval_examples"):  # None = all
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"finetune.{name} must be at least 1 (or none), got {getattr(self, name)}")
        if self.pooling != "auto" and self.pooling not in POOLERS:
            raise ConfigError(f"finetune.pooling: unknown '{self.pooling}'")


# --------------------------------------------------------------------------------------------
# Learning-rate schedules: progress in [0, 1] after warmup -> multiplier


SCHEDULES: dict[str, Callable[[float], float]] = {
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "linear": lambda p: 1.0 - p,
    "constant": lambda p: 1.0,
}


def lr_multiplier(step: int, total: int, warmup: float, schedule: str) -> float:
    """LR factor at optimizer ``step`` (0-based) of ``total``: linear warmup, then ``schedule``."""
    decay = SCHEDULES.get(schedule)
    if decay is None:
        raise ConfigError(f"unknown schedule '{schedule}'{did_you_mean(schedule, SCHEDULES)}")
    warm = int(round(warmup * total))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, decay((step - warm) / max(1, total - warm)))


# --------------------------------------------------------------------------------------------
# The backbone: what a run directory (or its random-init control) provides


#: Offset of the seeds that draw random-init weights (see :meth:`Backbone.build`).
RANDOM_INIT_SEED = 1_000_003


@dataclasses.dataclass
class Backbone:
    """A model shape, its weights (None = random init), and the run's tokenizer."""

    model_config: Any
    state_dict: dict[str, torch.Tensor] | None
    tokenizer: Any
    special: SpecialIds
    run_dir: Path | None = None
    #: The run's checkpoint folder the weights came from, and the checksum of its weights when
    #: they were loaded: what a saved PEFT adapter needs again, and how to tell it is unchanged.
    checkpoint: Path | None = None
    checkpoint_sha256: str | None = None

    def as_random(self) -> Backbone:
        """The same shape and tokenizer without the pretrained weights."""
        return dataclasses.replace(self, state_dict=None)

    @property
    def random_init(self) -> bool:
        """Whether this is the "no pretraining" control."""
        return self.state_dict is None

    def build(self, dropout: float, attention_dropout: float, seed: int = 0) -> nn.Module:
        """A fresh model with fine-tuning dropout, holding the pretrained weights if any.

        Weights are drawn from a private RNG stream (``RANDOM_INIT_SEED + seed``) and the global
        RNG is left as it was, so the classifier head and batch order of a seed are the same for
        the pretrained model and its random-init control (a paired comparison). The offset keeps
        the control from reproducing the pretraining run's own initialisation (often seed 0).
        """
        from ..models import build_model

        cfg = self.model_config.for_single_inputs().replace(
            dropout=dropout, attention_dropout=attention_dropout
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED + seed)
            model = build_model(cfg)
        if self.state_dict is not None:
            model.load_state_dict(self.state_dict)
        return model


def check_vocab(tokenizer, model_config, where: str = "") -> None:
    """A tokenizer with more ids than the model has embedding rows cannot be used with it."""
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    if n > model_config.vocab_size:
        raise CheckpointError(
            f"{where or 'tokenizer'} has {n} tokens but the model's vocabulary is "
            f"{model_config.vocab_size}: tokenizer and model do not belong together"
        )


def _refuse_finetuned(run_dir: Path) -> None:
    """A folder of weights that ``cramkit finetune save=true`` wrote (``RUN/finetune/TASK/seed-N``,
    or a folder above it inside the run) is a natural thing to point export or another fine-tune
    at, and would otherwise be called an unfinished run: say what it is and what to use."""
    if (run_dir / "config.json").is_file():
        return
    saved = [p.parent for pattern in ("finetune_config.json", "*/finetune_config.json",
                                      "*/*/finetune_config.json") for p in run_dir.glob(pattern)]
    if saved:
        run = saved[0].resolve().parents[2]
        raise ConfigError(
            f"{run_dir} holds fine-tuned weights (cramkit finetune save=true), not a pretraining "
            f"run: use the run they came from ({run})"
        )


def _refuse_export(run_dir: Path) -> None:
    """A folder that ``cramkit export`` wrote holds a config.json too, the model's alone: read as a
    run's, it was "config.json: unknown config key 'format'". Say what it is and which run to use."""
    from ..export import EXPORT_META

    meta = run_dir / EXPORT_META
    if not meta.is_file():
        return
    try:
        source = json.loads(meta.read_text(encoding="utf-8")).get("source_run")
    except (OSError, ValueError, AttributeError):
        source = None
    raise ConfigError(f"{run_dir} is a cramkit export (cramkit export --out), not a pretraining run: use "
                      + (f"the run it was exported from ({source})" if source else "the run it was exported from"))


def open_run(run_dir: str | Path):
    """The newest intact model of a pretraining run, its config and its tokenizer, checked
    against each other: ``(model, model_config, tokenizer, info)`` (``info`` as from
    :func:`~cramkit.train.checkpoint.load_pretrained`, plus ``document_mask``: whether
    pretraining masked attention across packed documents).

    The model and config are set up for single inputs (fine-tuning, export): see
    :meth:`~cramkit.models.ModelConfig.for_single_inputs`."""
    from ..train.checkpoint import load_pretrained

    run_dir = require_run_dir(run_dir)
    _refuse_finetuned(run_dir)
    _refuse_export(run_dir)
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"{run_dir}: no tokenizer.json (not a finished cramkit run)")
    model, model_config, info = load_pretrained(run_dir)
    info["document_mask"] = model_config.document_mask
    model_config = model.config = model_config.for_single_inputs()
    return model, model_config, run_tokenizer(run_dir, model_config), info


def run_tokenizer(run_dir: Path, model_config):
    """A run's ``tokenizer.json``, checked against ``model_config``'s vocabulary and the run's
    data manifest."""
    from tokenizers import Tokenizer

    tok_path = Path(run_dir) / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"{run_dir}: no tokenizer.json (not a finished cramkit run)")
    try:
        tokenizer = Tokenizer.from_file(str(tok_path))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"{tok_path}: cannot read tokenizer ({exc})") from None
    check_vocab(tokenizer, model_config, str(tok_path))
    check_tokenizer_file(Path(run_dir), tok_path)
    return tokenizer


def check_tokenizer_file(run_dir: Path, tok_path: Path) -> None:
    """``tokenizer.json`` must be the file pretraining copied in, as the data manifest records.

    The vocabulary-size check cannot see a tokenizer swapped for another one of the same or a
    smaller size (another run's): every id would still be in range, every input misread.
    """
    from ..data.dataset import tokenizer_matches
    from ..utils import read_json

    manifest = run_dir / "data_manifest.json"
    if not manifest.is_file():
        return
    if not tokenizer_matches(tok_path, read_json(manifest, CheckpointError)):
        raise CheckpointError(
            f"{tok_path} is not the tokenizer this run was trained with (its sha256 differs from "
            f"tokenizer_sha256 in {manifest.name}): tokenizer and model do not belong together"
        )


def pretrained_on(run_dir: Path | None, sources: Sequence[str]) -> list[str]:
    """Which of ``sources`` the run's pretraining data was prepared from (its data manifest's
    ``config.sources``); none when that is not recorded."""
    from ..utils import read_json

    manifest = None if run_dir is None else Path(run_dir) / "data_manifest.json"
    if not sources or manifest is None or not manifest.is_file():
        return []
    used = (read_json(manifest, CheckpointError).get("config") or {}).get("sources") or []
    return [s for s in sources if s in used]


def finetune_name(task_name: str, random_init: bool, peft: str = "none") -> str:
    """The file-name stem of a task's fine-tuning outputs: the name made safe for a path, the
    PEFT method, and ``-random`` for the no-pretraining control, so that a LoRA result, a full
    fine-tune and the control never overwrite each other (nor adapter and full weights)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", task_name).strip("-") or "task"
    return slug + ("" if peft == "none" else f"-{peft}") + ("-random" if random_init else "")


def finetune_save_dir(run_dir: str | Path, task_name: str, random_init: bool, peft: str = "none") -> Path:
    """Where fine-tuned weights go (``finetune.save=true``), for `cramkit finetune` and
    `cramkit evaluate` alike: ``RUN/finetune/<finetune_name>``."""
    return Path(run_dir) / "finetune" / finetune_name(task_name, random_init, peft)


def changed_settings(path: Path, new: dict[str, Any], sections: Sequence[str] = ("config",)) -> list[str]:
    """The settings in which the result already at ``path`` differs from the result or report
    ``new`` (empty when there is none, or it was written with the same), so a replaced result
    does not go unseen. ``sections`` are the keys that record settings. Every result records its
    ``config``; a later section (``task_options``) that the old result lacks, written before it
    was recorded, is not compared."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(previous, dict):
        return []
    changed = []
    for section in sections:
        old = previous.get(section, {} if section == "config" else None)
        if isinstance(old, dict):
            changed += [k for k in changed_keys(old, new[section]) if section != "config" or k not in _NOT_SCORED]
    return changed


#: Fine-tuning options that change what is shown or kept, never a score: a rerun that differs
#: only in them must not be reported as written with other settings.
_NOT_SCORED = frozenset({"progress", "save"})


def outputs_owner(task: TaskData | TaskSpec, random_init: bool, peft: str = "none") -> dict[str, str]:
    """Whose fine-tuning outputs these are: task name and source (a GLUE task, a file...), init
    and PEFT method. A result file and a saved weights folder record it (:func:`name_clash`)."""
    spec = task.spec if isinstance(task, TaskData) else task
    return {"task": spec.name, "task_source": spec.source, "init": "random" if random_init else "pretrained",
            "peft": peft, **({"task_file": spec.file} if spec.file else {})}


def _recorded_owners(path: Path) -> list[dict[str, Any]]:
    """The owners a result file (``task``, ``init``, ``config.peft``) or a weights folder (each
    ``seed-N/owner.json``) records; none for what is absent or unreadable."""
    found = []
    files = [path] if path.suffix == ".json" else sorted(path.glob("seed-*/owner.json"))
    for file in files:
        try:
            data = json.loads(file.read_text())
            if file.name == "owner.json":
                found.append({k: str(v) for k, v in data.items()})
            else:
                found.append({"task": data["task"], "init": data["init"],
                              "peft": data["config"].get("peft", "none"),
                              **{k: data[k] for k in ("task_source", "task_file") if k in data}})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return found


def name_clash(paths: Sequence[Path], owner: dict[str, str]) -> str | None:
    """Why this fine-tune must not write ``paths`` (its result file, its weights folder; None
    when it may): what is there belongs to another task, init or PEFT method whose outputs got
    the same name (:func:`finetune_name`).

    A task file ``reviews-lora.tsv`` fine-tuned fully and ``reviews.tsv`` with LoRA are both
    ``reviews-lora``, as are ``my reviews.tsv`` and ``my-reviews.tsv``, ``reviews/train.tsv`` and
    ``reviews/train.csv`` (told apart by the file name recorded), and a file ``rte.tsv``
    and GLUE's RTE: the second would replace the first's result and saved weights. Checked
    before fine-tuning, so no work is lost. (An output from before sources were recorded is
    compared by the rest.)"""

    def describe(o: dict[str, str]) -> str:
        source = f"{o['task_source']} " if o.get("task_source") else ""
        method = "full fine-tune" if o.get("peft", "none") == "none" else o["peft"]
        file = f" from {o['task_file']}" if o.get("task_file") else ""
        return f"{source}task '{o['task']}'{file} ({o['init']} init, {method})"

    for path in paths:
        for previous in _recorded_owners(path):
            if any(previous.get(k, v) != v for k, v in owner.items()):
                return (f"{path} holds the outputs of {describe(previous)}, whose names are those of "
                        f"{describe(owner)}'s: rename one of the task files, or move {path} away")
    return None


def require_run_dir(run_dir: str | os.PathLike) -> Path:
    """``run_dir`` as a Path; CheckpointError when there is no such folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: run directory not found")
    return run_dir


def load_backbone(run_dir: str | Path, random_init: bool = False) -> Backbone:
    """Load a pretraining run for fine-tuning (``load_pretrained`` + ``tokenizer.json``).

    With ``random_init`` the weights are dropped and each seed starts from a fresh
    initialisation of the same shape (the "no pretraining" control).
    """
    run_dir = Path(run_dir)
    model, model_config, tokenizer, info = open_run(run_dir)
    state = None
    if not random_init:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Backbone(model_config, state, tokenizer, SpecialIds.for_run(run_dir, tokenizer), run_dir,
                    info["checkpoint"], info["weights_sha256"])


# --------------------------------------------------------------------------------------------
# Training and evaluation


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)


#: What to change when a fine-tune diverges (its loss or its outputs not finite).
DIVERGED_ADVICE = "lower finetune.lr, or set finetune.grad_clip=1.0"


def batched_logits(
    model: nn.Module,
    encoder: TaskEncoder,
    data: Sequence[Encoded],
    batch_size: int,
    device: torch.device,
    precision: str,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """``(indices into data, float32 logits)`` per evaluation batch, with the model in eval mode.

    Fine-tuning's scoring and a reloaded model's predictions (:mod:`cramkit.eval.finetuned`)
    both batch through here, so that the same examples meet the same padding and give the same
    logits, bit for bit on the same device.
    """
    model.eval()
    # Length-sorted batches waste little compute on padding; callers put results back in order.
    order = sorted(range(len(data)), key=lambda i: len(data[i].ids))
    with torch.no_grad(), autocast(device, resolve_precision(precision, device)):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = encoder.collate([data[i] for i in idx], regression=False)
            logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            yield idx, logits.float()


def predict(
    model: nn.Module,
    encoder: TaskEncoder,
    data: Sequence[Encoded],
    cfg: FinetuneConfig,
    device: torch.device,
    regression: bool,
) -> list:
    """Predictions (class index or float) in the order of ``data``."""
    out: list = [None] * len(data)
    for idx, logits in batched_logits(model, encoder, data, cfg.eval_batch_size, device, cfg.precision):
        if not bool(torch.isfinite(logits).all()):  # the last update broke the weights
            raise TrainingError("the fine-tuned model's outputs are not finite: training "
                                f"diverged ({DIVERGED_ADVICE})")
        values = logits.squeeze(-1).tolist() if regression else logits.argmax(-1).tolist()
        for i, v in zip(idx, values):
            out[i] = v
    return out


def train_one(
    backbone: Backbone,
    encoder: TaskEncoder,
    train: Sequence[Encoded],
    evals: dict[str, Sequence[Encoded]],
    task: TaskData,
    cfg: FinetuneConfig,
    seed: int,
    device: torch.device,
    save_dir: Path | None = None,
) -> dict[str, Any]:
    """One fine-tuning run with ``seed``: returns metrics per evaluation entry and sizes."""
    spec = task.spec
    regression = spec.is_regression
    torch.manual_seed(seed)
    encoder_model = backbone.build(cfg.dropout, cfg.attention_dropout, seed)
    model: nn.Module = SequenceClassifier(
        encoder_model,
        backbone.model_config.hidden,
        spec.num_labels,
        cfg.pooling,
        cfg.dropout,
        causal=backbone.model_config.causal,
        head_width=cfg.head_width,
    )
    if cfg.peft != "none":
        targets = None if cfg.peft_targets is None else tuple(cfg.peft_targets)
        opts = PeftOptions(cfg.peft, cfg.peft_rank, cfg.peft_alpha, cfg.peft_dropout, targets)
        model = apply_peft(model, opts)
    model.to(device)
    counts = parameter_counts(model)
    params = [p for p in model.parameters() if p.requires_grad]
    # Decay never on norms and biases, as in pretraining (cramkit.optim.parameter_groups): an
    # ungrouped AdamW pulled LayerNorm gains toward 0 as soon as weight_decay was set. Nor on
    # IA3's scaling vectors, which that rule by shape takes for matrices.
    groups = parameter_groups(model, cfg.weight_decay, vectors=scaling_parameters(model, cfg.peft))
    optimizer = torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=device.type == "cuda",
    )
    per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = max(1, math.ceil(cfg.epochs * per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total, cfg.warmup, cfg.schedule)
    )
    rng = random.Random(seed)
    order: list[int] = []
    bar = _progress(total, f"{spec.name} seed {seed}", cfg.progress)
    model.train()
    for _step in range(total):
        if len(order) < cfg.batch_size:
            # Epoch boundaries fall mid-batch when len(train) is not a multiple of the batch:
            # the next shuffled pass tops the batch up, so every step has a full batch.
            perm = list(range(len(train)))
            rng.shuffle(perm)
            order.extend(perm)
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        batch = encoder.collate([train[i] for i in idx], regression)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, resolve_precision(cfg.precision, device)):
            logits = model(batch["input_ids"], batch["attention_mask"])
        logits = logits.float()
        if regression:
            loss = F.mse_loss(logits.squeeze(-1), batch["labels"])
        else:
            loss = F.cross_entropy(logits, batch["labels"])
        value = loss.item()  # read for the progress bar anyway
        if not math.isfinite(value):
            bar.close()
            # The weights are no longer a model (or soon will not be): scored anyway, the
            # argmax of nan logits is class 0 and a nan regressor correlates "0", reported as if
            # it had trained.
            raise TrainingError(
                f"{spec.name} seed {seed}: fine-tuning loss is {value} at step {_step + 1} of "
                f"{total}; training diverged ({DIVERGED_ADVICE})"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}", refresh=False)
    bar.close()
    metrics = {}
    for entry, data in evals.items():
        preds = predict(model, encoder, data, cfg, device, regression)
        metrics[entry] = compute_metrics(spec.metrics, preds, [e.label for e in data])
    if save_dir is not None:
        from .finetuned import classifier_record

        _save_finetuned(model, save_dir, cfg, outputs_owner(task, backbone.random_init, cfg.peft),
                        classifier_record(backbone, spec, seed))
    return {"metrics": metrics, "parameters": counts, "steps": total}


def _save_finetuned(model: nn.Module, out: Path, cfg: FinetuneConfig, owner: dict[str, str],
                    classifier: dict[str, Any]) -> None:
    """Write the weights, and what reloading them needs (``classifier``: see
    :func:`~cramkit.eval.finetuned.classifier_record`), into the empty folder ``out``: the
    staging folder that :func:`finetune` puts in place once every seed has finished."""
    from safetensors.torch import save_file

    from ..train.checkpoint import file_record
    from ..utils import write_json
    from .adapters import save_adapters
    from .finetuned import CLASSIFIER_FILE

    if cfg.peft != "none":
        save_adapters(model, out)
    else:
        from ..train.checkpoint import model_weights

        save_file(model_weights(model), str(out / "model.safetensors"))
    # Sizes and checksums of the weights (and peft's adapter_config.json): a truncated or
    # altered file is named when loading, rather than failing deep inside safetensors or
    # loading other numbers than were trained.
    files = {f.name: file_record(f) for f in sorted(out.iterdir()) if f.suffix in (".safetensors", ".json")}
    write_json(out / "finetune_config.json", cfg.to_dict())
    write_json(out / "owner.json", owner)  # whose weights these are: see name_clash
    write_json(out / CLASSIFIER_FILE, {**classifier, "files": files})


def _check_head_fits_host(cfg: FinetuneConfig, hidden: int, num_labels: int) -> None:
    # head_width=1e12 was the allocator's traceback when the head was built.
    width = cfg.head_width or hidden
    values = hidden * width + width * num_labels
    beyond = beyond_host_memory(values)
    if beyond:
        raise ConfigError(f"finetune.head_width={cfg.head_width}: the classification head's {values:,} weights "
                          f"{beyond} (0 = the model's width, {hidden})")


def finetune_config(cfg: FinetuneConfig | dict[str, Any] | None) -> FinetuneConfig:
    """``cfg`` as a FinetuneConfig: defaults for None, a dict read as ``finetune``'s options
    (unknown keys and wrong types named, as on the command line); anything else a TypeError,
    not an AttributeError once fine-tuning has begun."""
    if cfg is None:
        return FinetuneConfig()
    if isinstance(cfg, dict):
        return FinetuneConfig.from_dict(cfg, path="finetune")
    if not isinstance(cfg, FinetuneConfig):
        raise TypeError(f"cfg: give a FinetuneConfig or a dict of its fields, got {type(cfg).__name__}")
    return cfg


def finetune(
    backbone: Backbone,
    task: TaskData,
    cfg: FinetuneConfig | dict[str, Any] | None = None,
    save_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Fine-tune once per seed and report the per-metric median over seeds.

    ``backbone`` is :func:`load_backbone`'s, ``task`` :func:`~cramkit.eval.tasks.load_task`'s;
    ``cfg`` a FinetuneConfig or a dict of its fields (as :func:`~cramkit.models.build_model`
    takes one), defaults for None. Returns ``{"task", "init", "pooling", "metrics": {entry: {metric:
    median}}, "scores": {entry: score}, "per_seed": [...], "train_examples", "eval_examples",
    "skipped_rows", "parameters", "steps", "seconds", "config"}`` (metric values on a 0-1 scale).
    """
    cfg = finetune_config(cfg)
    # A run's folder or a task's name in their place was an AttributeError from deep inside.
    if not isinstance(backbone, Backbone):
        raise TypeError(f"backbone: give a Backbone (cramkit.eval.load_backbone(RUN_DIR)), "
                        f"got {type(backbone).__name__}")
    if not isinstance(task, TaskData):
        raise TypeError(f"task: give a TaskData (cramkit.eval.load_task(NAME_OR_FILE)), "
                        f"got {type(task).__name__}")
    device = resolve_device(cfg.device)
    start = time.perf_counter()
    encoder = TaskEncoder(
        backbone.tokenizer, backbone.special, cfg.seq_len, backbone.model_config.causal
    )
    # Every position scheme but none covers max_positions only (rotary's cache too): checked by
    # the model at the first batch that long, which may be hours into a suite.
    if backbone.model_config.exceeds_positions(cfg.seq_len):
        raise ConfigError(f"finetune.seq_len {cfg.seq_len} exceeds model.max_positions "
                          f"{backbone.model_config.max_positions}")
    _check_head_fits_host(cfg, backbone.model_config.hidden, task.spec.num_labels)
    train = encoder.encode(subsample(task.train, cfg.max_train_examples, seed=0))
    evals = {
        entry: encoder.encode(subsample(data, cfg.max_eval_examples, seed=0))
        for entry, data in task.evals.items()
    }
    seen = [] if backbone.random_init else pretrained_on(backbone.run_dir, task.spec.seen_in)
    if seen:
        warnings.warn(f"{backbone.run_dir} pretrained on {', '.join(seen)}, which holds the "
                      f"{task.spec.name} task's evaluation texts: its scores are on text it has read, "
                      "not held out", stacklevel=2)
    runs: list[dict[str, Any]] = []
    saved = Path(save_dir) / f"seed-{cfg.seeds[0]}" if (save_dir and cfg.save) else None
    # The first seed's weights are staged beside their folder and replace it (as a whole: no
    # earlier save's file lingers) only once every seed has finished. A later seed that diverged
    # or failed left them there with no result describing them, or in place of the weights an
    # earlier fine-tune saved, whose result still described those; now it writes nothing.
    # The folders that staging creates (RUN/finetune/NAME) go with it when nothing lands there.
    with contextlib.ExitStack() as staged:
        for i, seed in enumerate(cfg.seeds):
            target = staged.enter_context(atomic_dir(saved)) if (saved and i == 0) else None
            try:
                runs.append(train_one(backbone, encoder, train, evals, task, cfg, seed, device, target))
            except CramkitError as exc:
                if not runs:
                    raise
                raise type(exc)(f"{exc}; {_finished(cfg.seeds, runs)}, but the result is the median of "
                                "every seed, so nothing of this fine-tune was written"
                                + (f" ({saved} left as it was)" if saved else "")) from None
    metrics = {entry: median_metrics([r["metrics"][entry] for r in runs]) for entry in task.evals}
    return {
        "task": task.spec.name,
        "task_source": task.spec.source,
        **({"task_file": task.spec.file} if task.spec.file else {}),
        "init": "random" if backbone.random_init else "pretrained",
        # What pooling=auto stood for on this backbone (last token for a causal one, else [CLS]):
        # the config below keeps the setting as given.
        "pooling": resolve_pooling(cfg.pooling, backbone.model_config.causal),
        "metrics": metrics,
        "scores": {entry: task_score(m) for entry, m in metrics.items()},
        "score_spread": {
            entry: _spread([task_score(r["metrics"][entry]) for r in runs]) for entry in metrics
        },
        "per_seed": [{"seed": s, **r["metrics"]} for s, r in zip(cfg.seeds, runs)],
        # Where save=true put the first seed's weights: the result said nothing of them.
        **({"saved": str(saved)} if saved else {}),
        **({"evaluation_text_in_pretraining": seen} if seen else {}),
        "train_examples": len(train),
        "eval_examples": {entry: len(data) for entry, data in evals.items()},
        # Malformed rows of GLUE files left out when loading (QQP's): {file: count}.
        "skipped_rows": dict(task.skipped_rows),
        "parameters": runs[0]["parameters"],
        "steps": runs[0]["steps"],
        "seconds": round(time.perf_counter() - start, 2),
        "config": cfg.to_dict(),
    }


def _finished(seeds: Sequence[int], runs: Sequence[dict[str, Any]]) -> str:
    """``seeds 0, 1 finished (rte 61.00, 58.50)``: the scores of the seeds before a failed one."""
    done = seeds[: len(runs)]
    scores = "; ".join(f"{entry} " + ", ".join(f"{to_percent(task_score(r['metrics'][entry])):.2f}" for r in runs)
                       for entry in runs[0]["metrics"])
    return f"seed{'s' * (len(done) > 1)} {', '.join(map(str, done))} finished ({scores})"


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


#: Cheap settings for :func:`finetune_demo`: a tiny model needs a larger LR than GLUE-sane's
#: 4e-5 to move in two short epochs, and mean pooling learns faster than [CLS] from few steps.
DEMO_SETTINGS: dict[str, Any] = {
    "epochs": 2.0,
    "lr": 3e-3,
    "pooling": "mean",
    # Three seeds, median reported: at this size one fine-tuning run swings by ±10 points.
    "seeds": [0, 1, 2],
    "seq_len": 128,
    "max_train_examples": 600,
}


def majority_baseline(task: TaskData) -> dict[str, float]:
    """Accuracy of always predicting the most frequent training label, per evaluation entry."""
    from collections import Counter

    top = Counter(e.label for e in task.train).most_common(1)[0][0]
    return {
        entry: sum(e.label == top for e in data) / len(data) for entry, data in task.evals.items()
    }


def finetune_demo(run_dir: str | Path, progress: bool = True, **overrides: Any) -> dict[str, Any]:
    """Briefly fine-tune a run on the embedded ``bbc`` task, pretrained vs random init.

    Meant as the last step of ``cramkit pretrain demo`` (well under a minute on 2 CPU cores for
    the tiny preset). Returns ``{"task", "pretrained_accuracy", "random_init_accuracy",
    "majority_baseline", "train_examples", "eval_examples", "seconds", "config"}`` (accuracies
    0-1, on ``eval_examples`` dev articles).
    """
    from .tasks import load_task

    cfg = FinetuneConfig.from_dict({**DEMO_SETTINGS, "progress": progress, **overrides})
    task = load_task("bbc")
    start = time.perf_counter()
    backbone = load_backbone(run_dir)
    pre = finetune(backbone, task, cfg)
    rnd = finetune(backbone.as_random(), task, cfg)
    return {
        "task": "bbc",
        "pretrained_accuracy": pre["metrics"]["bbc"]["accuracy"],
        "random_init_accuracy": rnd["metrics"]["bbc"]["accuracy"],
        "majority_baseline": majority_baseline(task)["bbc"],
        "train_examples": pre["train_examples"],
        "eval_examples": len(task.evals["bbc"]),
        "seconds": round(time.perf_counter() - start, 1),
        "config": cfg.to_dict(),
    }
