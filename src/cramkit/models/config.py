"""The model's architecture axes as one typed config.

The defaults describe the crammed BERT of Geiping & Goldstein (2023) but for ``norm_bias`` (unset:
it follows ``bias``, as configs saved before it existed did; the preset sets it); see ``presets.py`` for the
other named shapes. Choices that are names (``arch``, ``norm``, ``ffn``, ``positions``,
``activation``, ``init``, ``embedding_scale``, ``document_mask_kernel``) are plain strings checked
against registries (``cramkit.models.layers.NORMS`` and its neighbours), so a new variant is a
registration, not a new branch or a new type.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..configbase import Config, Name, field
from ..errors import ConfigError, UnknownName
from ..plugins import unknown_hint
from .registry import ARCHITECTURES, INITS


@dataclasses.dataclass
class ModelConfig(Config):
    """Architecture of a BERT-style encoder or GPT-style decoder language model."""

    arch: str = field("bert", help="architecture: 'bert' (masked-LM encoder) or 'gpt' (causal decoder)")
    vocab_size: int = field(32768, help="vocabulary size (rows of the token embedding and decoder)")
    hidden: int = field(768, help="model width (hidden size)")
    layers: int = field(16, help="number of transformer blocks")
    heads: int = field(12, help="attention heads; hidden must be divisible by heads")
    intermediate: int = field(
        3072,
        help="feed-forward up-projection width; with ffn=glu it is split into value and gate "
        "halves, so the down-projection reads intermediate/2",
    )
    norm_position: Literal["pre", "post"] = field(
        "pre", help="'pre': norm inside each residual branch (usually with final_norm, as the residual stream is otherwise never normalised); 'post': BERT 2018"
    )
    norm: Name = field(
        "layernorm", help="normalisation layer; 'none' for inits that train without it (t-fixup, fixup, rezero)"
    )
    norm_eps: float = field(1e-12, help="epsilon of every norm (BERT 1e-12, GPT-2 1e-5)")
    bias: bool = field(False, help="biases on all linear layers (except the decoder)")
    norm_bias: bool | None = field(
        None,
        help="a shift (bias) on every LayerNorm (RMSNorm has none); none: as model.bias. The "
        "crammed-bert and tiny presets set true, as cramming's otherwise bias-free crammed BERT "
        "has (runs saved before this setting existed load as they were trained)",
    )
    ffn: Name = field(
        "glu", help="feed-forward: 'gelu' (up, act, down) or 'glu' (gated: act(gate) * value)"
    )
    activation: Name = field(
        "gelu", help="GELU flavour: 'gelu' exact erf (BERT), 'gelu_tanh' tanh approximation (GPT-2)"
    )
    positions: Name = field(
        "sinusoidal",
        help="position information: learned table, scaled sinusoidal (fixed table times a learned "
        "scalar), rotary on queries/keys, or none",
    )
    max_positions: int = field(512, help="longest sequence the position table / rotary cache covers")
    rotary_base: float = field(10000.0, help="rotary frequency base (positions=rotary only)")
    embedding_scale: Name = field(
        "none",
        help="factor on the token embedding's output (not on the tied decoder, nor on position "
        "and token-type embeddings): 'none' (1) or 'sqrt_hidden' (sqrt(hidden), fairseq's "
        "embed_scale, which t-fixup needs)",
    )
    type_vocab_size: int = field(0, help="token-type (segment) embeddings; 0 = none, BERT-base 2")
    embedding_norm: bool = field(True, help="norm after summing the embeddings")
    final_norm: bool = field(True, help="norm after the last block (needed with pre-norm)")
    tie_embeddings: bool = field(True, help="the decoder weight is the token embedding weight")
    dropout: float = field(0.0, help="dropout on embeddings and on each residual branch output")
    attention_dropout: float = field(0.0, help="dropout on attention probabilities")
    head_transform: bool = field(
        False, help="BERT 2018's dense + activation + norm before the decoder"
    )
    decoder_bias: bool = field(False, help="bias on the output (vocabulary) projection")
    sparse_prediction: bool = field(
        True,
        help="run the LM head only on positions with labels != -100 (same loss, less compute); "
        "logits are then returned for those positions only",
    )
    residual_scale: Literal["none", "scalar"] = field(
        "none",
        help="'scalar': a learnable gain on each residual branch output (block.gain1/gain2), "
        "set by the init (0 for rezero/skipinit, 1 otherwise; fixup's per-branch multiplier)",
    )
    init: str = field(
        "normal",
        help="weight initialisation: 'normal' N(0, init_std) (BERT), 'gpt2' (normal, residual "
        "projections scaled by 1/sqrt(2*layers)), 'torch-default' (PyTorch's defaults), 'fixup' "
        "(needs norm=none, residual_scale=scalar), 't-fixup' (needs norm=none, "
        "embedding_scale=sqrt_hidden, ffn=gelu), 'rezero' (needs norm=none, residual_scale=scalar), "
        "'skipinit' (needs residual_scale=scalar; the paper's is norm-free, norm=none, and "
        "cramkit also allows norm_position=pre)",
    )
    init_std: float = field(0.02, help="standard deviation of the normal initialisations")
    document_mask: bool = field(
        False,
        help="attend only within each packed document (documents end at "
        "document_boundary_id); positions still count from the start of the sequence",
    )
    document_boundary_id: int | None = field(
        None,
        help="token id that ends a document ([SEP] for bert data, end-of-document for gpt "
        "data); pretraining fills it from the prepared data when document_mask is on",
    )
    document_mask_kernel: Name = field(
        "auto",
        help="document-mask attention: 'flex' (flex_attention, compiled on CUDA; no attention "
        "dropout; training needs CUDA), 'sdpa' (dense boolean mask, any device), 'auto' (flex "
        "on CUDA unless attention_dropout > 0, else sdpa)",
    )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden // self.heads

    def exceeds_positions(self, seq_len: int) -> bool:
        """Whether a sequence of ``seq_len`` tokens is longer than the position table holds
        (``max_positions``; no limit without positions)."""
        return self.positions != "none" and seq_len > self.max_positions

    def for_single_inputs(self) -> ModelConfig:
        """This architecture for inputs that hold one example each (fine-tuning, export).

        The document mask describes how pretraining packed its sequences, not the model: in a
        downstream input the ``[SEP]`` between a pair's two sentences is no document boundary,
        so the mask is turned off (and its kernel choice with it). The weights are unaffected.
        """
        if not self.document_mask and self.document_mask_kernel == "auto":
            return self
        return self.replace(document_mask=False, document_mask_kernel="auto")

    @property
    def causal(self) -> bool:
        """Whether attention is causal (taken from the architecture class)."""
        return bool(ARCHITECTURES.get(self.arch).causal)

    @property
    def gated(self) -> bool:
        """Whether the feed-forward is gated (``up`` = [value | gate], its inner width halved);
        the ``ffn`` registry says so for each variant."""
        from .layers import FFNS

        return bool(FFNS.get(self.ffn))

    @property
    def norm_shift(self) -> bool:
        """Whether LayerNorms have a shift: ``norm_bias``, or ``bias`` when that is unset."""
        return self.bias if self.norm_bias is None else self.norm_bias

    def validate(self) -> None:
        """Raise ConfigError naming the offending field for impossible shapes or unknown names."""
        from .docmask import DOC_MASK_KERNELS
        from .layers import ACTIVATIONS, EMBEDDING_SCALES, FFNS, NORMS, POSITIONS

        def known(name: str, registry, *also: str) -> None:
            value = getattr(self, name)
            if value not in registry and value not in also:
                choices = [*also, *registry.names()]
                # A run trained with a plugin's name, read without the plugin, learns where it comes from.
                raise UnknownName(f"{name}: unknown {registry.kind} {value!r}{unknown_hint(str(value), choices)}; "
                                  f"choose from {choices}")

        for name, registry in (("arch", ARCHITECTURES), ("init", INITS), ("norm", NORMS), ("ffn", FFNS),
                               ("positions", POSITIONS), ("activation", ACTIVATIONS),
                               ("embedding_scale", EMBEDDING_SCALES)):
            known(name, registry)
        known("document_mask_kernel", DOC_MASK_KERNELS, "auto")
        # An init may need architecture options (e.g. no norms): it says so with a ``check``.
        check = getattr(INITS.get(self.init), "check", None)
        if check is not None:
            check(self)
        if self.norm_position not in ("pre", "post"):
            raise ConfigError(f"norm_position must be 'pre' or 'post', got {self.norm_position!r}")
        for name in ("vocab_size", "hidden", "layers", "heads", "intermediate", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.type_vocab_size < 0:
            raise ConfigError(f"type_vocab_size must be >= 0, got {self.type_vocab_size}")
        if self.hidden % self.heads:
            raise ConfigError(
                f"hidden ({self.hidden}) must be divisible by heads ({self.heads})"
            )
        if self.gated and self.intermediate % 2:
            raise ConfigError(
                f"ffn={self.ffn} splits intermediate into value and gate halves, so intermediate "
                f"must be even, got {self.intermediate}"
            )
        if self.positions == "rotary" and self.head_dim % 2:
            raise ConfigError(
                f"positions=rotary rotates pairs of channels, so the head dim (hidden/heads = "
                f"{self.head_dim}) must be even"
            )
        if self.positions == "rotary" and self.rotary_base <= 1:
            raise ConfigError(f"rotary_base must be > 1, got {self.rotary_base}")
        if self.positions == "sinusoidal" and self.hidden % 2:
            raise ConfigError(
                f"positions=sinusoidal pairs sine and cosine channels, so hidden must be even, "
                f"got {self.hidden}"
            )
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps}")
        if self.init_std <= 0:
            raise ConfigError(f"init_std must be positive, got {self.init_std}")
        if self.document_boundary_id is not None and not 0 <= self.document_boundary_id < self.vocab_size:
            raise ConfigError(
                f"document_boundary_id must be a token id in [0, vocab_size={self.vocab_size}), "
                f"got {self.document_boundary_id}"
            )
        if self.document_mask and self.document_mask_kernel == "flex" and self.attention_dropout > 0:
            raise ConfigError(
                "document_mask_kernel=flex has no attention dropout; set attention_dropout=0 or "
                "use document_mask_kernel=sdpa"
            )
