"""What a run writes as it goes: metrics.jsonl, TensorBoard events, a live progress bar."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ..errors import RunError
from ..utils import atomic_path, json_object, read_text, strict_json


class RunLog:
    """Appends metric records to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    ``resume_step``: the step of the checkpoint a resumed run continues from. Records of later
    steps belong to the timeline the resume abandons (a run killed after its last checkpoint, or
    one whose newest checkpoint was damaged); they are dropped, so that the log holds each step
    once and ``cramkit report`` reads the run that the checkpoints hold.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tensorboard, self._resume_step = tensorboard, resume_step
        self._file = self._tb = None
        self._closed = False

    def _open(self) -> None:
        """Trim the log and open it, and TensorBoard's, at the first record, not before: a resume
        refused after the log was made (its optimizer state does not fit, its budget is spent)
        must leave the run's files as they were, not cut the records past an earlier checkpoint
        or add an events file."""
        _drop_partial_last_line(self.path)
        if self._resume_step is not None:
            _drop_records_after(self.path, self._resume_step)
        self._file = self.path.open("a")
        if self._tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: TensorBoard hides the abandoned timeline's events too.
                self._tb = SummaryWriter(str(self.path.parent / "tb"),
                                         purge_step=None if self._resume_step is None else self._resume_step + 1)
            except Exception:  # tensorboard is an optional extra
                self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: the log is closed")
        if self._file is None:
            self._open()
        self._file.write(strict_json(record) + "\n")  # a non-finite loss as null
        self._file.flush()
        if self._tb is not None:
            kind = record.get("type", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "type"):
                    self._tb.add_scalar(f"{kind}/{key}", value, record.get("step", 0))

    def finish(self) -> None:
        """Close the log of a run that ended well: trimmed (and created) even where nothing was
        written, as the summary reads it."""
        if self._file is None and not self._closed:
            self._open()
        self.close()

    def close(self) -> None:
        self._closed = True
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def check_log(path: Path) -> None:
    """Refuse to resume onto a ``metrics.jsonl`` with a line that is not a JSON object (but a
    last one without its newline, which a killed run leaves and :class:`RunLog` cuts off).

    The resumed run appends to the log and reads it back for its summary: it trained to its end,
    then failed there with a traceback, and left no summary.json.
    """
    if not path.is_file():
        return
    advice = "repair or remove that line (or move the file away: the run then logs to a new one) and resume again"
    try:
        lines = read_text(path, RunError).split("\n")
    except RunError as exc:
        raise RunError(f"{exc}; {advice}") from None
    for number, line in enumerate(lines[:-1], start=1):  # the last: "" or the partial line
        if not line.strip():
            continue
        try:
            json_object(line, path, RunError, number)
        except RunError as exc:
            raise RunError(f"{exc}; {advice}") from None


def _drop_partial_last_line(path: Path) -> None:
    """Cut off a last line without its newline, which a run killed in mid-write leaves.

    Appended to, it would glue the resumed run's first record onto it: one unreadable line in
    the middle of the log, which ``cramkit report`` (rightly) refuses and the summary at the
    end of the resumed run failed on. The cut-off record was incomplete anyway.
    """
    if not path.is_file():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    warnings.warn(f"{path}: dropping a truncated last line (the run was stopped while writing it)",
                  stacklevel=3)
    with path.open("r+b") as f:
        f.truncate(keep)


def _drop_records_after(path: Path, step: int) -> None:
    if not path.is_file():
        return

    def later(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) > step
        except (ValueError, AttributeError):  # not a record of ours: not ours to drop
            return False

    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not later(line)]
    if len(kept) == len(lines):
        return
    dropped = len(lines) - len(kept)
    warnings.warn(f"{path}: dropping {dropped} record{'s' * (dropped != 1)} after step {step}, the checkpoint "
                  "this run resumes from (they were logged by the part of the run that it repeats)",
                  stacklevel=3)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(kept))


class Progress:
    """A tqdm bar over budget progress with loss, throughput, MFU and time left."""

    def __init__(self, enabled: bool, description: str) -> None:
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=1000, desc=description, unit="‰", leave=True,
                             bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix}")

    def update(self, progress: float, **fields: Any) -> None:
        if self._bar is None:
            return
        self._bar.n = int(progress * 1000)
        self._bar.set_postfix_str(" ".join(f"{k}={v}" for k, v in fields.items()), refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, device and git commit: what a reader needs to reproduce the run."""
    versions = {}
    for pkg in ("cramkit", "torch", "numpy", "tokenizers", "safetensors", "transformers"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    try:
        repo = Path(__file__).resolve().parents[3]
        found = subprocess.run(["git", "-C", str(repo), "rev-parse", "--show-toplevel", "HEAD"],
                               capture_output=True, text=True, timeout=5)
        top, _, commit = found.stdout.strip().rpartition("\n")
        # Only a checkout of cramkit itself: installed into a virtual environment that sits
        # inside the user's own repository, git found that repository and its commit was
        # recorded as cramkit's.
        if found.returncode == 0 and top and Path(top).resolve() == repo:
            env["git_commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    if "git_commit" not in env and os.environ.get("CRAMKIT_COMMIT"):
        # A copy of the checkout without .git (a borrowed GPU machine): the launcher names it.
        env["git_commit"] = os.environ["CRAMKIT_COMMIT"]
    return env
