"""How long a cramkit command takes to start: ``cramkit --help`` (parsing, imports, plugin
registration) timed in fresh interpreters, for one or more source trees side by side.

    PYTHONPATH=src python benchmarks/startup_time.py --src before=/tmp/old/src --src after=src --runs 7

Each run starts every tree once, in turn, so that a machine's load drifts over all of them
alike; the table gives each tree's median and its ratio to the first. Every command, every
torchrun rank and every test that starts a process pays this once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def time_help(src: Path) -> float:
    """Seconds for ``python -m cramkit --help`` importing cramkit from ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cramkit", "--help"], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"error: cramkit --help from {src} failed: {done.stderr.strip().splitlines()[-1:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", action="append", default=[], metavar="LABEL=PATH",
                    help="a source tree to time (repeatable; default: this checkout's src)")
    ap.add_argument("--runs", type=int, default=7, help="starts per tree (default 7)")
    ap.add_argument("--json", type=Path, help="also write the timings here")
    args = ap.parse_args(argv)
    if args.runs < 1:
        raise SystemExit("error: --runs must be >= 1")
    trees = {}
    for spec in args.src or [f"this={Path(__file__).resolve().parents[1] / 'src'}"]:
        label, sep, path = spec.partition("=")
        if not sep or not (Path(path) / "cramkit").is_dir():
            raise SystemExit(f"error: --src {spec}: expected LABEL=PATH with PATH/cramkit a package")
        trees[label] = Path(path)
    seconds: dict[str, list[float]] = {label: [] for label in trees}
    for _ in range(args.runs):
        for label, src in trees.items():
            seconds[label].append(time_help(src))
    first = statistics.median(next(iter(seconds.values())))
    print(f"cramkit --help, {args.runs} start(s) per tree, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| tree | median s | × first | all s |")
    print("| --- | ---: | ---: | --- |")
    for label, values in seconds.items():
        median = statistics.median(values)
        print(f"| {label} | {median:.2f} | {median / first:.2f} | {' '.join(f'{v:.2f}' for v in values)} |")
    if args.json:
        args.json.write_text(json.dumps({"python": sys.version.split()[0], "runs": args.runs,
                                         "trees": {k: str(v) for k, v in trees.items()}, "seconds": seconds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
