"""The command line: user mistakes are one `error:` line and exit status 2, never a traceback."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cramkit.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["pretrain", "crammed-bart"], "unknown recipe 'crammed-bart'"),
        (["pretrain", "demo", "train.budjet=1h"], "did you mean 'train.budget'"),
        (["pretrain", "demo", "budget=abc"], "budget 'abc' is not understood"),
        (["pretrain", "demo", "techniques=[pdl]"], "did you mean 'pld'"),
        (["pretrain"], "name a recipe"),
        (["pretrain", "--resume", "/nonexistent/run"], "not a cramkit run directory"),
        (["show-config", "demo", "model.layers=two"], "model.layers: expected an integer"),
        (["show-config", "demo", "budget=1.5steps"], "not a whole number of steps"),
        (["show-config", "demo", "out_dir=none"], "out_dir: expected a string, got None"),
        (["pretrain", "demo", "name=../../etc/x"], "name='../../etc/x': a run name is one folder name inside out_dir"),
        (["pretrain", "demo", "name=.."], "(no '/' or '\\', not '.' or '..')"),
        (["show-config", "demo", "hidden=32"], "unknown config key 'hidden' (did you mean 'model.hidden'?)"),
        (["pretrain", "demo", "--resume", "runs/x", "budget=5steps"], "--resume takes the recipe from the run"),
        (["evaluate", "runs/none", "--data", "glue", "--tasks", ","], "--tasks names no task"),
        (["pretrain", "demo", "train.device=cpu", "model.document_mask=true", "model.document_mask_kernel=flex"],
         "document_mask_kernel=flex trains only on CUDA"),
    ],
)
def test_user_mistakes_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_show_config_resolves_overrides(capsys):
    assert main(["show-config", "crammed-bert", "budget=2h", "model.layers=4"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["budget"] == "2h" and cfg["model"]["layers"] == 4 and cfg["model"]["hidden"] == 768


def test_show_config_prints_what_a_run_records_in_config_json(tiny_mlm_data, tmp_path, capsys):
    """show-config printed `"technique": {}` and `"peak_at": null` where the run's config.json
    has every enabled technique's options and the schedule's own peak and start."""
    args = [f"data.dir={tiny_mlm_data}", f"out_dir={tmp_path}", "name=shown", "model.vocab_size=512",
            "train.budget=1steps", "train.micro_batch=4", "train.batch_size=4", "train.progress_bar=false",
            "train.tensorboard=false", "train.plots=false", "finetune_demo=false", "train.eval_batches=1", "techniques=[pld]"]
    assert main(["show-config", "demo", *args]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["technique"]["pld"]["theta_bar"] == 0.5 and shown["schedule"]["peak_at"] == 0.75
    assert main(["pretrain", "demo", *args]) == 0
    assert shown == json.loads((tmp_path / "shown" / "config.json").read_text())
    assert main(["show-config", "demo", "data.dir=/no/such/data", "techniques=[stacking]"]) == 0  # no data read


def test_recipes_lists_shipped_recipes(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "crammed-bert", "bert-original", "gpt-small"):
        assert name in out
    # One column each: the architecture starts at the same place on every line.
    lines = out.splitlines()
    assert len({line.index(" bert ") if " bert " in line else line.index(" gpt ") for line in lines}) == 1


def test_pretrain_and_resume_through_the_cli(tiny_mlm_data, tmp_path, capsys):
    base = [f"data.dir={tiny_mlm_data}", f"out_dir={tmp_path}", "name=cli", "model.vocab_size=512",
            "train.budget=3steps", "train.micro_batch=4", "train.batch_size=4", "train.progress_bar=false",
            "train.tensorboard=false", "finetune_demo=false", "train.eval_batches=1"]
    assert main(["pretrain", "demo", *base]) == 0
    out = capsys.readouterr().out
    assert "stopped by budget after 3 steps" in out and "validation loss" in out
    plots = tmp_path / "cli" / "plots"
    if importlib.util.find_spec("matplotlib") is None:  # the [plot] extra is optional
        assert not plots.exists()
    else:
        assert sorted(p.name for p in plots.iterdir()) == [f"loss-vs-{x}.png" for x in ("flops", "time", "tokens")]
        first = (plots / "loss-vs-tokens.png").read_bytes()
    assert main(["pretrain", "--resume", str(tmp_path / "cli"), "budget=5steps"]) == 0
    out = capsys.readouterr().out
    assert "after 5 steps" in out
    if plots.exists():  # redrawn with the resumed steps
        assert (plots / "loss-vs-tokens.png").read_bytes() != first
    # The resumed summary still knows where the run started.
    assert "validation loss: start n/a" not in out
    # A spent budget is one error line, not announced as a run first ("run: ...", "model: ...").
    assert main(["pretrain", "--resume", str(tmp_path / "cli")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and "already spent its budget of 5steps at step 5" in captured.err


def test_unusable_paths_are_one_line_errors(tiny_mlm_data, tmp_path, capsys):
    """An OSError about a path the user gave (a file where a folder must be, a folder where a
    file must be) used to be a FileExistsError / NotADirectoryError / IsADirectoryError
    traceback."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("precious\n")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n")
    cases = [
        (["prepare", str(corpus), "--out", str(a_file / "data"), "--no-progress"],
         f"{a_file}: exists and is not a directory"),
        (["pretrain", "demo", f"data.dir={tiny_mlm_data}", "model.vocab_size=512", f"out_dir={a_file}",
          "name=r", "train.budget=1steps", "finetune_demo=false"], f"{a_file / 'r'}: Not a directory"),
        (["bench", "cramkit:tiny", "--steps", "1", "--warmup", "0", "--batch", "1", "--seq-len", "8",
          "--json", str(tmp_path)], f"--json {tmp_path} is a folder: name the file to write, e.g. --json bench.json"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == f"error: {message}\n", (argv, err)
    assert a_file.read_text() == "precious\n"


def test_pretrain_leaves_the_process_group_before_rank_0_alone_works_on(tiny_mlm_data, tmp_path, monkeypatch):
    """Under torchrun the other ranks leave as soon as training is done; had the exit barrier
    come after rank 0's fine-tuning demo, they would wait for all of it (and fail with it)."""
    import importlib

    parallel = importlib.import_module("cramkit.distributed.parallel")
    finetune = importlib.import_module("cramkit.eval.finetune")  # the module, not eval's function
    calls = []
    monkeypatch.setattr(parallel, "leave_process_group", lambda clean: calls.append(("leave", clean)))
    monkeypatch.setattr(finetune, "finetune_demo", lambda *a, **k: calls.append(("demo",)) or {
        "train_examples": 1, "eval_examples": 1, "seconds": 0, "pretrained_accuracy": 1, "random_init_accuracy": 0, "majority_baseline": 0})
    argv = ["pretrain", "demo", f"data.dir={tiny_mlm_data}", "model.vocab_size=512", f"out_dir={tmp_path}",
            "name=r", "train.budget=2steps", "train.progress_bar=false", "train.tensorboard=false", "train.plots=false",
            "train.eval_batches=1"]
    assert main(argv) == 0
    assert calls[:2] == [("leave", True), ("demo",)]


def _python(code: str) -> subprocess.CompletedProcess:
    """``code`` run by a fresh interpreter that imports this checkout's cramkit."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_warnings_are_one_line_on_the_command_line(tmp_path):
    """A warning (a stop signal, a compile fallback) reads ``warning: MESSAGE``, not Python's
    ``/path/trainer.py:330: UserWarning: ...`` followed by the line of source that raised it."""
    code = ("import sys, warnings; import cramkit.train.cli as t; "
            "t.run_recipes = lambda args: warnings.warn('received SIGINT: finishing the step', stacklevel=1) or 0; "
            "from cramkit.cli import main; sys.exit(main(['recipes']))")
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "warning: received SIGINT: finishing the step\n"


def test_starting_the_command_line_imports_no_optimizer_library():
    """Every ``cramkit`` command imports the trainer, which registers the optimizers. pytorch_optimizer
    (with transformers behind it) took over a second of each start, ``cramkit --help`` included,
    and of every worker process; the optimizers that use it import it when a run builds them."""
    import ast

    code = ("import sys, cramkit.cli, cramkit.train.run, cramkit.eval.finetune, cramkit.optim; "
            "print(sorted(m for m in ('pytorch_optimizer', 'transformers') if m in sys.modules)); "
            "from cramkit.optim import OPTIMIZERS; print(sorted(OPTIMIZERS))")
    done = _python(code)
    assert done.returncode == 0, done.stderr
    imported, names = done.stdout.splitlines()
    assert imported == "[]"
    assert {"lamb", "lars", "lion", "muon", "sam", "schedulefree"} <= set(ast.literal_eval(names))  # all registered


def test_pretrain_help_lists_every_technique_option(capsys):
    """technique.NAME.KEY=VALUE options were nowhere on the command line (only in docs/)."""
    import dataclasses

    from cramkit.techniques import TECHNIQUES

    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    for name, cls in TECHNIQUES.items():
        for f in dataclasses.fields(cls.Options):
            assert f"technique.{name}.{f.name}=" in out
    assert "technique.pld.theta_bar=0.5: " in out


def test_sequences_longer_than_the_position_table_are_refused_before_the_run_starts(tiny_mlm_data, tmp_path,
                                                                                      capsys):
    # Was found at the first evaluation, after "run: ..." and "model: ..." had been printed.
    argv = ["pretrain", "demo", f"data.dir={tiny_mlm_data}", "model.vocab_size=512", "model.max_positions=16",
            f"out_dir={tmp_path}", "train.budget=1steps", "finetune_demo=false"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"error: the sequences in {tiny_mlm_data} are 32 tokens long, but model.max_positions "
                            "is 16; set model.max_positions=32 or prepare data with a shorter seq_len\n")
    assert list(tmp_path.iterdir()) == []


def test_a_resume_cannot_rename_the_run(tiny_mlm_data, tmp_path, capsys):
    from train.helpers import tiny_config

    from cramkit.train.run import pretrain

    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps"), say=lambda *_: None)
    before = (tmp_path / "run" / "config.json").read_text()
    assert main(["pretrain", "--resume", str(tmp_path / "run"), "budget=4steps", "name=other"]) == 2
    assert "error: name=other differs from the run this run was checkpointed with" in capsys.readouterr().err
    assert (tmp_path / "run" / "config.json").read_text() == before


def test_a_stopped_run_exits_130(monkeypatch, capsys):
    """^C ends a pretraining run cleanly (checkpoint, evaluation, summary) but unfinished: 130,
    as everywhere else in cramkit, so that a script can tell it from a finished run."""

    summary = {"run_dir": "r", "stop_reason": "signal", "steps": 3, "tokens": 96, "train_seconds": 1.0,
               "paused_seconds": 0.0, "first_train_loss": 7.0, "first_train_step": 2, "last_train_loss": 6.0,
               "initial_val_loss": 7.1, "final_val_loss": 6.1, "tokens_per_s": 96.0, "mfu": 0.1}
    monkeypatch.setattr("cramkit.train.run.pretrain", lambda cfg: dict(summary))
    assert main(["pretrain", "demo", "finetune_demo=false"]) == 130
    summary["stop_reason"] = "budget"
    assert main(["pretrain", "demo", "finetune_demo=false"]) == 0
    out = capsys.readouterr().out
    assert "validation loss: start 7.1000  end 6.1000" in out
    assert "train loss: step 2 7.0000  end 6.0000" in out  # the first record's step, not "start"


def test_sigterm_during_prepare_removes_the_half_written_data(tmp_path, monkeypatch, capsys):
    """A scheduler's SIGTERM (a time limit) used to end `cramkit prepare` on the spot, no
    `finally` run, leaving its hidden temporary folder (the size of the corpus) behind. It now
    unwinds like ^C: nothing half-written stays, status 130, one line."""
    import os
    import signal
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "data"))
    from data_helpers import synthetic_docs, write_corpus

    import cramkit.data.prepare as prep

    src = write_corpus(tmp_path / "c.txt", synthetic_docs(60))
    real_count, calls, unhandled = prep._count, [], []

    def count_then_terminate(*args):
        calls.append(1)
        if len(calls) == 5:  # half-way through the documents, the temporary folder written to
            assert [p for p in tmp_path.iterdir() if p.name.startswith(".data.tmp-")]
            os.kill(os.getpid(), signal.SIGTERM)
        return real_count(*args)

    monkeypatch.setattr(prep, "_count", count_then_terminate)
    # Stands in for the default action (which would end pytest too) should main() not take over.
    def stand_in(*_):
        unhandled.append(1)

    original = signal.signal(signal.SIGTERM, stand_in)
    try:
        argv = ["prepare", str(src), "--out", str(tmp_path / "data"), "--vocab-size", "200", "--no-progress"]
        assert main(argv) == 130
        assert not unhandled and signal.getsignal(signal.SIGTERM) is stand_in  # main() restored it
    finally:
        signal.signal(signal.SIGTERM, original)
    assert capsys.readouterr().err.splitlines()[-1] == "terminated"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt"]
    # A parent that has its children ignore SIGTERM (nohup-like wrappers) is obeyed.
    calls.clear()
    original = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        assert main(argv) == 0 and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, original)
    assert (tmp_path / "data" / "manifest.json").is_file()


def test_interrupt_while_starting_exits_130(monkeypatch, capsys):
    """^C during start-up (the subcommands' imports take a second) was a KeyboardInterrupt
    traceback; it is one line and status 130, as later on."""
    import cramkit.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    try:
        status = main(["prepare", "--out", "x"])
    except KeyboardInterrupt:
        pytest.fail("main() let the KeyboardInterrupt out (a traceback)")
    assert status == 130
    assert capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize("argv, warned", [
    (["pretrain", "gpt-small", "objective.mask_rate=0.3", "objective.eval_mask_rate=0.2"],
     "objective.mask_rate, objective.eval_mask_rate: masking options only act on masked-LM runs; this causal-LM "
     "run ignores them"),
    (["pretrain", "demo", "model.preset=tiny-gpt", "data.prepare.objective=clm", "data.prepare.tokenizer=auto",
      "objective.mask_rate=0.3"],
     "objective.mask_rate: masking options only act on masked-LM runs; this causal-LM run ignores it"),
    (["pretrain", "demo", "objective.mask_rate=0.3"], None),  # a BERT: it acts
    # The recipe's own masking rate is not the user's doing: a GPT may run under a BERT recipe.
    (["pretrain", "demo", "model.preset=tiny-gpt", "data.prepare.objective=clm", "data.prepare.tokenizer=auto"],
     None),
    (["pretrain", "demo", "parallel.fsdp_reshard=false", "parallel.fsdp_param_dtype=bf16"],
     "parallel.fsdp_reshard, parallel.fsdp_param_dtype: FSDP2 options only act with parallel.strategy=fsdp; "
     "this run ignores them"),
    (["pretrain", "demo", "parallel.strategy=fsdp", "parallel.fsdp_reshard=false"], None),
    (["pretrain", "demo", "memory.checkpoint_every=3"],
     "memory.checkpoint_every: only selective activation checkpointing reads it; this run ignores it"),
    (["pretrain", "demo", "memory.activation_checkpointing=full", "memory.checkpoint_every=3"],
     "memory.checkpoint_every: only selective activation checkpointing reads it; this run ignores it"),
    (["pretrain", "demo", "memory.activation_checkpointing=selective", "memory.checkpoint_every=2"], None),
    # Outside torchrun the run is one process, whatever parallel.* says (it used to be silent).
    (["pretrain", "demo", "parallel.strategy=fsdp", "parallel.fsdp_reshard=false", "--one-process"],
     "parallel.strategy, parallel.fsdp_reshard: parallel options only act under torchrun; this single-process "
     "run ignores them"),
    # The demo's budget-triangle has no warm-up: the option was recorded in config.json and dropped.
    (["pretrain", "demo", "schedule.warmup=0.1"],
     "schedule.warmup: not read by the budget-triangle schedule; this run ignores it"),
    (["pretrain", "demo", "schedule.name=constant", "schedule.peak_at=0.5", "schedule.final=0.1"],
     "schedule.peak_at, schedule.final: not read by the constant schedule; this run ignores them"),
    (["pretrain", "demo", "schedule.name=cosine", "schedule.warmup=0.1", "schedule.final=0.1"], None),
    (["pretrain", "demo", "schedule.start=0.1", "schedule.peak_at=0.5"], None),
    # SAM's options without optim.name=sam, Muon's under AdamW: recorded, and nothing read them.
    (["pretrain", "demo", "optim.base=lamb", "optim.muon_lr=0.01"],
     "optim.base, optim.muon_lr: not read by optim.name=adamw; this run ignores them"),
    (["pretrain", "demo", "optim.name=sam", "optim.base=lion", "optim.eps=1e-8"],
     "optim.eps: not read by optim.name=sam with optim.base=lion; this run ignores it"),
    (["pretrain", "demo", "optim.name=sam", "optim.base=muon", "optim.muon_lr=0.01", "optim.sam_rho=0.1",
      "optim.betas=[0.9,0.95]", "optim.weight_decay=0.1", "optim.lr_scaling=sqrt"], None),
    (["pretrain", "demo", "optim.name=sgd", "optim.momentum=0.5", "optim.nesterov=false"], None),
    # Model options that only one architecture choice reads were recorded and did nothing.
    (["pretrain", "demo", "model.rotary_base=500000"],
     "model.rotary_base: only model.positions=rotary reads it; this run ignores it"),
    (["pretrain", "demo", "model.positions=rotary", "model.rotary_base=500000"], None),
    (["pretrain", "demo", "model.document_mask_kernel=sdpa", "model.document_boundary_id=3"],
     "model.document_mask_kernel, model.document_boundary_id: only model.document_mask=true reads the "
     "document-mask options; "
     "this run ignores them"),
    (["pretrain", "demo", "model.document_mask=true", "model.document_mask_kernel=sdpa"], None),
])
def test_options_a_run_ignores_are_said_to_do_nothing(argv, warned, monkeypatch, recwarn):
    if "--one-process" in argv:
        argv = [a for a in argv if a != "--one-process"]
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")  # the other cases are as torchrun's rank 0
    summary = {"run_dir": "r", "stop_reason": "budget", "steps": 3, "tokens": 96, "train_seconds": 1.0,
               "paused_seconds": 0.0, "first_train_loss": 7.0, "last_train_loss": 6.0,
               "initial_val_loss": 7.1, "final_val_loss": 6.1, "tokens_per_s": 96.0, "mfu": 0.1}
    monkeypatch.setattr("cramkit.train.run.pretrain", lambda cfg: dict(summary))
    assert main([*argv, "finetune_demo=false"]) == 0
    said = [str(w.message) for w in recwarn if " ignores " in str(w.message)]
    assert said == ([warned] if warned else [])


def test_a_failed_plot_is_a_warning_not_a_failed_run(tmp_path, monkeypatch):
    from cramkit.train import run

    def broken(*_):
        raise RuntimeError("no font")

    monkeypatch.setattr("cramkit.report.load_run", lambda path: object())
    monkeypatch.setattr("cramkit.report.write_plots", broken)
    with pytest.warns(UserWarning, match=r"the loss plots were not written \(RuntimeError: no font\); "
                                         r"`cramkit report .* --out .*plots` retries them"):
        run._plot_losses(tmp_path)


def test_every_subcommand_s_help_says_what_it_does():
    """`cramkit recipes --help` printed only its usage line."""
    import argparse

    from cramkit.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"recipes", "pretrain", "prepare", "finetune", "evaluate", "export", "bench", "report"} <= set(commands)
    assert [name for name, sub in commands.items() if not sub.description] == []


@pytest.mark.parametrize("error, local_rank, printed, torchrun", [
    ("config", "0", True, True), ("config", "1", False, True),  # every rank met it: each machine's first says it
    ("rank0", "0", True, True), ("rank0", "3", False, True),
    ("data", "1", True, True),  # may be this rank's own: always said
    ("config", "1", True, False),  # a LOCAL_RANK left in the shell, outside torchrun
])
def test_under_torchrun_an_error_every_rank_meets_is_printed_once_per_machine(error, local_rank, printed, torchrun,
                                                                              monkeypatch, capsys):
    from cramkit.errors import ConfigError, DataError, RankFailed

    raised = {"config": ConfigError("bad key"), "rank0": RankFailed("rank 0 failed while x: y"),
              "data": DataError("shard 3 is truncated")}[error]

    def fail(cfg):
        raise raised

    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if torchrun:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr("cramkit.train.run.pretrain", fail)
    assert main(["pretrain", "demo", "finetune_demo=false"]) == 2
    assert capsys.readouterr().err == (f"error: {raised}\n" if printed else "")


@pytest.mark.parametrize("local_rank, printed", [("0", True), ("1", False)])
def test_commands_other_than_pretrain_refuse_torchrun(local_rank, printed, monkeypatch, tmp_path, capsys):
    """`torchrun ... -m cramkit.cli finetune RUN` fine-tuned once per rank, each rank writing
    the same result file and printing every line."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("cramkit.eval.cli.cmd_finetune", lambda args: pytest.fail("ran under torchrun"))
    assert main(["finetune", str(tmp_path), "--task", "bbc"]) == 2
    assert capsys.readouterr().err == ("error: cramkit finetune runs in one process; run it without torchrun "
                                       "(only pretrain uses several)\n" if printed else "")
    # A world of one process is one process: nothing to refuse.
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr("cramkit.eval.cli.cmd_finetune", lambda args: 0)
    assert main(["finetune", str(tmp_path), "--task", "bbc"]) == 0


def test_a_reader_that_goes_away_ends_the_command_quietly(monkeypatch, capsys):
    """`cramkit predict ... | head -1`: the pipe closes under the output, which is no error of
    the user's; the command stops without a word, with the status of a tool killed by SIGPIPE."""
    def closed(cfg):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("cramkit.train.run.pretrain", closed)
    assert main(["pretrain", "demo", "finetune_demo=false"]) == 141
    assert capsys.readouterr().err == ""


def test_running_out_of_host_memory_is_one_line(monkeypatch, capsys):
    """prepare --seq-len 1000000000000 ended in numpy's MemoryError traceback."""
    def huge(cfg, *args, **kwargs):
        raise MemoryError

    monkeypatch.setattr("cramkit.train.run.pretrain", huge)
    assert main(["pretrain", "demo", "finetune_demo=false"]) == 2
    assert capsys.readouterr().err == ("error: out of memory on this machine: check the sizes this command was given "
                                       "(model.*, seq_len, vocab_size, batch and micro-batch)\n")
