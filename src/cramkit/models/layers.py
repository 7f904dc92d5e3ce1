"""Building blocks shared by the BERT and GPT models.

Parameter naming is kept plain so that an exporter can map it one-to-one:

- ``attn.qkv`` is one fused ``Linear(hidden, 3 * hidden)``; its output rows are ``[q | k | v]``,
  each ``hidden`` rows, and inside each part head ``h`` owns rows ``h*head_dim:(h+1)*head_dim``.
  This is GPT-2's ``c_attn`` layout (transposed, since GPT-2 stores ``Conv1D`` weights as
  ``[in, out]``) and splits into BERT's ``query`` / ``key`` / ``value`` by ``chunk(3)``.
- ``attn.out`` is the attention output projection, ``ffn.up`` / ``ffn.down`` the feed-forward
  projections. With ``ffn=glu`` the first half of ``ffn.up``'s output rows is the value and the
  second half the gate: ``down(act(gate) * value)``.
- ``norm1`` guards the attention branch and ``norm2`` the feed-forward branch. With post-norm they
  are applied after the residual sums (BERT's ``attention.output.LayerNorm`` and
  ``output.LayerNorm``); with pre-norm at the branch input (GPT-2's ``ln_1`` / ``ln_2``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .docmask import flex_attention
from .registry import Registry

NORMS: Registry[Callable[..., nn.Module]] = Registry("norm")
FFNS: Registry[bool] = Registry("ffn")
ACTIVATIONS: Registry[Callable[[], nn.Module]] = Registry("activation")
POSITIONS: Registry[Callable[..., nn.Module | None]] = Registry("positions")
#: ``embedding_scale`` → ``fn(hidden) -> float``, the factor on the token embedding's output.
EMBEDDING_SCALES: Registry[Callable[[int], float]] = Registry("embedding scale")


def _layernorm(width: int, eps: float, bias: bool) -> nn.Module:
    return nn.LayerNorm(width, eps=eps, bias=bias)


def _rmsnorm(width: int, eps: float, bias: bool) -> nn.Module:
    # RMSNorm has no shift by definition, so ``bias`` does not apply to it.
    return nn.RMSNorm(width, eps=eps)


def _no_norm(width: int, eps: float, bias: bool) -> nn.Module:
    # For inits that make normalisation unnecessary (T-Fixup, Fixup, ReZero).
    return nn.Identity()


NORMS.add("layernorm", _layernorm)
NORMS.add("rmsnorm", _rmsnorm)
NORMS.add("none", _no_norm)

# The value says whether the feed-forward is gated.
FFNS.add("gelu", False)
FFNS.add("glu", True)

ACTIVATIONS.add("gelu", lambda: nn.GELU(approximate="none"))
ACTIVATIONS.add("gelu_tanh", lambda: nn.GELU(approximate="tanh"))


EMBEDDING_SCALES.add("none", lambda hidden: 1.0)
# fairseq's Transformer multiplies the token embedding by sqrt(d) (``embed_scale``), and T-Fixup's
# init (Huang et al. 2020, built on fairseq) is stated for that effective embedding.
EMBEDDING_SCALES.add("sqrt_hidden", math.sqrt)


def token_embedding_scale(cfg) -> float:
    """The factor ``cfg.embedding_scale`` puts on the token embedding in the forward pass."""
    return float(EMBEDDING_SCALES.get(cfg.embedding_scale)(cfg.hidden))


def make_norm(cfg) -> nn.Module:
    """The norm layer ``cfg`` asks for, of width ``cfg.hidden``."""
    return NORMS.get(cfg.norm)(cfg.hidden, cfg.norm_eps, cfg.norm_shift)


def _dropout(p: float) -> nn.Module:
    # An Identity instead of Dropout(0) keeps a no-op kernel out of the compiled graph.
    return nn.Dropout(p) if p > 0 else nn.Identity()


class LearnedPositions(nn.Embedding):
    """A learned table of position vectors; ``forward(seq_len)`` returns its first rows."""

    def forward(self, seq_len: int) -> torch.Tensor:  # type: ignore[override]
        return self.weight[:seq_len]


class ScaledSinusoidalPositions(nn.Module):
    """The fixed sinusoidal table times one learned scalar (cramming's "scaled sinusoidal").

    The table is a non-persistent buffer (it is recomputed, never saved); call
    :meth:`reset_buffers` after materialising a model built on the ``meta`` device.
    """

    def __init__(self, hidden: int, max_positions: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.max_positions = max_positions
        # 1/sqrt(hidden) makes the added position vector's norm about 1, small next to a
        # normalised token embedding but not negligible.
        # Shape (1,), not a 0-d scalar: FSDP2's fully_shard refuses 0-d parameters.
        self.scale = nn.Parameter(torch.full((1,), 1.0 / math.sqrt(hidden)))
        self.register_buffer("table", torch.empty(max_positions, hidden), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the sinusoidal table in place."""
        if self.table.is_meta:
            return
        half = self.hidden // 2
        pos = torch.arange(self.max_positions, dtype=torch.float64)[:, None]
        freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
        angles = pos * freq[None, :]
        table = torch.cat([angles.sin(), angles.cos()], dim=1)
        with torch.no_grad():
            self.table.copy_(table.to(self.table.dtype))

    def reset_parameters(self) -> None:
        """Restore the scalar's initial value."""
        with torch.no_grad():
            self.scale.fill_(1.0 / math.sqrt(self.hidden))

    def forward(self, seq_len: int) -> torch.Tensor:
        return self.table[:seq_len] * self.scale


POSITIONS.add("learned", lambda cfg: LearnedPositions(cfg.max_positions, cfg.hidden))
POSITIONS.add("sinusoidal", lambda cfg: ScaledSinusoidalPositions(cfg.hidden, cfg.max_positions))
# Rotary is applied inside attention, so the embedding adds nothing.
POSITIONS.add("rotary", lambda cfg: None)
POSITIONS.add("none", lambda cfg: None)


class Rotary(nn.Module):
    """Rotary position embedding applied to queries and keys of shape [B, heads, L, head_dim].

    Channel ``i`` is rotated together with channel ``i + head_dim/2`` (the "half split" pairing).
    The cos/sin caches are non-persistent buffers; see :meth:`reset_buffers`.
    """

    def __init__(self, head_dim: int, max_positions: int, base: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.base = base
        half = head_dim // 2
        self.register_buffer("cos", torch.empty(max_positions, half), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, half), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the cos/sin caches in place."""
        if self.cos.is_meta:
            return
        half = self.head_dim // 2
        inv_freq = self.base ** (-torch.arange(half, dtype=torch.float64) / half)
        angles = torch.arange(self.max_positions, dtype=torch.float64)[:, None] * inv_freq
        with torch.no_grad():
            self.cos.copy_(angles.cos().to(self.cos.dtype))
            self.sin.copy_(angles.sin().to(self.sin.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq_len = x.shape[-2]
        # Casting to x's dtype keeps q/k/v in one dtype under autocast, as SDPA requires.
        cos = self.cos[:seq_len].to(x.dtype)
        sin = self.sin[:seq_len].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection and SDPA.

    ``attn_mask`` is ``None`` (no padding: lets SDPA pick its fastest kernel, with ``is_causal``
    for causal models), a boolean mask broadcastable to [B, heads, L, L], True = may attend,
    that already includes causality when the model is causal, or a flex_attention ``BlockMask``
    (document masking, see :mod:`cramkit.models.docmask`), which runs flex_attention instead.
    """

    def __init__(self, cfg, causal: bool) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.hidden // cfg.heads
        self.causal = causal
        self.attention_dropout = cfg.attention_dropout
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=cfg.bias)
        self.qkv.stacked_matrices = 3  # [q | k | v]: Muon orthogonalises each (cramkit.optim)
        self.out = nn.Linear(cfg.hidden, cfg.hidden, bias=cfg.bias)
        self.rotary = (
            Rotary(self.head_dim, cfg.max_positions, cfg.rotary_base)
            if cfg.positions == "rotary"
            else None
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq_len, width = x.shape
        qkv = self.qkv(x).view(batch, seq_len, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        if attn_mask is None or isinstance(attn_mask, torch.Tensor):
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=self.attention_dropout if self.training else 0.0,
                is_causal=self.causal and attn_mask is None,
            )
        else:
            # A flex_attention BlockMask (model.document_mask with the flex kernel); it already
            # holds causality, and the config refuses attention dropout for this kernel.
            y = flex_attention(q, k, v, attn_mask)
        return self.out(y.transpose(1, 2).reshape(batch, seq_len, width))


class FeedForward(nn.Module):
    """``down(act(up(x)))``, or gated: ``down(act(gate) * value)`` with ``up`` = [value | gate]."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.gated = FFNS.get(cfg.ffn)
        inner = cfg.intermediate // 2 if self.gated else cfg.intermediate
        self.up = nn.Linear(cfg.hidden, cfg.intermediate, bias=cfg.bias)
        self.up.stacked_matrices = 2 if self.gated else 1  # [value | gate]
        self.act = ACTIVATIONS.get(cfg.activation)()
        self.down = nn.Linear(inner, cfg.hidden, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            value, gate = h.chunk(2, dim=-1)
            h = self.act(gate) * value
        else:
            h = self.act(h)
        return self.down(h)


class ResidualGain(nn.Module):
    """A learnable scalar multiplying a residual branch's output (ReZero, SkipInit, Fixup).

    ``reset_parameters`` sets it to 1 (a plain residual); the init scheme sets its own value.
    """

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))  # (1,) rather than 0-d, for FSDP2

    def reset_parameters(self) -> None:
        """A neutral gain of 1."""
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def _residual_gain(cfg) -> nn.Module:
    # Identity when off, so the default model's graph and parameters are unchanged.
    return ResidualGain() if cfg.residual_scale == "scalar" else nn.Identity()


class Block(nn.Module):
    """One transformer block: attention and feed-forward residual branches, pre- or post-norm.

    Techniques reach the branches as ``block.attn``, ``block.ffn``, ``block.norm1``,
    ``block.norm2``, the branch-output dropouts as ``block.drop1`` / ``block.drop2`` and the
    branch gains (``model.residual_scale=scalar``; Identity otherwise) as ``block.gain1`` /
    ``block.gain2``.
    """

    def __init__(self, cfg, causal: bool) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, causal)
        self.drop1 = _dropout(cfg.dropout)
        self.norm2 = make_norm(cfg)
        self.ffn = FeedForward(cfg)
        self.drop2 = _dropout(cfg.dropout)
        self.gain1 = _residual_gain(cfg)
        self.gain2 = _residual_gain(cfg)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.gain1(self.drop1(self.attn(self.norm1(x), attn_mask)))
            return x + self.gain2(self.drop2(self.ffn(self.norm2(x))))
        x = self.norm1(x + self.gain1(self.drop1(self.attn(x, attn_mask))))
        return self.norm2(x + self.gain2(self.drop2(self.ffn(x))))


class Embeddings(nn.Module):
    """Token (+ position) (+ token-type) embeddings, then optional norm and dropout.

    Parameters: ``tokens.weight`` [vocab, hidden], ``positions.weight`` (learned) or
    ``positions.scale`` (scaled sinusoidal), ``token_types.weight`` [types, hidden], ``norm``.
    The token embedding's output (only it, as in fairseq) is multiplied by ``token_scale``
    (``model.embedding_scale``); a tied decoder reads the unscaled table.
    """

    def __init__(self, cfg) -> None:
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        # A forward-time factor, not a larger table: the tied decoder shares the table, and
        # scaling it would scale the logits too.
        self.token_scale = token_embedding_scale(cfg)
        self.positions = POSITIONS.get(cfg.positions)(cfg)
        self.token_types = (
            nn.Embedding(cfg.type_vocab_size, cfg.hidden) if cfg.type_vocab_size > 0 else None
        )
        self.norm = make_norm(cfg) if cfg.embedding_norm else None
        self.dropout = _dropout(cfg.dropout)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.tokens(input_ids)
        if self.token_scale != 1.0:  # skipped at 1, so the default graph is unchanged
            x = x * self.token_scale
        if self.positions is not None:
            # In the tokens' dtype: FSDP2's bf16 parameters leave a sinusoidal table's fp32 buffer
            # as it is, and the sum, promoted to fp32, then met bf16 norm weights.
            x = x + self.positions(input_ids.shape[1]).to(x.dtype)
        if self.token_types is not None:
            # Like BERT, a missing token_type_ids means "all segment 0".
            if token_type_ids is None:
                x = x + self.token_types.weight[0]
            else:
                x = x + self.token_types(token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)


class LMHead(nn.Module):
    """Optional BERT-2018 transform (``transform.dense``, act, ``transform.norm``), then the
    vocabulary projection ``decoder`` (its weight is the token embedding's when tied)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        if cfg.head_transform:
            self.transform = nn.Sequential()
            self.transform.add_module("dense", nn.Linear(cfg.hidden, cfg.hidden, bias=cfg.bias))
            self.transform.add_module("act", ACTIVATIONS.get(cfg.activation)())
            self.transform.add_module("norm", make_norm(cfg))
        else:
            self.transform = None
        self.decoder = nn.Linear(cfg.hidden, cfg.vocab_size, bias=cfg.decoder_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform is not None:
            x = self.transform(x)
        return self.decoder(x)
