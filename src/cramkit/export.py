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
import json
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

    def mismatches(self, cfg) -> list[str]:
        """Why ``cfg`` is not exactly this HF architecture (empty when it is)."""
        return [
            f"{name}={getattr(cfg, name)!r} ({self.explain[name]})"
            for name, ok in self.requirements.items()
            if not ok(getattr(cfg, name))
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
    "norm_position": (_is("post"), "BertForMaskedLM is post-LN"),
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
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(tokenizer.to_str())
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
    # split_special_tokens: a special token's spelling inside a text ("[MASK]", "[SEP]",
    # "<|endoftext|>") is plain text, as in cramkit's pretraining and fine-tuning (encoding_copy).
    # Raw text then gives the same ids here as in cramkit, and a corpus or a task that contains
    # "[MASK]" or "[SEP]" never yields a mask or a separator the model was not trained to see
    # there. The cost is HF's habit of writing the mask in the text: fill-mask needs
    # tokenizer_kwargs={"split_special_tokens": False} (or the mask id put in by id).
    # Byte-level BPE decodes text exactly; HF's clean-up (" ," -> ",", " 's" -> "'s") would alter
    # it, and transformers 4.42-4.44 apply it when the file does not say (5.x and 4.45+ do not).
    cleanup = {"clean_up_tokenization_spaces": False} if causal else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=max_len, split_special_tokens=True, **cleanup, **tokens
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
    if out.exists() and not out.is_dir():
        # Not even --force: an export is a directory, and replacing a file is not what it means.
        raise ConfigError(f"{out} exists and is not a directory; choose another --out")
    # Not even --force: the export would replace the run (or the folder holding it), or be
    # written inside it and then replace a part of it (its checkpoints).
    if paths_overlap(out, run_dir):
        raise ConfigError(f"--out {out} overlaps the run directory {run_dir}; choose another --out")
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


def load_exported(path: str | Path, device: str | torch.device = "cpu"):
    """Load a cramkit-format export: ``(model in eval mode, tokenizers.Tokenizer)``.

    The tokenizer frames inputs as the run's tokenizer.json says (``[CLS] a [SEP] (b [SEP])`` for
    cramkit's WordPiece) and, as cramkit does, reads special-token spellings inside a text as text.

    HF-format exports are loaded with ``transformers`` Auto classes instead.
    """
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from .models import ModelConfig, build_model

    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no config.json (not a cramkit export)")
    data = json.loads(cfg_path.read_text())
    if data.get("format") != NATIVE_FORMAT:
        raise CheckpointError(
            f"{path} is a transformers export; load it with transformers Auto classes "
            "(AutoModelForMaskedLM / AutoModelForCausalLM .from_pretrained)"
        )
    cfg = ModelConfig.from_dict(data["model"], path="model")
    model = build_model(cfg)
    weights = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"head.decoder.weight"} if cfg.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(
            f"{path}/model.safetensors does not match config.json: missing "
            f"{sorted(set(missing) - tied)[:5]}, unexpected {list(unexpected)[:5]}"
        )
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    # Not stored in tokenizer.json: special-token spellings in a text are text, as cramkit's own
    # encoding reads them and as the HF export's tokenizer does (see save_hf_tokenizer).
    tokenizer.encode_special_tokens = True
    return model.to(device).eval(), tokenizer
