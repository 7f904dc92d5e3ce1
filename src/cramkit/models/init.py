"""Weight initialisation schemes (registered in ``INITS``; ``ModelConfig.init`` picks one).

Initialisation decides a lot under a short budget: docs/references.md measured the same crammed model at
validation loss 3.95 with N(0, 0.02) and 6.91 with PyTorch's default N(0, 1) embeddings.

``fixup``, ``t-fixup`` and ``rezero`` follow their authors' code (hongyi-zhang/Fixup,
layer6ai-labs/T-Fixup, majumderb/rezero); each docstring says which parts cramkit keeps, changes
or leaves out, and why. A scheme's architecture needs (no norms, branch gains, the embedding
scale) are checked by ``ModelConfig.validate`` through the ``check`` that :func:`requires`
attaches.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .layers import ResidualGain
from .registry import INITS


def _normal(model: nn.Module, std: float) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                if module.weight is not None:
                    module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif hasattr(module, "reset_parameters") and not list(module.children()):
                # Leaf modules with their own parameters (e.g. the sinusoidal scale).
                if any(True for _ in module.parameters(recurse=False)):
                    module.reset_parameters()


@INITS.register("normal")
def init_normal(model: nn.Module) -> None:
    """N(0, init_std) for linear and embedding weights, zero biases, unit norm weights."""
    _normal(model, model.config.init_std)


@INITS.register("gpt2")
def init_gpt2(model: nn.Module) -> None:
    """``normal``, then each residual branch's output projection (``attn.out``, ``ffn.down``)
    drawn with std init_std / sqrt(2 * layers), so the residual stream's variance does not grow
    with depth."""
    cfg = model.config
    _normal(model, cfg.init_std)
    std = cfg.init_std / math.sqrt(2 * cfg.layers)
    with torch.no_grad():
        for block in model.layers:
            block.attn.out.weight.normal_(0.0, std)
            block.ffn.down.weight.normal_(0.0, std)


@INITS.register("torch-default")
def init_torch_default(model: nn.Module) -> None:
    """PyTorch's own defaults (kaiming-uniform linears, N(0, 1) embeddings): the baseline that
    shows why initialisation matters. A tied decoder keeps the embedding's N(0, 1)."""
    decoder = model.head.decoder
    tied = decoder.weight is model.embeddings.tokens.weight
    for module in model.modules():
        if tied and module is decoder:
            continue
        reset = getattr(module, "reset_parameters", None)
        if reset is not None and any(True for _ in module.parameters(recurse=False)):
            reset()
    if tied and decoder.bias is not None:
        # Resetting the decoder would overwrite the shared embedding; do its bias alone, with
        # nn.Linear's own default bound.
        bound = 1.0 / math.sqrt(decoder.in_features)
        with torch.no_grad():
            decoder.bias.uniform_(-bound, bound)


# ---------------------------------------------------------------- inits with requirements


def requires(check):
    """Decorator: attach ``check(cfg)`` (raises ConfigError) to an init scheme, so
    ``ModelConfig.validate`` rejects architectures the scheme was not designed for."""

    def attach(fn):
        fn.check = check
        return fn

    return attach


def _need(cfg, init: str, **wanted) -> None:
    wrong = {k: v for k, v in wanted.items() if getattr(cfg, k) != v}
    if wrong:
        have = ", ".join(f"{k}={getattr(cfg, k)!r}" for k in wrong)
        want = " ".join(f"model.{k}={v}" for k, v in wrong.items())
        raise ConfigError(f"model.init={init} needs {want} (got {have})")


def _set_gains(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for block in model.layers:
            for gain in (block.gain1, block.gain2):
                if isinstance(gain, ResidualGain):
                    gain.weight.fill_(value)


def _untied_decoder(model: nn.Module) -> nn.Linear | None:
    decoder = model.head.decoder
    return None if decoder.weight is model.embeddings.tokens.weight else decoder


def _xavier_ffn_up(ffn: nn.Module) -> torch.Tensor:
    """Xavier-uniform ``ffn.up`` and return the rows that play a ReLU network's ``fc1``.

    With ``ffn=glu`` (which Fixup's reference code does not cover) the value and gate halves are
    drawn as matrices of their own, and only the value half is returned: ``act(gate) * value``
    scales by exactly ``s`` when the value rows do, as ``relu(s * fc1(x))`` does, whereas
    scaling the gate too would shrink the branch by about ``s`` once more (GELU is near-linear
    around 0).
    """
    weight = ffn.up.weight
    if not ffn.gated:
        nn.init.xavier_uniform_(weight)
        return weight
    value, gate = weight.chunk(2, dim=0)
    nn.init.xavier_uniform_(value)
    nn.init.xavier_uniform_(gate)
    return value


def _xavier_linears(model: nn.Module) -> None:
    # Every linear but the decoder (it may be the token table, and each scheme sets its own).
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not model.head.decoder:
            nn.init.xavier_uniform_(module.weight)


def _fixup_check(cfg) -> None:
    _need(cfg, "fixup", norm="none", residual_scale="scalar")


@INITS.register("fixup")
@requires(_fixup_check)
def init_fixup(model: nn.Module) -> None:
    """Fixup (Zhang, Dauphin & Ma 2019) for a network without normalisation, after the
    authors' Transformer code (hongyi-zhang/Fixup, ``fairseq/fairseq/models/transformer_zero.py``
    and ``modules/multihead_attention_zero.py``).

    Xavier-uniform linears; with L = 2 * layers residual branches, the fused ``attn.qkv`` is
    scaled by L^(-1/6) (the authors' code; the paper's L^(-1/(2m-2)) with m = 4, the attention
    branch counted deeper than its two matrices), the feed-forward's inner layer (the value
    half of ``ffn.up`` with ``ffn=glu``; see :func:`_xavier_ffn_up`) by L^(-1/2) (m = 2), and
    each branch's last layer (``attn.out``, ``ffn.down``) and an untied output layer are zeroed
    (the reference's ``out_proj``, ``fc2`` and ``embed_out``).
    The branch gains (``residual_scale=scalar``, the paper's scalar multiplier, the code's
    ``LayerScale``) start at 1. Each branch then contributes nothing at first and its growth is
    bounded independently of depth.

    Left out: the scalar shifts (``LayerShift``, a learned scalar subtracted before each branch,
    activation and linear), which cramkit has no module for; with ``model.bias=true`` the
    zero-initialised linear biases can represent them (as vectors rather than scalars). The
    embeddings stay N(0, init_std) with no input scale: the reference draws N(0, d^-1/2) and
    multiplies by sqrt(d) (fairseq's ``embed_scale``), but at an effective N(0, 1) a tied
    decoder with no final norm starts with each token's own logit at sqrt(d) (27 at d = 768).
    """
    cfg = model.config
    _normal(model, cfg.init_std)  # embeddings, zero biases, leaf modules
    branches = 2 * cfg.layers
    with torch.no_grad():
        _xavier_linears(model)
        for block in model.layers:
            # Xavier over the fused [3d, d] matrix, as the reference's in_proj_weight.
            block.attn.qkv.weight.mul_(branches ** (-1.0 / 6.0))
            _xavier_ffn_up(block.ffn).mul_(branches ** -0.5)
            block.attn.out.weight.zero_()
            block.ffn.down.weight.zero_()
        decoder = _untied_decoder(model)
        if decoder is not None:
            decoder.weight.zero_()
    _set_gains(model, 1.0)


def _t_fixup_check(cfg) -> None:
    _need(cfg, "t-fixup", norm="none", embedding_scale="sqrt_hidden")
    if cfg.gated:
        raise ConfigError(
            f"model.init=t-fixup needs an ungated feed-forward (model.ffn=gelu, got "
            f"{cfg.ffn!r}): its scaling is derived for fc2(act(fc1(x))), and a gated branch, "
            f"quadratic in its input, blew up under it where N(0, 0.02) trained"
        )


@INITS.register("t-fixup")
@requires(_t_fixup_check)
def init_t_fixup(model: nn.Module) -> None:
    """T-Fixup (Huang et al. 2020): Transformer training without LayerNorm or warm-up, after
    the authors' fairseq code (layer6ai-labs/T-Fixup, ``fairseq/modules/transformer_layer.py``
    ``fixup_initialization``, ``fairseq/models/transformer.py``).

    fairseq's base init: Xavier-uniform linears, q and k with gain 1/sqrt(2) (fairseq's
    ``MultiheadAttention`` for same-dim q, k, v), every embedding table N(0, d^-1/2), an untied
    decoder N(0, d^-1/2). Then, with N = layers, s = 0.67 N^(-1/4) (the paper's encoder rule):
    v (drawn with gain 1, the reference's gain 1/sqrt(2) times its sqrt(2)), ``attn.out``,
    ``ffn.up`` and ``ffn.down`` are multiplied by s, and the token table alone by (9N)^(-1/4).
    ``model.embedding_scale=sqrt_hidden`` multiplies the token embedding by sqrt(d) in the
    forward pass (fairseq's ``embed_scale``), so it enters the blocks at std (9N)^(-1/4) while a
    tied decoder reads the table itself, as in the reference.

    A decoder-only GPT gets the encoder rule too: its blocks are self-attention and feed-forward
    only, the encoder layer's shape; the reference's decoder rule (9M)^(-1/4) is derived for
    decoder layers that also attend to the encoder. Position and token-type tables keep
    N(0, d^-1/2) (the reference scales only ``embed_tokens``); the scaled-sinusoidal positions
    keep cramkit's own 1/sqrt(d) start (fairseq's sinusoids have amplitude 1). Branch gains
    (if any) start at 1.

    ``ffn=glu`` is refused: the reference's feed-forward is ``fc2(relu(fc1(x)))``, linear in
    the size of its input, while ``act(gate) * value`` is quadratic in it. At the reference's
    input scale, an 8-block no-norm BERT with a GLU blew up under T-Fixup (loss above twice its
    start) at Adam 6e-3 where N(0, 0.02) trained, and more often than N(0, 0.02) at 8e-3,
    whether the value half or both halves were scaled; with ``ffn=gelu`` T-Fixup trained at 1e-2
    where N(0, 0.02) blew up (benchmarks/RESULTS_optim.md).
    """
    cfg = model.config
    _normal(model, cfg.init_std)  # zero biases, unit gains, reset leaf modules
    n, d = cfg.layers, cfg.hidden
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Embedding):  # tokens, learned positions, token types
                module.weight.normal_(0.0, d ** -0.5)
        model.embeddings.tokens.weight.mul_((9 * n) ** -0.25)
        _xavier_linears(model)
        decoder = _untied_decoder(model)
        if decoder is not None:
            decoder.weight.normal_(0.0, d ** -0.5)  # fairseq's embed_out
        block_scale = 0.67 * n ** -0.25
        for block in model.layers:
            q, k, v = block.attn.qkv.weight.chunk(3, dim=0)
            nn.init.xavier_uniform_(q, gain=2 ** -0.5)
            nn.init.xavier_uniform_(k, gain=2 ** -0.5)
            nn.init.xavier_uniform_(v).mul_(block_scale)
            block.attn.out.weight.mul_(block_scale)
            block.ffn.up.weight.mul_(block_scale)  # ungated: the check refuses ffn=glu
            block.ffn.down.weight.mul_(block_scale)
    _set_gains(model, 1.0)


def _rezero_check(cfg) -> None:
    _need(cfg, "rezero", residual_scale="scalar", norm="none")


def _skipinit_check(cfg) -> None:
    _need(cfg, "skipinit", residual_scale="scalar")
    if cfg.norm_position == "post" and cfg.norm != "none":
        raise ConfigError(
            "model.init=skipinit makes each block the identity only when no norm sits on the "
            "residual path: use model.norm_position=pre or model.norm=none"
        )


@INITS.register("rezero")
@requires(_rezero_check)
def init_rezero(model: nn.Module) -> None:
    """ReZero (Bachlechner et al. 2021): no normalisation, each residual branch times a
    learnable scalar that starts at 0, so every block is the identity at initialisation;
    other weights ``normal``.

    cramkit gives each block two gains, one per branch (``gain1``, ``gain2``); the authors'
    layer (majumderb/rezero, ``rezero/transformer/rztx.py``) shares one ``resweight`` between
    its attention and feed-forward branches. Both start every block at the identity; the two
    gains let the branches open at their own rates (and are the same modules SkipInit and
    Fixup use). The reference leaves the other weights at PyTorch's defaults."""
    _normal(model, model.config.init_std)
    _set_gains(model, 0.0)


@INITS.register("skipinit")
@requires(_skipinit_check)
def init_skipinit(model: nn.Module) -> None:
    """SkipInit (De & Smith 2020): a learnable scalar at the end of each residual branch,
    starting at 0 (the paper's alpha = 0 choice), so that every block is the identity at
    initialisation; other weights ``normal``.

    The paper proposes SkipInit to train residual networks *without* normalisation, which
    ``model.norm=none`` gives (and then it equals ``rezero`` with one gain per branch). cramkit
    also accepts pre-norms with it, where a zero gain still makes the block the identity; that
    combination is cramkit's, not the paper's. Post-norms are refused: a norm on the residual
    path would not be the identity."""
    _normal(model, model.config.init_std)
    _set_gains(model, 0.0)
