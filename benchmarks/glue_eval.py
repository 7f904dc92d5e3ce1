"""GLUE-dev evaluation of a pretraining run, pretrained vs random init (for the GPU machine).

Usage::

    python benchmarks/glue_eval.py RUN_DIR --data ../shared/data/glue [--tasks cola,sst2] \
        [--seeds 5] [key=value ...]

Runs ``cramkit evaluate`` twice — the run's checkpoint and a random initialisation of the same
shape (the "no pretraining" control) — with cramming's GLUE-sane fine-tuning recipe, writes
``RUN_DIR/eval/glue.md|json`` and ``glue-random.md|json`` (with ``--tasks``, the names are in
the file names: ``glue-cola-rte.md``), and prints both tables plus the gap.
On a GPU the fine-tuning runs under bf16 autocast. Only tasks with train and dev files in
``--data`` are run (the shared copy has no MNLI/QQP, and QNLI has no train split).
"""

from __future__ import annotations

import argparse
import sys
import time

from cramkit.configbase import apply_overrides
from cramkit.errors import CramkitError
from cramkit.eval.finetune import FinetuneConfig, load_backbone
from cramkit.eval.suite import evaluate_glue, render_markdown
from cramkit.utils import append_jsonl


def _record(path: str, init: str, entry: dict) -> None:
    """Append ``entry`` (tagged with its init) as one JSON line to ``path`` (none when empty)."""
    if path:
        append_jsonl(path, {"init": init, **entry}, default=str)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--data", required=True, help="GLUE directory (original TSV layout)")
    parser.add_argument("--tasks", default=None, help="comma-separated subset")
    parser.add_argument("--seeds", type=int, default=5, help="fine-tuning seeds per task")
    parser.add_argument("--inits", default="pretrained,random",
                        help="which initialisations to fine-tune: pretrained, random or both (comma list)")
    parser.add_argument("--records", default="",
                        help="append one JSON line per scored task (and per finished init) to this file, "
                             "as each ends: a run cut short keeps what it scored")
    parser.add_argument("overrides", nargs="*", help="FinetuneConfig key=value overrides")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = FinetuneConfig.from_dict(
            apply_overrides({"seeds": list(range(args.seeds))}, args.overrides), path="finetune"
        )
        tasks = args.tasks.split(",") if args.tasks else None
        inits = {x.strip() for x in args.inits.split(",") if x.strip()}
        if not inits or inits - {"pretrained", "random"}:
            parser.error(f"--inits takes pretrained and/or random, not {args.inits!r}")
        backbone = load_backbone(args.run_dir)
        reports = {}
        for label, bb in (("pretrained", backbone), ("random", backbone.as_random())):
            if label not in inits:
                continue
            start = time.perf_counter()
            reports[label] = evaluate_glue(args.run_dir, args.data, tasks, cfg, backbone=bb,
                                           on_result=lambda r, label=label: _record(args.records, label, r))
            _record(args.records, label, {"summary": reports[label]["summary"],
                                          "seconds": round(time.perf_counter() - start, 1)})
            print(render_markdown(reports[label]))
            print(
                f"[{label}] {time.perf_counter() - start:.0f} s; files: {reports[label]['paths']}\n"
            )
    except CramkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if len(reports) == 2:
        pre, rnd = (reports[k]["summary"] for k in ("pretrained", "random"))
        print("| entry | pretrained | random init | gain |")
        print("| --- | ---: | ---: | ---: |")
        for entry, score in pre["scores"].items():
            other = rnd["scores"].get(entry)
            print(f"| {entry} | {score:.2f} | {other:.2f} | {score - other:+.2f} |")
        if pre["average"] is not None and rnd["average"] is not None:
            print(
                f"| **average** | **{pre['average']:.2f}** | **{rnd['average']:.2f}** | "
                f"**{pre['average'] - rnd['average']:+.2f}** |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
