"""The training step without host-device synchronisation behaves exactly like the host-decided one.

The sync-free path needs an optimizer that can skip a step from a device flag: fused AdamW, which
the trainer uses on CUDA by default and these CPU tests ask for with ``optim.fused=on``. The
reference is the previous code path, forced by patching: the host reads the loss to decide
(``skips_on_device`` false) and the model finds its targets itself (no ``target_index``).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import cramkit.train.run as run_module
import cramkit.train.trainer as trainer_module
from cramkit.errors import TrainingError
from cramkit.models import build_model
from cramkit.objectives import target_index
from cramkit.train import checkpoint as ckpt
from cramkit.train.run import pretrain

from .helpers import on_training_forward, poison_training_loss, tiny_config

FUSED = "optim.fused=on"


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"]


def _host_decided(monkeypatch):
    """The code path before this change: host reads of the loss, nonzero() in the model."""
    monkeypatch.setattr(trainer_module, "skips_on_device", lambda *a: False)
    monkeypatch.setattr(trainer_module, "locate_targets", lambda batch, model: batch)
    monkeypatch.setattr(run_module, "locate_targets", lambda batch, model: batch)


def _poison(monkeypatch, bad):
    """Models whose training loss is NaN on the forward calls for which ``bad(n)`` is true."""
    poison_training_loss(monkeypatch, bad)


def test_supplied_target_index_gives_the_same_loss_and_gradients(tiny_mlm_data, tmp_path):
    from cramkit.data.dataset import TokenDataset
    from cramkit.objectives import build_objective

    cfg = tiny_config(tiny_mlm_data, tmp_path)
    assert cfg.model.sparse_prediction
    ds = TokenDataset.open(tiny_mlm_data)
    batch = build_objective("mlm", ds, seed=0)(torch.from_numpy(ds.sequences("train")[:8].astype("int64")), 3)
    model = build_model(cfg.model)
    results = []
    for extra in ({}, {"target_index": target_index(batch["labels"])}):
        model.zero_grad(set_to_none=True)
        out = model(**batch, **extra)
        out.loss.backward()
        results.append((out.loss.detach(), out.logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, logits_a, grads_a), (loss_b, logits_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    torch.testing.assert_close(logits_a, logits_b, rtol=0, atol=0)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_model_predicts_at_the_supplied_index_and_the_trainer_supplies_it(tiny_mlm_data, tmp_path,
                                                                             monkeypatch):
    """Same results with and without the index (above) would also hold if the model ignored it
    and synchronised anyway: here it must follow an index that differs from its own."""
    from cramkit.data.dataset import TokenDataset
    from cramkit.objectives import build_objective

    cfg = tiny_config(tiny_mlm_data, tmp_path)
    ds = TokenDataset.open(tiny_mlm_data)
    batch = build_objective("mlm", ds, seed=0)(torch.from_numpy(ds.sequences("train")[:8].astype("int64")), 3)
    index = target_index(batch["labels"])
    out = build_model(cfg.model)(**batch, target_index=index[::2])
    assert out.logits.shape[0] == len(index[::2]) < len(index)
    supplied = []
    on_training_forward(monkeypatch, lambda n, kwargs, out: supplied.append(kwargs.get("target_index") is not None))
    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps", name="supplied"), say=lambda *_: None)
    assert supplied and all(supplied)  # every training micro-batch came with its index


def test_sync_free_step_equals_the_host_decided_step(tiny_mlm_data, tmp_path, monkeypatch):
    common = (FUSED, "train.budget=8steps", "train.batch_ramp=0.5", "model.dropout=0.1", "train.clip_grad=0.5")
    pretrain(tiny_config(tiny_mlm_data, tmp_path, *common, name="new"), say=lambda *_: None)
    with monkeypatch.context() as m:
        _host_decided(m)
        pretrain(tiny_config(tiny_mlm_data, tmp_path, *common, name="old"), say=lambda *_: None)
    assert _losses(tmp_path / "new") == _losses(tmp_path / "old")
    a = load_file(str(ckpt.latest_checkpoint(tmp_path / "new") / "model.safetensors"))
    b = load_file(str(ckpt.latest_checkpoint(tmp_path / "old") / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def _bare_trainer(data, tmp_path, fused):
    """A Trainer over a tiny model with gradient clipping, driven step by step by the test, and
    three micro-batches of four sequences."""
    from cramkit.data.dataset import TokenDataset
    from cramkit.objectives import build_objective
    from cramkit.optim import build_optimizer
    from cramkit.train.trainer import Trainer

    cfg = tiny_config(data, tmp_path, fused, "train.clip_grad=0.5")
    ds = TokenDataset.open(data)
    objective = build_objective("mlm", ds, seed=0)
    batches = [objective(torch.from_numpy(ds.sequences("train")[i * 4:(i + 1) * 4].astype("int64")), i * 4)
               for i in range(3)]
    model = build_model(cfg.model)
    trainer = Trainer(
        cfg=cfg, model=model, optimizer_factory=lambda m: build_optimizer(m, cfg.optim, torch.device("cpu")),
        train_batches=iter(()), evaluate=lambda m: 0.0, checkpoint=lambda s: None, log=lambda r: None,
        techniques=[], device=torch.device("cpu"), precision="fp32", micro_batch=4, seq_len=32,
        flops_per_token=lambda m: 1.0, peak_flops=1.0,
    )
    return model, trainer, batches


def test_a_nonfinite_step_leaves_weights_and_optimizer_untouched(tiny_mlm_data, tmp_path):
    model, trainer, batches = _bare_trainer(tiny_mlm_data, tmp_path, FUSED)
    trainer.train_step(batches[:1])  # a good step first, so the optimizer has state to protect
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = {k: v.clone() for k, v in trainer.state.optimizer.state[model.head.decoder.weight].items()}
    forward = model.forward
    model.forward = lambda *a, **k: _nan_loss(forward(*a, **k))
    loss = trainer.train_step(batches[1:])
    assert not torch.isfinite(loss)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    for key, value in trainer.state.optimizer.state[model.head.decoder.weight].items():
        torch.testing.assert_close(value, opt_before[key], rtol=0, atol=0, msg=key)  # step count too
    trainer.nonfinite.settle(trainer.state)
    assert (trainer.state.nonfinite_total, trainer.state.nonfinite_in_row) == (1, 1)


@pytest.mark.parametrize("fused", ["on", "off"])  # decided on the device / on the host
def test_a_nonfinite_gradient_under_a_finite_loss_is_skipped_too(tiny_mlm_data, tmp_path, fused):
    """Clipping by a NaN norm writes NaN into every gradient: stepped, it ruined every weight."""
    model, trainer, batches = _bare_trainer(tiny_mlm_data, tmp_path, f"optim.fused={fused}")
    trainer.train_step(batches[:1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hook = model.layers[0].ffn.down.weight.register_hook(lambda g: g * float("inf"))
    loss = trainer.train_step(batches[1:2])
    hook.remove()
    assert not torch.isfinite(loss)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    trainer.nonfinite.settle(trainer.state)
    assert trainer.state.nonfinite_total == 1
    assert torch.isfinite(trainer.train_step(batches[:1]))  # and the next step trains again
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def _nan_loss(out):
    out.loss = out.loss * float("nan")
    return out


def test_nonfinite_steps_are_skipped_and_counted_on_the_device(tiny_mlm_data, tmp_path, monkeypatch):
    _poison(monkeypatch, lambda n: n in (3, 4))  # two bad steps (one micro-batch each), then healthy
    cfg = tiny_config(tiny_mlm_data, tmp_path, FUSED, "train.budget=6steps", "train.micro_batch=8",
                      "train.log_every=4")
    summary = pretrain(cfg, say=lambda *_: None)
    assert summary["nonfinite_steps"] == 2 and summary["steps"] == 6
    losses = _losses(tmp_path / "run")  # logged at steps 4 and 6: the 4th was a skipped one (null)
    assert len(losses) == 2 and losses[0] is None and isinstance(losses[1], float)


@pytest.mark.parametrize(("log_every", "noticed_at"), [(1, 3), (4, 4)])
def test_too_many_nonfinite_in_a_row_stops_at_the_next_read(tiny_mlm_data, tmp_path, monkeypatch, log_every,
                                                            noticed_at):
    # The limit (3) is reached at step 3; the counts are read every log_every steps, so the error
    # comes at the first read from then on: step 3 when logging every step, step 4 otherwise.
    _poison(monkeypatch, lambda n: True)
    cfg = tiny_config(tiny_mlm_data, tmp_path, FUSED, "train.max_nonfinite=3", "train.micro_batch=8",
                      f"train.log_every={log_every}")
    with pytest.raises(TrainingError, match=f"not finite for {noticed_at} steps in a row \\(by step {noticed_at}\\)"):
        pretrain(cfg, say=lambda *_: None)


def test_a_run_of_nonfinite_steps_that_ended_before_the_read_still_stops(tiny_mlm_data, tmp_path, monkeypatch):
    _poison(monkeypatch, lambda n: n in (1, 2, 3))  # three bad steps, then good ones before the read
    cfg = tiny_config(tiny_mlm_data, tmp_path, FUSED, "train.max_nonfinite=3", "train.micro_batch=8",
                      "train.log_every=5")
    with pytest.raises(TrainingError, match="not finite for 3 steps in a row \\(by step 5\\)"):
        pretrain(cfg, say=lambda *_: None)


def test_device_skip_needs_the_parameters_on_the_flags_device():
    """With FSDP2's CPU offload the fused step runs on the CPU while the loss (and so the skip
    flag) is on the GPU; a non-blocking copy of the flag would race the kernel that reads it."""
    from cramkit.train.nonfinite import skips_on_device

    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param], fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert skips_on_device(optimizer, scaler, torch.device("cpu"))
    assert not skips_on_device(optimizer, scaler, torch.device("cuda"))
    assert not skips_on_device(torch.optim.AdamW([param], foreach=True), scaler, torch.device("cpu"))


def test_the_sync_free_step_copies_no_host_value_to_the_device(tiny_mlm_data, tmp_path, monkeypatch):
    """torch.tensor(python_value, device=...) copies from the host and waits: on a GPU it is a
    sync. None may run inside a training step (the counts' start after each read was one)."""
    calls, inside = [], []
    real_tensor, real_step = torch.tensor, trainer_module.Trainer.train_step

    def recording_tensor(*args, **kwargs):
        if inside and kwargs.get("device") is not None:
            calls.append((args, kwargs))
        return real_tensor(*args, **kwargs)

    def step(self, batches):
        inside.append(True)
        try:
            return real_step(self, batches)
        finally:
            inside.pop()

    monkeypatch.setattr(torch, "tensor", recording_tensor)
    monkeypatch.setattr(trainer_module.Trainer, "train_step", step)
    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=6steps", "train.log_every=2", FUSED),
             say=lambda *_: None)
    assert calls == []
