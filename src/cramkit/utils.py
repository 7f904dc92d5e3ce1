"""Small helpers shared across modules: atomic writes, hashing, seeding."""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import CramkitError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    An interrupted write never leaves a file at ``path`` that looks complete.
    """
    path = Path(path)
    if path.is_dir():  # else os.replace fails naming the temporary file, not the user's path
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name made here with the umask's permissions (mkstemp's file is mode 0600 and
    # would leave run files unreadable to the group). Made here rather than by the block so that
    # a folder that takes no files (/proc) is reported under the user's path, not this name.
    tmp_path = path.parent / f".{path.name}.{os.getpid()}-{time.time_ns()}-{secrets.token_hex(4)}.tmp"
    with _named_as(path):
        tmp_path.touch(exist_ok=False)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, clear_folder: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; it replaces ``path`` (a directory,
    if there is one, with everything in it) only if the block succeeds.

    A failed or interrupted write leaves ``path`` as it was (absent, or the previous version),
    removes the folders above it that it created, and no file of a previous version survives
    next to the new ones. What killed writers of
    ``path`` left beside it is cleared first (:func:`clear_abandoned`); with ``clear_folder``,
    what they left for any name in its folder (a folder cramkit alone writes into, such as a
    run's checkpoints, whose next write has another name).
    """
    path = Path(path)
    created = missing_folders(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        clear_abandoned(path, every_name=clear_folder)
        token = _token()
        tmp = path.parent / f".{path.name}.tmp-{token}"
        with contextlib.ExitStack() as held:
            with _named_as(path):
                held.enter_context(_new_locked_dir(path.parent / f".{path.name}.new-{token}", tmp))
            try:
                yield tmp
                _umask_modes(tmp)
                with _named_as(path):
                    _swap_in(tmp, path, path.parent / f".{path.name}.old-{token}")
            finally:
                if tmp.is_dir() and not tmp.is_symlink():
                    shutil.rmtree(tmp, ignore_errors=True)
                elif tmp.exists() or tmp.is_symlink():  # a file the swap found at ``path``
                    tmp.unlink()
    except BaseException:
        remove_empty(created)  # a failed export to a new a/b/out leaves no empty a/b behind either
        raise


@contextlib.contextmanager
def _named_as(path: Path) -> Iterator[None]:
    """An OSError raised in the block names ``path``: the temporary names beside it mean
    nothing to the user."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:  # not a system call's error: nothing names a file
            raise
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None


def missing_folders(folder: str | os.PathLike) -> list[Path]:
    """``folder`` and the folders above it that do not exist yet, deepest first: what making
    ``folder`` creates, for :func:`remove_empty` to take back should the work in it fail."""
    folder = Path(folder)
    return [p for p in (folder, *folder.parents) if not p.exists()]


def remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first, as :func:`missing_folders` lists them) while they are
    empty: the first one that is not (another writer's files since) ends it, with all above."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty, or gone
            break


def _swap_in(tmp: Path, path: Path, old: Path) -> None:
    """Put ``tmp`` in place of ``path``; the previous version, if any, ends up deleted.

    Where the kernel can swap two names in one step (Linux's ``renameat2``), ``path`` always
    names a complete version, and writers of the same path at the same time never fail each
    other: the last to swap wins (the previous version lands at ``tmp``, which the caller
    deletes). Elsewhere the previous version is moved aside to ``old`` first; an exception in
    between (a signal's interrupt can arrive inside ``rename``, after the system call) puts it
    back unless the new one is already in place.
    """
    for _ in range(100):  # each retry follows another writer's swap, which this one then undoes
        if not path.exists():
            try:
                tmp.rename(path)
                return
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                continue  # another writer's version arrived meanwhile: swap with it
        try:
            if _exchange(tmp, path):
                return
        except FileNotFoundError:
            continue  # another writer moved it aside meanwhile
        break  # no atomic swap here
    try:
        path.rename(old)
        tmp.rename(path)
    except BaseException:
        if old.exists() and not path.exists():
            old.rename(path)
        raise
    shutil.rmtree(old, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


@functools.cache
def _renameat2():
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28 and later, musl 1.2.3 and later
    except (ImportError, OSError, AttributeError, TypeError):  # TypeError: CDLL(None) on Windows
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` (both must exist) in one step; False where this system or
    filesystem cannot (not Linux, an old kernel or C library, some network filesystems)."""
    import ctypes

    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


# ``.NAME.tmp-TOKEN`` (locked while written) and ``.NAME.old-TOKEN`` (the previous version,
# moved aside), TOKEN = PID-NANOSECONDS-MACHINE. MACHINE: 8 hex digits of a hash of the host name
# and the running kernel's boot id, short whatever the name; flock on a network filesystem's
# directories is local to each client, so only this machine's own entries can be judged.
# ``.NAME.new-TOKEN`` is a folder not yet locked: never judged at all.
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<token>\d+-\d+-(?P<host>[0-9a-f]{8}))$")


@functools.cache
def _host() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return hashlib.blake2b(f"{socket.gethostname()}/{boot}".encode(), digest_size=4).hexdigest()


def _token() -> str:
    return f"{os.getpid()}-{time.time_ns()}-{_host()}"


def lock_exclusive(path: str | os.PathLike, *, open_flags: int = os.O_RDONLY, wait: bool = False) -> int | None:
    """Open ``path`` and take an exclusive ``flock`` on it: the descriptor (closing it releases
    the lock, as the end of the process does, however it ends), or None where no lock can be
    had (no fcntl, ``path`` cannot be opened, a filesystem without locks). Without ``wait``,
    a lock another process holds raises BlockingIOError.
    """
    try:
        import fcntl

        fd = os.open(path, open_flags, 0o666)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise BlockingIOError(exc.errno, os.strerror(exc.errno), str(path)) from None
        return None
    return fd


@contextlib.contextmanager
def _new_locked_dir(new: Path, name: Path) -> Iterator[None]:
    """Make the folder ``name`` and hold an exclusive ``flock`` on it while the block runs.

    The kernel drops the lock when the process ends, however it ends (SIGKILL, the OOM killer),
    so a held lock marks a live writer, in any PID namespace and whatever PID a restarted
    process got; a process id could not. The folder is made as ``new`` (a name no clean-up
    reads), locked, and only then renamed to ``name``, so no other writer ever sees it unlocked.
    """
    new.mkdir()  # mkdir, not mkdtemp: the umask's permissions (mkdtemp's are 0700)
    fd = None
    try:
        # A folder just made: nobody else holds it. None (no flock here): writes work, and
        # nothing is ever cleared.
        fd = lock_exclusive(new, wait=True)
        new.rename(name)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        if fd is not None:
            os.close(fd)
        raise
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def _if_abandoned(entry: Path) -> Iterator[bool]:
    """True (and the entry's lock held for the block) only when ``entry`` is a real directory
    whose lock nobody holds; False where that cannot be told (no flock, a symlink, a file)."""
    fd = None
    if not entry.is_symlink() and entry.is_dir():
        with contextlib.suppress(BlockingIOError):  # held by a live writer
            fd = lock_exclusive(entry, open_flags=os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)


def clear_abandoned(path: Path, every_name: bool = False) -> None:
    """Clear what killed :func:`atomic_dir` writers of ``path`` (with ``every_name``, of any
    name in its folder) left beside it.

    SIGKILL, the OOM killer or a power cut leave no ``finally`` to remove a temporary folder,
    which can be gigabytes (a half-prepared corpus) that nothing else would ever delete. Only
    entries written on this machine since it booted, and whose writer's lock nobody holds, are
    touched. A temporary folder is deleted. A previous version its writer moved aside is deleted
    when a version of its path is in place, and renamed back when there is none (the writer died
    between its two renames) and no live writer of that path is at work.
    """
    folder, host = path.parent, _host()
    try:
        entries = [(e, m) for e in folder.iterdir() if (m := _LEFTOVER.match(e.name))
                   and (every_name or m["name"] == path.name) and m["host"] == host]
    except OSError:
        return
    live: set[str] = set()  # names a live writer is writing
    for entry, m in entries:
        if m["kind"] != "tmp":
            continue
        with _if_abandoned(entry) as abandoned:
            if abandoned:
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.exists():
                live.add(m["name"])
    for entry, m in entries:
        if m["kind"] != "old" or (folder / f".{m['name']}.tmp-{m['token']}").exists():
            continue  # its writer is still between its renames (or could not be told dead)
        target = folder / m["name"]
        with _if_abandoned(entry) as abandoned:
            if not abandoned:
                continue
            if target.exists():
                shutil.rmtree(entry, ignore_errors=True)
            elif m["name"] not in live:
                with contextlib.suppress(OSError):  # failing that, the old version stays as it is
                    entry.rename(target)


def _current_umask() -> int:
    # Read, not set: os.umask(0) and back would leave a moment in which other threads' new files
    # are world-writable. /proc has it on Linux; elsewhere the set-and-restore is the only way.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _umask_modes(folder: Path) -> None:
    # Files get the umask's permissions, as any file the user writes would: safetensors' save_file
    # (checkpoints, exports) creates its file 0600, which left a run's weights unreadable to the
    # group that can read everything else in it.
    umask = _current_umask()
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            f.chmod(0o666 & ~umask)


def host_memory() -> int | None:
    """Bytes of physical memory on this machine, or None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def beyond_host_memory(values: int) -> str | None:
    """``take N GB in fp32, more than this machine's M GB of memory`` when ``values`` fp32
    numbers do not fit in this machine's memory; None when they do, or the system does not say."""
    host = host_memory()
    if host is None or 4 * values <= host:
        return None
    return f"take {4 * values / 1e9:,.0f} GB in fp32, more than this machine's {host / 1e9:,.0f} GB of memory"


def looked_in(path: str | os.PathLike) -> str:
    """`` in the working directory, CWD`` for a relative ``path`` that was not found there (a
    recipe's paths are read from there, not beside the recipe file), else nothing."""
    return "" if Path(path).is_absolute() else f" in the working directory, {Path.cwd()}"


def paths_overlap(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` (resolved, so links and ``..`` count) are the same path or one
    lies inside the other: replacing either as a whole would destroy (part of) the other."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


def refuse_current_folder(out: str | os.PathLike, error: type[CramkitError], example: str) -> None:
    """An output folder that atomic_dir would replace must not be the current folder or hold it:
    renaming onto "." fails (EBUSY), and onto its absolute path leaves this process and the
    user's shell in the replaced (deleted) folder. ``example`` names a subfolder to suggest."""
    out, cwd = Path(out), Path.cwd().resolve()
    if out.resolve() in (cwd, *cwd.parents):
        raise error(f"--out {out} is the current folder (or holds it); choose a folder to create, "
                    f"e.g. --out {out / example}")


def read_text(path: str | os.PathLike, error: type[CramkitError]) -> str:
    """A UTF-8 text file; ``error`` names the file (and line) when it cannot be read or decoded.

    A damaged or binary file must be a one-line error, not a UnicodeDecodeError traceback.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise error(f"{path} line {line}: not UTF-8 text (the file is damaged or binary)") from None


def read_json(path: str | os.PathLike, error: type[CramkitError]) -> dict[str, Any]:
    """A JSON object from ``path``; ``error`` (a CramkitError subclass) names the file and line
    when the file is unreadable, not JSON (e.g. truncated) or not an object."""
    return json_object(read_text(path, error), path, error)


def json_object(text: str, path: str | os.PathLike, error: type[CramkitError], line: int | None = None) -> dict[str, Any]:
    """``text`` parsed as a JSON object; ``error`` names ``path`` and the line (``line``, for one
    line of a JSON Lines file, else the parser's) when it is not JSON or not an object."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path} line {line or exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise error(f"{path}{f' line {line}' if line else ''}: expected a JSON object, got {type(data).__name__}")
    return data


def add_unique(table: dict[str, Any], name: str, obj: Any, kind: str) -> None:
    """``table[name] = obj``, refusing a second, different object under one name: a plugin that
    picked a shipped name would otherwise replace it silently, in one registry and not another.
    The same definition imported again (its module reloaded) replaces the first."""
    old = table.get(name)
    same = old is obj or (old is not None and (getattr(old, "__module__", None), getattr(old, "__qualname__", None))
                          == (getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)))
    if old is not None and not same:
        raise TypeError(f"{kind} '{name}' is registered twice ({_where(old)} and {_where(obj)})")
    table[name] = obj


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys, sorted, whose values differ between ``old`` and ``new`` (a key one lacks counts
    as None there): what changed between a saved configuration and the current one."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def finite_or_none(value: Any) -> Any:
    """``value`` with NaN and infinities (a diverged run's loss) as None, in nested dicts and
    lists too: strict JSON has neither, and strict readers (jq, JavaScript) reject Python's
    bare ``NaN``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def strict_json(data: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`finite_or_none` of ``data``: text every JSON reader accepts."""
    return json.dumps(finite_or_none(data), allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, data: Any, default: Any = None) -> None:
    """Write strict JSON atomically (``default`` is json.dumps's, for values JSON has no type
    for; non-finite numbers become null)."""
    with atomic_path(path) as tmp:
        tmp.write_text(strict_json(data, indent=2, sort_keys=False, default=default) + "\n")


def append_jsonl(path: str | os.PathLike, record: Any, default: Any = None) -> None:
    """Append ``record`` to ``path`` as one JSON line (the folder is made if needed): records
    saved as each run ends, so that a process cut short keeps what finished. ``default`` is
    json.dumps's, for values JSON has no type for."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(strict_json(record, default=default) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def accept_late_overrides(parser: argparse.ArgumentParser) -> None:
    """Let ``key=value`` overrides follow options (``RUN --task t lr=1e-4``, ``pretrain --resume RUN
    budget=2h``) into ``overrides``.

    Plain argparse binds a ``nargs="*"`` positional once, to the first run of positionals, and
    rejects any that come after an option.
    """

    class Parser(type(parser)):
        def parse_known_args(self, args=None, namespace=None):
            ns, extras = super().parse_known_args(args, namespace)
            late = [a for a in extras if "=" in a and not a.startswith("-")]
            ns.overrides = list(getattr(ns, "overrides", None) or []) + late
            return ns, [a for a in extras if a not in late]

    parser.__class__ = Parser


def launched_by_torchrun() -> bool:
    """Whether this process is one of torchrun's workers (or another launcher's with a world of
    several processes)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def first_on_machine() -> bool:
    """Whether this process speaks for its machine: always outside torchrun, else the one with
    ``LOCAL_RANK`` 0 (under torchrun every machine's processes would repeat the same lines)."""
    return not launched_by_torchrun() or int(os.environ.get("LOCAL_RANK", "0") or 0) == 0
