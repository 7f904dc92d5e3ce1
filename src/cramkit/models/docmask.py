"""Document masking for packed sequences: attention stays inside each document.

A packed sequence holds several documents separated by a boundary token (``[SEP]`` for MLM
data, the end-of-document token for CLM data; see :mod:`cramkit.data.packing`). Document ids are
counted on the device from the input ids: a boundary token closes the document it ends, so it
belongs to that document and the next one starts after it. For BERT's framing ``[CLS] a [SEP]
b [SEP]`` that gives ``[CLS] a [SEP]`` → document 0 and ``b [SEP]`` → document 1.

A query may attend to a key when both lie in the same document (and, for causal models, the key
is not after the query), or when the key is the query itself, so that a padded query always has
one key and never produces NaN. Padded keys are hidden as without document masking.

Two kernels compute the same thing (``model.document_mask_kernel``):

- ``sdpa``: a dense boolean [B, 1, L, L] mask for ``scaled_dot_product_attention``. Works on
  every device and supports attention dropout, but SDPA's flash kernel does not take an
  arbitrary mask, so it falls back to the memory-efficient or math kernel.
- ``flex``: ``torch.nn.attention.flex_attention`` with a ``BlockMask``; compiled, it skips the
  blocks that cross documents. It has no attention dropout.

``auto`` picks ``flex`` on CUDA without attention dropout and ``sdpa`` otherwise. The mask is
built once per forward and shared by every block.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError
from .registry import Registry

#: ``document_mask_kernel`` → ``fn(doc_ids, valid, causal) -> mask`` handed to every block.
DOC_MASK_KERNELS: Registry[Callable[..., Any]] = Registry("document mask kernel")

# Under ``auto``, the kernel per device type; anything not listed uses the dense SDPA mask.
_AUTO_KERNEL = {"cuda": "flex"}


def document_ids(input_ids: torch.Tensor, boundary_id: int) -> torch.Tensor:
    """[B, L] long: the index of each position's document within its sequence (0, 1, ...)."""
    ends = (input_ids == boundary_id).long()
    # Exclusive count: a boundary token still belongs to the document it ends.
    return ends.cumsum(dim=1) - ends


def _allowed(doc: torch.Tensor, valid: torch.Tensor | None, causal: bool):
    """The mask as a function of (batch, head, query, key) indices, in flex_attention's
    ``mask_mod`` form; the dense kernel calls it with broadcast index grids, so both kernels
    share one definition."""

    def mask_mod(b, h, q, kv):
        ok = doc[b, q] == doc[b, kv]
        if valid is not None:
            ok = ok & valid[b, kv]
        if causal:
            ok = ok & (q >= kv)
        return ok | (q == kv)

    return mask_mod


@DOC_MASK_KERNELS.register("sdpa")
def dense_mask(doc: torch.Tensor, valid: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """A boolean [B, 1, L, L] mask for SDPA (True = may attend)."""
    batch, seq_len = doc.shape
    dev = doc.device
    b = torch.arange(batch, device=dev)[:, None, None, None]
    h = torch.zeros(1, dtype=torch.long, device=dev)[None, :, None, None]
    q = torch.arange(seq_len, device=dev)[None, None, :, None]
    kv = torch.arange(seq_len, device=dev)[None, None, None, :]
    return _allowed(doc, valid, causal)(b, h, q, kv)


@DOC_MASK_KERNELS.register("flex")
def block_mask(doc: torch.Tensor, valid: torch.Tensor | None, causal: bool):
    """A flex_attention ``BlockMask`` (one for all heads)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, seq_len = doc.shape
    return create_block_mask(
        _allowed(doc, valid, causal), batch, None, seq_len, seq_len, device=doc.device
    )


#: Kernels that train on one device type only: flex_attention has no backward elsewhere, and
#: failed at the first backward with torch's NotImplementedError (advice for its own users).
_TRAINS_ONLY_ON = {"flex": "cuda"}


def untrainable_kernel(document_mask: bool, kernel: str, device: torch.device) -> str | None:
    """Why ``kernel`` cannot train on ``device`` (as ``document_mask_kernel=...: why; what to
    do``, for the caller to prefix with where the setting came from), or None."""
    needs = _TRAINS_ONLY_ON.get(kernel)
    if not document_mask or needs is None or device.type == needs:
        return None
    return (f"document_mask_kernel={kernel} trains only on {needs.upper()} (flex_attention has no backward "
            f"on {device.type}); use document_mask_kernel=auto or sdpa here")


def resolve_kernel(name: str, device: torch.device, attention_dropout: float) -> str:
    """The concrete kernel for ``name`` (``auto`` resolved for ``device``)."""
    if name != "auto":
        return name
    if attention_dropout > 0:
        return "sdpa"  # flex_attention has no dropout
    return _AUTO_KERNEL.get(device.type, "sdpa")


def build_document_mask(
    input_ids: torch.Tensor,
    boundary_id: int | None,
    *,
    causal: bool,
    kernel: str,
    attention_dropout: float = 0.0,
    attention_mask: torch.Tensor | None = None,
):
    """The attention mask of packed ``input_ids`` [B, L] for every block: a boolean tensor
    (``sdpa``) or a ``BlockMask`` (``flex``). ``attention_mask`` is the usual [B, L] padding
    mask (1 = token) or None."""
    if boundary_id is None:
        raise ConfigError(
            "model.document_mask=true needs model.document_boundary_id (the token that ends a "
            "document); pretraining fills it from the prepared data's special tokens"
        )
    doc = document_ids(input_ids, boundary_id)
    valid = attention_mask.bool() if attention_mask is not None else None
    chosen = resolve_kernel(kernel, input_ids.device, attention_dropout)
    return DOC_MASK_KERNELS.get(chosen)(doc, valid, causal)


_compiled_flex: Callable[..., torch.Tensor] | None = None


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """``flex_attention`` compiled on CUDA (compiled once, on first use); eager elsewhere, and
    left to the surrounding compiler inside a compiled model.

    Eager flex_attention materialises the full score matrix: correct, and fine for CPU tests,
    but not fast. Its warning saying so is silenced here because the eager path is chosen only
    where no fused kernel exists.
    """
    global _compiled_flex
    from torch.nn.attention import flex_attention as fa

    if torch.compiler.is_compiling():
        # Inside a compiled model the compiler fuses flex_attention itself; compiling again
        # (or warning-filter contexts) there would only break the graph.
        return fa.flex_attention(q, k, v, block_mask=block_mask)
    if q.device.type != "cuda":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return fa.flex_attention(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:
        # dynamic=None (automatic dynamic shapes): with dynamic=False every new batch size is a
        # recompile, and the micro-batch probe's 11 sizes pass dynamo's recompile limit (8), after
        # which flex_attention runs uncompiled, materialising the scores. On the CPU (inductor)
        # sizes 1..1024 compile two graphs this way, the static first one and a dynamic one.
        _compiled_flex = torch.compile(fa.flex_attention, dynamic=None)
    return _compiled_flex(q, k, v, block_mask=block_mask)
