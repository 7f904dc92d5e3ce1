"""Atomic writers: a failed write leaves the previous version, and files get normal permissions."""

from __future__ import annotations

import contextlib
import errno
import os
import stat

import pytest
import torch

from cramkit import utils
from cramkit.utils import atomic_dir, atomic_path, write_json


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_path_replaces_only_on_success_and_respects_the_umask(tmp_path):
    target = tmp_path / "summary.json"
    write_json(target, {"a": 1})
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text('{"a": ')  # half written, then ^C
            raise KeyboardInterrupt
    assert target.read_text().startswith('{\n  "a": 1') and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    old = os.umask(0o022)
    try:
        write_json(target, {"a": 2})
        assert _mode(target) == 0o644  # not mkstemp's 0600: a shared run directory stays readable
    finally:
        os.umask(old)
    with pytest.raises(IsADirectoryError, match=str(tmp_path.name)):
        with atomic_path(tmp_path):  # a directory is not a file to replace
            pass


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, a folder that takes no new files")
@pytest.mark.parametrize("writer", [atomic_path, atomic_dir])
def test_a_folder_that_takes_no_files_is_reported_under_the_users_path(writer):
    """`cramkit predict --out /proc/x.jsonl` said `error: /proc/.x.jsonl.6096-17966...tmp: No such
    file or directory`, naming a file the user never asked for (export: a `.x.new-...` folder)."""
    with pytest.raises(OSError) as raised:
        with writer("/proc/x.out"):
            pytest.fail("the block ran")
    assert raised.value.filename == "/proc/x.out"


def test_an_oserror_no_system_call_raised_keeps_its_message(tmp_path, monkeypatch):
    """_named_as renames a system call's error after the user's path; one without an errno
    (raised by Python code, e.g. OSError("...")) has no file to rename and was rebuilt as
    "[Errno None] None: '<path>'", its message lost."""
    def refuse(*_):
        raise OSError("no swap here: the folder is on a read-only mount")

    monkeypatch.setattr(utils, "_swap_in", refuse)
    with pytest.raises(OSError, match=r"^no swap here: the folder is on a read-only mount$"):
        with atomic_dir(tmp_path / "out"):
            pass


def test_atomic_dir_replaces_the_whole_directory_or_nothing(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "old-only.txt").write_text("1")
        (tmp / "both.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "both.txt").write_text("2")
            raise RuntimeError("failed half-way")
    assert {p.name: p.read_text() for p in target.iterdir()} == {"old-only.txt": "1", "both.txt": "1"}
    with atomic_dir(target) as tmp:
        (tmp / "both.txt").write_text("3")
    assert {p.name: p.read_text() for p in target.iterdir()} == {"both.txt": "3"}  # nothing old lingers
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old copy left beside it


def test_a_failed_atomic_dir_removes_the_folders_it_created_and_only_those(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "kept" / "a" / "b" / "out") as tmp:
            (tmp / "x.txt").write_text("1")
            raise RuntimeError("failed half-way")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any((tmp_path / "kept").iterdir())
    # A created folder that another writer has put something in since stays, with its parents.
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "kept" / "a" / "b" / "out"):
            (tmp_path / "kept" / "a" / "other.txt").write_text("theirs")
            raise RuntimeError("failed half-way")
    assert [p.name for p in (tmp_path / "kept" / "a").iterdir()] == ["other.txt"]
    with atomic_dir(tmp_path / "new" / "out") as tmp:
        (tmp / "x.txt").write_text("1")
    assert (tmp_path / "new" / "out" / "x.txt").read_text() == "1"


def _old_version_two_renames(tmp_path, monkeypatch):
    """``tmp_path/out`` with a first version written, the atomic swap switched off (the
    two-rename fallback of systems without renameat2), and the real ``Path.rename`` to wrap."""
    from pathlib import Path

    monkeypatch.setattr(utils, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    return target, Path.rename


def test_atomic_dir_restores_the_old_version_when_the_final_rename_fails(tmp_path, monkeypatch):
    """Without an atomic swap, the old version is moved aside before the new one is renamed
    into place; when that second rename failed, ``path`` was absent and the old version hidden
    as .out.old-*."""
    from pathlib import Path

    target, real_rename = _old_version_two_renames(tmp_path, monkeypatch)

    def rename(self, dest):
        if self.name.startswith(".out.tmp-"):
            raise OSError(28, "No space left on device")
        return real_rename(self, dest)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="No space left"):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("new")
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a.txt": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_files_written_into_an_atomic_dir_get_the_umasks_permissions(tmp_path):
    """safetensors writes its file 0600: checkpoints and exports were unreadable to the group."""
    import os

    from safetensors.torch import save_file

    umask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
            (tmp / "sub").mkdir()
            (tmp / "sub" / "note.txt").write_text("x")
            (tmp / "sub" / "note.txt").chmod(0o600)
    finally:
        os.umask(umask)
    for name in ("model.safetensors", "sub/note.txt"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644, name


@contextlib.contextmanager
def _locked(folder):
    """What a live writer holds on its temporary folder."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(fd)


def test_atomic_dir_clears_what_killed_writers_left(tmp_path):
    """SIGKILL (the OOM killer) leaves a temporary folder no finally removed, gigabytes for a
    half-prepared corpus. The next write of the same path removes a dead writer's temporary
    folder and restores a previous version it moved aside and died before replacing. A live
    writer (its folder's lock held, whatever its PID namespace), another machine's entries, other
    paths' entries and symlinks are left alone."""
    from cramkit.utils import _host, clear_abandoned

    host = _host()
    stale = tmp_path / f".data.tmp-1-1-{host}"
    (stale / "shards").mkdir(parents=True)
    (stale / "shards" / "train-00000.bin").write_bytes(b"\0" * 64)
    live = tmp_path / f".data.tmp-999999999-2-{host}"  # no such PID here: another namespace
    remote = tmp_path / ".data.tmp-1-3-0badf00d"
    other = tmp_path / f".other.tmp-1-4-{host}"
    for d in (live, remote, other):
        d.mkdir()
    link = tmp_path / f".data.tmp-1-5-{host}"
    link.symlink_to(other)
    with _locked(live):  # a writer at work: its lock is what says so, not its PID
        with atomic_dir(tmp_path / "data") as tmp:
            (tmp / "x").write_text("1")
            # The writer's own folder is locked from the moment it is visible under its name.
            clear_abandoned(tmp_path / "data")
            assert tmp.is_dir()
    left = {live.name, remote.name, other.name, link.name, "data"}
    assert {p.name for p in tmp_path.iterdir()} == left
    # Died between its two renames: the previous version is hidden, the new one unfinished.
    moved = tmp_path / f".ckpt.old-9-6-{host}"
    moved.mkdir()
    (moved / "meta.json").write_text("{}")
    (tmp_path / f".ckpt.tmp-9-6-{host}").mkdir()
    with atomic_dir(tmp_path / "ckpt-2"):  # another path: nothing of ckpt's is touched
        pass
    assert moved.exists()
    clear_abandoned(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "meta.json").read_text() == "{}"
    assert {p.name for p in tmp_path.iterdir()} == left | {"ckpt", "ckpt-2"}
    # A folder cramkit alone writes into (checkpoints) is swept for every name; the writer of
    # `live` has let go of its lock by now, so its folder goes too.
    with atomic_dir(tmp_path / "ckpt-3", clear_folder=True):
        pass
    assert {p.name for p in tmp_path.iterdir()} == {remote.name, link.name, "data", "ckpt", "ckpt-2", "ckpt-3"}


def test_an_interrupt_between_the_two_renames_keeps_the_previous_version(tmp_path, monkeypatch):
    """Without an atomic swap: a signal's KeyboardInterrupt can arrive inside Path.rename, after
    the system call: the previous version was moved aside, the new one not yet in place, and the
    folder was missing."""
    from pathlib import Path

    target, real_rename = _old_version_two_renames(tmp_path, monkeypatch)

    def rename(self, dest):
        result = real_rename(self, dest)
        if self == target:  # the previous version has just been moved aside
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("new")
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a.txt": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.skipif(utils._renameat2() is None, reason="no renameat2 in this C library: the two-rename swap is used")
def test_writers_of_one_path_at_the_same_time_never_fail_each_other(tmp_path):
    """Two exports to one folder at once: the two-rename swap failed one of them when the other
    moved the folder aside between its check and its rename (336 of 2400 writes in a stress run).
    Swapped in one step, every write succeeds, the last one wins whole, and nothing is left."""
    import threading

    target, errors = tmp_path / "out", []

    def write(worker: int) -> None:
        for i in range(40):
            try:
                with atomic_dir(target) as tmp:
                    for name in "abc":
                        (tmp / name).write_text(f"{worker}-{i}")
            except OSError as exc:  # pragma: no cover - what this test is here to catch
                errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({p.read_text() for p in target.iterdir()}) == 1  # one writer's complete version
    assert {p.name for p in target.iterdir()} == set("abc")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_filesystem_without_an_atomic_swap_falls_back_to_two_renames(tmp_path, monkeypatch):
    import ctypes

    def unsupported(*args):
        ctypes.set_errno(errno.EINVAL)  # what renameat2 says on a filesystem without RENAME_EXCHANGE
        return -1

    monkeypatch.setattr(utils, "_renameat2", lambda: unsupported)
    target = tmp_path / "out"
    for version in ("old", "new"):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text(version)
    assert (target / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    def failing(*args):
        ctypes.set_errno(errno.EACCES)
        return -1

    monkeypatch.setattr(utils, "_renameat2", lambda: failing)
    with pytest.raises(PermissionError, match="out"):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("denied")
    assert (target / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
