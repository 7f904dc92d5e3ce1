"""The transformer language model shared by the BERT and GPT architectures."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import ConfigError
from .config import ModelConfig
from .docmask import build_document_mask
from .layers import Block, Embeddings, LMHead, make_norm
from .registry import INITS

IGNORE_INDEX = -100


@dataclasses.dataclass
class ModelOutput:
    """What a language model's forward returns.

    - ``loss``: mean cross-entropy over positions with ``labels != -100`` (None without labels;
      0 when a batch has no targets at all).
    - ``logits``: [B, L, vocab], or [num_targets, vocab] under sparse prediction (rows in the
      row-major order of the labelled positions).
    - ``num_targets``: a 0-d long tensor on the model's device (None without labels); a tensor so
      that reading it costs no host-device sync until the caller wants the number.
    """

    loss: torch.Tensor | None
    logits: torch.Tensor
    num_targets: torch.Tensor | None


# FSDP2 (and DDP) find a forward's output tensors by flattening the output as a pytree, to hook
# the root module's backward there. An unregistered dataclass hides them: on torch 2.11, a step in
# which no sharded block ran (PLD dropping every block) never resharded the root, so its
# gradients missed that optimizer step and leaked into the next one.
pytree.register_dataclass(ModelOutput)

_TOKENS_KEY = "embeddings.tokens.weight"
_DECODER_KEY = "head.decoder.weight"


def _alias_tied_decoder(module, state_dict, prefix, local_metadata, strict, missing_keys,
                        unexpected_keys, error_msgs) -> None:
    # A tied decoder is the token table: a state dict that stores the shared tensor once (as
    # safetensors files must) is complete, so the decoder reads the table's entry.
    if module.config.tie_embeddings and prefix + _TOKENS_KEY in state_dict:
        state_dict.setdefault(prefix + _DECODER_KEY, state_dict[prefix + _TOKENS_KEY])


def _complete_after_load(module, incompatible_keys) -> None:
    # load_state_dict(assign=True), PyTorch's idiom for materialising a meta-device model, puts
    # a new Parameter on each module, which would train the decoder apart from the table ...
    if module.config.tie_embeddings and module.head.decoder.weight is not module.embeddings.tokens.weight:
        module.tie_weights()
    # ... and leaves the fixed tables (non-persistent buffers, never in a state dict) on meta.
    device = module.embeddings.tokens.weight.device
    if device.type == "meta":
        return
    for sub in module.modules():
        reset = getattr(sub, "reset_buffers", None)
        meta = [name for name, b in sub.named_buffers(recurse=False) if b.is_meta]
        if reset is not None and meta:
            for name in meta:
                setattr(sub, name, torch.empty_like(getattr(sub, name), device=device))
            reset()


class TransformerLM(nn.Module):
    """Embeddings → ``layers`` (blocks) → optional final norm → LM head.

    Subclasses set ``causal``. Parameters are named ``embeddings.*``, ``layers.{i}.*``,
    ``final_norm.*`` and ``head.*`` (see :mod:`cramkit.models.layers` for the inside of a block).
    """

    causal: ClassVar[bool] = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        if config.document_mask and config.document_boundary_id is None:
            raise ConfigError(
                "model.document_mask=true needs model.document_boundary_id, the token that ends "
                "a document; `cramkit pretrain` fills it from the prepared data, elsewhere set it"
            )
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Block(config, self.causal) for _ in range(config.layers))
        self.final_norm = make_norm(config) if config.final_norm else None
        self.head = LMHead(config)
        self.tie_weights()
        self.init_weights()
        self.register_load_state_dict_pre_hook(_alias_tied_decoder)
        self.register_load_state_dict_post_hook(_complete_after_load)

    def tie_weights(self) -> None:
        """Make the decoder weight the token embedding weight (when ``config.tie_embeddings``).

        ``to_empty``, ``init_weights`` and ``load_state_dict`` keep the tie; a state dict that
        holds the token table alone loads a tied model completely. ``load_state_dict(...,
        assign=True)`` into a model built on the ``meta`` device also computes the fixed
        position/rotary tables on the device of the loaded weights.
        """
        if self.config.tie_embeddings:
            self.head.decoder.weight = self.embeddings.tokens.weight

    def to_empty(self, *, device, recurse: bool = True):
        """Like ``nn.Module.to_empty``, but keeps the tied weights tied (the base method gives
        every module its own new tensor when leaving the ``meta`` device)."""
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    def init_weights(self) -> None:
        """Apply ``config.init`` and recompute the fixed tables (position/rotary caches).

        Call it after ``to_empty()`` when the model was built on the ``meta`` device.
        """
        self.tie_weights()
        for module in self.modules():
            reset = getattr(module, "reset_buffers", None)
            if reset is not None:
                reset()
        INITS.get(self.config.init)(self)

    def attention_mask(
        self, attention_mask: torch.Tensor | None, seq_len: int
    ) -> torch.Tensor | None:
        """Turn a [B, L] padding mask (1/True = token, 0/False = padding) into SDPA's boolean
        [B, 1, L or 1, L] mask, adding causality for causal models; None stays None."""
        if attention_mask is None:
            return None
        keys = attention_mask.bool()[:, None, None, :]
        if not self.causal:
            return keys
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=keys.device).tril()
        # A padded query row would otherwise have no key at all and give NaN; let it see itself.
        return (keys & causal) | torch.eye(seq_len, dtype=torch.bool, device=keys.device)

    def document_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        """The mask that keeps attention inside each packed document of ``input_ids`` (and off
        padding), for ``config.document_mask``; see :mod:`cramkit.models.docmask`."""
        cfg = self.config
        return build_document_mask(
            input_ids,
            cfg.document_boundary_id,
            causal=self.causal,
            kernel=cfg.document_mask_kernel,
            attention_dropout=cfg.attention_dropout,
            attention_mask=attention_mask,
        )

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states [B, L, hidden] (after the final norm when there is one).

        Pass ``attention_mask=None`` when nothing is padded: SDPA can then use its flash kernel.
        """
        seq_len = input_ids.shape[1]
        if self.config.exceeds_positions(seq_len):
            raise ConfigError(
                f"sequence length {seq_len} exceeds model.max_positions "
                f"({self.config.max_positions})"
            )
        if self.config.document_mask:
            mask = self.document_mask(input_ids, attention_mask)
        else:
            mask = self.attention_mask(attention_mask, seq_len)
        x = self.embeddings(input_ids, token_type_ids)
        for block in self.layers:
            x = block(x, mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        target_index: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits and, given ``labels`` (already aligned: ``labels[t]`` is position t's target,
        -100 = no loss), the mean cross-entropy over the labelled positions.

        ``target_index`` (optional, used only under sparse prediction) holds the flat positions
        ``(labels.reshape(-1) != -100).nonzero()`` in increasing order, as the data pipeline
        computes them on the CPU (:func:`cramkit.objectives.target_index`). Without it the model
        finds them itself, which makes the host wait for the device (the gathered shape depends
        on the data).
        """
        hidden = self.encode(input_ids, attention_mask, token_type_ids)
        if labels is None:
            return ModelOutput(loss=None, logits=self.head(hidden), num_targets=None)
        flat_labels = labels.reshape(-1)
        has_target = flat_labels != IGNORE_INDEX
        num_targets = has_target.sum()
        if self.config.sparse_prediction:
            # nonzero() is a host-device sync: the number of masked positions decides the gathered
            # shape. A supplied index (computed on the CPU) avoids it; the result is the same.
            index = target_index if target_index is not None else has_target.nonzero().squeeze(1)
            states = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
            targets = flat_labels.index_select(0, index)
            logits = self.head(states)
            flat_logits = logits
        else:
            logits = self.head(hidden)
            targets = flat_labels
            flat_logits = logits.reshape(-1, logits.shape[-1])
        total = F.cross_entropy(flat_logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        loss = total / num_targets.clamp(min=1)
        return ModelOutput(loss=loss, logits=logits, num_targets=num_targets)
