"""Activation checkpointing, activation offloading and the memory estimate before training."""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import checkpoint

from ..models.flops import count_parameters
from .config import MemoryConfig


def apply_activation_checkpointing(model: torch.nn.Module, cfg: MemoryConfig) -> torch.nn.Module:
    """Recompute blocks in backward instead of storing their activations.

    The block's ``forward`` is replaced in place (no wrapper module), so parameter names, and
    therefore checkpoints, are unchanged. ``selective`` checkpoints every k-th block.
    """
    chosen = checkpointed_blocks(cfg, len(model.layers))
    for i, block in enumerate(model.layers):
        if i in chosen and not getattr(block, "_cramkit_checkpointed", False):
            original = block.forward
            block.forward = functools.partial(_checkpointed, original)
            block._cramkit_checkpointed = True
    return model


def checkpointed_blocks(cfg: MemoryConfig, layers: int) -> list[int]:
    """Indices of the blocks that ``cfg``'s activation checkpointing recomputes in backward."""
    if cfg.activation_checkpointing == "none":
        return []
    every = 1 if cfg.activation_checkpointing == "full" else cfg.checkpoint_every
    return [i for i in range(layers) if i % every == every - 1]


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def offload_context(cfg: MemoryConfig, device: torch.device):
    """Keep tensors saved for backward in (pinned) host memory while the forward pass runs."""
    if not cfg.offload_activations:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


# Bytes each block keeps for backward per token, per unit of width (h) and of feed-forward width
# (intermediate), as measured by counting the tensors autograd saves (tests/train/test_memory.py
# checks the estimate against that count at two feed-forward widths): the same for every block
# cramkit builds (pre- or post-LN, GLU or GELU, with or without biases). fp32: 8 values of width
# h, 2 of width intermediate. Half-precision autocast: matmul inputs in half, norm inputs and the
# residual stream in fp32. Plus the attention's fp32 log-sum-exp, one value per head.
_BLOCK_BYTES = {"full": (32, 8), "half": (20, 4)}
# A checkpointed block keeps only its input, which autocast leaves in fp32.
_CHECKPOINTED_BYTES = 4
# Attention dropout off CUDA runs the math kernel, which keeps the L x L probabilities: three
# fp32-sized values per score, plus a few half-precision copies of the block's inputs. CUDA's
# flash and memory-efficient kernels take the dropout themselves and keep no scores.
_SCORE_BYTES = 12


def _block_activations(mc, tokens: int, seq_len: int, half: bool, cuda: bool) -> float:
    per_h, per_intermediate = _BLOCK_BYTES["half" if half else "full"]
    per_token = mc.hidden * per_h + mc.intermediate * per_intermediate + 4 * mc.heads
    if mc.dropout > 0:  # two residual-branch dropout masks
        per_token += 2 * mc.hidden * (2 if half else 4)
    if mc.attention_dropout > 0 and not cuda:
        per_token += mc.heads * seq_len * _SCORE_BYTES + (6 * mc.hidden if half else 0)
    return tokens * per_token


def _outside_blocks(mc, tokens: int) -> float:
    # fp32 values of width h: the head's input and the final norm's (2), two more for a norm of
    # the embeddings and two for a head transform.
    width = 2 + 2 * mc.embedding_norm + 2 * mc.head_transform
    return tokens * mc.hidden * 4 * width


def _kept(mc, tokens: int, seq_len: int, half: bool, cuda: bool, checkpointed: int) -> float:
    """Bytes the forward pass saves for backward outside the loss: every block's activations, a
    checkpointed block's input alone, and what the embeddings and head keep."""
    block = _block_activations(mc, tokens, seq_len, half, cuda)
    inputs = checkpointed * tokens * mc.hidden * _CHECKPOINTED_BYTES
    return (mc.layers - checkpointed) * block + inputs + _outside_blocks(mc, tokens)


def _predicted_logits(mc, tokens: int, mask_rate: float) -> float:
    """Elements of the logits: predicted positions (a mask_rate share of them under sparse
    prediction) times the vocabulary."""
    return tokens * (mask_rate if mc.sparse_prediction else 1.0) * mc.vocab_size


def _loss_tensors(mc, tokens: int, mask_rate: float, half: bool) -> tuple[float, float]:
    # Tensors of (predicted positions x vocabulary) alive at once, in bytes per element: at the
    # end of the forward pass the logits (half under autocast), their fp32 cast for the loss and
    # the log-probabilities; in the loss's backward the log-probabilities, their gradient and the
    # logits' gradient, all fp32. (The logits are gone by then: the trainer drops the model's
    # output before backward.)
    predicted = _predicted_logits(mc, tokens, mask_rate)
    return predicted * (10 if half else 8), predicted * 12


def _head_backward(mc, tokens: int, mask_rate: float, half: bool) -> float:
    # The decoder's backward: the logits' gradient (half under autocast) beside the decoder
    # weight's fp32 gradient, (vocabulary x width), while every activation saved before the head
    # is still there. Tied, that gradient is the one held until the embedding's arrives; untied,
    # it too is a tensor of its own until added into a .grad that gradient accumulation has
    # made already. (Under autocast the weight's half-precision gradient takes the place of the
    # decoder's weight copy, freed by then.)
    return _predicted_logits(mc, tokens, mask_rate) * (2 if half else 4) + mc.vocab_size * mc.hidden * 4


def _embedding_gradients(mc) -> tuple[float, float]:
    # The (vocabulary x width) embedding's gradients beyond its .grad, in fp32. Tied, the
    # decoder's contribution waits from the head's backward until the embedding's arrives at the
    # very end, where the two and their sum are alive at once; untied, the embedding's dense
    # gradient is one such tensor at the end. Returns (held through backward, peak at the end).
    size = mc.vocab_size * mc.hidden * 4
    return (size, 3 * size) if mc.tie_embeddings else (0.0, size)


def _linear_weights(module: torch.nn.Module) -> int:
    return sum(w.numel() for w in {id(m.weight): m.weight for m in module.modules()
                                   if isinstance(m, torch.nn.Linear)}.values())


def estimate_memory(model: torch.nn.Module, *, micro_batch: int, seq_len: int, precision: str,
                    world_size: int = 1, sharded: bool = False, cfg: MemoryConfig | None = None,
                    optimizer_states: float = 2, mask_rate: float = 0.25,
                    device_type: str = "cuda", compiled: bool = False,
                    fsdp_reshard: bool = True, fsdp_param_dtype: str = "auto") -> dict[str, float]:
    """GB a training step will need on each device, by category.

    - parameters and gradients in fp32, ``optimizer_states`` fp32 tensors per parameter (Adam: 2;
      torchao's 8-bit states: 0.5); FSDP divides all three by the world size, and its CPU
      offload (``memory.offload_optimizer``) moves them to the host, leaving the gradients of
      what is gathered;
    - the half-precision copies of the linear weights that autocast keeps for backward (bf16 and
      fp16); under FSDP the gathered parameters of the root and of two blocks (one computing,
      one prefetched) instead, in the training precision;
    - activations of one micro-batch at the peak of its backward: each block's saved tensors
      (measured per token, see ``_BLOCK_BYTES``), what the embeddings and head keep, the
      loss's backward and the decoder's weight gradient (``mask_rate``: the share of positions
      with a target under sparse prediction). Checkpointing keeps a checkpointed block's input and adds one block's
      activations, recomputed in backward; eager offloading keeps them in host memory, leaving
      one block's worth or the loss's backward on the device. ``device_type`` decides whether
      attention dropout keeps its scores.

    ``fsdp_reshard`` and ``fsdp_param_dtype`` are ``parallel.*``'s: without resharding every
    block stays gathered from its forward to its backward; parameters gathered in fp32 under
    half-precision autocast leave autocast its own copies of the linear weights.
    """
    cfg = cfg or MemoryConfig()
    params = count_parameters(model)
    mc = model.config
    half = precision in ("bf16", "fp16")
    shard = world_size if sharded else 1
    weights = 4 * params / shard
    grads = 4 * params / shard
    optim = optimizer_states * 4 * params / shard
    blocks = list(model.layers)
    chosen = checkpointed_blocks(cfg, len(blocks))
    offloaded = cfg.offload_activations and not compiled
    copies = copies_in_backward = 0.0
    if half:
        # Autocast caches its half-precision weight copies until the forward pass ends. Backward
        # keeps those saved for it: a checkpointed block's are remade when it is recomputed, and
        # offloaded ones come back one block at a time.
        per_block = [_linear_weights(b) for b in blocks]
        dropped = range(len(blocks)) if offloaded else chosen
        copies = 2.0 * _linear_weights(model)
        copies_in_backward = copies - 2.0 * (sum(per_block[i] for i in dropped)
                                             - max((per_block[i] for i in dropped), default=0))
    if sharded or cfg.offload_optimizer:
        # FSDP gathers the root's parameters and a block's at a time (plus one prefetched), in
        # the mixed-precision policy's dtype; autocast then makes no copies of its own.
        root = params - sum(count_parameters(b) for b in blocks)
        in_use = root + 2 * max(map(count_parameters, blocks), default=0)
        gathered = in_use if fsdp_reshard else params
        param_dtype = precision if fsdp_param_dtype == "auto" else fsdp_param_dtype
        gathered_bytes = (2 if param_dtype in ("bf16", "fp16") else 4) * gathered
        if half and gathered_bytes == 4 * gathered:  # fp32 gathered: autocast casts them as without FSDP
            copies, copies_in_backward = copies + gathered_bytes, copies_in_backward + gathered_bytes
        else:
            copies = copies_in_backward = gathered_bytes
        if cfg.offload_optimizer:
            # FSDP2's CPU offload keeps the sharded parameters, their gradients and the optimizer
            # on the host; the device holds what is gathered and the gradients before reduction,
            # a block's at a time.
            weights, grads, optim = 0.0, 4.0 * in_use, 0.0
    tokens = micro_batch * seq_len
    block_act = _block_activations(mc, tokens, seq_len, half, device_type == "cuda")
    # Backward recomputes one checkpointed block at a time and holds, beside its activations,
    # the fp32 gradients of its widest tensors: two of the feed-forward width (before and after
    # the activation function) and two of the residual stream.
    recomputed = block_act + tokens * 8 * (mc.intermediate + mc.hidden) if chosen else 0.0
    loss_forward, loss_backward = _loss_tensors(mc, tokens, mask_rate, half)
    held, at_end = _embedding_gradients(mc)
    head = _head_backward(mc, tokens, mask_rate, half)
    if offloaded:
        # Saved tensors go to the host as the forward pass makes them and come back one backward
        # node at a time in eager mode: about one block's worth is on the device at once. (A
        # compiled backward unpacks every saved tensor at its start, pytorch/pytorch#148222, so
        # then offloading saves nothing at the peak: the else branch.)
        forward = max(block_act, loss_forward)
        backward = max(max(block_act, recomputed) + held, loss_backward, head)
    else:
        kept = _kept(mc, tokens, seq_len, half, device_type == "cuda", len(chosen))
        forward = kept + loss_forward
        # The loss's backward frees its tensors before the head's backward, where the decoder's
        # gradient appears, and before any recomputation.
        backward = kept + max(loss_backward, head, held + recomputed)
    # The peak comes at the end of the forward pass, in backward, or at its very end, where
    # nearly all activations are freed; reported as the weight copies plus the rest.
    activations = max(copies + forward, copies_in_backward + backward, at_end) - copies
    gb = 1e9
    out = {"parameters_gb": weights / gb, "gradients_gb": grads / gb, "optimizer_gb": optim / gb,
           "weight_copies_gb": copies / gb, "activations_gb": activations / gb}
    out["total_gb"] = sum(out.values())
    return out


def activation_switches(cfg: MemoryConfig) -> list[str]:
    """The settings that shrink the activations' memory which ``cfg`` does not have on yet."""
    return [s for s, on in (("memory.activation_checkpointing=full", cfg.activation_checkpointing == "full"),
                            ("memory.offload_activations=true", cfg.offload_activations)) if not on]


def advise(estimate: dict[str, float], available_gb: float, cfg: MemoryConfig | None = None,
           whole_tensors: str | None = None) -> str | None:
    """A sentence naming the switch that would make the run fit, or None when it fits; a switch
    ``cfg`` has on already is not suggested again. ``whole_tensors``: the optimizer setting
    (``optim.name=lamb``) that FSDP2 refuses, whose run the FSDP switches alone cannot help."""
    if estimate["total_gb"] <= 0.9 * available_gb:
        return None
    cfg = cfg or MemoryConfig()
    biggest = max(("activations_gb", "optimizer_gb", "parameters_gb"), key=lambda k: estimate[k])
    activations = activation_switches(cfg)
    hint = {
        "activations_gb": " or ".join([*activations, "a smaller train.micro_batch"]),
        "optimizer_gb": "more GPUs with FSDP" if cfg.offload_optimizer else
                        "memory.offload_optimizer=true with parallel.strategy=fsdp, or more GPUs with FSDP",
        "parameters_gb": "parallel.strategy=fsdp across more GPUs",
    }[biggest]
    if whole_tensors and biggest != "activations_gb":
        # Both FSDP hints would be refused by the config check for this optimizer.
        hint = (f"an optimizer that FSDP2 can shard instead of {whole_tensors} (which needs whole tensors), "
                f"then {hint}")
    return (f"estimated {estimate['total_gb']:.1f} GB per device exceeds {available_gb:.1f} GB available; "
            f"the largest part is {biggest.removesuffix('_gb')} ({estimate[biggest]:.1f} GB): try {hint}")
