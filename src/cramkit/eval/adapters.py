"""Parameter-efficient fine-tuning of cramkit models through HF ``peft``.

Methods are a registry of ``(config builder)``; each targets cramkit's linear layers by module
name: the fused attention projection ``attn.qkv``, ``attn.out`` and the feed-forward
``ffn.up`` / ``ffn.down`` inside ``encoder.layers``. The classification head (``classifier``) is
trained in full and saved with the adapters (peft's ``modules_to_save``); base weights stay
frozen and are not saved.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

from ..configbase import did_you_mean
from ..errors import ConfigError

#: Default module-name suffixes adapted by every method.
DEFAULT_TARGETS = ("attn.qkv", "attn.out", "ffn.up", "ffn.down")


@dataclasses.dataclass
class PeftOptions:
    """What to adapt and how (LoRA/LoHa rank and scaling, IA3 feed-forward modules)."""

    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Sequence[str] = DEFAULT_TARGETS


def _require_peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("PEFT needs the 'peft' package (pip install 'cramkit[hf]')") from None
    return peft


def target_modules(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full names of the ``nn.Linear`` modules in ``model.encoder.layers`` matching ``targets``.

    Full names (not bare suffixes) keep peft away from same-named layers elsewhere, e.g. the
    classification head or the LM head.
    """
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name.startswith("encoder.layers.")
        and any(name.endswith(t) for t in targets)
    ]
    if not names:
        raise ConfigError(
            f"peft targets {list(targets)} match no linear layer inside encoder.layers "
            f"(cramkit names them {list(DEFAULT_TARGETS)})"
        )
    return names


def _lora(peft, names: list[str], opts: PeftOptions):
    return peft.LoraConfig(
        r=opts.rank,
        lora_alpha=opts.alpha,
        lora_dropout=opts.dropout,
        target_modules=names,
        modules_to_save=["classifier"],
    )


def _loha(peft, names: list[str], opts: PeftOptions):
    return peft.LoHaConfig(
        r=opts.rank,
        alpha=opts.alpha,
        module_dropout=opts.dropout,
        target_modules=names,
        modules_to_save=["classifier"],
    )


def _ia3(peft, names: list[str], opts: PeftOptions):
    # IA3 scales the *input* of feed-forward modules and the *output* of the others; the FFN's
    # down projection is the one whose input is the feed-forward activation.
    ff = [n for n in names if n.endswith("ffn.down")]
    return peft.IA3Config(
        target_modules=names,
        feedforward_modules=ff,
        modules_to_save=["classifier"],
    )


PEFT_METHODS: dict[str, Callable] = {"lora": _lora, "loha": _loha, "ia3": _ia3}


def apply_peft(model: nn.Module, opts: PeftOptions) -> nn.Module:
    """Wrap a :class:`~cramkit.eval.heads.SequenceClassifier` in a peft model.

    Only adapter parameters and the classifier head stay trainable.
    """
    peft = _require_peft()
    try:
        build = PEFT_METHODS[opts.method]
    except KeyError:
        raise ConfigError(
            f"unknown peft method '{opts.method}'{did_you_mean(opts.method, PEFT_METHODS)}; "
            f"choose from {sorted(PEFT_METHODS)}"
        ) from None
    config = build(peft, target_modules(model, opts.targets), opts)
    return peft.get_peft_model(model, config)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``{"trainable": n, "total": n}``, counting shared (tied) tensors once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"trainable": trainable, "total": total}


def save_adapters(model: nn.Module, out_dir: str | Path) -> Path:
    """Save only the adapter (and head) weights of a peft-wrapped model with ``save_pretrained``."""
    out = Path(out_dir)
    model.save_pretrained(str(out))
    return out
