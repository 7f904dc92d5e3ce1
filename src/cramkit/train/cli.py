"""CLI for pretraining: ``pretrain``, ``show-config``, ``recipes``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import load_config, recipe_names
from ..utils import accept_late_overrides


def config_help() -> str:
    """Every run-config key with its help text, for ``cramkit pretrain --help``."""
    import dataclasses

    from ..config import RunConfig
    from ..configbase import Config

    lines = ["config keys (key=value; `cramkit show-config RECIPE` prints a recipe's values):"]

    def walk(cls, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if isinstance(default, Config):
                walk(type(default), f"{prefix}{f.name}.")
            else:
                lines.append(f"  {prefix}{f.name}: {f.metadata.get('help', '')}")

    walk(RunConfig, "")
    from ..models.presets import PRESETS
    from ..techniques import TECHNIQUES

    lines.append("  budget: short for train.budget (e.g. budget=2h, budget=500steps, budget=20Mtok)")
    lines.append(f"  model.preset: a model preset ({', '.join(PRESETS)}) whose fields the other model.* keys override")

    lines.append("technique options (technique.NAME.KEY=VALUE, with NAME in techniques=[...]):")
    for name, cls in TECHNIQUES.items():
        for f in dataclasses.fields(cls.Options):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(f"  technique.{name}.{f.name}={default}: {f.metadata.get('help', '')}")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="train a model from scratch under a budget",
        epilog=config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train RECIPE (a shipped recipe name or a TOML file) under its budget. key=value "
            "overrides use dotted paths, e.g. train.budget=10min model.layers=4 techniques=[pld]. "
            "With --resume RUN_DIR, continue that run (overrides such as budget=2h extend it)."
        ),
    )
    p.add_argument("recipe", nargs="?", help="recipe name or path (see `cramkit recipes`)")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest intact checkpoint")
    p.set_defaults(func=run_pretrain)
    accept_late_overrides(p)

    s = sub.add_parser("show-config", help="print the resolved config of a recipe with overrides",
                       description="Print RECIPE's resolved run config as JSON, with key=value overrides "
                                   "applied (the keys are listed in `cramkit pretrain --help`): what a run "
                                   "records in its config.json, every enabled technique's options and the "
                                   "schedule's defaults written out. Only model.document_boundary_id is left "
                                   "unset, which a run with model.document_mask=true takes from its data.")
    s.add_argument("recipe", help="recipe name or path (see `cramkit recipes`)")
    s.add_argument("overrides", nargs="*", default=[], help="key=value overrides, e.g. train.budget=2h model.layers=4")
    s.set_defaults(func=run_show_config)

    r = sub.add_parser(
        "recipes", help="list the shipped recipes",
        description="List the shipped recipes, one a line: name, architecture (bert or gpt), budget and "
                    "what the recipe is for. `cramkit show-config NAME` prints one's whole config; "
                    "`cramkit pretrain NAME` trains it.",
    )
    r.set_defaults(func=run_recipes)


def _split_overrides(args) -> tuple[str | None, list[str]]:
    # `cramkit pretrain --resume RUN budget=2h`: argparse puts the first override in `recipe`.
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe and "=" in recipe:
        overrides.insert(0, recipe)
        recipe = None
    return recipe, _expand(overrides)


def _expand(overrides: list[str]) -> list[str]:
    """``budget=2h`` is short for ``train.budget=2h``."""
    return [("train." + o) if o.startswith("budget=") else o for o in overrides]


def run_pretrain(args: argparse.Namespace) -> int:
    from ..distributed.parallel import leave_process_group

    try:
        return _pretrain(args)
    finally:  # under torchrun, leave the process group after a failure too (no barrier then)
        leave_process_group(clean=False)


def _pretrain(args: argparse.Namespace) -> int:
    from ..distributed.parallel import leave_process_group
    from ..errors import ConfigError
    from .run import pretrain, resume_config

    recipe, overrides = _split_overrides(args)
    if args.resume:
        if recipe:
            raise ConfigError("--resume takes the recipe from the run directory; give only key=value overrides")
        cfg = resume_config(Path(args.resume), overrides)
        _warn_unused_options(cfg, overrides)
        summary = pretrain(cfg, run_dir=Path(args.resume), resume=True)
    else:
        if not recipe:
            raise ConfigError("name a recipe (see `cramkit recipes`), e.g. `cramkit pretrain demo`")
        cfg = load_config(recipe, overrides)
        _warn_unused_options(cfg, overrides)
        summary = pretrain(cfg)
    # Every rank leaves together now, before rank 0's own work (the summary, the fine-tuning
    # demo): the other ranks would otherwise wait at the exit barrier for all of it, and fail
    # with rank 0 if it failed or outlasted the group's timeout.
    leave_process_group(clean=True)
    finished = summary.get("stop_reason") == "budget"
    # A stop signal ends the run cleanly (checkpoint, final evaluation, summary), but it did not
    # finish: 130, as for ^C anywhere else in cramkit, so that scripts can tell.
    status = 0 if finished else 130
    if int(os.environ.get("RANK", "0")) != 0:
        return status
    _print_summary(summary)
    if cfg.finetune_demo and finished:
        from ..eval.finetune import finetune_demo

        print("fine-tuning on the embedded BBC News task (pretrained vs random init) ...")
        r = finetune_demo(summary["run_dir"], progress=sys.stderr.isatty())
        print(f"BBC News topic accuracy on {r['eval_examples']} dev articles (median of 3 fine-tunes on "
              f"{r['train_examples']} training articles, {r['seconds']:.0f} s): "
              f"pretrained {r['pretrained_accuracy']:.1%}, random init {r['random_init_accuracy']:.1%}, "
              f"majority class {r['majority_baseline']:.1%}")
    return status


def _causal(cfg, key: str) -> bool:
    from ..objectives import training_objective

    return key != "objective.name" and training_objective(cfg.model) == "clm"


def _one_process(cfg, key: str) -> bool:
    from ..utils import launched_by_torchrun

    return not launched_by_torchrun()


def _schedule_ignores(cfg, key: str) -> bool:
    # A schedule reads the options its function names: schedule.warmup under the default
    # budget-triangle went into config.json and changed nothing.
    import inspect

    from ..schedules import LR_SCHEDULES

    return key != "schedule.name" and key.partition(".")[2] not in inspect.signature(
        LR_SCHEDULES[cfg.schedule.name]).parameters


def _optimizer_ignores(cfg, key: str) -> bool:
    # optim.base=lamb without optim.name=sam trained AdamW without a word.
    from ..optim.optimizers import settings_read

    reads = settings_read(cfg.optim)
    return reads is not None and key.partition(".")[2] not in reads


def _optimizer_named(cfg) -> str:
    o = cfg.optim
    return f"optim.name=sam with optim.base={o.base}" if o.name == "sam" else f"optim.name={o.name}"


#: Command-line options a run would take and then ignore: ``(prefix, ignores(cfg, key), why)``,
#: ``why`` text or a function of the config. Only the command line's: recipes set such options
#: for every run they serve (a masking rate, an FSDP policy), and a GPT may train under a BERT
#: recipe. In order: a key is named by the first rule that ignores it.
IGNORED_OPTIONS: list[tuple[str, Callable[[Any, str], bool], str | Callable[[Any], str]]] = [
    ("objective.", _causal, "masking options only act on masked-LM runs; this causal-LM run"),
    ("parallel.", _one_process, "parallel options only act under torchrun; this single-process run"),
    ("parallel.fsdp_", lambda cfg, key: cfg.parallel.strategy != "fsdp",
     "FSDP2 options only act with parallel.strategy=fsdp; this run"),
    ("memory.checkpoint_every", lambda cfg, key: cfg.memory.activation_checkpointing != "selective",
     "only selective activation checkpointing reads it; this run"),
    ("schedule.", _schedule_ignores, lambda cfg: f"not read by the {cfg.schedule.name} schedule; this run"),
    ("optim.", _optimizer_ignores, lambda cfg: f"not read by {_optimizer_named(cfg)}; this run"),
    # Recorded in config.json as if the model used them.
    ("model.rotary_base", lambda cfg, key: cfg.model.positions != "rotary",
     "only model.positions=rotary reads it; this run"),
    ("model.document_", lambda cfg, key: key != "model.document_mask" and not cfg.model.document_mask,
     "only model.document_mask=true reads the document-mask options; this run"),
]


def _warn_unused_options(cfg, overrides: list[str]) -> None:
    """Say which options given on the command line this run ignores (:data:`IGNORED_OPTIONS`),
    once (rank 0) under torchrun."""
    import warnings

    if int(os.environ.get("RANK", "0")) != 0:
        return
    keys = [o.partition("=")[0].strip() for o in overrides]
    for prefix, ignores, why in IGNORED_OPTIONS:
        unused = [k for k in keys if k.startswith(prefix) and ignores(cfg, k)]
        if unused:
            keys = [k for k in keys if k not in unused]  # each key named once
            why = why(cfg) if callable(why) else why
            warnings.warn(f"{', '.join(unused)}: {why} ignores {'them' if len(unused) > 1 else 'it'}", stacklevel=2)


def _print_summary(s: dict) -> None:
    def fmt(x):
        return "n/a" if x is None else f"{x:.4f}"

    print(f"run directory: {s['run_dir']}")
    print(f"stopped by {s['stop_reason']} after {s['steps']} steps, {s['tokens']:,} tokens, "
          f"{s['train_seconds']:.1f} s of training ({s['paused_seconds']:.1f} s paused for evaluation, "
          "checkpoints and compilation)")
    # The first record's step: that loss is one step's, logged log_every steps in (a summary
    # from before the step was recorded says so without it).
    first = f"step {s['first_train_step']}" if s.get("first_train_step") is not None else "first logged"
    print(f"train loss: {first} {fmt(s['first_train_loss'])}  end {fmt(s['last_train_loss'])}")
    ppl = s.get("final_val_perplexity")  # causal runs only
    print(f"validation loss: start {fmt(s['initial_val_loss'])}  end {fmt(s['final_val_loss'])}"
          + (f" (perplexity {ppl:.2f})" if ppl is not None else ""))
    print(f"throughput: {s['tokens_per_s']:,.0f} tokens/s, MFU {s['mfu']:.1%}")
    if s.get("energy_kwh") is not None:
        print(f"GPU energy: {s['energy_kwh']:.4f} kWh ({s['kwh_per_billion_tokens']:.2f} kWh per billion tokens)")


def run_show_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, _expand(args.overrides))
    print(json.dumps(cfg.resolved(), indent=2))
    return 0


def run_recipes(args: argparse.Namespace) -> int:
    names = recipe_names()
    width = max(map(len, names), default=0)  # crammed-bert-lamb is longer than a fixed 16
    for name in names:
        cfg = load_config(name)
        print(f"{name:{width}s} {cfg.model.arch:5s} {cfg.train.budget:>8s}  {cfg.description}")
    return 0
