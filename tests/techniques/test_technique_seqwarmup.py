"""Sequence-length warm-up: lengths follow the schedule, tokens and FLOPs count what was seen."""

from __future__ import annotations

import pytest
import torch
from technique_helpers import metrics, quiet, tiny_config

from cramkit.errors import ConfigError
from cramkit.models.flops import flops_per_token
from cramkit.techniques.seqwarmup import SeqWarmupOptions, truncate, warmup_length
from cramkit.train.run import pretrain


def test_length_schedule():
    lengths = [warmup_length(p / 100, 128, 16, 0.5) for p in range(101)]
    assert lengths[0] == 16 and lengths[50] == 128 and lengths[-1] == 128
    assert lengths == sorted(lengths)
    assert all(n % 8 == 0 for n in lengths)
    assert warmup_length(0.25, 128, 16, 0.5) == 72  # 16 + 112 * 0.5 = 72
    assert warmup_length(0.3, 128, 16, 0.0) == 128  # fraction 0 = off
    assert warmup_length(0.0, 128, 12, 0.5) == 8  # start rounded down to the multiple


def test_truncation_keeps_mlm_framing():
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 3], [2, 20, 21, 22, 23, 24, 25, 3]])
    labels = torch.full_like(ids, -100)
    labels[:, 3] = 99
    out = truncate({"input_ids": ids, "labels": labels}, 4, sep_id=3)
    assert out["input_ids"].tolist() == [[2, 10, 11, 3], [2, 20, 21, 3]]
    assert out["labels"][:, -1].tolist() == [-100, -100]
    assert ids[0, 3] == 12  # the original batch is not modified
    plain = truncate({"input_ids": ids, "labels": labels}, 4)
    assert plain["input_ids"].tolist() == [[2, 10, 11, 12], [2, 20, 21, 22]]


def test_truncation_of_a_single_row_batch_leaves_the_batch_alone():
    """With B=1 ``v[:, :n].contiguous()`` is already contiguous, so it is a view: writing
    [SEP] and -100 into it changed the caller's batch."""
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 3]])
    labels = torch.tensor([[-100, -100, -100, 99, -100, -100, -100, -100]])
    out = truncate({"input_ids": ids, "labels": labels}, 4, sep_id=3)
    assert out["input_ids"].tolist() == [[2, 10, 11, 3]] and out["labels"].tolist() == [[-100] * 4]
    assert ids.tolist() == [[2, 10, 11, 12, 13, 14, 15, 3]]
    assert labels.tolist() == [[-100, -100, -100, 99, -100, -100, -100, -100]]


def test_options_are_validated():
    with pytest.raises(ConfigError, match="at least multiple"):
        SeqWarmupOptions.from_dict({"start": 4})
    with pytest.raises(ConfigError, match="fraction"):
        SeqWarmupOptions.from_dict({"fraction": 1.5})


@pytest.mark.parametrize("arch", ["bert", "gpt"])
def test_run_lengths_tokens_and_flops(arch, tiny_mlm_data, tiny_clm_data, tmp_path):
    data = tiny_mlm_data if arch == "bert" else tiny_clm_data
    cfg = tiny_config(data, tmp_path, "train.budget=10steps", "train.batch_ramp=0",
                      "techniques=[seqwarmup]", "technique.seqwarmup.start=8",
                      "technique.seqwarmup.fraction=0.5", arch=arch)
    summary = pretrain(cfg, say=quiet)
    train = metrics(tmp_path / "run")
    per_step = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + train, train)]
    lengths = [warmup_length(s / 10, 32, 8, 0.5) for s in range(10)]
    assert lengths[0] == 8 and lengths[-1] == 32
    assert per_step == [8 * n for n in lengths]  # 8 sequences per step, truncated
    assert summary["tokens"] == 8 * sum(lengths)
    rate = cfg.objective.mask_rate if arch == "bert" else None
    expected = sum(8 * n * flops_per_token(cfg.model, n, rate) for n in lengths)
    assert summary["flops"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.compile
@pytest.mark.parametrize("arch", ["bert", "gpt"])
def test_compiled_run_meets_no_recompilation_while_lengths_grow(arch, tiny_mlm_data, tiny_clm_data, tmp_path,
                                                                monkeypatch):
    """The compile warm-up (outside the budget) also runs a warm-up-length batch, so that the
    growing lengths of training reuse one graph instead of compiling inside the budget. The
    backend is aot_eager (cheap on a CPU); the guards and recompilations are dynamo's, the same
    for every backend."""
    from torch._dynamo.utils import counters

    from cramkit.train.trainer import Trainer

    real_compile, real_fit = torch.compile, Trainer.fit
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="aot_eager", **kw))
    graphs = {}

    def fit(self):  # graphs compiled before training (warm-up, first evaluation) and after it
        graphs["before"] = counters["stats"]["unique_graphs"]
        state = real_fit(self)
        graphs["after"] = counters["stats"]["unique_graphs"]
        return state

    monkeypatch.setattr(Trainer, "fit", fit)
    torch._dynamo.reset()
    counters.clear()
    data = tiny_mlm_data if arch == "bert" else tiny_clm_data
    cfg = tiny_config(data, tmp_path, "train.budget=8steps", "train.compile=true", "techniques=[seqwarmup]",
                      "technique.seqwarmup.start=8", "technique.seqwarmup.fraction=0.8", arch=arch)
    pretrain(cfg, say=quiet)
    torch._dynamo.reset()
    # Training did see several lengths: read off the log (every step is logged), the tokens each
    # step added over the sequences it took.
    train = metrics(tmp_path / "run")
    assert [r["step"] for r in train] == list(range(1, 9))
    seen = {(b["tokens"] - a["tokens"]) / b["batch_size"] for a, b in zip([{"tokens": 0}] + train, train)}
    assert len(seen) >= 4, seen
    assert graphs["after"] == graphs["before"] > 0


def test_a_resume_refused_at_its_first_step_leaves_the_run_as_it_was(tiny_mlm_data, tmp_path):
    """The start length is checked against the data at the first batch, after a resume has
    written config.json: the refused override stayed in it, and a plain ``--resume`` then failed
    the same way. The summary it had moved aside stayed there too (`cramkit report` then called
    the finished run unfinished), and environment.json listed a resume that never trained."""
    from cramkit.train.run import resume_config

    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps", "techniques=[seqwarmup]",
                         "technique.seqwarmup.start=8"), say=quiet)
    run = tmp_path / "run"
    files = ("config.json", "summary.json", "environment.json")
    before = {name: (run / name).read_text() for name in files}
    with pytest.raises(ConfigError, match="start length 64 is not shorter"):
        pretrain(resume_config(run, ["train.budget=3steps", "technique.seqwarmup.start=64"]), run_dir=run,
                 resume=True, say=quiet)
    assert {name: (run / name).read_text() for name in files} == before
    # A run without environment.json (from before it, or moved away) is left without one.
    (run / "environment.json").unlink()
    with pytest.raises(ConfigError, match="start length 64 is not shorter"):
        pretrain(resume_config(run, ["train.budget=3steps", "technique.seqwarmup.start=64"]), run_dir=run,
                 resume=True, say=quiet)
    assert not (run / "environment.json").exists()
    assert pretrain(resume_config(run, ["train.budget=3steps"]), run_dir=run, resume=True, say=quiet)["steps"] == 3
