"""Enabling techniques from a recipe or the command line: names, options, conflicts, order."""

from __future__ import annotations

import pytest
from technique_helpers import tiny_config

from cramkit.config import load_config
from cramkit.errors import ConfigError
from cramkit.plugins import load_plugins
from cramkit.techniques import TECHNIQUES, build_techniques

load_plugins()  # a plugin named in CRAMKIT_PLUGINS is held to the same rules


def test_command_line_enables_techniques_with_options(tmp_path):
    cfg = load_config("demo", ["techniques=[pld,seqwarmup]", "technique.pld.theta_bar=0.4",
                               "technique.seqwarmup.fraction=0.2"])
    built = build_techniques(cfg.techniques, cfg.technique)
    assert [t.name for t in built] == ["seqwarmup", "pld"]  # hook order, not list order
    assert built[1].options.theta_bar == 0.4 and built[0].options.fraction == 0.2


def test_unknown_names_and_options_are_errors_with_hints():
    with pytest.raises(ConfigError, match="did you mean 'pld'"):
        load_config("demo", ["techniques=[pdl]"])
    with pytest.raises(ConfigError, match="did you mean 'technique.pld.theta_bar'"):
        load_config("demo", ["techniques=[pld]", "technique.pld.theta_bra=0.4"])
    with pytest.raises(ConfigError, match="not enabled"):
        load_config("demo", ["technique.pld.theta_bar=0.4"])
    with pytest.raises(ConfigError, match="did you mean 'pld'"):  # another case is no other name
        load_config("demo", ["techniques=[PLD]"])
    with pytest.raises(ConfigError, match=r"^technique\.theta_bar: options go under technique\.NAME\.KEY "
                       r"\(did you mean 'technique\.pld\.theta_bar'\?\)$"):
        load_config("demo", ["techniques=[pld]", "technique.theta_bar=0.4"])


def test_declared_conflicts_are_refused():
    assert "vcycle" in TECHNIQUES["stacking"].conflicts
    with pytest.raises(ConfigError, match="cannot be combined"):
        load_config("demo", ["techniques=[stacking,vcycle]"])


def test_declared_conflicts_name_registered_techniques():
    # A misspelt name in ``conflicts`` declares no conflict at all, silently. (Not checked when
    # a run starts: a conflict with a plugin's technique that is not loaded is no error.)
    for cls in TECHNIQUES.values():
        assert set(cls.conflicts) <= set(TECHNIQUES), f"{cls.name}.conflicts: {cls.conflicts}"


def test_every_technique_documents_its_options():
    for cls in TECHNIQUES.values():
        assert cls.__doc__ and cls.Options.__doc__
        for f in cls.Options.__dataclass_fields__.values():
            assert f.metadata.get("help"), f"{cls.name}.{f.name} has no help text"


def test_techniques_compose_in_one_run(tiny_mlm_data, tmp_path):
    from cramkit.train.run import pretrain

    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=8steps", "model.layers=4",
                      "techniques=[stacking,pld,seqwarmup]", "technique.stacking.doublings=1",
                      "technique.stacking.at=[0.5]", "technique.pld.theta_bar=0.5",
                      "technique.pld.gamma=5", "technique.seqwarmup.start=8")
    summary = pretrain(cfg, say=lambda *_: None)
    assert summary["steps"] == 8


@pytest.mark.parametrize("optim", ["adamw", "sam"])
def test_after_backward_sees_the_gradients_unscaled_once_per_pass(optim, tiny_mlm_data, tmp_path):
    """fp16's loss scale (65536 at the start) was still in the gradients a technique's hook read;
    SAM's second forward/backward calls the hook again, as its docstring says."""
    import torch

    from cramkit.data.dataset import TokenDataset
    from cramkit.models import build_model
    from cramkit.objectives import build_objective
    from cramkit.optim import build_optimizer
    from cramkit.techniques import Technique
    from cramkit.train.trainer import Trainer

    class GradientNorms(Technique):
        name = "gradient-norms"

        def __init__(self):
            super().__init__(None)
            self.seen = []

        def on_after_backward(self, model, state):
            self.seen.append(float(torch.linalg.vector_norm(model.head.decoder.weight.grad)))

    ds = TokenDataset.open(tiny_mlm_data)
    batch = build_objective("mlm", ds, seed=0)(torch.from_numpy(ds.sequences("train")[:4].astype("int64")), 0)
    norms = {}
    for precision in ("fp32", "fp16"):
        cfg = tiny_config(tiny_mlm_data, tmp_path, f"optim.name={optim}")
        torch.manual_seed(0)
        model, hook = build_model(cfg.model), GradientNorms()
        trainer = Trainer(
            cfg=cfg, model=model, optimizer_factory=lambda m, c=cfg: build_optimizer(m, c.optim, torch.device("cpu")),
            train_batches=iter(()), evaluate=lambda m: 0.0, checkpoint=lambda s: None, log=lambda r: None,
            techniques=[hook], device=torch.device("cpu"), precision=precision, micro_batch=4, seq_len=32,
            flops_per_token=lambda m: 1.0, peak_flops=1.0)
        if optim == "sam" and precision == "fp16":  # SAM refuses loss scaling: nothing to compare
            with pytest.raises(ConfigError, match="fp16 loss scaling"):
                trainer.train_step([batch])
            continue
        trainer.train_step([batch])
        norms[precision] = hook.seen
    assert len(norms["fp32"]) == (2 if optim == "sam" else 1)
    if "fp16" in norms:
        assert norms["fp16"] == pytest.approx(norms["fp32"], rel=0.05)
