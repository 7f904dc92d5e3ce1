"""Fine-tuned weights back in use: what ``finetune.save=true`` records beside them, and
:func:`load_finetuned`, which rebuilds the classifier from them to label new texts.

A saved folder (``RUN/finetune/TASK[-PEFT][-random]/seed-N``) holds the weights (the whole
model, or a PEFT adapter with the head), ``finetune_config.json`` (pooling, head width, sequence
length...), ``owner.json`` and :data:`CLASSIFIER_FILE`: the task's label names in output order,
its text columns, the architecture, the special-token ids, the seed, which run and checkpoint
the weights started from, and the size and checksum of each weight file. The tokenizer is the
run's, checked by checksum; a PEFT adapter also needs the run's checkpoint it was trained on
(or, for ``-random``, the seed's random initialisation, which :meth:`Backbone.build` redraws).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, DataError, UnknownName
from ..plugins import run_plugins
from ..utils import read_json, sha256_file
from .encoding import SpecialIds, TaskEncoder
from .finetune import Backbone, FinetuneConfig, batched_logits, run_tokenizer
from .heads import SequenceClassifier
from .tasks import Example, TaskSpec

#: What reloading needs beside the weights (written by ``finetune.save=true`` since format 1).
CLASSIFIER_FILE = "classifier.json"
FORMAT = 1
#: The TaskSpec fields a saved classifier keeps: its labels and the layout of its input files.
_TASK_FIELDS = ("name", "source", "file", "text_column", "text_pair_column", "label_column",
                "has_header", "is_regression", "labels", "metrics")
_SAVE_HINT = "cramkit finetune RUN_DIR --task TASK finetune.save=true"


def classifier_record(backbone: Backbone, spec: TaskSpec, seed: int) -> dict[str, Any]:
    """What :func:`load_finetuned` needs to rebuild a fine-tune of ``backbone`` on ``spec``
    started from ``seed`` (``files``, the weights' checksums, is added once they are written)."""
    base = None
    if not backbone.random_init and backbone.checkpoint is not None:
        # The checksum of the weights as they were loaded, not as the folder holds them now: a
        # resume from an earlier step may have rewritten it while fine-tuning ran. None for a
        # Backbone built in Python without it; an adapter is then refused when loading.
        base = {"checkpoint": Path(backbone.checkpoint).name, "sha256": backbone.checkpoint_sha256}
    run = None if backbone.run_dir is None else Path(backbone.run_dir).resolve()
    tokenizer = None if run is None or not (run / "tokenizer.json").is_file() else run / "tokenizer.json"
    task = {name: getattr(spec, name) for name in _TASK_FIELDS}
    return {
        "format": FORMAT,
        "task": {k: list(v) if isinstance(v, tuple) else v for k, v in task.items()},
        "init": "random" if backbone.random_init else "pretrained",
        "seed": seed,
        "run_dir": None if run is None else str(run),
        "base_checkpoint": base,
        "tokenizer_sha256": None if tokenizer is None else sha256_file(tokenizer),
        "model_config": backbone.model_config.to_dict(),
        "special_ids": dataclasses.asdict(backbone.special),
    }


@dataclasses.dataclass
class FinetunedModel:
    """A fine-tuned classifier (or regressor) loaded by :func:`load_finetuned`.

    ``model`` maps ``(input_ids, attention_mask)`` to logits and is in eval mode; ``task`` holds
    the label names (``task.labels``, in output order) and the text columns; ``encoder`` frames
    and truncates inputs as fine-tuning did. ``tokenizer`` (the run's, as read and checked) and
    ``special`` (the special-token ids recorded at saving) are what ``encoder`` was built from:
    export writes them rather than reading the files again.
    """

    model: nn.Module
    task: TaskSpec
    encoder: TaskEncoder
    config: FinetuneConfig
    device: torch.device
    path: Path
    run_dir: Path
    tokenizer: Any
    special: SpecialIds

    @property
    def labels(self) -> tuple[str, ...] | None:
        """Label names in output order (logit ``i`` is ``labels[i]``); None for regression."""
        return None if self.task.is_regression else self.task.labels

    @property
    def is_regression(self) -> bool:
        return self.task.is_regression

    @property
    def is_pair(self) -> bool:
        """Whether each input is a pair of texts (``(text, text_pair)``)."""
        return self.task.text_pair_column is not None

    def logits(self, inputs: str | Sequence[str] | Sequence[tuple[str, str]]) -> torch.Tensor:
        """Float32 logits on the CPU, one row per input: ``[N, len(labels)]``, ``[N, 1]`` for
        regression. ``inputs`` are texts, or ``(text, text_pair)`` pairs for a pair task; a
        single text stands for a list of one (a dict or a set, which have no row order of their
        own, is a DataError). Texts are stripped, as task files are read."""
        return self.logits_of(self._examples(inputs))

    def logits_of(self, examples: Sequence[Example]) -> torch.Tensor:
        """:meth:`logits` of task examples (their labels are ignored)."""
        data = self.encoder.encode(examples)
        out = torch.empty(len(data), 1 if self.is_regression else len(self.task.labels or ()))
        for idx, logits in batched_logits(self.model, self.encoder, data, self.config.eval_batch_size,
                                          self.device, self.config.precision):
            out[idx] = logits.cpu()
        return out

    def probabilities(self, inputs: str | Sequence[str] | Sequence[tuple[str, str]]) -> torch.Tensor:
        """Softmax of :meth:`logits`: ``[N, len(labels)]``, column ``i`` for ``labels[i]``."""
        if self.is_regression:
            raise ConfigError(f"task '{self.task.name}' is a regression: it has no class probabilities")
        return torch.softmax(self.logits(inputs), dim=-1)

    def predict(self, inputs: str | Sequence[str] | Sequence[tuple[str, str]]) -> list[str] | list[float]:
        """Label names (classification) or floats (regression), one per input."""
        return self.decode(self.logits(inputs))

    def decode(self, logits: torch.Tensor) -> list[str] | list[float]:
        """What :meth:`predict` returns for these logits."""
        if self.is_regression:
            return logits[:, 0].tolist()
        labels = self.task.labels or ()
        return [labels[i] for i in logits.argmax(-1).tolist()]

    def _examples(self, inputs: str | Sequence[str] | Sequence[tuple[str, str]]) -> list[Example]:
        # Only an ordered collection gives rows that line up with the inputs: a dict would be
        # labelled by its keys and a set in an arbitrary order, both without a word; None, a
        # number or bytes were Python's "not iterable" or "got int" (each byte an input).
        if isinstance(inputs, (Mapping, AbstractSet, bytes, bytearray)) or not isinstance(inputs, (str, Iterable)):
            raise DataError(f"inputs: give a text or a list of "
                            f"{'(text, text_pair) tuples' if self.is_pair else 'texts'}, "
                            f"got {type(inputs).__name__}")
        if hasattr(inputs, "columns") and hasattr(inputs, "iloc"):
            # A pandas DataFrame iterates over its column names: one prediction, for "text".
            column = (f"list(zip(df[{self.task.text_column!r}], df[{self.task.text_pair_column!r}]))"
                      if self.is_pair else f"df[{self.task.text_column!r}]")
            raise DataError(f"inputs: a DataFrame is read as its column names; give its text columns, "
                            f"e.g. {column}")
        items = [inputs] if isinstance(inputs, str) else list(inputs)
        out = []
        for i, item in enumerate(items):
            if self.is_pair:
                if (isinstance(item, str) or not isinstance(item, Sequence) or len(item) != 2
                        or not all(isinstance(t, str) for t in item)):
                    raise DataError(f"input {i}: task '{self.task.name}' classifies pairs of texts "
                                    f"({self.task.text_column}, {self.task.text_pair_column}): give "
                                    f"(text, text_pair) tuples of strings, got {item!r:.80}")
                out.append(Example(item[0].strip(), item[1].strip(), 0))
            else:
                if not isinstance(item, str):
                    raise DataError(f"input {i}: task '{self.task.name}' classifies single texts, "
                                    f"got {type(item).__name__}")
                out.append(Example(item.strip(), None, 0))
        return out


def load_finetuned(
    path: str | Path,
    device: str | torch.device = "cpu",
    run_dir: str | Path | None = None,
) -> FinetunedModel:
    """Load weights that ``cramkit finetune ... finetune.save=true`` saved, ready to predict.

    ``path`` is the saved folder (``RUN/finetune/TASK[-PEFT][-random]/seed-N``), or a folder
    above it that holds just one. The backbone is rebuilt from the pretraining run the weights
    came from: the run the folder lies in, else the one recorded at saving (``run_dir`` names it
    when it has moved). A PEFT adapter is put on the run's checkpoint it was trained on (or, for
    ``-random``, on the same random initialisation). ``device``: ``"cpu"``, ``"cuda"``,
    ``"auto"``...; the precision is fine-tuning's (``auto``: bf16 on CUDA).

    Example::

        clf = load_finetuned("runs/demo/finetune/bbc/seed-0")
        clf.predict(["Shares rose after the bank's results."])  # ['business']: label names
        clf.probabilities(texts)  # [N, len(clf.labels)]; clf.logits(texts) before the softmax

    Raises :class:`~cramkit.errors.ConfigError` for a folder that holds no fine-tuned weights
    (a pretraining run, say) and :class:`~cramkit.errors.CheckpointError` for damaged or
    incomplete ones.
    """
    from ..models import ModelConfig
    from ..train.checkpoint import load_weights, verify_files
    from ..train.device import resolve_device

    folder = saved_folder(Path(path))
    record = read_json(folder / CLASSIFIER_FILE, CheckpointError)
    if record.get("format") != FORMAT:
        raise CheckpointError(f"{folder / CLASSIFIER_FILE}: format {record.get('format')!r}, this cramkit "
                              f"reads format {FORMAT}: fine-tune again with {_SAVE_HINT}")
    try:
        cfg = FinetuneConfig.from_dict(read_json(folder / "finetune_config.json", CheckpointError),
                                       path="finetune")
        spec = TaskSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in record["task"].items()})
        model_fields = record["model_config"]
        special = SpecialIds(**record["special_ids"])
        seed, adapter_on_run = int(record["seed"]), cfg.peft != "none" and record["init"] == "pretrained"
        _check_record(record)
        problem = verify_files(folder, record["files"])
    except (ConfigError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _damaged(folder, exc) from None
    if problem:
        raise CheckpointError(f"{folder}: {problem}; fine-tune again with {_SAVE_HINT}")
    run = _find_run(folder, record, run_dir)
    # With the run's plugins: the model config may name a plugin's component (an init scheme),
    # whose unknown name was reported as a damaged file.
    with run_plugins(run):
        try:
            model_config = ModelConfig.from_dict(model_fields, path="model_config")
        except UnknownName as exc:  # the hint names the plugin, if the run recorded it
            raise CheckpointError(f"{folder}: {exc}") from None
        except (ConfigError, TypeError, ValueError, AttributeError) as exc:
            raise _damaged(folder, exc) from None
    backbone = Backbone(model_config, None, run_tokenizer(run, model_config), special, run)
    # Rebuilt as train_one builds it; the redraws of the weights that get loaded over (and the
    # -random PEFT base, which must be redrawn) leave the caller's random stream alone.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pooling warning was given when fine-tuning
        encoder_model = backbone.build(cfg.dropout, cfg.attention_dropout, seed)
        if adapter_on_run:
            load_weights(encoder_model, _base_checkpoint(folder, run, record, cfg.peft))
        model: nn.Module = SequenceClassifier(
            encoder_model, model_config.hidden, spec.num_labels, cfg.pooling, cfg.dropout,
            causal=model_config.causal, head_width=cfg.head_width,
        )
    if cfg.peft == "none":
        load_weights(model, folder)
    else:
        model = _with_adapter(model, folder, cfg)
    dev = resolve_device(str(device))
    model.to(dev).eval()
    encoder = TaskEncoder(backbone.tokenizer, special, cfg.seq_len, model_config.causal)
    return FinetunedModel(model, spec, encoder, cfg, dev, folder, run, backbone.tokenizer, special)


def _damaged(folder: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(f"{folder}: {CLASSIFIER_FILE} or finetune_config.json is damaged "
                           f"({type(exc).__name__}: {exc}); fine-tune again with {_SAVE_HINT}")


def _check_record(record: dict[str, Any]) -> None:
    """A ValueError for a field of ``record`` that :func:`load_finetuned` reads later, outside
    its check, and that is not what :func:`classifier_record` writes."""
    base = record.get("base_checkpoint")
    if base is not None and not (isinstance(base, dict) and isinstance(base.get("checkpoint"), str)
                                 and isinstance(base.get("sha256"), (str, type(None)))):
        raise ValueError(f"base_checkpoint is {base!r}")
    for key in ("run_dir", "tokenizer_sha256"):
        if not isinstance(record.get(key), (str, type(None))):
            raise ValueError(f"{key} is {record.get(key)!r}")
    if record["init"] not in ("pretrained", "random"):
        raise ValueError(f"init is {record['init']!r}")
    if not isinstance(record["files"], dict) or not record["files"]:  # nothing would be checked
        raise ValueError(f"files is {record['files']!r}")


_SAVED_PATTERNS = ("seed-*/finetune_config.json", "*/seed-*/finetune_config.json",
                   "finetune/*/seed-*/finetune_config.json")


def _saved_below(path: Path) -> list[Path]:
    """The saved fine-tunes inside ``path`` (a run, its ``finetune`` folder, a task's folder)."""
    return sorted({p.parent for pattern in _SAVED_PATTERNS for p in path.glob(pattern)})


def is_finetuned_folder(path: Path) -> bool:
    """Whether ``path`` names saved fine-tuned weights as :func:`saved_folder` reads it (the
    folder itself or a folder above it, not a pretraining run): what it resolves to, or the
    error it gives, is :func:`saved_folder`'s. A run whose config.json is lost or damaged (its
    checkpoints are there) is a damaged run, not the fine-tune it holds."""
    if not path.is_dir() or (path / "config.json").is_file() or (path / "checkpoints").is_dir():
        return False
    return (path / CLASSIFIER_FILE).is_file() or (path / "finetune_config.json").is_file() or bool(
        _saved_below(path))


def saved_folder(path: Path) -> Path:
    """The saved fine-tune that ``path`` names: itself, or the one folder it holds; anything
    else is an error that says what ``path`` is instead."""
    if not path.exists():
        raise CheckpointError(f"{path}: not found")
    if not path.is_dir():
        raise ConfigError(f"{path} is a file: give the folder of fine-tuned weights "
                          "(RUN_DIR/finetune/TASK/seed-N)")
    if (path / CLASSIFIER_FILE).is_file():
        return path
    if (path / "finetune_config.json").is_file():
        raise CheckpointError(f"{path} was saved by an earlier cramkit, which did not record the label "
                              f"order and input layout ({CLASSIFIER_FILE}): fine-tune again with {_SAVE_HINT}")
    saved = _saved_below(path)
    shown = ", ".join(str(p.relative_to(path)) for p in saved[:6]) + (", …" if len(saved) > 6 else "")
    if (path / "config.json").is_file():
        where = f"give one of its saved folders ({shown})" if saved else f"save some with {_SAVE_HINT}"
        raise ConfigError(f"{path} is a pretraining run, not fine-tuned weights: {where}")
    if len(saved) == 1:
        return saved_folder(saved[0])
    if saved:
        raise ConfigError(f"{path} holds {len(saved)} fine-tuned folders ({shown}): give one")
    raise ConfigError(f"{path} holds no fine-tuned weights (no {CLASSIFIER_FILE}); {_SAVE_HINT} "
                      "saves them to RUN_DIR/finetune/TASK/seed-N")


def _find_run(folder: Path, record: dict[str, Any], run_dir: str | Path | None) -> Path:
    """The pretraining run whose tokenizer the weights were fine-tuned with: ``run_dir``, else
    the run the folder lies in (``RUN/finetune/NAME/seed-N``: moved with it), else the one
    recorded when saving."""
    if run_dir is not None:
        candidates = [Path(run_dir)]
    else:
        parents = folder.resolve().parents
        candidates = [parents[2]] if len(parents) > 2 else []
        if record.get("run_dir"):
            candidates.append(Path(record["run_dir"]))
    expected = record.get("tokenizer_sha256")
    for run in dict.fromkeys(candidates):  # each once, in order
        if (run / "config.json").is_file() and (run / "tokenizer.json").is_file():
            if expected is None or sha256_file(run / "tokenizer.json") == expected:
                return run
            if run_dir is not None:
                raise CheckpointError(f"{run / 'tokenizer.json'} is not the tokenizer {folder} was "
                                      "fine-tuned with: the weights do not come from this run")
    tried = " nor ".join(str(c) for c in dict.fromkeys(candidates)) or "recorded"
    raise CheckpointError(f"{folder}: the pretraining run these weights were fine-tuned from (whose "
                          f"tokenizer it needs) is not at {tried}: pass its folder with --run-dir "
                          "(run_dir= in Python)")


def _base_checkpoint(folder: Path, run: Path, record: dict[str, Any], method: str) -> Path:
    """The run's checkpoint that a PEFT adapter was trained on, as it was then."""
    base = record.get("base_checkpoint")
    if not base:
        raise CheckpointError(f"{folder}: the {method} adapter's base weights were not recorded (a "
                              "Backbone built in Python without its run's checkpoint)")
    from ..train.checkpoint import verify

    ckpt = run / "checkpoints" / str(base["checkpoint"])
    problem = verify(ckpt) if ckpt.is_dir() else "it is no longer there (pruned as training went on?)"
    if problem is None and base.get("sha256") is None:  # see classifier_record
        problem = ("its checksum was not recorded (a Backbone built without it), so its weights "
                   "cannot be told to be the ones the adapter was trained on")
    if problem is None:
        meta = read_json(ckpt / "meta.json", CheckpointError)
        if meta["files"]["model.safetensors"]["sha256"] != base.get("sha256"):
            problem = "its weights are not the ones it held then"
    if problem:
        raise CheckpointError(f"{folder}: the {method} adapter was trained on {ckpt}, but {problem}; "
                              f"an adapter needs its own base weights: fine-tune again with {_SAVE_HINT}")
    return ckpt


def _with_adapter(model: nn.Module, folder: Path, cfg: FinetuneConfig) -> nn.Module:
    """``model`` wrapped as fine-tuning wrapped it, holding the saved adapter and head."""
    from safetensors.torch import load_file

    from ..train.checkpoint import ShapeMismatch
    from .adapters import PeftOptions, apply_peft

    targets = None if cfg.peft_targets is None else tuple(cfg.peft_targets)
    model = apply_peft(model, PeftOptions(cfg.peft, cfg.peft_rank, cfg.peft_alpha, cfg.peft_dropout, targets))
    import peft  # present: apply_peft has said so otherwise

    file = folder / "adapter_model.safetensors"
    try:
        weights = load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"cannot read {file}: {exc}") from None
    expected = set(peft.get_peft_model_state_dict(model))
    if set(weights) != expected:
        raise ShapeMismatch(f"{file} does not match finetune_config.json's {cfg.peft} adapter: missing "
                            f"{sorted(expected - set(weights))[:5]}, unexpected {sorted(set(weights) - expected)[:5]}")
    try:
        peft.set_peft_model_state_dict(model, weights)
    except RuntimeError as exc:  # shapes differ
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise ShapeMismatch(f"{file} does not match finetune_config.json's {cfg.peft} adapter: {first}") from None
    return model
