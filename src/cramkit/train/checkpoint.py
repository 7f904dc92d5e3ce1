"""Checkpoints: safetensors weights plus a weights-only state file, written atomically.

Layout: ``RUN/checkpoints/step-NNNNNNNN/{model.safetensors, state.pt, meta.json}``. ``meta.json``
is written last and records each file's size and sha256, so a checkpoint whose files are missing,
truncated or altered is detected and skipped in favour of the previous good one. Loading never
unpickles arbitrary objects: weights come from safetensors and state through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, ConfigError, UnknownName
from ..plugins import run_plugins
from ..utils import atomic_dir, read_json, sha256_file, write_json

FILES = ("model.safetensors", "state.pt")


def model_weights(model_or_state: torch.nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors to save, each shared storage once (tied embeddings).

    safetensors refuses tensors that share storage; ``load_weights`` re-ties them through the
    module's own aliasing.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    out, seen = {}, set()
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def save_checkpoint(
    run_dir: Path, step: int, model: torch.nn.Module | dict[str, torch.Tensor], state: dict[str, Any], keep: int = 2,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint for ``step`` and prune older ones, keeping ``keep``.

    ``meta`` (JSON) goes into ``meta.json``, e.g. the architecture the weights belong to.
    """
    final = Path(run_dir) / "checkpoints" / f"step-{step:08d}"
    # Built under a dot-name that list_checkpoints ignores, renamed into place when complete.
    # clear_folder: a checkpoint killed mid-write (SIGKILL after a grace period) has a step the
    # next saves will not reuse, so its leftovers would otherwise never be cleared.
    with atomic_dir(final, clear_folder=True) as tmp:
        save_file(model_weights(model), str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
        files = {name: file_record(tmp / name) for name in FILES}
        write_json(tmp / "meta.json", {"step": step, "files": files, "time": time.time(), **(meta or {})})
    # Checkpoints after this step belong to a timeline that a resume abandoned; of the earlier
    # ones keep the newest keep-1 beside the one just written (never that one itself).
    for path in list_checkpoints(run_dir):
        if _step_of(path) > step:
            shutil.rmtree(path, ignore_errors=True)
    earlier = [p for p in list_checkpoints(run_dir) if _step_of(p) < step]
    for old in earlier[: max(0, len(earlier) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders (complete or not), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def verify(path: Path) -> str | None:
    """None when the checkpoint at ``path`` is complete and intact, else the reason."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return "meta.json is missing (the write was interrupted)"
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, OSError) as exc:  # ValueError: bad JSON, and bytes that are not UTF-8
        return f"meta.json is unreadable ({exc})"
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or any(
        not isinstance(i, dict) or "bytes" not in i or "sha256" not in i for i in files.values()
    ):
        return "meta.json does not list its files' sizes and checksums"
    return verify_files(path, files)


def file_record(path: Path) -> dict[str, Any]:
    """``{"bytes", "sha256"}`` of a file, as :func:`verify_files` checks it."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def verify_files(path: Path, files: dict[str, dict[str, Any]]) -> str | None:
    """None when every file of ``files`` (``{name: {"bytes", "sha256"}}``) in folder ``path``
    has its recorded size and checksum, else what is wrong with the first that has not."""
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != info["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, {info['bytes']} expected (truncated or altered)"
        if sha256_file(f) != info["sha256"]:
            return f"{name} does not match its checksum"
    return None


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def latest_checkpoint(run_dir: Path, warn=_warn) -> Path:
    """The newest intact checkpoint; broken newer ones are reported through ``warn`` (a Python
    warning by default: the command line prints it as ``warning: ...`` on stderr)."""
    candidates = list_checkpoints(run_dir)
    if not candidates:
        if (Path(run_dir) / "config.json").is_file():  # a run killed before its first checkpoint
            raise CheckpointError(f"{run_dir} has no checkpoints: the run stopped before it wrote its first one "
                                  "(killed, or failed, before train.checkpoint_every or its end); "
                                  f"there is nothing to continue or load: start a new run under another name= "
                                  f"(or delete {run_dir})")
        raise CheckpointError(f"{run_dir} has no checkpoints (was the run started with cramkit pretrain?)")
    for path in reversed(candidates):
        problem = verify(path)
        if problem is None:
            return path
        warn(f"skipping checkpoint {path.name}: {problem}; falling back to the previous one")
    raise CheckpointError(f"{run_dir} has no intact checkpoint (all {len(candidates)} are damaged)")


class ShapeMismatch(CheckpointError):
    """The checkpoint is readable but holds other tensors (names or shapes) than the model."""


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load ``model.safetensors`` from a checkpoint folder into ``model`` (shapes must match)."""
    try:
        weights = load_file(str(Path(path) / "model.safetensors"))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"cannot read {path}/model.safetensors: {exc}") from None
    apply_weights(model, weights, path)


def apply_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: Path | str) -> None:
    """Load ``weights`` (tied tensors stored once) into ``model``; ``where`` names their file in
    errors. Raises :class:`ShapeMismatch` when they do not fit."""
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shapes differ, e.g. model.hidden changed on resume
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        first = first.rstrip(".")
        raise ShapeMismatch(f"checkpoint {where} does not match the model: {first}") from None
    tied = {n for n, t in model.state_dict().items() if n in missing and _is_tied(model, n)}
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise ShapeMismatch(
            f"checkpoint {where} does not match the model: missing {missing[:5]}, unexpected {list(unexpected)[:5]}"
        )


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    sd = model.state_dict()
    ptr = sd[name].untyped_storage().data_ptr()
    return any(other != name and t.untyped_storage().data_ptr() == ptr for other, t in sd.items())


def load_state(path: Path) -> dict[str, Any]:
    """The training state of a checkpoint, loaded without unpickling arbitrary objects."""
    try:
        return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}/state.pt: {exc}") from None


def load_pretrained(run_dir: str | Path, device: str | torch.device = "cpu"):
    """Load the newest intact checkpoint of a pretraining run for fine-tuning or export.

    Returns ``(model, model_config, info)`` where ``info`` has ``run_dir``, ``checkpoint``,
    ``weights_sha256`` (the checkpoint's weights, as loaded), ``tokenizer_path`` and ``special_ids``.
    The run is read with the plugins it recorded (:func:`cramkit.plugins.run_plugins`).
    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (anything else is a ConfigError).
    """
    from .device import resolve_device

    # Before the checkpoint is read: "gpu" was torch's list of twenty device types, once the
    # weights had been loaded.
    device = resolve_device(str(device))
    with run_plugins(run_dir):
        return _load_pretrained(Path(run_dir), device)


def _load_pretrained(run_dir: Path, device: str | torch.device):
    from ..config import config_from_dict
    from ..models import ModelConfig, build_model

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{run_dir} is not a cramkit run directory (no config.json)")
    saved = read_json(cfg_path, CheckpointError)
    try:
        try:
            # Not strict: cramkit wrote the file, and earlier versions kept technique options as
            # given (100.0 for a count), which a run must still load with.
            run_model = config_from_dict(saved, strict=False).model
        except UnknownName:
            # Trained with a plugin's technique or optimizer that is not loaded here: fine-tuning
            # and export need the model alone, so only its section is read.
            run_model = ModelConfig.from_dict(saved.get("model", {}), path="model")
    except ConfigError as exc:  # a damaged or edited config.json: say which file is wrong
        raise CheckpointError(f"{cfg_path}: {exc}") from None
    ckpt = latest_checkpoint(run_dir)
    # Techniques may have changed the architecture; the checkpoint records the one it holds.
    meta_path = ckpt / "meta.json"
    meta = read_json(meta_path, CheckpointError)
    meta_model = meta.get("model_config")
    try:
        model_cfg = ModelConfig.from_dict(meta_model, path="model_config") if meta_model else run_model
    except ConfigError as exc:
        raise CheckpointError(f"{meta_path}: {exc}") from None
    model = build_model(model_cfg)
    load_weights(model, ckpt)
    model.to(device).eval()
    manifest_path = run_dir / "data_manifest.json"
    special = read_json(manifest_path, CheckpointError).get("special_ids", {}) if manifest_path.is_file() else {}
    info = {
        "run_dir": run_dir,
        "checkpoint": ckpt,
        # As verified when the checkpoint was chosen: what a later rewrite of the folder (a
        # resume from an earlier step) can be told from.
        "weights_sha256": meta["files"]["model.safetensors"]["sha256"],
        "tokenizer_path": run_dir / "tokenizer.json",
        "special_ids": special,
    }
    return model, model_cfg, info
