"""Update rules checked against the papers' formulas (one step on a tiny tensor), SAM's second
pass through the trainer, Schedule-Free's evaluation weights and learning-rate scaling."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from optim_helpers import tiny_run_config, train_losses

from cramkit.config import OptimConfig
from cramkit.errors import ConfigError
from cramkit.models import build_model
from cramkit.optim import OPTIMIZERS, build_optimizer, lr_scale
from cramkit.train.run import pretrain
from cramkit.train.trainer import Trainer

CPU = torch.device("cpu")


def _tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)


def _one_step(name: str, w0: torch.Tensor, grad: torch.Tensor, kind: str = "hidden", **cfg):
    w = torch.nn.Parameter(w0.clone())
    opt = OPTIMIZERS[name]([{"params": [w], "weight_decay": cfg.pop("weight_decay", 0.0),
                             "kind": kind}], OptimConfig(name=name, **cfg), CPU)
    w.grad = grad.clone()
    opt.step()
    return w.detach()


def test_lion_step_is_the_sign_of_the_interpolated_momentum():
    w, g = _tensors()
    lr, wd = 1e-2, 0.1
    new = _one_step("lion", w, g, lr=lr, weight_decay=wd, betas=(0.9, 0.99))
    # Chen et al. 2023, Alg. 2 with m_0 = 0: w - lr * (sign(b1*m + (1-b1)*g) + wd*w).
    expected = w * (1 - lr * wd) - lr * torch.sign(0.1 * g)
    torch.testing.assert_close(new, expected)


def test_lamb_step_uses_the_layerwise_trust_ratio():
    w, g = _tensors()
    lr, wd, b1, b2, eps = 1e-2, 0.1, 0.9, 0.999, 1e-6
    new = _one_step("lamb", w, g, lr=lr, weight_decay=wd, betas=(b1, b2), eps=eps)
    # You et al. 2020, Alg. 2, first step: r = Adam direction + decay, rescaled to ||w|| / ||r||
    # per tensor. The library leaves m and v without bias correction (see optimizers.lamb).
    m, v = (1 - b1) * g, (1 - b2) * g * g
    r = m / (v.sqrt() + eps) + wd * w
    expected = w - lr * (w.norm() / r.norm()) * r
    torch.testing.assert_close(new, expected, rtol=1e-4, atol=1e-6)


def test_lars_step_uses_the_layerwise_trust_ratio():
    w, g = _tensors()
    lr, wd, eta = 0.5, 0.01, 0.001
    new = _one_step("lars", w, g, lr=lr, weight_decay=wd, lars_trust=eta, momentum=0.0)
    # You et al. 2017: local lr = eta * ||w|| / (||g|| + wd * ||w||), applied to g + wd * w.
    trust = eta * w.norm() / (g.norm() + wd * w.norm())
    torch.testing.assert_close(new, w - lr * trust * (g + wd * w))
    # Vectors (norms, biases) take plain steps: a trust ratio is only for layers' matrices.
    v, gv = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(_one_step("lars", v, gv, kind="vector", lr=lr, momentum=0.0),
                               v - lr * gv)


def test_muon_orthogonalises_hidden_matrices_and_adamw_steps_the_rest():
    u, _ = torch.linalg.qr(torch.randn(16, 16))
    v, _ = torch.linalg.qr(torch.randn(8, 8))
    spread = torch.tensor([10.0, 5, 2, 1, 0.5, 0.2, 0.1, 0.05])
    g = u[:, :8] @ torch.diag(spread) @ v.T  # condition number 200
    w0 = torch.randn(16, 8) * 0.1
    new = _one_step("muon", w0, g, muon_lr=0.02)
    s = torch.linalg.svdvals((w0 - new) / 0.02)
    assert s.max() / s.min() < 3, s  # Newton-Schulz maps every singular value near 1
    vec, gv = torch.randn(8), torch.randn(8)
    new_vec = _one_step("muon", vec, gv, kind="vector", lr=1e-3, eps=1e-12)
    # Adam's first step is lr * sign(g) once bias-corrected.
    torch.testing.assert_close(new_vec, vec - 1e-3 * torch.sign(gv), rtol=1e-5, atol=1e-7)


def _cubic(w, c):
    return (w**3).sum() / 3 + (c * w).sum()  # gradient w^2 + c: curvature makes SAM differ


def test_sam_step_uses_the_gradient_at_the_ascent_point_and_every_k():
    w0, c = _tensors()
    lr, rho = 0.1, 0.05
    w = torch.nn.Parameter(w0.clone())
    cfg = OptimConfig(name="sam", base="sgd", momentum=0.0, lr=lr, sam_rho=rho, sam_every=2)
    opt = OPTIMIZERS["sam"]([{"params": [w], "weight_decay": 0.0, "kind": "hidden"}], cfg, CPU)

    def closure():
        opt.zero_grad()
        loss = _cubic(w, c)
        loss.backward()
        return loss

    grad = lambda x: x**2 + c  # noqa: E731
    closure()
    opt.step(closure)
    g = grad(w0)
    # Foret et al. 2021, Eq. 2: e = rho * g / ||g||; the update uses the gradient at w + e.
    w1 = w0 - lr * grad(w0 + rho * g / g.norm())
    torch.testing.assert_close(w.detach(), w1)
    closure()
    opt.step(closure)  # the second of every 2 steps is a plain base step
    torch.testing.assert_close(w.detach(), w1 - lr * grad(w1))


def _bare_trainer(cfg, model):
    return Trainer(
        cfg=cfg, model=model, optimizer_factory=lambda m: build_optimizer(m, cfg.optim, CPU),
        train_batches=iter(()), evaluate=lambda m: 0.0, checkpoint=lambda s: None,
        log=lambda r: None, techniques=[], device=CPU, precision="fp32", micro_batch=4,
        seq_len=32, flops_per_token=lambda m: 1.0, peak_flops=1.0,
    )


def _micro_batches(tiny_mlm_data):
    from cramkit.data.dataset import TokenDataset
    from cramkit.objectives import build_objective

    ds = TokenDataset.open(tiny_mlm_data)
    objective = build_objective("mlm", ds, seed=0, mask_rate=0.25)
    big = objective(torch.from_numpy(ds.sequences("train")[:12].astype("int64")), 0)
    return [{k: v[i:i + 4] for k, v in big.items()} for i in range(0, 12, 4)]


def test_trainer_second_pass_recomputes_the_same_micro_batches(tiny_mlm_data, tmp_path):
    """SAM with rho = 0 perturbs nothing, so its closure's gradient over the same micro-batches
    must reproduce the plain optimizer's step exactly; clipping applies to both passes."""
    batches = _micro_batches(tiny_mlm_data)
    results = []
    for extra in (["optim.name=sgd"], ["optim.name=sam", "optim.base=sgd", "optim.sam_rho=0"]):
        cfg = tiny_run_config(tiny_mlm_data, tmp_path, "optim.lr=0.5", "train.clip_grad=0.1",
                              *extra)
        torch.manual_seed(0)
        model = build_model(cfg.model)
        _bare_trainer(cfg, model).train_step(batches)
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=0, atol=1e-7, msg=key)


def test_schedule_free_is_evaluated_at_its_averaged_weights(tiny_mlm_data, tmp_path):
    cfg = tiny_run_config(tiny_mlm_data, tmp_path, "optim.name=schedulefree")
    model = build_model(cfg.model)
    trainer = _bare_trainer(cfg, model)
    for _ in range(3):
        trainer.train_step(_micro_batches(tiny_mlm_data))
    training = model.layers[0].attn.qkv.weight.detach().clone()
    seen = []
    trainer.evaluate = lambda m: seen.append(m.layers[0].attn.qkv.weight.detach().clone()) or 0.0
    trainer.run_eval()
    assert not torch.allclose(seen[0], training)
    torch.testing.assert_close(model.layers[0].attn.qkv.weight.detach(), training)


@pytest.mark.parametrize(("rule", "expected"), [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_lr_scaling_rules(rule, expected):
    assert math.isclose(lr_scale(rule, 1024, 256), expected)


def test_lr_scaling_applies_to_every_group_and_is_logged(caplog):
    model = build_model({**__import__("cramkit.models.presets", fromlist=["x"]).get_preset("tiny"),
                         "vocab_size": 512})
    cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, lr_scaling="linear", base_batch_size=256)
    with caplog.at_level(logging.INFO, logger="cramkit.optim"):
        opt = build_optimizer(model, cfg, CPU, batch_size=1024)
    lrs = {g["kind"]: g["initial_lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"hidden": 0.08, "embedding": 4e-3, "vector": 4e-3})
    assert "scales the learning rate by 4" in caplog.text
    with pytest.raises(ConfigError, match="needs the batch size"):
        build_optimizer(model, cfg, CPU)
    with pytest.raises(ConfigError, match="unknown rule"):
        lr_scale("quadratic", 2, 1)


def test_scaled_learning_rate_reaches_the_metrics(tiny_mlm_data, tmp_path):
    cfg = tiny_run_config(tiny_mlm_data, tmp_path, "train.budget=2steps", "optim.lr=1e-3",
                          "optim.lr_scaling=sqrt", "optim.base_batch_size=2")
    pretrain(cfg, say=lambda *_: None)
    import json

    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r.get("type") == "train"]
    assert lrs == pytest.approx([2e-3, 2e-3])  # sqrt(8 / 2) * 1e-3, constant schedule
    assert train_losses(tmp_path / "run")


def test_parameter_groups_keep_norms_biases_and_optionally_embeddings_undecayed():
    from cramkit.models.presets import get_preset
    from cramkit.optim import parameter_groups

    model = build_model({**get_preset("tiny"), "vocab_size": 512, "bias": True})
    groups = {g["kind"]: g for g in parameter_groups(model, 0.1, decay_embeddings=False)}
    assert groups["vector"]["weight_decay"] == 0.0 and groups["embedding"]["weight_decay"] == 0.0
    assert groups["hidden"]["weight_decay"] == 0.1
    assert all(p.ndim == 1 or p.ndim == 0 for p in groups["vector"]["params"])
    assert model.embeddings.tokens.weight in groups["embedding"]["params"]
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len({id(p) for p in model.parameters()})  # the tied decoder counted once


def test_schedule_free_checkpoints_the_averaged_weights_for_users_and_resumes_from_its_own(
    tiny_mlm_data, tmp_path
):
    """model.safetensors (what fine-tuning and export load) holds the evaluated x, as the
    reference says to checkpoint; state.pt keeps the training y for an exact resume."""
    from safetensors.torch import load_file

    from cramkit.train.checkpoint import latest_checkpoint, load_pretrained, load_state
    from cramkit.train.run import pretrain

    cfg = tiny_run_config(tiny_mlm_data, tmp_path, "optim.name=schedulefree", "train.budget=4steps")
    pretrain(cfg, say=lambda *a, **k: None)
    ckpt = latest_checkpoint(tmp_path / "run")
    x, state = load_file(str(ckpt / "model.safetensors")), load_state(ckpt)
    y = state["train_weights"]
    name = "layers.0.attn.qkv.weight"
    assert not torch.allclose(x[name], y[name])
    # The optimizer state's z, through a fresh optimizer over the same model.
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"), cfg.train.batch_size)
    opt.load_state_dict(state["optimizer"])
    param = dict(model.named_parameters())[name]
    group = next(g for g in opt.param_groups if any(q is param for q in g["params"]))
    z = opt.state[param]["z"]
    torch.testing.assert_close(x[name], torch.lerp(y[name], z, 1.0 - 1.0 / group["betas"][0]))
    loaded, _, _ = load_pretrained(tmp_path / "run")
    torch.testing.assert_close(loaded.state_dict()[name], x[name], rtol=0, atol=0)
