"""Parameter-efficient fine-tuning of cramkit models through HF ``peft``.

Methods are a registry of :class:`PeftMethod` (config builder + default targets); each targets
cramkit's linear layers by module name: the fused attention projection ``attn.qkv``,
``attn.out`` and the feed-forward ``ffn.up`` / ``ffn.down`` inside ``encoder.layers``. LoRA and
LoHa adapt all four by default. IA3 scales keys, values and the feed-forward intermediate, as in
its paper and peft's BERT default: the output of ``attn.qkv`` and the input of ``ffn.down``.
cramkit's ``attn.qkv`` is fused, so IA3 scales the queries too (one vector over q, k and v).

The classification head's linear layers (``classifier.0`` and ``classifier.3``) are trained in
full and saved with the adapters (peft's ``modules_to_save``); base weights stay frozen and are
not saved.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

from ..configbase import did_you_mean
from ..errors import ConfigError

#: Every linear layer of a block: what LoRA and LoHa adapt by default.
DEFAULT_TARGETS = ("attn.qkv", "attn.out", "ffn.up", "ffn.down")
#: IA3's default: (q,) k, v from the fused projection, and the feed-forward intermediate once,
#: at ffn.down's input; adding ffn.up (LoRA's list) scaled the intermediate a second time, before
#: the activation, and attn.out's output, which the paper leaves alone.
IA3_TARGETS = ("attn.qkv", "ffn.down")
#: Targets whose *input* IA3 scales (peft's ``feedforward_modules``); the others' output.
IA3_FEEDFORWARD = ("ffn.down",)


@dataclasses.dataclass
class PeftOptions:
    """What to adapt and how (LoRA/LoHa rank and scaling); ``targets`` None = the method's own."""

    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Sequence[str] | None = None


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


def head_modules(model: nn.Module) -> list[str]:
    """Names of the linear layers of ``model.classifier`` (``classifier.0``, ``classifier.3``).

    peft's ``modules_to_save`` gets these rather than ``classifier`` itself: wrapped whole, the
    ``nn.Sequential`` head made ``merge_and_unload()`` fail for IA3 and LoHa in peft 0.21
    ("'Sequential' object has no attribute 'weight'"). The head's other layers (tanh, dropout)
    have no parameters, so training and saving are unchanged.
    """
    return [
        f"classifier.{name}"
        for name, module in model.classifier.named_children()
        if isinstance(module, nn.Linear)
    ]


def _lora(peft, names: list[str], head: list[str], opts: PeftOptions):
    return peft.LoraConfig(
        r=opts.rank,
        lora_alpha=opts.alpha,
        lora_dropout=opts.dropout,
        target_modules=names,
        modules_to_save=head,
    )


def _loha(peft, names: list[str], head: list[str], opts: PeftOptions):
    return peft.LoHaConfig(
        r=opts.rank,
        alpha=opts.alpha,
        module_dropout=opts.dropout,
        target_modules=names,
        modules_to_save=head,
    )


def _ia3(peft, names: list[str], head: list[str], opts: PeftOptions):
    # IA3 scales the *input* of feed-forward modules and the *output* of the others; the FFN's
    # down projection is the one whose input is the feed-forward activation.
    ff = [n for n in names if n.endswith(IA3_FEEDFORWARD)]
    return peft.IA3Config(target_modules=names, feedforward_modules=ff, modules_to_save=head)


@dataclasses.dataclass(frozen=True)
class PeftMethod:
    """A peft method: ``build(peft, target names, head names, options)`` -> peft config, the
    module-name suffixes it adapts when ``finetune.peft_targets`` is not set, and
    ``scaling_attrs``: the adapter layers' attributes (peft's ``adapter_layer_names``) that hold
    scaling vectors, which weight decay must not reach (:func:`scaling_parameters`)."""

    build: Callable
    default_targets: tuple[str, ...]
    scaling_attrs: tuple[str, ...] = ()


PEFT_METHODS: dict[str, PeftMethod] = {
    "lora": PeftMethod(_lora, DEFAULT_TARGETS),
    "loha": PeftMethod(_loha, DEFAULT_TARGETS),
    # IA3's vectors are stored 2-D ([out, 1] or [1, in]), so a rule by shape takes them for
    # matrices; they start at 1 and multiply activations, and decay toward 0 would switch the
    # adapted layers off rather than pull them toward the frozen model.
    "ia3": PeftMethod(_ia3, IA3_TARGETS, scaling_attrs=("ia3_l",)),
}


def apply_peft(model: nn.Module, opts: PeftOptions) -> nn.Module:
    """Wrap a :class:`~cramkit.eval.heads.SequenceClassifier` in a peft model.

    Only adapter parameters and the classifier head stay trainable.
    """
    peft = _require_peft()
    method = get_peft_method(opts.method)
    targets = method.default_targets if opts.targets is None else opts.targets
    config = method.build(peft, target_modules(model, targets), head_modules(model), opts)
    return peft.get_peft_model(model, config)


def get_peft_method(name: str) -> PeftMethod:
    """The registered method called ``name``; unknown names list the known ones."""
    try:
        return PEFT_METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown peft method '{name}'{did_you_mean(name, PEFT_METHODS)}; "
            f"choose from {sorted(PEFT_METHODS)}"
        ) from None


def scaling_parameters(model: nn.Module, method: str) -> list[nn.Parameter]:
    """The trainable scaling vectors of ``method``'s adapter layers in ``model`` (IA3's), each
    once; none for methods without them (LoRA, LoHa) and for ``none``."""
    attrs = PEFT_METHODS[method].scaling_attrs if method in PEFT_METHODS else ()
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for attr in attrs:
            holder = getattr(module, attr, None)
            if isinstance(holder, nn.Module):  # peft keeps them in a ParameterDict per adapter
                found.update((id(p), p) for p in holder.parameters() if p.requires_grad)
    return list(found.values())


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
