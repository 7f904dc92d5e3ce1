"""Activation checkpointing, activation offloading and the memory estimate before training."""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import checkpoint

from .config import MemoryConfig


def apply_activation_checkpointing(model: torch.nn.Module, cfg: MemoryConfig) -> torch.nn.Module:
    """Recompute blocks in backward instead of storing their activations.

    The block's ``forward`` is replaced in place (no wrapper module), so parameter names, and
    therefore checkpoints, are unchanged. ``selective`` checkpoints every k-th block.
    """
    if cfg.activation_checkpointing == "none":
        return model
    every = 1 if cfg.activation_checkpointing == "full" else cfg.checkpoint_every
    for i, block in enumerate(model.layers):
        if i % every == every - 1 and not getattr(block, "_cramkit_checkpointed", False):
            original = block.forward
            block.forward = functools.partial(_checkpointed, original)
            block._cramkit_checkpointed = True
    return model


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def offload_context(cfg: MemoryConfig, device: torch.device):
    """Keep tensors saved for backward in (pinned) host memory while the forward pass runs."""
    if not cfg.offload_activations:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


def estimate_memory(model: torch.nn.Module, *, micro_batch: int, seq_len: int, precision: str,
                    world_size: int = 1, sharded: bool = False, cfg: MemoryConfig | None = None,
                    optimizer_states: float = 2) -> dict[str, float]:
    """Bytes (as GB) a training step will need on each device, by category.

    Parameters and gradients in fp32, ``optimizer_states`` fp32 tensors per parameter (Adam: 2),
    and activations per micro-batch from a per-layer rule of thumb for transformer blocks
    (~34·s·b·h bytes plus 5·a·s²·b for attention scores in half precision, halved once SDPA's
    fused kernels avoid materialising the scores). Sharding divides the first three by the world
    size; checkpointing keeps one block's activations plus each block's input.
    """
    cfg = cfg or MemoryConfig()
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    mc = model.config
    per_elem = 2 if precision in ("bf16", "fp16") else 4
    shard = world_size if sharded else 1
    weights = 4 * params / shard
    grads = 4 * params / shard
    optim = 0.0 if cfg.offload_optimizer else optimizer_states * 4 * params / shard
    block_act = micro_batch * seq_len * mc.hidden * (34 * per_elem / 2) + micro_batch * mc.heads * seq_len * per_elem
    if cfg.activation_checkpointing == "none":
        stored = mc.layers * block_act
    else:
        every = 1 if cfg.activation_checkpointing == "full" else cfg.checkpoint_every
        kept = mc.layers - mc.layers // every
        stored = kept * block_act + (mc.layers // every) * micro_batch * seq_len * mc.hidden * per_elem + block_act
    logits = micro_batch * seq_len * mc.vocab_size * 4 * (0.25 if getattr(mc, "sparse_prediction", False) else 1)
    activations = 0.0 if cfg.offload_activations else stored + logits
    gb = 1e9
    out = {"parameters_gb": weights / gb, "gradients_gb": grads / gb, "optimizer_gb": optim / gb,
           "activations_gb": activations / gb}
    out["total_gb"] = sum(out.values())
    return out


def advise(estimate: dict[str, float], available_gb: float) -> str | None:
    """A sentence naming the switch that would make the run fit, or None when it fits."""
    if estimate["total_gb"] <= 0.9 * available_gb:
        return None
    biggest = max(("activations_gb", "optimizer_gb", "parameters_gb"), key=lambda k: estimate[k])
    hint = {
        "activations_gb": "memory.activation_checkpointing=full (or a smaller train.micro_batch, or memory.offload_activations=true)",
        "optimizer_gb": "memory.offload_optimizer=true with parallel.strategy=fsdp, or more GPUs with FSDP",
        "parameters_gb": "parallel.strategy=fsdp across more GPUs",
    }[biggest]
    return (f"estimated {estimate['total_gb']:.1f} GB per device exceeds {available_gb:.1f} GB available; "
            f"the largest part is {biggest.removesuffix('_gb')} ({estimate[biggest]:.1f} GB): try {hint}")
