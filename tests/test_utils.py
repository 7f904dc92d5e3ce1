"""Atomic writers: a failed write leaves the previous version, and files get normal permissions."""

from __future__ import annotations

import os
import stat

import pytest

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
