"""The ``cramkit`` command line: prepare | pretrain | show-config | recipes | finetune | evaluate | predict
| export | bench | report.

Every subcommand module exposes ``add_parser(subparsers)`` and sets ``func`` (returning an exit
code); user mistakes surface as one ``error:`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import warnings

from .errors import ConfigError, CramkitError, RankFailed, Terminated
from .utils import first_on_machine, launched_by_torchrun, strict_json

# Modules that register subcommands, in help order.
COMMAND_MODULES = ("cramkit.train.cli", "cramkit.data.cli", "cramkit.eval.cli", "cramkit.bench",
                   "cramkit.report")
#: Commands that run as one of torchrun's ranks; the others work in one process.
TORCHRUN_COMMANDS = ("pretrain",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cramkit",
        description="Train transformer language models efficiently under a fixed budget.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # an optional part missing its extra must not break the rest
            warnings.warn(f"{name} unavailable: {exc}", stacklevel=1)
            continue
        module.add_parser(sub)
    return parser


def format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the command line shows it: ``warning: MESSAGE``, one line.

    Python's default format names cramkit's own source file and line and then prints that line
    of code (``trainer.py:330: UserWarning: received SIGINT ...`` + ``warnings.warn(...)``),
    which tells a user nothing.
    """
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cramkit`` console script."""
    previous_format, warnings.formatwarning = warnings.formatwarning, format_warning
    try:
        return _main(argv)
    except KeyboardInterrupt:  # ^C while the command starts (imports), before _main's handler
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous_format


def _terminate(signum, frame) -> None:
    # Python's default for SIGTERM ends the process on the spot: no ``finally`` runs, so a
    # ``prepare`` stopped by a scheduler's time limit left its half-written temporary folder,
    # and a run stopped during set-up its half-made directory. As an interrupt it takes the way
    # out ^C takes: what was half-written is removed, status 130.
    raise Terminated


def _main(argv: list[str] | None) -> int:
    from .plugins import load_plugins

    try:  # before the parser: --help lists the options of the techniques plugins register
        load_plugins()
    except CramkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = signal.getsignal(signal.SIGTERM)
    installed = previous is not signal.SIG_IGN  # a parent that has us ignore SIGTERM keeps it so
    try:
        if installed:
            signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (an embedding program's worker): leave it be
        installed = False
    try:
        several = launched_by_torchrun() and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
        if several and args.command not in TORCHRUN_COMMANDS:
            # Each rank would do the whole job on its own: N fine-tunes writing one result file,
            # N exports racing for one folder, every line printed N times.
            raise ConfigError(f"cramkit {args.command} runs in one process; run it without torchrun "
                              f"(only {' and '.join(TORCHRUN_COMMANDS)} uses several)")
        return int(args.func(args) or 0)
    except CramkitError as exc:
        if not said_on_this_machine(exc):
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        # A size typed a few digits too long (prepare --seq-len 1000000000000, a rotary table of
        # model.max_positions=1e12) that no check before caught: what was half-written is gone
        # (the writers remove it on any exception); a traceback would add nothing for the user.
        print("error: out of memory on this machine: check the sizes this command was given (model.*, "
              "seq_len, vocab_size, batch and micro-batch)", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # What reads the output went away (`cramkit predict ... | head`): stop quietly, as a Unix
        # tool killed by SIGPIPE does, with its status. stdout goes to /dev/null first, or the
        # interpreter's own flush at exit fails on the pipe again and prints a traceback.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE (13), as a shell reports it
    except OSError as exc:
        # A path given on the command line that cannot be used (a file where a folder must be,
        # no permission, a full disk) is a user's mistake as well: one line, naming the path.
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("terminated" if isinstance(exc, Terminated) else "interrupted", file=sys.stderr)
        return 130
    finally:
        if installed:  # None: a handler not set from Python, which getsignal cannot return
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def said_on_this_machine(exc: CramkitError) -> bool:
    """Whether another process on this machine prints the same error: under torchrun every rank
    meets the same mistake in a config, and rank 0's failure reaches every other rank as
    :class:`RankFailed`, so those are printed by each machine's first process
    (:func:`~cramkit.utils.first_on_machine`) alone, not once per GPU. Any other error may be one rank's own and is always printed."""
    return isinstance(exc, (ConfigError, RankFailed)) and not first_on_machine()


def describe_os_error(exc: OSError) -> str:
    """``PATH: reason`` for an OSError, e.g. ``runs/x.txt/run: Not a directory``."""
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    # EEXIST means a file stands where a folder must: cramkit's mkdirs pass exist_ok=True, or
    # create a fresh unique name (atomic_dir's temporary folder), or catch EEXIST for a folder
    # that exists and re-raise it only for a file (new_run_dir).
    reason = "exists and is not a directory" if isinstance(exc, FileExistsError) else exc.strerror
    reason = reason or str(exc)
    return f"{paths}: {reason}" if paths else reason


def print_json(data) -> None:
    print(strict_json(data, indent=2))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
