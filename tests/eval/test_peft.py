"""PEFT through peft on cramkit models: base weights untouched, only adapters saved."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cramkit.errors import ConfigError
from cramkit.eval.adapters import PeftOptions, apply_peft, parameter_counts, save_adapters
from cramkit.eval.heads import SequenceClassifier

pytest.importorskip("peft")


def _classifier(preset="tiny"):
    from cramkit.models import build_model
    from cramkit.models.presets import preset_config

    torch.manual_seed(0)
    return SequenceClassifier(build_model(preset_config(preset)), 64, 3, "mean", 0.0)


def _train(model, steps=5):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(5, 1000, (4, 12), generator=gen)
        loss = F.cross_entropy(model(x, torch.ones_like(x)), torch.tensor([0, 1, 2, 0]))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_lora_leaves_base_weights_untouched_and_saves_only_adapters(tmp_path):
    clf = _classifier()
    base = {k: v.clone() for k, v in clf.encoder.state_dict().items()}
    head_before = clf.classifier[0].weight.clone()
    model = apply_peft(clf, PeftOptions("lora", rank=4, alpha=8))
    counts = parameter_counts(model)
    assert 0 < counts["trainable"] < counts["total"] / 4
    _train(model)
    # The wrapped encoder's own weights (base_layer under LoRA) did not move.
    for name, module in clf.encoder.named_modules():
        if hasattr(module, "base_layer"):
            assert torch.equal(module.base_layer.weight, base[f"{name}.weight"]), name
    untouched = {k: v for k, v in clf.encoder.state_dict().items() if "lora_" not in k}
    for name, value in untouched.items():
        assert torch.equal(value, base[name.replace(".base_layer", "")]), name
    # The adapters and the head did train.
    assert any(
        n.endswith("lora_B.default.weight") and p.abs().sum() > 0
        for n, p in model.named_parameters()
    )
    assert not torch.equal(
        model.base_model.model.classifier[0].modules_to_save.default.weight, head_before
    )

    out = save_adapters(model, tmp_path / "adapter")
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert saved and all("lora_" in k or ".classifier." in k for k in saved), list(saved)
    assert any("attn.qkv.lora_A" in k for k in saved) and any("ffn.up.lora_A" in k for k in saved)
    saved_numel = sum(t.numel() for t in saved.values())
    assert saved_numel == counts["trainable"]


@pytest.mark.parametrize("method, marker", [("ia3", "ia3_l"), ("loha", "hada_")])
def test_adapter_methods_train_only_their_parameters(method, marker, tmp_path):
    clf = _classifier()
    frozen = {k: v.clone() for k, v in clf.encoder.state_dict().items()}
    model = apply_peft(clf, PeftOptions(method))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(marker in n or ".classifier." in n for n in trainable)
    _train(model, steps=2)
    after = {
        k.replace(".base_layer", ""): v
        for k, v in clf.encoder.state_dict().items()
        if marker.split("_")[0] not in k
    }
    for name, value in after.items():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name
    saved = load_file(str(save_adapters(model, tmp_path / method) / "adapter_model.safetensors"))
    assert all(marker.split("_")[0] in k or ".classifier." in k for k in saved)


def test_gpt_model_and_bad_targets():
    model = apply_peft(_classifier("tiny-gpt"), PeftOptions("lora"))
    x = torch.randint(5, 1000, (2, 7))
    assert model(x, torch.ones_like(x)).shape == (2, 3)
    with pytest.raises(ConfigError, match="match no linear layer"):
        apply_peft(_classifier(), PeftOptions("lora", targets=("nope",)))
    with pytest.raises(ConfigError, match="unknown peft method 'lorra'"):
        apply_peft(_classifier(), PeftOptions("lorra"))


def test_finetune_with_lora_reports_trainable_count(tiny_run, bbc_task, tmp_path):
    from cramkit.eval.finetune import FinetuneConfig, finetune, load_backbone

    cfg = FinetuneConfig.from_dict(
        {
            "seeds": [0],
            "progress": False,
            "epochs": 1,
            "peft": "lora",
            "max_train_examples": 32,
            "max_eval_examples": 32,
            "save": True,
        }
    )
    result = finetune(load_backbone(tiny_run), bbc_task, cfg, save_dir=tmp_path / "ft")
    counts = result["parameters"]
    assert counts["trainable"] < counts["total"] / 4
    assert (tmp_path / "ft" / "seed-0" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "ft" / "seed-0" / "model.safetensors").exists()


def test_saving_again_replaces_the_seed_directory(tiny_run, bbc_task, tmp_path, monkeypatch):
    """A LoRA save into the directory of an earlier full save left the full model.safetensors
    beside the adapter (and a finetune_config.json saying peft=lora); a failed save left a
    half-written directory. The seed directory is now replaced as a whole, or not at all."""
    import json

    from cramkit.eval import adapters
    from cramkit.eval.finetune import FinetuneConfig, finetune, load_backbone

    small = {"seeds": [0], "progress": False, "epochs": 1, "max_train_examples": 16,
             "max_eval_examples": 16, "save": True}
    backbone = load_backbone(tiny_run)
    seed_dir = tmp_path / "ft" / "seed-0"
    finetune(backbone, bbc_task, FinetuneConfig.from_dict(small), save_dir=tmp_path / "ft")
    assert (seed_dir / "model.safetensors").is_file()
    finetune(backbone, bbc_task, FinetuneConfig.from_dict({**small, "peft": "lora"}),
             save_dir=tmp_path / "ft")
    assert (seed_dir / "adapter_model.safetensors").is_file()
    assert not (seed_dir / "model.safetensors").exists()
    assert json.loads((seed_dir / "finetune_config.json").read_text())["peft"] == "lora"

    def broken(model, out):
        (out / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(adapters, "save_adapters", broken)
    with pytest.raises(OSError, match="disk full"):
        finetune(backbone, bbc_task, FinetuneConfig.from_dict({**small, "peft": "lora"}),
                 save_dir=tmp_path / "ft2")
    assert not (tmp_path / "ft2").exists()  # nor the folder made for it: nothing is left


def _perturb_adapters(model):
    """Move every trainable tensor off its init (LoRA's B and IA3's vectors start as a no-op)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("preset", ["crammed-bert", "tiny-gpt"])
@pytest.mark.parametrize("method", ["lora", "loha", "ia3"])
def test_merge_and_unload_gives_the_unmerged_outputs(method, preset):
    """With modules_to_save=["classifier"] peft wrapped the nn.Sequential head, and
    merge_and_unload() failed for IA3 and LoHa ("'Sequential' object has no attribute
    'weight'"). The head's linear layers are saved by name instead."""
    from cramkit.models import build_model
    from cramkit.models.presets import preset_config

    cfg = preset_config(preset, vocab_size=256, hidden=32, layers=2, heads=4, intermediate=64,
                        max_positions=64)
    torch.manual_seed(0)
    clf = SequenceClassifier(build_model(cfg), 32, 3, dropout=0.0, causal=cfg.causal)
    model = apply_peft(clf, PeftOptions(method))
    head = model.peft_config["default"].modules_to_save
    _perturb_adapters(model)
    model.eval()
    x = torch.randint(5, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    mask[1, 7:] = 0
    with torch.no_grad():
        before = model(x, mask)
        merged = model.merge_and_unload()
        after = merged(x, mask)
    assert type(merged) is SequenceClassifier
    nn = torch.nn
    assert [type(m) for m in merged.classifier] == [nn.Linear, nn.Tanh, nn.Dropout, nn.Linear]
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    assert head == ["classifier.0", "classifier.3"]


@pytest.mark.parametrize("method", ["lora", "loha", "ia3"])
def test_saved_adapters_and_head_reload(method, tmp_path):
    """Saving names the head's linear layers; peft's from_pretrained on a fresh base model of
    the same weights gives back the fine-tuned outputs."""
    import peft

    clf = _classifier()
    base = {k: v.clone() for k, v in clf.state_dict().items()}
    model = apply_peft(clf, PeftOptions(method))
    _perturb_adapters(model)
    model.eval()
    x = torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x, torch.ones_like(x))
    saved = load_file(str(save_adapters(model, tmp_path / method) / "adapter_model.safetensors"))
    assert {k for k in saved if ".classifier." in k} == {
        f"base_model.model.classifier.{i}.{kind}" for i in (0, 3) for kind in ("weight", "bias")
    }
    fresh = _classifier()
    fresh.load_state_dict(base)
    reloaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / method)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, torch.ones_like(x)), want)


def test_ia3_scales_keys_values_and_the_ffn_intermediate_once():
    """IA3 used LoRA's target list: it scaled attn.out and the FFN intermediate twice (ffn.up's
    output and ffn.down's input). Its default is now the paper's (and peft's BERT default):
    the fused qkv's output and ffn.down's input; an explicit target list still wins."""
    from cramkit.eval.adapters import IA3_TARGETS, PEFT_METHODS

    assert IA3_TARGETS == ("attn.qkv", "ffn.down")
    assert PEFT_METHODS["lora"].default_targets == PEFT_METHODS["loha"].default_targets == (
        "attn.qkv", "attn.out", "ffn.up", "ffn.down")
    config = apply_peft(_classifier(), PeftOptions("ia3")).peft_config["default"]
    layers = range(len(_classifier().encoder.layers))
    assert set(config.target_modules) == {
        f"encoder.layers.{i}.{t}" for i in layers for t in ("attn.qkv", "ffn.down")
    }
    assert set(config.feedforward_modules) == {f"encoder.layers.{i}.ffn.down" for i in layers}
    lora = apply_peft(_classifier(), PeftOptions("lora")).peft_config["default"]
    assert {n.split(".", 3)[3] for n in lora.target_modules} == {
        "attn.qkv", "attn.out", "ffn.up", "ffn.down"}
    chosen = apply_peft(_classifier(), PeftOptions("ia3", targets=("attn.qkv", "attn.out", "ffn.down")))
    config = chosen.peft_config["default"]
    assert {n.split(".", 3)[3] for n in config.target_modules} == {"attn.qkv", "attn.out", "ffn.down"}
    assert {n.split(".", 3)[3] for n in config.feedforward_modules} == {"ffn.down"}


def test_finetune_peft_targets_default_to_the_methods_own():
    from cramkit.configbase import apply_overrides
    from cramkit.eval.finetune import FinetuneConfig

    assert FinetuneConfig().peft_targets is None
    assert FinetuneConfig.from_dict(apply_overrides({}, ["peft_targets=none"])).peft_targets is None
    assert FinetuneConfig.from_dict(apply_overrides({}, ["peft_targets=attn.qkv,ffn.up"])).peft_targets == [
        "attn.qkv", "ffn.up"]



@pytest.mark.parametrize(("method", "marker"), [("ia3", ".ia3_l."), ("lora", ".lora_")])
def test_weight_decay_spares_ia3_scaling_vectors(method, marker, tiny_run, bbc_task, monkeypatch):
    """IA3's vectors are 2-D in peft ([out, 1], [1, in]), so fine-tuning's parameter groups (which
    spare tensors of fewer than 2 dims) decayed them toward 0 under finetune.weight_decay > 0,
    toward switching the adapted layers off. LoRA's matrices stay decayed."""
    import importlib

    ft = importlib.import_module("cramkit.eval.finetune")  # the module; the package exports a function of that name
    made, wrapped = [], []

    class Recording(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            made.append(self)

    def recording_apply_peft(model, opts):
        wrapped.append(apply_peft(model, opts))
        return wrapped[-1]

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    monkeypatch.setattr(ft, "apply_peft", recording_apply_peft)
    cfg = ft.FinetuneConfig.from_dict({"seeds": [0], "progress": False, "epochs": 0.05, "seq_len": 32,
                                       "max_train_examples": 32, "max_eval_examples": 8,
                                       "weight_decay": 0.1, "peft": method})
    ft.finetune(ft.load_backbone(tiny_run), bbc_task, cfg)
    decay = {id(p): g["weight_decay"] for g in made[0].param_groups for p in g["params"]}
    assert len(decay) == sum(len(g["params"]) for g in made[0].param_groups)  # each once
    trainable = {n: p for n, p in wrapped[0].named_parameters() if p.requires_grad}
    assert set(decay) == {id(p) for p in trainable.values()}
    adapter = {n: p for n, p in trainable.items() if marker in n}
    assert adapter and all(p.ndim == 2 for p in adapter.values())
    want = 0.0 if method == "ia3" else 0.1
    assert {n: decay[id(p)] for n, p in adapter.items()} == {n: want for n in adapter}
    head = trainable["base_model.model.classifier.0.modules_to_save.default.weight"]
    assert decay[id(head)] == 0.1  # the head's matrices are decayed as before
