"""Techniques composed: every set of registered techniques that declares no conflict trains,
resumes bit for bit, charges the FLOPs it runs, and each member still does what it claims.

Each set runs the members' ``contract_cases().acting`` overrides together on a tiny 12-step CPU
run with gradient accumulation, a batch-size ramp, mid-run evaluations and a mid-run checkpoint
(the contract test's resume check), and per-step records of what the trainer saw: the model's
depth and width, the sequence length and layer dropping's decisions. Checked against them:

- pld: every step draws one decision per block of the model as it is then (after a doubling or
  a V-cycle level change too), and some steps drop blocks;
- stacking: the depth doubles after the first step that starts past each fraction of ``at``;
- vcycle: the model is the current stage's level (coalesced width and depth) at every step;
- seqwarmup: every step's length is ``warmup_length`` at its progress, on any model.

Every step's FLOP charge must match a count of the FLOPs the step ran (so layer dropping on a
truncated sequence is charged at the truncated length, on the depth and width of the moment).
Sets of techniques that declare a conflict must be refused when the config loads, with a
message naming both. A plugin's technique (``CRAMKIT_PLUGINS``) is composed as well; it gets the
resume and FLOP checks, not an effect check of its own.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from technique_helpers import (
    charged_flops,
    counting_train_step,
    interrupted_copy,
    metrics,
    quiet,
    tiny_config,
    weights,
)

from cramkit.config import load_config
from cramkit.data.dataset import TokenDataset
from cramkit.errors import ConfigError
from cramkit.plugins import load_plugins
from cramkit.techniques import TECHNIQUES, build_techniques
from cramkit.techniques.seqwarmup import warmup_length
from cramkit.techniques.vcycle import stage_at
from cramkit.train.run import pretrain, resume_config
from cramkit.train.trainer import Trainer

load_plugins()
STEPS = 12
CUT = STEPS // 2


def _conflict(a: str, b: str) -> bool:
    return b in TECHNIQUES[a].conflicts or a in TECHNIQUES[b].conflicts


def _compatible(names) -> bool:
    return not any(_conflict(a, b) for a, b in itertools.combinations(names, 2))


def _largest() -> list[tuple[str, ...]]:
    """The largest compatible sets of two or more techniques (each: no other can join it)."""
    names = sorted(TECHNIQUES)
    subsets = [s for k in range(2, len(names) + 1) for s in itertools.combinations(names, k) if _compatible(s)]
    return [s for s in subsets if not any(set(s) < set(t) for t in subsets)]


LARGEST = _largest()
# Every compatible pair, and every largest compatible set (all the others together).
SETS = [p for p in itertools.combinations(sorted(TECHNIQUES), 2) if _compatible(p)]
SETS += [s for s in LARGEST if s not in SETS]
CONFLICTS = [p for p in itertools.combinations(sorted(TECHNIQUES), 2) if _conflict(*p)]

# Trainer features on top of the plain tiny run (which already accumulates 2 micro-batches per
# step, ramps the batch, evaluates mid-run and resumes from a mid-run checkpoint).
FEATURES = {
    "plain": ("bert", ()),
    # SAM's second forward/backward is charged and counted too.
    "gpt-docmask-sam": ("gpt", ("model.document_mask=true", "optim.name=sam")),
    # Activation checkpointing recomputes blocks (hardware FLOPs the count sees and the model-FLOP
    # accounting does not charge): no FLOP check there.
    "checkpointing-schedulefree": ("bert", ("memory.activation_checkpointing=selective",
                                            "optim.name=schedulefree", "schedule.name=constant")),
}


def _acting(names: tuple[str, ...]) -> tuple[str, list[str]]:
    """The members' acting overrides together; two members setting one key differently would
    test neither as its contract case does."""
    archs, merged = set(), {}
    for name in names:
        cases = TECHNIQUES[name].contract_cases()
        archs.add(cases.arch)
        for override in cases.acting:
            key, value = override.split("=", 1)
            if merged.setdefault(key, value) != value:
                pytest.skip(f"the acting cases of {names} set {key} to {merged[key]} and {value}")
    if len(archs) > 1:
        pytest.skip(f"the acting cases of {names} need different architectures {sorted(archs)}")
    return archs.pop(), [f"{k}={v}" for k, v in merged.items()]


def _tracing(trace: list[dict]):
    """Trainer.train_step, recording what each step trains: progress at its start, depth,
    width, sequence length and layer dropping's decisions (None without)."""
    original = Trainer.train_step

    def train_step(self, batches):
        keep = getattr(self.raw_model.layers, "pld_keep", None)
        cfg = self.raw_model.config
        trace.append({"progress": self.state.progress, "layers": cfg.layers, "hidden": cfg.hidden,
                      "seq": int(batches[0]["input_ids"].shape[1]),
                      "keep": None if keep is None else list(keep)})
        return original(self, batches)

    return train_step


def _check_effects(techniques, model_cfg, full_len: int, trace: list[dict]) -> None:
    # The progress at which the step before each step started: a model change made in on_step_end
    # trains from the next step on.
    before = [None] + [row["progress"] for row in trace[:-1]]
    for t in techniques:
        o = t.options
        if t.name == "pld":
            for row in trace:
                assert row["keep"] is not None and len(row["keep"]) == row["layers"], row
            assert any(not all(row["keep"]) for row in trace), "pld dropped no block"
        elif t.name == "stacking":
            base = model_cfg.layers // 2 ** o.doublings
            want = [base * 2 ** sum(p is not None and p >= at for at in o.schedule()) for p in before]
            assert [row["layers"] for row in trace] == want
            assert trace[-1]["layers"] == model_cfg.layers
        elif t.name == "vcycle":
            t.base = model_cfg
            stages = [0 if p is None else stage_at(p, t.fractions) for p in before]
            want = [(t.level_config(t.levels[s]).layers, t.level_config(t.levels[s]).hidden) for s in stages]
            assert [(row["layers"], row["hidden"]) for row in trace] == want
            assert max(t.levels[s] for s in stages) > 0, "the V-cycle never left the full model"
        elif t.name == "seqwarmup":
            want = [warmup_length(row["progress"], full_len, o.start, o.fraction, o.multiple) for row in trace]
            assert [row["seq"] for row in trace] == want
            assert want[0] < full_len == want[-1]


# Every compatible set on the plain run; the trainer features with the largest sets only.
RUNS = [pytest.param(names, "plain", id="+".join(names)) for names in SETS] + [
    pytest.param(names, feature, id=f"{'+'.join(names)}-{feature}")
    for names in LARGEST for feature in FEATURES if feature != "plain"]


@pytest.mark.parametrize(("names", "feature"), RUNS)
def test_compatible_techniques_compose(names, feature, request, tmp_path, monkeypatch):
    arch, acting = _acting(names)
    arch = FEATURES[feature][0] if feature != "plain" else arch
    data = request.getfixturevalue("tiny_mlm_data" if arch == "bert" else "tiny_clm_data")
    bias = ("model.norm_bias=false", *(("model.bias=false",) if arch == "gpt" else ()))  # see the FLOP test
    overrides = (f"train.budget={STEPS}steps", f"techniques=[{','.join(names)}]", *acting, *bias,
                 *FEATURES[feature][1], "train.checkpoint_every=0.5", "train.batch_ramp=0.5",
                 "train.eval_every=0.25")
    cfg = tiny_config(data, tmp_path, *overrides, name="full", arch=arch)
    trace: list[dict] = []
    counted: list[float] = []
    plain = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", counting_train_step(counted))
    monkeypatch.setattr(Trainer, "train_step", _tracing(trace))
    summary = pretrain(cfg, say=quiet)
    full = tmp_path / "full"
    assert summary["steps"] == STEPS and summary["final_val_loss"] < summary["initial_val_loss"]
    assert len(metrics(full, "eval")) >= 4  # step 0, mid-run, final

    # Each technique still does what it claims, beside the others.
    _check_effects(build_techniques(cfg.techniques, cfg.technique), cfg.model, TokenDataset.open(data).seq_len,
                   trace)

    # The FLOPs charged are the FLOPs run, step by step, however the techniques combine: within
    # 1 % as in the FLOP test, 2 % in a step that runs no block at all (layer dropping skipped the
    # one block stacking starts with), where the norm weights' 6 FLOPs per parameter, which run no
    # matrix product, are 1.6 % of what is left (embeddings and head).
    if "checkpointing" not in feature:
        charged = charged_flops(full)
        assert len(charged) == len(counted) == STEPS
        for step, (c, n, row) in enumerate(zip(charged, counted, trace), 1):
            blockless = row["keep"] is not None and not any(row["keep"])
            assert c == pytest.approx(n, rel=0.02 if blockless else 0.01), f"step {step}: {row}"

    # Resumed from the mid-run checkpoint, it ends bit-identical to the uninterrupted run.
    cut = interrupted_copy(full, tmp_path / "cut", CUT)
    resumed: list[dict] = []
    monkeypatch.setattr(Trainer, "train_step", plain)
    monkeypatch.setattr(Trainer, "train_step", _tracing(resumed))
    pretrain(resume_config(cut, []), run_dir=cut, resume=True, say=quiet)
    assert resumed == trace[CUT:]
    a, b = weights(full), weights(cut)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    for field in ("loss", "tokens", "flops", "lr"):
        assert [r[field] for r in metrics(cut)] == [r[field] for r in metrics(full)][CUT:], field


@pytest.mark.parametrize("names", CONFLICTS, ids="+".join)
def test_conflicting_techniques_are_refused_when_the_config_loads(names):
    for listed in (names, names[::-1], (*names, *[n for n in sorted(TECHNIQUES) if n not in names][:1])):
        with pytest.raises(ConfigError) as refused:
            load_config("demo", [f"techniques=[{','.join(listed)}]"])
        message = str(refused.value)
        assert "\n" not in message and all(f"'{n}'" in message for n in names), message
