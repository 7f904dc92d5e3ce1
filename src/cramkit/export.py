"""Export a pretraining run: HF ``transformers`` layout when exact, cramkit's own otherwise.

``export(run_dir, out)`` writes a directory atomically (temporary sibling + rename):

- when the architecture has an exact HF counterpart — judged from the ModelConfig fields (norm
  position, biases, learned positions, FFN kind, head transform, ...), never from a preset name —
  a ``transformers`` model (``BertForMaskedLM`` for ``arch=bert``, ``GPT2LMHeadModel`` for
  ``arch=gpt``) saved with ``save_pretrained`` plus a ``PreTrainedTokenizerFast``: it loads with
  ``AutoModelForMaskedLM`` / ``AutoModelForCausalLM`` and ``AutoTokenizer``;
- otherwise (e.g. crammed BERT: pre-norm, gated FFN, no biases, scaled sinusoidal positions)
  ``model.safetensors``, ``config.json`` (``{"format": "cramkit", "model": ModelConfig}``) and
  ``tokenizer.json``, loadable with :func:`load_exported` — **not** by HF Auto classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .configbase import did_you_mean
from .errors import CheckpointError, ConfigError
from .utils import atomic_dir, paths_overlap, read_json, refuse_current_folder, write_json

NATIVE_FORMAT = "cramkit"
# Written into every export; a folder holding it is one that --force may replace.
EXPORT_META = "cramkit_export.json"
README_NATIVE = """# cramkit export (not loadable by HF Auto classes)

This architecture has no exact `transformers` counterpart ({reasons}).

Load it with cramkit:

```python
from cramkit.export import load_exported
model, tokenizer = load_exported("{name}")   # cramkit model (eval mode), tokenizers.Tokenizer
```

Files: `model.safetensors` (weights; tied tensors stored once), `config.json`
(`model` = cramkit ModelConfig), `tokenizer.json` (`tokenizers` format), `special_ids.json`.
The tokenizer `load_exported` returns reads special-token spellings inside a text (`[SEP]`,
`[MASK]`) as plain text, as cramkit's pretraining and fine-tuning do; one loaded from
`tokenizer.json` directly needs `tokenizer.encode_special_tokens = True` for that.
"""


@dataclasses.dataclass
class HFTarget:
    """An HF architecture that reproduces a cramkit one exactly, given matching fields."""

    hf_class: str
    auto_class: str
    requirements: dict[str, Callable[[Any], bool]]
    explain: dict[str, str]
    #: ``(ModelConfig, state dict, special ids) -> (HF config, HF state dict)``.
    convert: Callable[
        [Any, dict[str, torch.Tensor], dict[str, int | None]], tuple[Any, dict[str, torch.Tensor]]
    ]

    def mismatches(self, cfg, skip: tuple[str, ...] = ()) -> list[str]:
        """Why ``cfg`` is not exactly this HF architecture (empty when it is), leaving out the
        fields in ``skip``."""
        return [
            f"{name}={getattr(cfg, name)!r} ({self.explain[name]})"
            for name, ok in self.requirements.items()
            if name not in skip and not ok(getattr(cfg, name))
        ]


#: cramkit's activation names -> transformers' ``hidden_act`` / ``activation_function``.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to("cpu", torch.float32).contiguous()


def _bert_convert(cfg, sd: dict[str, torch.Tensor], special: dict[str, int | None]):
    from transformers import BertConfig

    h = cfg.hidden
    hf = BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=h,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.intermediate,
        hidden_act=HF_ACTIVATIONS[cfg.activation],
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_positions,
        # HF always adds a token-type embedding; one zero row is exactly "none".
        type_vocab_size=max(cfg.type_vocab_size, 1),
        layer_norm_eps=cfg.norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        # HF's default is 0, which is [PAD] only when the tokenizer put it first.
        pad_token_id=special.get("pad"),
    )
    types = sd.get("embeddings.token_types.weight", torch.zeros(1, h))
    out = {
        "bert.embeddings.word_embeddings.weight": sd["embeddings.tokens.weight"],
        "bert.embeddings.position_embeddings.weight": sd["embeddings.positions.weight"],
        "bert.embeddings.token_type_embeddings.weight": types,
        "bert.embeddings.LayerNorm.weight": sd["embeddings.norm.weight"],
        "bert.embeddings.LayerNorm.bias": sd["embeddings.norm.bias"],
    }
    for i in range(cfg.layers):
        src, dst = f"layers.{i}.", f"bert.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{src}attn.qkv.{kind}"].chunk(3, dim=0)
            out[f"{dst}attention.self.query.{kind}"] = q
            out[f"{dst}attention.self.key.{kind}"] = k
            out[f"{dst}attention.self.value.{kind}"] = v
            out[f"{dst}attention.output.dense.{kind}"] = sd[f"{src}attn.out.{kind}"]
            out[f"{dst}attention.output.LayerNorm.{kind}"] = sd[f"{src}norm1.{kind}"]
            out[f"{dst}intermediate.dense.{kind}"] = sd[f"{src}ffn.up.{kind}"]
            out[f"{dst}output.dense.{kind}"] = sd[f"{src}ffn.down.{kind}"]
            out[f"{dst}output.LayerNorm.{kind}"] = sd[f"{src}norm2.{kind}"]
    if "head.transform.dense.weight" in sd:  # the MLM head (a classifier's encoder may lack its transform)
        for kind in ("weight", "bias"):
            out[f"cls.predictions.transform.dense.{kind}"] = sd[f"head.transform.dense.{kind}"]
            out[f"cls.predictions.transform.LayerNorm.{kind}"] = sd[f"head.transform.norm.{kind}"]
        decoder_bias = sd.get("head.decoder.bias", torch.zeros(cfg.vocab_size))
        out["cls.predictions.bias"] = decoder_bias
        out["cls.predictions.decoder.bias"] = decoder_bias
        out["cls.predictions.decoder.weight"] = sd["head.decoder.weight"]
    return hf, {k: _t(v) for k, v in out.items()}


def _gpt2_convert(cfg, sd: dict[str, torch.Tensor], special: dict[str, int | None]):
    from transformers import GPT2Config

    # GPT-2's convention: the end-of-document token is bos and eos (generate() stops at it), and
    # pads when the vocabulary has no pad token; GPT2ForSequenceClassification needs a pad id to
    # find each row's last real token, and refuses batches above 1 without one.
    eod = special.get("eod")
    pad = special.get("pad")

    hf = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_positions,
        n_embd=cfg.hidden,
        n_layer=cfg.layers,
        n_head=cfg.heads,
        n_inner=cfg.intermediate,
        activation_function=HF_ACTIVATIONS[cfg.activation],
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.attention_dropout,
        layer_norm_epsilon=cfg.norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=eod,
        eos_token_id=eod,
        pad_token_id=pad if pad is not None else eod,
    )
    out = {
        "transformer.wte.weight": sd["embeddings.tokens.weight"],
        "transformer.wpe.weight": sd["embeddings.positions.weight"],
        "transformer.ln_f.weight": sd["final_norm.weight"],
        "transformer.ln_f.bias": sd["final_norm.bias"],
        "lm_head.weight": sd["head.decoder.weight"],
    }
    # GPT-2 keeps its linear layers as Conv1D with [in, out] weights: transpose ours.
    pairs = {
        "attn.qkv": "attn.c_attn",
        "attn.out": "attn.c_proj",
        "ffn.up": "mlp.c_fc",
        "ffn.down": "mlp.c_proj",
    }
    for i in range(cfg.layers):
        src, dst = f"layers.{i}.", f"transformer.h.{i}."
        for ours, theirs in pairs.items():
            out[f"{dst}{theirs}.weight"] = sd[f"{src}{ours}.weight"].t()
            out[f"{dst}{theirs}.bias"] = sd[f"{src}{ours}.bias"]
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[f"{dst}{theirs}.weight"] = sd[f"{src}{ours}.weight"]
            out[f"{dst}{theirs}.bias"] = sd[f"{src}{ours}.bias"]
    return hf, {k: _t(v) for k, v in out.items()}


def _is(value):
    return lambda v: v == value


_COMMON = {
    "norm": (_is("layernorm"), "HF uses LayerNorm"),
    "bias": (_is(True), "HF has biases on every linear layer"),
    "norm_bias": (lambda v: v is not False, "HF's LayerNorms have a bias"),
    "ffn": (_is("gelu"), "HF's feed-forward is not gated"),
    "activation": (lambda v: v in HF_ACTIVATIONS, "needs an HF activation"),
    "positions": (_is("learned"), "HF uses a learned position table"),
    # The gains are trained parameters that HF has no place for: dropping them changes the output.
    "residual_scale": (_is("none"), "HF has no gain on the residual branches"),
    "embedding_scale": (_is("none"), "HF does not scale the token embedding"),
}
_BERT = {
    **_COMMON,
    "norm_position": (_is("post"), "BERT is post-LN"),
    "embedding_norm": (_is(True), "BERT normalises the embeddings"),
    "final_norm": (_is(False), "BERT has no final norm"),
    "head_transform": (_is(True), "BERT's MLM head has a dense + act + norm transform"),
}
_GPT2 = {
    **_COMMON,
    "norm_position": (_is("pre"), "GPT-2 is pre-LN"),
    "embedding_norm": (_is(False), "GPT-2 does not normalise the embeddings"),
    "final_norm": (_is(True), "GPT-2 has a final ln_f"),
    "head_transform": (_is(False), "GPT-2's LM head is a single projection"),
    "decoder_bias": (_is(False), "GPT-2's lm_head has no bias"),
    "type_vocab_size": (_is(0), "GPT-2 has no segment embeddings"),
}

#: ``arch`` -> its exact HF counterpart (when the other fields match).
HF_COUNTERPARTS: dict[str, HFTarget] = {
    "bert": HFTarget(
        "BertForMaskedLM",
        "AutoModelForMaskedLM",
        {k: v[0] for k, v in _BERT.items()},
        {k: v[1] for k, v in _BERT.items()},
        _bert_convert,
    ),
    "gpt": HFTarget(
        "GPT2LMHeadModel",
        "AutoModelForCausalLM",
        {k: v[0] for k, v in _GPT2.items()},
        {k: v[1] for k, v in _GPT2.items()},
        _gpt2_convert,
    ),
}


def hf_counterpart(cfg) -> tuple[HFTarget | None, list[str]]:
    """The exact HF target for ModelConfig ``cfg``, or None and the reasons there is none."""
    target = HF_COUNTERPARTS.get(cfg.arch)
    if target is None:
        return None, [f"arch={cfg.arch!r} has no HF counterpart"]
    reasons = target.mismatches(cfg)
    return (None, reasons) if reasons else (target, [])


# --------------------------------------------------------------------------------------------
# Tokenizer


def _special_tokens(tokenizer, special: dict[str, int | None]) -> dict[str, str]:
    names = {
        "pad": "pad_token",
        "unk": "unk_token",
        "cls": "cls_token",
        "sep": "sep_token",
        "mask": "mask_token",
    }
    out = {}
    for key, hf_name in names.items():
        idx = special.get(key)
        if idx is not None and tokenizer.id_to_token(idx) is not None:
            out[hf_name] = tokenizer.id_to_token(idx)
    eod = special.get("eod")
    if eod is not None and tokenizer.id_to_token(eod) is not None:
        out["eos_token"] = out["bos_token"] = tokenizer.id_to_token(eod)
    return out


def save_hf_tokenizer(
    tokenizer, special: dict[str, int | None], out: Path, causal: bool, max_len: int
) -> None:
    """Save ``tokenizer`` as a ``PreTrainedTokenizerFast`` (AutoTokenizer-loadable).

    BERT-style tokenizers get a ``[CLS] a [SEP] b [SEP]`` post-processor so that HF pipelines
    build the same inputs cramkit's fine-tuning does, segment ids included: cramkit never feeds
    token types (pretraining and fine-tuning use segment 0 throughout), so the second text is
    segment 0 too. Segment 1 would index an untrained row of the token-type table, or a row
    that does not exist when the model has none (``type_vocab_size=0`` exports as one row).
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from .data.tokenizer import encoding_copy

    # As cramkit encodes: without a reused tokenizer.json's own padding or truncation (on the
    # left, say: transformers takes padding_side and truncation_side from the file, and left
    # padding moves learned positions) and without its framing (Llama's "<s> $A" before each
    # text, which pretraining never fed a causal model); BERT's framing is set below.
    tok = encoding_copy(tokenizer)
    tokens = _special_tokens(tok, special)
    if causal and "pad_token" not in tokens and "eos_token" in tokens:
        # The pad id the GPT-2 config falls back to: tokenizer(..., padding=True) then works and
        # pads with the id the model skips.
        tokens["pad_token"] = tokens["eos_token"]
    if not causal and "cls_token" in tokens and "sep_token" in tokens:
        cls, sep = tokens["cls_token"], tokens["sep_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} $B {sep}",
            special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
        )
    elif not causal:
        tok.post_processor = tokenizer.post_processor
    # split_special_tokens: a special token's spelling inside a text ("[MASK]", "[SEP]",
    # "<|endoftext|>") is plain text, as in cramkit's pretraining and fine-tuning (encoding_copy).
    # Raw text then gives the same ids here as in cramkit, and a corpus or a task that contains
    # "[MASK]" or "[SEP]" never yields a mask or a separator the model was not trained to see
    # there. The cost is HF's habit of writing the mask in the text: fill-mask needs
    # tokenizer_kwargs={"split_special_tokens": False} (or the mask id put in by id).
    # Byte-level BPE decodes text exactly; HF's clean-up (" ," -> ",", " 's" -> "'s") would alter
    # it, and transformers 4.42-4.44 apply it when the file does not say (5.x and 4.45+ do not).
    causal_only = {"clean_up_tokenization_spaces": False} if causal else {}
    # transformers 4.x returns token_type_ids (zeros) by default, and GPT2Model adds
    # wte(token_type_ids) to every position: model(**tokenizer(text)) was off cramkit's logits.
    # GPT-2's own tokenizers name only these two; BERT's zeros are the segment cramkit uses.
    if causal:
        causal_only["model_input_names"] = ["input_ids", "attention_mask"]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=max_len, split_special_tokens=True,
        padding_side="right", truncation_side="right", **causal_only, **tokens
    )
    fast.save_pretrained(str(out))
    # transformers 5 names its class TokenizersBackend, which 4.x (cramkit[hf] allows >= 4.42)
    # cannot find, so the export would not load there; every version knows
    # PreTrainedTokenizerFast (in 5.x an alias of TokenizersBackend).
    config_path = out / "tokenizer_config.json"
    config = read_json(config_path, CheckpointError)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_json(config_path, config)


# --------------------------------------------------------------------------------------------
# Export


def _write_hf(target: HFTarget, model, cfg, tokenizer, special, tmp: Path) -> None:
    import transformers

    hf_cfg, weights = target.convert(cfg, model.state_dict(), special)
    hf_model = getattr(transformers, target.hf_class)(hf_cfg)
    missing, unexpected = hf_model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"export to {target.hf_class}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    hf_model.eval()
    hf_model.save_pretrained(str(tmp))
    save_hf_tokenizer(tokenizer, special, tmp, cfg.causal, cfg.max_positions)


def _write_native(model, cfg, tokenizer, special, tmp: Path, reasons: list[str], out: Path) -> None:
    from safetensors.torch import save_file

    from .train.checkpoint import model_weights

    save_file(model_weights(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    write_json(
        tmp / "config.json",
        {"format": NATIVE_FORMAT, "model": cfg.to_dict(), "special_ids": special},
    )
    write_json(tmp / "special_ids.json", special)
    tokenizer.save(str(tmp / "tokenizer.json"))
    (tmp / "README.md").write_text(README_NATIVE.format(reasons="; ".join(reasons), name=out))


FORMATS = ("hf", NATIVE_FORMAT)


def _check_out(source: Path, out: Path, overwrite: bool, what: str = "run directory") -> None:
    """Refuse an ``out`` that export must not write (or replace), before anything is loaded."""
    if out.exists() and not out.is_dir():
        # Not even --force: an export is a directory, and replacing a file is not what it means.
        raise ConfigError(f"{out} exists and is not a directory; choose another --out")
    # Not even --force: the export would replace the run (or the folder holding it), or be
    # written inside it and then replace a part of it (its checkpoints).
    if paths_overlap(out, source):
        raise ConfigError(f"--out {out} overlaps the {what} {source}; choose another --out")
    refuse_current_folder(out, ConfigError, "export")
    # --force replaces only what export itself wrote: whatever else is in a folder (another
    # run, a folder of runs, someone's files) is not ours to delete.
    if out.exists() and any(out.iterdir()):
        if not (out / EXPORT_META).is_file():
            raise ConfigError(
                f"{out} exists, is not empty and is not a cramkit export; choose another --out "
                "(--force only replaces a previous export)"
            )
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty (pass --force to replace it)")


def export(
    run_dir: str | Path,
    out: str | Path,
    format: str = "hf",
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export the newest complete checkpoint of ``run_dir`` to ``out``.

    ``format="hf"`` writes a ``transformers`` directory when the architecture has an exact HF
    counterpart and falls back to the cramkit layout (with a clear message) when not;
    ``format="cramkit"`` always writes the cramkit layout. Returns ``{"out", "format",
    "hf_class", "auto_class", "loadable_by_hf", "reasons"}``.
    """
    from .eval.encoding import SpecialIds
    from .eval.finetune import open_run

    if format not in FORMATS:
        raise ConfigError(
            f"unknown export format '{format}'{did_you_mean(format, FORMATS)}; "
            f"choose from {list(FORMATS)}"
        )
    run_dir, out = Path(run_dir), Path(out)
    from .eval.finetuned import is_finetuned_folder

    if is_finetuned_folder(run_dir):
        return export_finetuned(run_dir, out, format=format, overwrite=overwrite, log=log)
    _check_out(run_dir, out, overwrite)
    model, cfg, tokenizer, info = open_run(run_dir)
    special = dataclasses.asdict(SpecialIds.for_run(run_dir, tokenizer))

    target, reasons = hf_counterpart(cfg) if format == "hf" else (None, ["format=cramkit"])
    if target is not None:
        try:  # the hf extra is optional: without it, a one-line error before anything is written
            import transformers  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"exporting as transformers {target.hf_class} needs the transformers package "
                "(pip install 'cramkit[hf]'); --format cramkit needs only cramkit"
            ) from None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a parent directory should be, no permission, ...
        raise ConfigError(f"{out}: cannot create {out.parent} ({exc.strerror})") from None
    with atomic_dir(out) as tmp:  # a failed export leaves --out as it was
        if target is not None:
            _write_hf(target, model, cfg, tokenizer, special, tmp)
        else:
            _write_native(model, cfg, tokenizer, special, tmp, reasons, out)
        write_json(
            tmp / EXPORT_META,
            {
                "source_run": str(run_dir.resolve()),
                "checkpoint": str(info.get("checkpoint", "")),
                "format": "hf" if target else NATIVE_FORMAT,
                "hf_class": target.hf_class if target else None,
                "model": cfg.to_dict(),
                "pretrained_with_document_mask": info["document_mask"],
            },
        )

    if target is not None:
        log(
            f"exported {run_dir} to {out} as transformers {target.hf_class} "
            f"(load with {target.auto_class}.from_pretrained and AutoTokenizer)"
        )
        if not cfg.causal:  # HF's fill-mask examples write the mask into the text
            log("NOTE: as in cramkit, '[MASK]' typed in a text is text; for fill-mask pass "
                "tokenizer_kwargs={'split_special_tokens': False} (or put in the mask token's id)")
    elif format == "hf":
        log(f"NOTE: this architecture is NOT loadable by HF Auto classes: {'; '.join(reasons)}")
        log(
            f"exported {run_dir} to {out} in cramkit's format; load with "
            f"cramkit.export.load_exported('{out}')"
        )
    else:
        log(f"exported {run_dir} to {out} in cramkit's format (cramkit.export.load_exported)")
    if info["document_mask"]:
        log("NOTE: pretraining masked attention between packed documents; the export attends "
            "over the whole input (one example per input, as in fine-tuning)")
    return {
        "out": str(out),
        "format": "hf" if target else NATIVE_FORMAT,
        "hf_class": target.hf_class if target else None,
        "auto_class": target.auto_class if target else None,
        "loadable_by_hf": target is not None,
        "reasons": reasons,
    }


# --------------------------------------------------------------------------------------------
# Fine-tuned classifiers (the folders ``cramkit finetune save=true`` writes)

#: The one HF classifier a cramkit fine-tune can be exactly: a BERT encoder, the first token's
#: state through dense (hidden wide) + tanh (BertPooler), dropout, a linear layer.
FINETUNED_HF_CLASS = "BertForSequenceClassification"
FINETUNED_AUTO_CLASS = "AutoModelForSequenceClassification"


def finetuned_mismatches(model_config, finetune_config) -> list[str]:
    """Why a fine-tune of ``model_config`` set up by ``finetune_config`` is not exactly
    :data:`FINETUNED_HF_CLASS` (empty when it is)."""
    from .eval.heads import resolve_pooling

    if model_config.arch != "bert":
        reasons = [f"arch={model_config.arch!r} ({FINETUNED_HF_CLASS} is a BERT encoder; "
                   "transformers' other sequence classifiers have no dense + tanh pooler)"]
    else:
        # The MLM head's shape does not matter: a sequence classifier drops that head.
        reasons = HF_COUNTERPARTS["bert"].mismatches(model_config, skip=("head_transform",))
    pooling = resolve_pooling(finetune_config.pooling, model_config.causal)
    if pooling != "cls":
        shown = repr(pooling) if pooling == finetune_config.pooling else f"'auto' ({pooling})"
        reasons.append(f"finetune.pooling={shown} ({FINETUNED_HF_CLASS} pools the first token)")
    width = finetune_config.head_width or model_config.hidden
    if width != model_config.hidden:
        reasons.append(f"finetune.head_width={width} (BertPooler's dense layer is hidden="
                       f"{model_config.hidden} wide)")
    return reasons


def _merged(clf) -> torch.nn.Module:
    """The classifier of a :class:`~cramkit.eval.finetuned.FinetunedModel` with its PEFT adapter
    (if any) merged into the weights: a plain SequenceClassifier."""
    if clf.config.peft == "none":
        return clf.model
    try:
        return clf.model.merge_and_unload()
    except (AttributeError, NotImplementedError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"{clf.path}: peft cannot merge a {clf.config.peft} adapter into the weights "
            f"({type(exc).__name__}: {exc}); `cramkit predict` and cramkit.eval.load_finetuned "
            "use the folder as it is"
        ) from None


def export_finetuned(
    path: str | Path,
    out: str | Path,
    format: str = "hf",
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export the fine-tuned classifier that ``cramkit finetune save=true`` saved at ``path``
    (``RUN/finetune/TASK[-PEFT][-random]/seed-N``, or a folder above it holding one, as
    :func:`~cramkit.eval.finetuned.load_finetuned` reads it) as transformers
    :data:`FINETUNED_HF_CLASS`, loadable with ``AutoModelForSequenceClassification`` and
    ``AutoTokenizer``; a PEFT adapter is merged into the weights.

    Only fine-tunes that are exactly that class are exported (a BERT backbone with an exact HF
    counterpart, cls pooling, a head as wide as the hidden size); the others are a ConfigError
    saying why. Returns what :func:`export` returns.
    """
    from .eval.finetuned import load_finetuned, saved_folder

    path, out = Path(path), Path(out)
    folder = saved_folder(path)
    as_is = (f"`cramkit predict` and cramkit.eval.load_finetuned use {folder} as it is")
    if format != "hf":
        raise ConfigError(f"--format {format} holds pretraining runs, not fine-tuned classifiers: "
                          f"{as_is} (--format hf exports the ones that are exactly {FINETUNED_HF_CLASS})")
    _check_out(path, out, overwrite, "fine-tuned folder")
    try:  # as in export: a one-line error before anything is loaded or written
        import transformers
    except ImportError:
        raise ConfigError(f"exporting as transformers {FINETUNED_HF_CLASS} needs the transformers "
                          f"package (pip install 'cramkit[hf]'); {as_is}") from None
    clf = load_finetuned(folder, device="cpu")
    base = clf.model.get_base_model() if clf.config.peft != "none" else clf.model
    model_config = base.encoder.config
    reasons = finetuned_mismatches(model_config, clf.config)
    if reasons:
        raise ConfigError(f"{folder} is not exactly transformers {FINETUNED_HF_CLASS} "
                          f"({'; '.join(reasons)}); cramkit's own export format holds pretraining "
                          f"runs only: {as_is}")
    model = _merged(clf)
    # The special ids and tokenizer that load_finetuned read and checked, not the files read
    # again: a folder re-saved or damaged meanwhile would pair these weights with other ones.
    special = dataclasses.asdict(clf.special)
    hf_cfg, weights = HF_COUNTERPARTS["bert"].convert(model_config, model.encoder.state_dict(), special)
    weights = {k: v for k, v in weights.items() if not k.startswith("cls.")}  # the MLM head
    dense, final = model.classifier[0], model.classifier[-1]
    weights.update({
        "bert.pooler.dense.weight": _t(dense.weight), "bert.pooler.dense.bias": _t(dense.bias),
        "classifier.weight": _t(final.weight), "classifier.bias": _t(final.bias),
    })
    if clf.labels is None:
        hf_cfg.num_labels = 1
        hf_cfg.problem_type = "regression"
    else:
        hf_cfg.num_labels = len(clf.labels)
        hf_cfg.id2label = dict(enumerate(clf.labels))
        hf_cfg.label2id = {name: i for i, name in enumerate(clf.labels)}
        hf_cfg.problem_type = "single_label_classification"
    hf_cfg.classifier_dropout = clf.config.dropout
    hf_model = getattr(transformers, FINETUNED_HF_CLASS)(hf_cfg)
    missing, unexpected = hf_model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"export to {FINETUNED_HF_CLASS}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    tokenizer = clf.tokenizer
    max_len = min(clf.config.seq_len, model_config.max_positions)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot create {out.parent} ({exc.strerror})") from None
    with atomic_dir(out) as tmp:  # a failed export leaves --out as it was
        hf_model.eval()
        hf_model.save_pretrained(str(tmp))
        save_hf_tokenizer(tokenizer, special, tmp, False, max_len)
        write_json(
            tmp / EXPORT_META,
            {
                "source_finetuned": str(folder.resolve()),
                "source_run": str(clf.run_dir.resolve()),
                "format": "hf",
                "hf_class": FINETUNED_HF_CLASS,
                "model": model_config.to_dict(),
                "finetune": clf.config.to_dict(),
                "task": clf.task.name,
                "labels": None if clf.labels is None else list(clf.labels),
                "peft_merged": clf.config.peft != "none",
            },
        )
    merged = f" (its {clf.config.peft} adapter merged into the weights)" if clf.config.peft != "none" else ""
    log(f"exported {folder}{merged} to {out} as transformers {FINETUNED_HF_CLASS} (load with "
        f"{FINETUNED_AUTO_CLASS}.from_pretrained and AutoTokenizer)")
    # transformers cuts nothing unless asked (a pipeline neither): a longer text reached the
    # classifier whole and was scored otherwise than by `cramkit predict`.
    log(f"NOTE: cramkit cuts each input to finetune.seq_len={max_len} tokens; transformers does so only "
        "when asked: tokenizer(..., truncation=True), or pipeline(...)(texts, truncation=True)")
    return {
        "out": str(out),
        "format": "hf",
        "hf_class": FINETUNED_HF_CLASS,
        "auto_class": FINETUNED_AUTO_CLASS,
        "loadable_by_hf": True,
        "reasons": [],
    }


def load_exported(path: str | Path, device: str | torch.device = "cpu"):
    """Load a cramkit-format export: ``(model in eval mode, tokenizers.Tokenizer)``.

    The tokenizer frames inputs as the run's tokenizer.json says (``[CLS] a [SEP] (b [SEP])`` for
    cramkit's WordPiece; a causal model's texts not at all, as in pretraining) and, as cramkit
    does, reads special-token spellings inside a text as text, with no padding or truncation of
    its own.

    HF-format exports are loaded with ``transformers`` Auto classes instead. ``device``:
    ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``, as :func:`~cramkit.eval.load_finetuned`
    takes it (anything else is a ConfigError).
    """
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from .data.tokenizer import encoding_copy
    from .eval.finetuned import CLASSIFIER_FILE
    from .models import ModelConfig, build_model
    from .train.device import resolve_device

    # Before anything is read: "gpu" was torch's list of twenty device types, and "cuda" on a
    # machine without one an AssertionError, once the weights had been loaded.
    dev = resolve_device(str(device))
    path = Path(path)
    cfg_path = path / "config.json"
    if path.is_file():  # model.safetensors or config.json given for their folder: it exists
        raise CheckpointError(f"{path} is a file: give the export's folder ({path.parent})")
    if not path.is_dir():
        raise CheckpointError(f"{path}: export folder not found")
    if (path / CLASSIFIER_FILE).is_file():
        raise CheckpointError(f"{path} holds fine-tuned weights, not an export: load them with "
                              "cramkit.eval.load_finetuned")
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no config.json (not a cramkit export)")
    data = read_json(cfg_path, CheckpointError)  # damaged: an error naming the file, not a traceback
    if data.get("format") != NATIVE_FORMAT:
        # A pretraining run holds a config.json too (the run's, with no "format"): it was
        # called a transformers export.
        if "model_type" not in data:
            what = ("a pretraining run" if (path / "checkpoints").is_dir() else "not a cramkit export")
            raise CheckpointError(
                f"{path} is {what}: export a run with `cramkit export RUN_DIR --out DIR` (or "
                "cramkit.export.export) and load DIR, or load a run's newest checkpoint with "
                "cramkit.train.checkpoint.load_pretrained"
            )
        raise CheckpointError(
            f"{path} is a transformers export; load it with transformers Auto classes "
            "(AutoModelForMaskedLM / AutoModelForCausalLM .from_pretrained)"
        )
    try:
        cfg = ModelConfig.from_dict(data.get("model"), path="model")
    except ConfigError as exc:  # a damaged or hand-edited config.json
        raise CheckpointError(f"{cfg_path}: not a cramkit export's model config ({exc}); export the run again") from None
    model = build_model(cfg)
    try:
        weights = load_file(str(path / "model.safetensors"))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"cannot read {path}/model.safetensors: {exc}; export the run again") from None
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # a tensor of another shape than config.json gives it
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise CheckpointError(f"{path}/model.safetensors does not match config.json: {first.rstrip('.')}") from None
    tied = {"head.decoder.weight"} if cfg.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(
            f"{path}/model.safetensors does not match config.json: missing "
            f"{sorted(set(missing) - tied)[:5]}, unexpected {list(unexpected)[:5]}"
        )
    try:
        saved = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"{path}/tokenizer.json: cannot read tokenizer ({exc}); export the run again") from None
    # As cramkit encodes (encoding_copy): special-token spellings in a text are text (not stored
    # in tokenizer.json), and none of a reused file's padding, truncation or framing; a BERT's
    # texts are framed as the file says, [CLS] a [SEP] (b [SEP]).
    tokenizer = encoding_copy(saved)
    if not cfg.causal:
        tokenizer.post_processor = saved.post_processor
    return model.to(dev).eval(), tokenizer
