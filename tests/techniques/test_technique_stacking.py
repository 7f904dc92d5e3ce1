"""Progressive stacking: depth doubling keeps trained blocks and (optionally) optimizer state."""

from __future__ import annotations

import pytest
import torch
from technique_helpers import quiet, tiny_config, weights

from cramkit.errors import ConfigError
from cramkit.models import build_model
from cramkit.models.presets import preset_config
from cramkit.optim import parameter_groups
from cramkit.techniques.stacking import (
    ProgressiveStacking,
    StackingOptions,
    source_name,
    stack,
    transfer_optimizer_state,
)
from cramkit.train.run import pretrain


def _trained_model_and_optimizer(layers=2):
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", layers=layers))
    opt = torch.optim.AdamW(parameter_groups(model, 0.01), lr=1e-3)
    ids = torch.randint(5, 1000, (2, 16))
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("mode", ["copy", "reset"])
def test_stack_keeps_weights_and_optimizer_state(mode):
    model, opt = _trained_model_and_optimizer()
    big = stack(model)
    assert big.config.layers == 4
    old, new = model.state_dict(), big.state_dict()
    for name, tensor in new.items():
        if name.startswith("layers."):
            index, rest = name.split(".", 2)[1:]
            source = f"layers.{int(index) % 2}.{rest}"
        else:
            source = name
        assert torch.equal(tensor, old[source]), name
    assert big.head.decoder.weight is big.embeddings.tokens.weight  # still tied
    new_opt = torch.optim.AdamW(parameter_groups(big, 0.01), lr=1e-3)
    transfer_optimizer_state(mode == "copy")(model, big, opt, new_opt)
    old_params = dict(model.named_parameters())
    for name, param in big.named_parameters():
        is_copy = name.startswith("layers.") and int(name.split(".")[1]) >= 2
        if is_copy and mode == "reset":
            assert param not in new_opt.state, name
            continue
        src = old_params[name if not is_copy else name.replace("layers.2.", "layers.0.").replace("layers.3.", "layers.1.")]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(new_opt.state[param][key], opt.state[src][key]), (name, key)
        assert new_opt.state[param]["exp_avg"] is not opt.state[src]["exp_avg"]


def _trained_two_block_model(optimizer: str):
    """``(config, model, optimizer)``: a tiny 2-block model after three steps of ``optimizer``."""
    from cramkit.config import load_config
    from cramkit.optim import build_optimizer

    cfg = load_config("demo", ["model.preset=tiny", "model.layers=2", f"optim.name={optimizer}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"), 8)
    ids = torch.randint(5, 1000, (2, 16))
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return cfg, model, opt


@pytest.mark.parametrize("name", ["lamb", "schedulefree", "muon", "adamw"])
def test_original_blocks_step_as_before_a_doubling_with_any_optimizer(name):
    """LAMB, Muon's Adam part and Schedule-Free count steps per parameter group, not per
    parameter: carried over with the moments, or the next update of a block that was already
    trained is that of a first step (bias correction, Schedule-Free's averaging weight)."""
    from cramkit.optim import build_optimizer

    cfg, model, opt = _trained_two_block_model(name)
    big = stack(model)
    new_opt = build_optimizer(big, cfg.optim, torch.device("cpu"), 8)
    transfer_optimizer_state(True)(model, big, opt, new_opt)
    # The same gradient for each original and its copies, stepped by the old and new optimizer.
    old_params = dict(model.named_parameters())
    grads = {n: torch.randn_like(p) for n, p in old_params.items()}
    for n, p in old_params.items():
        p.grad = grads[n].clone()
    for n, p in big.named_parameters():
        p.grad = grads[n if not n.startswith("layers.") else
                       f"layers.{int(n.split('.')[1]) % 2}.{n.split('.', 2)[2]}"].clone()
    opt.step()
    new_opt.step()
    grown = dict(big.named_parameters())
    for n, p in old_params.items():
        torch.testing.assert_close(grown[n], p, rtol=0, atol=1e-7, msg=n)


@pytest.mark.parametrize("mode", ["reset_all", "copy"])
def test_a_fresh_optimizer_stacks_the_evaluated_weights_of_schedule_free(mode):
    """Schedule-Free trains at y and is evaluated at its average x. With no state carried
    (reset_all) the deeper model starts from x; with its state carried (copy) from y, which that
    state belongs to."""
    pytest.importorskip("pytorch_optimizer")
    _, model, opt = _trained_two_block_model("schedulefree")
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    opt.eval()
    evaluated = {k: v.clone() for k, v in model.state_dict().items()}
    opt.train()
    model.load_state_dict(trained)

    class State:
        progress, optimizer, pending_model, last_step = 1.0, opt, None, False

        def request_model(self, new, transfer=None):
            self.pending_model = new

    state = State()
    state.model = model
    ProgressiveStacking(StackingOptions.from_dict({"doublings": 1, "optimizer": mode})).on_step_end(state)
    expected = evaluated if mode == "reset_all" else trained
    grown = state.pending_model.state_dict()
    assert len(grown) > len(expected)
    assert all(torch.equal(grown[name], expected[source_name(name, 2)]) for name in grown)
    assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained)


def test_schedule_and_configured_depth():
    # Two doublings default to Gong et al.'s compute split (3 -> 6 -> 12 for 50k/70k/280k steps).
    opts = StackingOptions.from_dict({"doublings": 2})
    layer_steps = [50 * 3, 70 * 6, 280 * 12]
    authors = [layer_steps[0] / sum(layer_steps), sum(layer_steps[:2]) / sum(layer_steps)]
    assert opts.schedule() == pytest.approx(authors, abs=0.005)
    assert StackingOptions.from_dict({"doublings": 3}).schedule() == pytest.approx([0.25, 0.5, 0.75])
    tech = ProgressiveStacking(opts)
    cfg = preset_config("tiny", layers=12)
    assert tech.configure_model(cfg).layers == 3
    tech.load_state_dict({"done": 1})  # resumed after the first doubling
    assert tech.configure_model(cfg).layers == 6
    with pytest.raises(ConfigError, match="multiple of 4"):
        tech.configure_model(preset_config("tiny", layers=6))
    # More doublings than the depth has bits: refused at once, not after computing 2**1e12.
    for doublings, multiple in ((4, "16"), (10**12, r"2\*\*1000000000000")):
        with pytest.raises(ConfigError, match=rf"layers=12 cannot be reached by doubling {doublings} times; "
                           rf"use a multiple of {multiple}$"):
            ProgressiveStacking(StackingOptions.from_dict({"doublings": doublings})).configure_model(cfg)
    with pytest.raises(ConfigError, match="increasing"):
        StackingOptions.from_dict({"doublings": 2, "at": [0.6, 0.3]})


def test_no_doubling_on_the_step_that_spends_the_budget():
    model, _ = _trained_model_and_optimizer()

    class State:
        progress, pending_model, last_step, model = 0.9, None, True, None

        def request_model(self, new, transfer=None):
            self.pending_model = new

    state, tech = State(), ProgressiveStacking(StackingOptions.from_dict({"doublings": 1}))
    state.model = model
    tech.on_step_end(state)
    assert state.pending_model is None and tech.state_dict() == {"done": 0}
    state.last_step = False
    tech.on_step_end(state)
    assert len(state.pending_model.layers) == 4 and tech.state_dict() == {"done": 1}


def test_run_grows_to_final_depth_and_counts_flops(tiny_mlm_data, tmp_path):
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=8steps", "model.layers=4", "train.batch_ramp=0",
                      "techniques=[stacking]", "technique.stacking.doublings=2",
                      "technique.stacking.at=[0.25,0.5]")
    summary = pretrain(cfg, say=quiet)
    w = weights(tmp_path / "run")
    assert {int(k.split(".")[1]) for k in w if k.startswith("layers.")} == {0, 1, 2, 3}
    # on_step_end sees the progress at the start of its step, so the doubling due at 25 % follows
    # step 3: 3 steps at depth 1, 2 at depth 2, 3 at depth 4 (equal tokens per step).
    import dataclasses

    from cramkit.models.flops import flops_per_token

    rate = cfg.objective.mask_rate
    per = [flops_per_token(dataclasses.replace(cfg.model, layers=n), 32, rate) for n in (1, 2, 4)]
    tokens_per_step = summary["tokens"] / 8
    expected = tokens_per_step * (3 * per[0] + 2 * per[1] + 3 * per[2])
    assert summary["flops"] == pytest.approx(expected, rel=1e-9)
    # The run starts at depth 1 but trains depth 4: memory is estimated (and on a GPU the
    # micro-batch sized) for depth 4, and the summary counts the model the run ended with.
    import json

    from cramkit.models.flops import count_parameters

    full = count_parameters(build_model(cfg.model))
    assert summary["parameters"] == full
    estimate = json.loads((tmp_path / "run" / "environment.json").read_text())["memory_estimate"]
    assert estimate["parameters_gb"] == pytest.approx(4 * full / 1e9, rel=1e-12)


def test_doublings_due_at_the_same_step_all_happen_after_it(tiny_mlm_data, tmp_path):
    """Step 5 of 12 starts at 1/3 of the budget, past both 0.3 and 0.31: the depth is 4 from step 6
    on, as a V-cycle passes every stage due at once. One doubling per step left step 6 at depth 2."""
    import dataclasses

    from cramkit.models.flops import flops_per_token

    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=12steps", "model.layers=4", "train.batch_ramp=0",
                      "techniques=[stacking]", "technique.stacking.at=[0.3,0.31]")
    summary = pretrain(cfg, say=quiet)
    per = [flops_per_token(dataclasses.replace(cfg.model, layers=n), 32, cfg.objective.mask_rate) for n in (1, 4)]
    expected = summary["tokens"] / 12 * (5 * per[0] + 7 * per[1])
    assert summary["flops"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("mode", ["copy", "reset", "reset_all"])
def test_a_run_carries_optimizer_state_across_each_doubling(mode, tiny_mlm_data, tmp_path, monkeypatch):
    """Through the trainer, not just the transfer function: the rebuilt optimizer must hold the
    original blocks' state, and the copied blocks' state copied from their sources or fresh."""
    from cramkit.train.trainer import Trainer

    swap, checked = Trainer._swap_model_if_requested, []

    def checking_swap(self):
        if self.state.pending_model is None:
            return swap(self)
        old, old_opt = self.raw_model, self.state.optimizer
        before = {n: old_opt.state[p]["exp_avg"].clone() for n, p in old.named_parameters() if p in old_opt.state}
        depth = len(old.layers)
        swap(self)
        opt = self.state.optimizer
        if mode == "reset_all":  # the authors' recipe: nothing carries over, not even the originals
            assert not any(opt.state.get(p) for p in self.raw_model.parameters())
            checked.append(depth)
            return
        for i in range(depth):
            for name, p in self.raw_model.layers[i].named_parameters():  # the originals keep theirs
                torch.testing.assert_close(opt.state[p]["exp_avg"], before[f"layers.{i}.{name}"], rtol=0, atol=0)
            for name, p in self.raw_model.layers[depth + i].named_parameters():
                if mode == "copy":
                    torch.testing.assert_close(opt.state[p]["exp_avg"], before[f"layers.{i}.{name}"], rtol=0, atol=0)
                else:
                    assert "exp_avg" not in opt.state.get(p, {})
        checked.append(depth)

    monkeypatch.setattr(Trainer, "_swap_model_if_requested", checking_swap)
    cfg = tiny_config(tiny_mlm_data, tmp_path, "model.layers=4", "techniques=[stacking]", "train.budget=8steps",
                      "technique.stacking.at=[0.3,0.6]", f"technique.stacking.optimizer={mode}")
    pretrain(cfg, say=quiet)
    assert checked == [1, 2]  # both doublings went through the check


def test_a_doubling_due_at_the_last_step_is_not_made_and_a_longer_resume_makes_it(tiny_mlm_data, tmp_path):
    """Step 8 of 8 starts at 7/8, the second doubling's point: stacking after it ended the run on a
    depth-4 model whose top two blocks (copies) were never trained, and the final evaluation, the
    checkpoint and the summary all described that model. The run ends on the depth it trained."""
    import dataclasses
    import warnings

    from cramkit.models.flops import count_parameters, flops_per_token
    from cramkit.train import checkpoint as ckpt
    from cramkit.train.run import resume_config

    run = tmp_path / "run"
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=8steps", "model.layers=4", "train.batch_ramp=0",
                      "techniques=[stacking]", "technique.stacking.at=[0.25,0.875]")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = pretrain(cfg, say=quiet)
    assert {int(k.split(".")[1]) for k in weights(run) if k.startswith("layers.")} == {0, 1}
    saved = ckpt.load_state(ckpt.latest_checkpoint(run))
    assert saved["techniques"]["stacking"] == {"done": 1}  # configure_model builds depth 2 on resume
    assert summary["parameters"] == count_parameters(build_model(dataclasses.replace(cfg.model, layers=2)))
    per = [flops_per_token(dataclasses.replace(cfg.model, layers=n), 32, cfg.objective.mask_rate) for n in (1, 2)]
    assert summary["flops"] == pytest.approx(summary["tokens"] / 8 * (3 * per[0] + 5 * per[1]), rel=1e-9)
    assert any("budget ran out with the model at layers=2" in str(w.message) for w in caught)

    # Twice the budget: step 9 starts at 8/16, and the doubling comes after step 15 (at 14/16).
    longer = pretrain(resume_config(run, ["train.budget=16steps"]), run_dir=run, resume=True, say=quiet)
    assert {int(k.split(".")[1]) for k in weights(run) if k.startswith("layers.")} == {0, 1, 2, 3}
    assert ckpt.load_state(ckpt.latest_checkpoint(run))["techniques"]["stacking"] == {"done": 2}
    assert longer["parameters"] == count_parameters(build_model(cfg.model))
    per4 = flops_per_token(cfg.model, 32, cfg.objective.mask_rate)
    expected = summary["flops"] + summary["tokens"] / 8 * (7 * per[1] + per4)
    assert longer["flops"] == pytest.approx(expected, rel=1e-9)
