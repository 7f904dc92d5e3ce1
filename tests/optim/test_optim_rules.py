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
from cramkit.models.presets import get_preset
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


def _reference_lamb(params, grads_per_step, lr, wd, b1, b2, eps, adapt):
    """tensorflow_addons/optimizers/lamb.py, _resource_apply_dense: bias-corrected moments, no
    cap on ||w||, plain Adam steps for the tensors excluded from layer adaptation."""
    ws = [p.clone() for p in params]
    ms, vs = [torch.zeros_like(w) for w in ws], [torch.zeros_like(w) for w in ws]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (w, g) in enumerate(zip(ws, grads)):
            ms[i] = b1 * ms[i] + (1 - b1) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
            r = (ms[i] / (1 - b1**t)) / ((vs[i] / (1 - b2**t)).sqrt() + eps) + wd[i] * w
            ratio = w.norm() / r.norm() if adapt[i] and w.norm() > 0 and r.norm() > 0 else 1.0
            ws[i] = w - ratio * lr * r
    return ws


@pytest.mark.parametrize("foreach", [False, True])
def test_lamb_matches_the_reference_implementation_over_several_steps(foreach, monkeypatch):
    """You et al. 2020 as in the TF reference: bias correction, no clamp of ||w|| (the matrix
    here has ||w|| ~ 40, the library caps it at 10), and the vector group (no weight decay)
    without trust ratio. Both library code paths: per tensor (CPU) and batched (CUDA's)."""
    if foreach:
        from cramkit.optim.lamb import ReferenceLamb

        monkeypatch.setattr(ReferenceLamb, "_can_use_foreach", lambda self, group: True)
    g = torch.Generator().manual_seed(0)
    matrix = torch.nn.Parameter(torch.randn(8, 8, generator=g) * 5)
    vector = torch.nn.Parameter(torch.randn(8, generator=g))
    lr, wd, b1, b2, eps = 1e-2, 0.1, 0.9, 0.999, 1e-6
    groups = [{"params": [matrix], "weight_decay": wd, "kind": "hidden"},
              {"params": [vector], "weight_decay": 0.0, "kind": "vector"}]
    w0 = [matrix.detach().clone(), vector.detach().clone()]
    opt = OPTIMIZERS["lamb"](groups, OptimConfig(name="lamb", lr=lr, betas=(b1, b2), eps=eps), CPU)
    steps = [[torch.randn(8, 8, generator=g), torch.randn(8, generator=g)] for _ in range(5)]
    for grads in steps:
        matrix.grad, vector.grad = grads[0].clone(), grads[1].clone()
        opt.step()
    expected = _reference_lamb(w0, steps, lr, [wd, 0.0], b1, b2, eps, adapt=[True, False])
    torch.testing.assert_close(matrix.detach(), expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vector.detach(), expected[1], rtol=1e-5, atol=1e-6)
    # The folded-in correction does not leak into the configured hyperparameters.
    assert [(gr["lr"], gr["eps"], gr["weight_decay"]) for gr in opt.param_groups] == [
        (lr, eps, wd), (lr, eps, 0.0)]


class _GainBlock(torch.nn.Module):
    """A residual branch behind a zero-initialised gain (ReZero) and a zero-initialised bias."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(16, 16)
        torch.nn.init.zeros_(self.inner.bias)
        self.gain = torch.nn.Parameter(torch.zeros(1))
        self.head = torch.nn.Linear(16, 16, bias=False)

    def forward(self, x):
        return self.head(x + self.gain * self.inner(x))


def test_lamb_moves_zero_initialised_gains_and_biases_like_adam():
    """With a trust ratio, a tensor at 0 would move by lr * ||w|| ~ lr^2 per step after its first
    and never train; LAMB's vectors must take the same steps as Adam's. The matrices are frozen
    so that both optimizers see the same gradients for the vectors."""
    trajectories = {}
    for name in ("lamb", "adamw"):
        torch.manual_seed(0)
        model = _GainBlock()
        model.inner.weight.requires_grad_(False)
        model.head.weight.requires_grad_(False)
        cfg = OptimConfig(name=name, lr=2e-3, betas=(0.9, 0.999), eps=1e-6)
        opt = build_optimizer(model, cfg, CPU)
        g = torch.Generator().manual_seed(1)
        target = torch.randn(16, 16, generator=g)
        for _ in range(30):
            x = torch.randn(32, 16, generator=g)
            opt.zero_grad()
            ((model(x) - x @ target) ** 2).mean().backward()
            opt.step()
        trajectories[name] = (model.gain.detach().clone(), model.inner.bias.detach().clone())
    assert trajectories["adamw"][0].abs() > 4 * cfg.lr  # Adam moves it by several steps of ~lr
    torch.testing.assert_close(trajectories["lamb"], trajectories["adamw"], rtol=1e-4, atol=1e-6)


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


def test_lars_momentum_is_heavy_ball_unless_nesterov_is_asked_for():
    """You et al. 2017, Alg. 1: v = m * v + local_lr * (g + wd * w); w = w - v (the TF reference
    defaults to use_nesterov=False). With momentum 0.9 the first step already tells them apart."""
    w0, g1 = _tensors()
    _, g2 = _tensors(1)
    lr, eta, mom = 0.5, 0.001, 0.9

    def two_steps(**cfg):
        w = torch.nn.Parameter(w0.clone())
        opt = OPTIMIZERS["lars"]([{"params": [w], "weight_decay": 0.0, "kind": "hidden"}],
                                 OptimConfig(name="lars", lr=lr, lars_trust=eta, momentum=mom,
                                             **cfg), CPU)
        for grad in (g1, g2):
            w.grad = grad.clone()
            opt.step()
        return w.detach()

    u1 = eta * w0.norm() / g1.norm() * g1
    w1 = w0 - lr * u1
    u2 = eta * w1.norm() / g2.norm() * g2
    torch.testing.assert_close(two_steps(), w1 - lr * (mom * u1 + u2))
    nesterov_w1 = w0 - lr * (u1 + mom * u1)
    nesterov_u2 = eta * nesterov_w1.norm() / g2.norm() * g2
    buf = mom * u1 + nesterov_u2
    torch.testing.assert_close(two_steps(nesterov=True), nesterov_w1 - lr * (nesterov_u2 + mom * buf))


def _group_option(opt, key):
    return {group.get("kind"): group.get(key) for group in opt.param_groups}


def test_unset_betas_and_nesterov_mean_each_optimizers_own_default():
    """optim.betas / optim.nesterov unset: Lion gets its paper's (0.9, 0.99), the Adam-type rules
    keep cramkit's (0.9, 0.98), SGD and Muon Nesterov, LARS heavy-ball; a set value wins."""
    torch.manual_seed(0)
    model = build_model(tiny_run_config("unused", "unused").model)
    adam = (0.9, 0.98)
    for name in ("adamw", "lamb", "schedulefree"):
        opt = build_optimizer(model, OptimConfig(name=name), CPU)
        assert set(map(tuple, _group_option(opt, "betas").values())) == {adam}, name
    sam = build_optimizer(model, OptimConfig(name="sam", base="adamw"), CPU)
    assert set(map(tuple, _group_option(sam, "betas").values())) == {adam}
    muon = build_optimizer(model, OptimConfig(name="muon"), CPU)
    assert tuple(_group_option(muon, "betas")["vector"]) == adam
    assert set(_group_option(muon, "nesterov").values()) - {None} == {True}  # its Muon groups
    assert set(map(tuple, _group_option(build_optimizer(model, OptimConfig(name="lion"), CPU),
                                        "betas").values())) == {(0.9, 0.99)}
    explicit = build_optimizer(model, OptimConfig(name="lion", betas=(0.9, 0.98)), CPU)
    assert set(map(tuple, _group_option(explicit, "betas").values())) == {adam}
    assert set(_group_option(build_optimizer(model, OptimConfig(name="sgd"), CPU), "nesterov").values()) == {True}
    assert set(_group_option(build_optimizer(model, OptimConfig(name="lars"), CPU), "nesterov").values()) == {False}
    with pytest.raises(ConfigError, match="optim.betas"):
        OptimConfig(name="lion", betas=(0.9, 1.0)).validate()


def _muon_update(layer_weights, grads, cfg):
    """Muon's first update (w0 - w1) / muon_lr of each Linear in ``layer_weights``, built through
    build_optimizer; each weight is (tensor, stacked_matrices)."""
    model = torch.nn.Module()
    for i, (w, stacked) in enumerate(layer_weights):
        layer = torch.nn.Linear(w.size(1), w.size(0), bias=False)
        layer.weight.data.copy_(w)
        layer.stacked_matrices = stacked
        model.add_module(f"l{i}", layer)
    model.add_module("head", torch.nn.Linear(4, 4, bias=False))  # the output layer: AdamW
    opt = build_optimizer(model, cfg, CPU)
    layers = [m for name, m in model.named_children() if name != "head"]
    for layer, grad in zip(layers, grads):
        layer.weight.grad = grad.clone()
    model.head.weight.grad = torch.zeros(4, 4)
    opt.step()
    return [(w - layer.weight.detach()) / cfg.muon_lr for (w, _), layer in zip(layer_weights, layers)]


def test_muon_orthogonalises_the_parts_of_fused_matrices_separately():
    """A fused qkv's update equals its three parts' updates as separate matrices (as Q, K and V
    are in modded-nanogpt), shape factor included; a GLU's [value | gate] likewise in halves."""
    g = torch.Generator().manual_seed(0)
    d, ff = 8, 12
    qkv, qkv_grad = torch.randn(3 * d, d, generator=g) * 0.1, torch.randn(3 * d, d, generator=g)
    up, up_grad = torch.randn(2 * ff, d, generator=g) * 0.1, torch.randn(2 * ff, d, generator=g)
    cfg = OptimConfig(name="muon", muon_lr=0.02, weight_decay=0.0)
    fused = _muon_update([(qkv, 3), (up, 2)], [qkv_grad, up_grad], cfg)
    separate = _muon_update(
        [(part, 1) for part in (*qkv.chunk(3), *up.chunk(2))],
        [*qkv_grad.chunk(3), *up_grad.chunk(2)], cfg)
    # Newton-Schulz runs in bf16 (relative precision 2^-8), batched or not: equal to that.
    torch.testing.assert_close(fused[0], torch.cat(separate[:3]), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(fused[1], torch.cat(separate[3:]), rtol=1e-2, atol=1e-2)
    # The models declare their fused matrices: the tiny preset has a fused qkv and a GLU.
    torch.manual_seed(0)
    model = build_model(tiny_run_config("unused", "unused").model)
    hidden = next(gr for gr in build_optimizer(model, OptimConfig(name="muon"), CPU).param_groups
                  if gr.get("blocks") == 3)
    assert model.layers[0].attn.qkv.weight in hidden["params"]
    assert {gr.get("blocks") for gr in build_optimizer(model, OptimConfig(name="muon"), CPU)
            .param_groups} == {1, 2, 3, None}


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


def _reference_newton_schulz(G, steps=5):
    """KellerJordan/Muon, muon.py ``zeropower_via_newtonschulz5``, in the input's dtype (the
    reference casts to bf16; the test runs both sides in fp64 to compare to rounding)."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.mT if G.size(-2) > G.size(-1) else G
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if G.size(-2) > G.size(-1) else X


def _reference_muon(model, batches, lr, muon_lr, wd, betas, eps, momentum=0.95):
    """KellerJordan/Muon's ``MuonWithAuxAdam`` written out: Nesterov momentum (``muon_update``),
    Newton-Schulz, shape factor sqrt(max(1, rows / cols)), decay p *= 1 - lr * wd, on every
    hidden matrix, Q, K, V and a GLU's value and gate as separate matrices (modded-nanogpt);
    bias-corrected Adam with the same decoupled decay on embeddings, the head and vectors."""
    parts = {"qkv": 3, "up": 2 if model.config.ffn == "glu" else 1}
    state, b1, b2 = {}, *betas
    for t, x in enumerate(batches, start=1):
        model.zero_grad()
        (model(x, labels=x).loss * 1e5).backward()  # gradients far above the 1e-7 guards
        with torch.no_grad():
            for name, p in model.named_parameters():
                kind = name.split(".")[-2]
                if p.ndim == 2 and not name.startswith(("embeddings.", "head.decoder.")):
                    buf = state.setdefault(name, torch.zeros_like(p))
                    steps = []
                    for g, m in zip(p.grad.chunk(parts.get(kind, 1)), buf.chunk(parts.get(kind, 1))):
                        m.lerp_(g, 1 - momentum)
                        u = _reference_newton_schulz(g.lerp(m, momentum))
                        steps.append(u * max(1, g.size(-2) / g.size(-1)) ** 0.5)
                    p.mul_(1 - muon_lr * wd).sub_(torch.cat(steps), alpha=muon_lr)
                else:
                    m, v = state.setdefault(name, (torch.zeros_like(p), torch.zeros_like(p)))
                    m.lerp_(p.grad, 1 - b1)
                    v.lerp_(p.grad.square(), 1 - b2)
                    update = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
                    decay = wd if p.ndim == 2 else 0.0  # norms and biases are never decayed
                    p.mul_(1 - lr * decay).sub_(update, alpha=lr)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt"])
def test_muon_matches_the_reference_implementation_over_several_steps(preset, monkeypatch):
    """Four steps of a tiny BERT (fused qkv, GLU) and GPT (biases, learned positions) against
    KellerJordan/Muon written out: Newton-Schulz coefficients and count, Nesterov, the shape
    factor per part, decoupled decay, and which parameters take AdamW."""
    from pytorch_optimizer.optimizer.muon import base
    from pytorch_optimizer.optimizer.utils.matrix import zero_power_via_newton_schulz_5

    def fp64(g, num_steps=5, weights=None, **kwargs):
        return zero_power_via_newton_schulz_5(g, num_steps=num_steps, weights=weights, dtype=torch.float64)

    monkeypatch.setattr(base, "zero_power_via_newton_schulz_5", fp64)  # bf16 in training
    torch.manual_seed(0)
    model = build_model({**get_preset(preset), "vocab_size": 96}).double()
    torch.manual_seed(0)
    start = build_model({**get_preset(preset), "vocab_size": 96}).double()
    twin = build_model({**get_preset(preset), "vocab_size": 96}).double()
    twin.load_state_dict(model.state_dict())
    cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1, eps=1e-8)
    opt = build_optimizer(model, cfg, CPU)
    batches = torch.randint(0, 96, (4, 2, 12), generator=torch.Generator().manual_seed(1))
    for x in batches:
        model.zero_grad()
        (model(x, labels=x).loss * 1e5).backward()
        opt.step()
    _reference_muon(twin, batches, cfg.lr, cfg.muon_lr, cfg.weight_decay, (0.9, 0.98), cfg.eps)
    for (name, a), b, a0 in zip(model.named_parameters(), twin.parameters(), start.parameters()):
        assert not torch.equal(a, a0), name  # every parameter trained (none left out)
        # Apart by ~1e-9 (rounding; the reference adds 1e-7 to the norm, the library clamps at
        # 1e-7): another coefficient, iteration count, factor or group moves them by >= 1e-5.
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)


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


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_sams_ascent_point_is_rho_away_whatever_the_gradients_size(scale):
    """e = rho * g / ||g||: the radius is rho for small gradients (late in training, or clipped)
    as for large ones; the test above has ||g|| > 1 only."""
    w0, c = _tensors()
    w = torch.nn.Parameter(w0.clone())
    cfg = OptimConfig(name="sam", base="sgd", momentum=0.0, lr=0.1, sam_rho=0.05)
    opt = OPTIMIZERS["sam"]([{"params": [w], "weight_decay": 0.0, "kind": "hidden"}], cfg, CPU)
    (scale * _cubic(w, c)).backward()
    opt.first_step()
    assert float(torch.linalg.vector_norm(w.detach() - w0)) == pytest.approx(0.05, rel=1e-5)


def test_adaptive_sam_scales_the_ascent_by_the_weights():
    """ASAM (Kwon et al. 2021, Eq. 6, with T_w = |w| and no eta offset, as davda54/sam's
    ``adaptive=True``): e = rho * w^2 * g / ||w * g||, over all parameters together."""
    w0, c = _tensors()
    v0 = torch.randn(5, generator=torch.Generator().manual_seed(3))
    lr, rho = 0.1, 0.5
    w, v = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(v0.clone())
    cfg = OptimConfig(name="sam", base="sgd", momentum=0.0, lr=lr, sam_rho=rho, sam_adaptive=True)
    groups = [{"params": [w], "weight_decay": 0.0, "kind": "hidden"},
              {"params": [v], "weight_decay": 0.0, "kind": "vector"}]
    opt = OPTIMIZERS["sam"](groups, cfg, CPU)

    def closure():
        opt.zero_grad()
        loss = _cubic(w, c) + (v**4).sum()
        loss.backward()
        return loss

    closure()
    opt.step(closure)
    gw, gv = w0**2 + c, 4 * v0**3
    norm = torch.cat([(w0 * gw).flatten(), v0 * gv]).norm()
    ew, ev = rho * w0**2 * gw / norm, rho * v0**2 * gv / norm
    torch.testing.assert_close(w.detach(), w0 - lr * ((w0 + ew) ** 2 + c))
    torch.testing.assert_close(v.detach(), v0 - lr * 4 * (v0 + ev) ** 3)


def test_sam_leaves_the_weights_alone_when_the_ascent_point_loss_is_not_finite():
    w0, c = _tensors()
    w = torch.nn.Parameter(w0.clone())
    cfg = OptimConfig(name="sam", base="adamw", lr=0.1, sam_rho=0.05)
    opt = OPTIMIZERS["sam"]([{"params": [w], "weight_decay": 0.0, "kind": "hidden"}], cfg, CPU)

    def closure():
        opt.zero_grad()
        loss = _cubic(w, c) * float("nan")
        loss.backward()
        return loss.detach()

    w.grad = w0**2 + c
    assert not math.isfinite(float(opt.step(closure)))
    torch.testing.assert_close(w.detach(), w0, rtol=0, atol=0)
    assert not opt.base_optimizer.state[w] and opt.param_groups[0]["sam_step"] == 0


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


def test_trainer_skips_a_step_whose_second_pass_is_not_finite(tiny_mlm_data, tmp_path):
    """The first pass is finite, the pass at SAM's ascent point is not: the step is skipped and
    counted, and no NaN reaches the weights."""
    cfg = tiny_run_config(tiny_mlm_data, tmp_path, "optim.name=sam", "optim.base=adamw")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forward, calls = model.forward, []

    def second_pass_overflows(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append(1)
        if len(calls) > 3:  # the three micro-batches of the first pass are finite
            out.loss = out.loss * float("inf")
        return out

    model.forward = second_pass_overflows
    trainer = _bare_trainer(cfg, model)
    loss = trainer.train_step(_micro_batches(tiny_mlm_data))
    assert len(calls) == 6 and math.isfinite(float(loss))
    assert (trainer.state.nonfinite_total, trainer.state.nonfinite_in_row) == (1, 1)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


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


def test_an_untied_output_projection_is_grouped_with_the_embeddings():
    """Untied, the decoder weight is a Linear, not an Embedding: found as the last Linear, it is
    an ``embedding`` (undecayed under decay_embeddings=false, left alone by Muon), not ``hidden``."""
    from cramkit.optim import parameter_groups

    model = build_model({**get_preset("tiny"), "vocab_size": 512, "tie_embeddings": False})
    decoder = model.head.decoder.weight
    assert decoder is not model.embeddings.tokens.weight
    groups = {g["kind"]: g for g in parameter_groups(model, 0.1, decay_embeddings=False)}
    assert any(p is decoder for p in groups["embedding"]["params"])
    assert not any(p is decoder for p in groups["hidden"]["params"])
    assert groups["embedding"]["weight_decay"] == 0.0


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


def test_memory_estimate_counts_sams_weight_copy_on_top_of_its_base():
    from cramkit.optim import optimizer_states

    assert optimizer_states(OptimConfig(name="adamw")) == 2
    assert optimizer_states(OptimConfig(name="sgd")) == 1
    assert optimizer_states(OptimConfig(name="sam", base="adamw")) == 3  # two moments + old_p
    assert optimizer_states(OptimConfig(name="sam", base="sgd")) == 2


def test_schedule_free_evaluations_and_checkpoints_leave_the_training_weights_exact(tiny_mlm_data, tmp_path):
    """eval() then train() is two lerps that do not round-trip bit for bit: every evaluation and
    checkpoint nudged the training weights, so a run with them did not equal one without."""
    from cramkit.train.checkpoint import latest_checkpoint, load_state

    ends = []
    for name, every in (("plain", "0"), ("busy", "0.34")):
        cfg = tiny_run_config(tiny_mlm_data, tmp_path, "optim.name=schedulefree", "train.budget=6steps",
                              f"train.eval_every={every}", f"train.checkpoint_every={every}", name=name)
        pretrain(cfg, say=lambda *a, **k: None)
        ends.append(load_state(latest_checkpoint(tmp_path / name))["train_weights"])
    for key in ends[0]:
        torch.testing.assert_close(ends[0][key], ends[1][key], rtol=0, atol=0, msg=key)


def test_sams_second_pass_is_charged_in_flops(tiny_mlm_data, tmp_path):
    """SAM runs forward and backward twice on its sharpness-aware steps: a FLOP budget and MFU
    that charged one pass let it compute up to twice what the budget allowed."""
    import json

    def flops(name, *extra):
        cfg = tiny_run_config(tiny_mlm_data, tmp_path, "train.budget=4steps", "train.log_every=1", *extra, name=name)
        pretrain(cfg, say=lambda *_: None)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        records = [r for r in map(json.loads, lines) if r.get("type") == "train"]
        return [b["flops"] - a["flops"] for a, b in zip([{"flops": 0}, *records], records)]

    plain = flops("sgd", "optim.name=sgd")
    assert flops("sam", "optim.name=sam", "optim.base=sgd") == [2 * f for f in plain]
    # Every second step sharpness-aware, the others a plain step of the base optimizer.
    assert flops("sam2", "optim.name=sam", "optim.base=sgd", "optim.sam_every=2") == [
        f * k for f, k in zip(plain, (2, 1, 2, 1))]


@pytest.mark.parametrize(("optim", "schedule", "warns"), [
    ("optim.name=schedulefree", "schedule.name=linear", True),
    ("optim.name=sam", "schedule.name=cosine", True),  # with optim.base=schedulefree below
    ("optim.name=schedulefree", "schedule.name=constant", False),
])
def test_schedule_free_under_a_decaying_schedule_warns(tiny_mlm_data, tmp_path, optim, schedule, warns):
    pytest.importorskip("pytorch_optimizer")
    import warnings

    from cramkit.train.run import pretrain

    cfg = tiny_run_config(tiny_mlm_data, tmp_path, optim, "optim.base=schedulefree", schedule,
                          "train.budget=1steps")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pretrain(cfg, say=lambda *a, **k: None)
    said = [str(w.message) for w in caught if "averaging replaces the decay" in str(w.message)]
    assert len(said) == int(warns), said
    # The options as the user set them: under SAM, optim.name=schedulefree was not among them.
    assert all(m.startswith(f"{optim}, optim.base=schedulefree" if "sam" in optim else optim) for m in said)
