"""Export: exact HF counterparts give the same logits; others use cramkit's own format."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from cramkit.errors import CheckpointError, ConfigError
from cramkit.export import export, hf_counterpart, load_exported

from .helpers import perturbed_run, train_wordpiece

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def small_tokenizer():
    return train_wordpiece(
        ["the quick brown fox jumps over the lazy dog"] * 5
        + ["a second sentence about markets and films"],
        vocab_size=200,
    )


def _run(tmp_path, preset, tokenizer, **overrides):
    return perturbed_run(tmp_path / preset, preset, tokenizer, **overrides)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(5, 256, (2, 24), generator=gen)
    mask = torch.ones_like(x)
    mask[1, 17:] = 0
    return x, mask


@pytest.mark.parametrize(
    "preset, auto, hf_class",
    [
        ("bert-base", "AutoModelForMaskedLM", "BertForMaskedLM"),
        ("gpt2-small", "AutoModelForCausalLM", "GPT2LMHeadModel"),
    ],
)
def test_exact_export_matches_transformers_logits(
    tmp_path, small_tokenizer, preset, auto, hf_class
):
    run, model = _run(tmp_path, preset, small_tokenizer)
    out = tmp_path / "out"
    info = export(run, out, log=lambda s: None)
    assert info["loadable_by_hf"] and info["hf_class"] == hf_class
    hf = getattr(transformers, auto).from_pretrained(str(out)).eval()
    assert type(hf).__name__ == hf_class
    x, mask = _inputs()
    with torch.no_grad():
        ours = model(x, attention_mask=mask).logits
        theirs = hf(input_ids=x, attention_mask=mask).logits
    torch.testing.assert_close(theirs[0], ours[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(theirs[1, :17], ours[1, :17], atol=1e-4, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = tok("the quick fox")["input_ids"]
    assert ids == small_tokenizer.encode("the quick fox", add_special_tokens=False).ids or (
        ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    )
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_exactness_is_decided_by_fields_not_names():
    from cramkit.models.presets import preset_config

    assert hf_counterpart(preset_config("bert-base"))[0].hf_class == "BertForMaskedLM"
    target, reasons = hf_counterpart(preset_config("bert-base", norm_position="pre"))
    assert target is None and any("norm_position='pre'" in r for r in reasons)
    target, reasons = hf_counterpart(preset_config("gpt2-small", positions="rotary"))
    assert target is None and any("positions='rotary'" in r for r in reasons)
    # Learnable residual-branch gains have no HF counterpart (they would be dropped on export).
    for preset in ("bert-base", "gpt2-small"):
        target, reasons = hf_counterpart(preset_config(preset, residual_scale="scalar"))
        assert target is None and any("residual_scale='scalar'" in r for r in reasons)
        # HF's embeddings are not multiplied by sqrt(hidden): the logits would change.
        target, reasons = hf_counterpart(preset_config(preset, embedding_scale="sqrt_hidden"))
        assert target is None and any("embedding_scale='sqrt_hidden'" in r for r in reasons)
    # A "tiny" preset reshaped to GPT-2's layout is exact, whatever its name.
    assert hf_counterpart(preset_config("tiny-gpt"))[0].hf_class == "GPT2LMHeadModel"


def test_crammed_export_uses_cramkit_format(tmp_path, small_tokenizer, capsys):
    run, model = _run(tmp_path, "tiny", small_tokenizer)
    info = export(run, tmp_path / "out")
    assert not info["loadable_by_hf"] and info["format"] == "cramkit"
    assert "NOT loadable by HF Auto classes" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["format"] == "cramkit" and cfg["model"]["ffn"] == "glu"
    loaded, tok = load_exported(tmp_path / "out")
    x, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, attention_mask=mask).logits, model(x, attention_mask=mask).logits
        )
    assert tok.get_vocab_size() == small_tokenizer.get_vocab_size()
    with pytest.raises(Exception):  # noqa: B017  (transformers' own error type varies)
        transformers.AutoConfig.from_pretrained(str(tmp_path / "out"))


def test_export_refuses_bad_targets(tmp_path, small_tokenizer):
    run, _ = _run(tmp_path, "tiny", small_tokenizer)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    # --force replaces an empty folder or a previous export, never someone's other files.
    for force in (False, True):
        with pytest.raises(ConfigError, match="busy exists, is not empty and is not a cramkit export") as exc:
            export(run, tmp_path / "busy", overwrite=force, log=lambda s: None)
        assert "pass --force" not in str(exc.value)
    assert (tmp_path / "busy" / "x").read_text() == "x"
    (tmp_path / "empty").mkdir()
    export(run, tmp_path / "empty", overwrite=True, log=lambda s: None)
    (tmp_path / "empty" / "stale").write_text("from the previous export")
    with pytest.raises(ConfigError, match="exists and is not empty .pass --force to replace it."):
        export(run, tmp_path / "empty", log=lambda s: None)
    export(run, tmp_path / "empty", overwrite=True, log=lambda s: None)
    assert (tmp_path / "empty" / "cramkit_export.json").is_file()
    assert not (tmp_path / "empty" / "stale").exists()
    # A file where the output (or its parent) directory should be: one-line errors, file kept.
    (tmp_path / "afile").write_text("x")
    for force in (False, True):
        with pytest.raises(ConfigError, match="afile exists and is not a directory"):
            export(run, tmp_path / "afile", overwrite=force, log=lambda s: None)
    with pytest.raises(ConfigError, match=r"afile/sub: cannot create .*afile \("):
        export(run, tmp_path / "afile" / "sub", log=lambda s: None)
    assert (tmp_path / "afile").read_text() == "x"
    # --force replaced the run itself, a folder inside it (its checkpoints), the folder holding
    # it, another run, or a folder of other runs with the export.
    other, _ = _run(tmp_path / "other", "tiny", small_tokenizer)
    overlap = "overlaps the run directory"
    for out, message in ((run, overlap), (run / "checkpoints", overlap), (run / "new", overlap),
                         (run.parent, overlap), (other, "is not a cramkit export"),
                         (other.parent, "is not a cramkit export")):
        for force in (False, True):
            with pytest.raises(ConfigError, match=message):
                export(run, out, overwrite=force, log=lambda s: None)
    assert (run / "checkpoints").is_dir() and (other / "checkpoints").is_dir()
    assert not (run / "new").exists()
    with pytest.raises(ConfigError, match="unknown export format 'onnx'"):
        export(run, tmp_path / "o2", format="onnx")
    with pytest.raises(CheckpointError, match="is a transformers export"):
        hf_run, _ = _run(tmp_path, "bert-base", small_tokenizer)
        export(hf_run, tmp_path / "hf", log=lambda s: None)
        load_exported(tmp_path / "hf")


def test_load_exported_says_what_a_folder_that_is_no_export_is(tmp_path, small_tokenizer):
    """A pretraining run given to load_exported was called "a transformers export"; a
    fine-tuned folder "no config.json"."""
    run, _ = _run(tmp_path, "tiny", small_tokenizer)
    with pytest.raises(CheckpointError, match=r"tiny is a pretraining run: export a run with `cramkit export"):
        load_exported(run)
    seed = tmp_path / "finetune" / "bbc" / "seed-0"
    seed.mkdir(parents=True)
    (seed / "classifier.json").write_text("{}")
    with pytest.raises(CheckpointError, match="holds fine-tuned weights, not an export: load them with "
                                              "cramkit.eval.load_finetuned"):
        load_exported(seed)
    with pytest.raises(CheckpointError, match="nowhere: export folder not found"):
        load_exported(tmp_path / "nowhere")
    # A file of an export exists: "export folder not found" sent the user looking for it.
    export(run, tmp_path / "out", format="cramkit", log=lambda s: None)
    weights = next((tmp_path / "out").glob("*.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(weights))} is a file: give the export's folder "
                                              rf"\({re.escape(str(tmp_path / 'out'))}\)$"):
        load_exported(weights)


@pytest.mark.parametrize("device, message", [
    ("gpu", "device 'gpu' is not understood; use auto, cpu, cuda or cuda:N"),
    ("meta", "device 'meta' is not understood"),
    pytest.param("cuda", "device 'cuda' needs CUDA", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="CUDA is available here")),
])
def test_load_exported_and_load_pretrained_check_the_device_as_load_finetuned_does(
        tmp_path, small_tokenizer, device, message):
    """A device string torch does not know was its list of twenty device types (a RuntimeError),
    "cuda" without CUDA an AssertionError, and "auto", which load_finetuned takes, was refused."""
    from cramkit.train.checkpoint import load_pretrained

    run, _ = _run(tmp_path, "tiny", small_tokenizer)
    export(run, tmp_path / "out", format="cramkit", log=lambda s: None)
    for load in (load_exported, load_pretrained):
        with pytest.raises(ConfigError, match=message):
            load(tmp_path / "out" if load is load_exported else run, device=device)
    model, _ = load_exported(tmp_path / "out", device="auto")
    reference, _, _ = load_pretrained(run, device=torch.device("cpu"))
    x, mask = _inputs()
    assert torch.equal(model(x, attention_mask=mask).logits, reference.eval()(x, attention_mask=mask).logits)


@pytest.mark.parametrize("name, damage, message", [
    ("config.json", b"{\"format\": \"cram", r"config.json line 1: not valid JSON"),
    ("config.json", b"\xff\xfe\x00garbage", r"config.json line 1: not UTF-8 text"),
    ("config.json", b"[1, 2]", r"config.json: expected a JSON object, got list"),
    ("config.json", b'{"format": "cramkit", "model": [1]}', r"config.json: not a cramkit export's model config"),
    ("model.safetensors", b"\x00" * 10, r"cannot read .*model.safetensors"),
    ("model.safetensors", None, r"cannot read .*model.safetensors"),
    ("tokenizer.json", b"{\"version", r"tokenizer.json: cannot read tokenizer"),
    ("config.json", "wider", r"model.safetensors does not match config.json: size mismatch"),
])
def test_load_exported_names_a_damaged_file(tmp_path, small_tokenizer, name, damage, message):
    """A damaged file of a cramkit-format export is a CheckpointError naming it (the command
    line's one-line error), not a JSONDecodeError, SafetensorError or bare Exception."""
    run, _ = _run(tmp_path, "tiny", small_tokenizer)
    export(run, tmp_path / "out", format="cramkit", log=lambda s: None)
    target = tmp_path / "out" / name
    if damage == "wider":  # valid, but not the weights' shape
        config = json.loads(target.read_text())
        config["model"]["intermediate"] *= 2
        damage = json.dumps(config).encode()
    target.unlink()
    if damage is not None:
        target.write_bytes(damage)
    with pytest.raises(CheckpointError, match=message):
        load_exported(tmp_path / "out")


@pytest.mark.parametrize("preset", ["tiny", "bert-base"])
def test_export_of_a_document_masked_run_attends_over_the_whole_input(tmp_path, small_tokenizer, preset):
    """Pretraining's document mask is about how sequences were packed: in an exported model a
    pair input's middle [SEP] is no boundary, so the export matches the unmasked model (as
    fine-tuning does), in both formats, and says so."""
    sep = small_tokenizer.token_to_id("[SEP]")
    run, model = _run(tmp_path, preset, small_tokenizer, document_mask=True, document_boundary_id=sep)
    said = []
    info = export(run, tmp_path / "out", log=said.append)
    assert any("masked attention between packed documents" in line for line in said)
    record = json.loads((tmp_path / "out" / "cramkit_export.json").read_text())
    assert record["pretrained_with_document_mask"] is True and record["model"]["document_mask"] is False
    x, mask = _inputs()
    x[:, 8] = sep  # a pair input: [SEP] in the middle
    unmasked = type(model)(model.config.for_single_inputs()).eval()
    unmasked.load_state_dict(model.state_dict())
    with torch.no_grad():
        want = unmasked(x, attention_mask=mask).logits
        assert not torch.allclose(model(x, attention_mask=mask).logits, want, atol=1e-3)  # the mask mattered
        if info["loadable_by_hf"]:
            hf = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path / "out")).eval()
            got = hf(input_ids=x, attention_mask=mask).logits
        else:
            loaded, _ = load_exported(tmp_path / "out")
            assert loaded.config.document_mask is False
            got = loaded(x, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("type_vocab_size", [0, 2])
def test_exported_tokenizer_builds_cramkit_pair_inputs(tmp_path, small_tokenizer, type_vocab_size):
    """A sentence pair through the exported tokenizer and model gives cramkit's logits for the
    pair as cramkit's fine-tuning encodes it: same ids and segment 0 throughout (cramkit never
    feeds token types). Segment 1 for the second text crashed a model without a token-type
    table and read an untrained row otherwise."""
    from cramkit.eval.encoding import SpecialIds, TaskEncoder
    from cramkit.eval.tasks import Example

    run, model = _run(tmp_path, "bert-base", small_tokenizer, type_vocab_size=type_vocab_size)
    export(run, tmp_path / "out", log=lambda s: None)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path / "out")).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    # Ask for token types explicitly: transformers 4.x returns them by default, 5.x on request.
    enc = tok("the quick fox", "the lazy dog", return_tensors="pt", return_token_type_ids=True)
    encoder = TaskEncoder(small_tokenizer, SpecialIds.from_vocab(small_tokenizer), 64, causal=False)
    (ours,) = encoder.encode([Example("the quick fox", "the lazy dog", 0)])
    assert enc["input_ids"][0].tolist() == ours.ids
    assert enc["token_type_ids"].eq(0).all()
    with torch.no_grad():
        want = model(torch.tensor([ours.ids])).logits
        got = hf(**enc).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_residual_gains_export_in_cramkit_format(tmp_path, small_tokenizer):
    """A post-LN BERT with trained residual-branch gains was written as BertForMaskedLM without
    them (logits 7e-3 off); it is now written in cramkit's format, which keeps them."""
    run, model = _run(tmp_path, "bert-base", small_tokenizer, residual_scale="scalar")
    info = export(run, tmp_path / "out", log=lambda s: None)
    assert not info["loadable_by_hf"] and any("residual_scale" in r for r in info["reasons"])
    loaded, _ = load_exported(tmp_path / "out")
    x, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, attention_mask=mask).logits, model(x, attention_mask=mask).logits
        )


def _bpe_tokenizer(specials):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["the quick brown fox jumps over the lazy dog"] * 5 + ["a second sentence about films"],
        trainers.BpeTrainer(vocab_size=120, special_tokens=specials),
    )
    return tok


def test_bert_export_pads_with_the_runs_pad_id(tmp_path):
    """BertConfig.pad_token_id was HF's default 0 whatever the run's [PAD] id."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "[PAD]"]  # [PAD] last: id 4, not 0
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 5,
                            trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials))
    run, _ = _run(tmp_path, "bert-base", tok)  # the run's data manifest records pad = 4
    export(run, tmp_path / "out", log=lambda s: None)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    config = transformers.AutoConfig.from_pretrained(str(tmp_path / "out"))
    assert hf_tok.pad_token_id == 4 == config.pad_token_id


@pytest.mark.parametrize("has_pad", [True, False])
def test_gpt2_export_has_special_ids_and_classifies_padded_batches(tmp_path, has_pad):
    """GPT2Config had no bos/eos/pad ids though the exported tokenizer had them: generate()
    never stopped at <|endoftext|>, and AutoModelForSequenceClassification refused batches
    above 1 ("no padding token is defined"). Without a pad token, the end of document pads."""
    tok = _bpe_tokenizer(["<|endoftext|>", "<|pad|>"] if has_pad else ["<|endoftext|>"])
    eod, pad = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>")
    run, _ = _run(tmp_path, "gpt2-small", tok)
    special = {"pad": pad, "unk": None, "cls": None, "sep": None, "mask": None, "eod": eod}
    (run / "data_manifest.json").write_text(json.dumps({"special_ids": special}))
    out = tmp_path / "out"
    export(run, out, log=lambda s: None)

    config = transformers.AutoConfig.from_pretrained(str(out))
    assert config.bos_token_id == config.eos_token_id == eod
    assert config.pad_token_id == (pad if has_pad else eod)
    assert transformers.GenerationConfig.from_pretrained(str(out)).eos_token_id == eod
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok.pad_token_id == config.pad_token_id and hf_tok.eos_token_id == eod

    clf = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), num_labels=2)
    clf.eval()
    texts = ["the quick brown fox jumps", "a dog"]
    batch = hf_tok(texts, padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 2 and not batch["attention_mask"].all()
    with torch.no_grad():
        logits = clf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = clf(**hf_tok(texts[1:], return_tensors="pt")).logits
    assert logits.shape == (2, 2)
    # The padded row is scored at its last real token, as it is alone.
    torch.testing.assert_close(logits[1:], alone, atol=1e-5, rtol=0)


def test_gpt2_export_tokenizer_returns_no_token_types(tmp_path):
    """transformers 4.x's PreTrainedTokenizerFast returns token_type_ids (zeros) unless told
    otherwise, and GPT2Model adds wte(token_type_ids) to every position: model(**tokenizer(text))
    was 0.1 off cramkit's logits there (checked with 4.57; 5.x returns none). GPT-2's own
    tokenizers name only input_ids and attention_mask, as the export now does."""
    tok = _bpe_tokenizer(["<|endoftext|>", "<|pad|>"])
    run, model = _run(tmp_path, "gpt2-small", tok)
    special = {"pad": tok.token_to_id("<|pad|>"), "unk": None, "cls": None, "sep": None, "mask": None,
               "eod": tok.token_to_id("<|endoftext|>")}
    (run / "data_manifest.json").write_text(json.dumps({"special_ids": special}))
    export(run, tmp_path / "out", log=lambda s: None)
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["model_input_names"] == ["input_ids", "attention_mask"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    batch = hf_tok(["the quick brown fox jumps", "a dog"], padding=True, return_tensors="pt")
    assert "token_type_ids" not in batch
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        want = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = hf(**batch).logits
    torch.testing.assert_close(got[keep], want[keep], atol=1e-4, rtol=0)


def test_gpt2_export_tokenizer_adds_no_tokens_that_pretraining_never_saw(tmp_path):
    """A reused tokenizer.json whose post-processor puts a <s> before every text (Llama's
    does) kept it in the GPT-2 export: tokenizer(text) started with a token that cramkit's
    packing, which drops post-processors, never fed the model, so every logit moved."""
    from tokenizers import processors

    from cramkit.data.tokenizer import encoding_copy

    tok = _bpe_tokenizer(["<|endoftext|>", "<s>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    run, model = _run(tmp_path, "gpt2-small", tok)
    special = {"pad": None, "unk": None, "cls": None, "sep": None, "mask": None,
               "eod": tok.token_to_id("<|endoftext|>")}
    (run / "data_manifest.json").write_text(json.dumps({"special_ids": special}))
    export(run, tmp_path / "out", log=lambda s: None)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    text = "the quick brown fox"
    assert hf_tok(text)["input_ids"] == encoding_copy(tok).encode(text).ids
    # cramkit's own format too: load_exported's tokenizer kept the file's framing.
    export(run, tmp_path / "native", format="cramkit", log=lambda s: None)
    _, native_tok = load_exported(tmp_path / "native")
    assert native_tok.encode(text).ids == encoding_copy(tok).encode(text).ids


def test_gpt2_export_decodes_its_byte_level_text_exactly(tmp_path):
    """The exported tokenizer did not say clean_up_tokenization_spaces, which transformers
    4.42-4.44 (cramkit[hf] allows 4.42) then take as true: decode(" , ") lost the space before
    punctuation and "it 's" became "it's", text the byte-level tokenizer encodes and decodes
    exactly in cramkit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox , it 's a dog !"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    run, _ = _run(tmp_path, "gpt2-small", tok, vocab_size=320)
    export(run, tmp_path / "out", log=lambda s: None)
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["clean_up_tokenization_spaces"] is False
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    text = "Hello , world ! it 's the fox ."
    assert hf_tok.decode(hf_tok(text)["input_ids"]) == text == tok.decode(tok.encode(text).ids)


# Special-token spellings written inside texts, and texts around them.
LITERAL_SPECIALS = ["a [SEP] b", "[MASK] fox", "[CLS] the [PAD] dog [UNK]", "end <|endoftext|> next",
                    "<|pad|> the fox"]


@pytest.mark.parametrize("preset", ["bert-base", "tiny", "gpt2-small"])
def test_exported_tokenizers_read_special_token_spellings_as_text(tmp_path, small_tokenizer, preset):
    """A text containing "[SEP]" or "[MASK]" is plain text to cramkit (pretraining packs and
    fine-tuning encodes it so, lest a corpus inject separators or masks), while the exported
    tokenizers matched it as the special token: the same raw text gave other ids, and so other
    logits, in transformers (or through load_exported) than in cramkit."""
    from tokenizers import Tokenizer, processors

    from cramkit.eval.encoding import SpecialIds, TaskEncoder
    from cramkit.eval.tasks import Example

    causal = preset == "gpt2-small"
    if causal:
        tok = _bpe_tokenizer(["<|endoftext|>", "<|pad|>"])
    else:  # framed by its post-processor, as `cramkit prepare` writes WordPiece tokenizers
        tok = Tokenizer.from_str(small_tokenizer.to_str())
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[(s, tok.token_to_id(s)) for s in ("[CLS]", "[SEP]")])
    special = SpecialIds.from_vocab(tok)
    run, _ = _run(tmp_path, preset, tok)
    (run / "data_manifest.json").write_text(json.dumps({"special_ids": dataclasses.asdict(special)}))
    said = []
    info = export(run, tmp_path / "out", log=said.append)
    assert any("split_special_tokens" in line for line in said) == (preset == "bert-base")
    encoder = TaskEncoder(tok, special, 64, causal=causal)
    ours = [e.ids for e in encoder.encode([Example(t, None, 0) for t in LITERAL_SPECIALS])]
    if causal:  # GPT-2's tokenizer adds no end of document: the texts' own ids are compared
        ours = [ids[:-1] for ids in ours]
    assert info["loadable_by_hf"] == (preset != "tiny")
    if info["loadable_by_hf"]:
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
        assert hf_tok(LITERAL_SPECIALS)["input_ids"] == ours
        if not causal:  # the mask token is one keyword away, for fill-mask
            ids = hf_tok("[MASK] fox", split_special_tokens=False)["input_ids"]
            assert ids[1] == special.mask
    else:
        _, native_tok = load_exported(tmp_path / "out")
        assert [e.ids for e in native_tok.encode_batch(LITERAL_SPECIALS)] == ours


def test_export_without_transformers_is_a_one_line_error(tmp_path, small_tokenizer, monkeypatch):
    """Without the hf extra an exact export died in a ModuleNotFoundError traceback; the cramkit
    format needs no transformers and still works."""
    run, _ = _run(tmp_path, "bert-base", small_tokenizer)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    with pytest.raises(ConfigError, match=r"BertForMaskedLM needs the transformers package .pip install 'cramkit\[hf\]'"):
        export(run, tmp_path / "out", log=lambda s: None)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    export(run, tmp_path / "out", format="cramkit", log=lambda s: None)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_export_or_finetune_of_a_finetuned_folder_says_what_it_is(tmp_path, small_tokenizer):
    """Pointing export or fine-tuning at the weights `cramkit finetune save=true` wrote (RUN/
    finetune/TASK/seed-0, or the folders above it) was "no tokenizer.json (not a finished cramkit
    run)". Fine-tuning says which run to use; export reads the folder as load_finetuned does
    (tests/eval/test_export_finetuned.py), here one without classifier.json."""
    from cramkit.eval.finetune import open_run

    run, _ = _run(tmp_path, "bert-base", small_tokenizer)
    seed = run / "finetune" / "bbc" / "seed-0"
    seed.mkdir(parents=True)
    (seed / "finetune_config.json").write_text("{}")
    (seed / "model.safetensors").write_bytes(b"")
    for folder in (seed, seed.parent, seed.parent.parent):
        with pytest.raises(CheckpointError, match="was saved by an earlier cramkit, which did not record"):
            export(folder, tmp_path / "out", log=lambda s: None)
        with pytest.raises(ConfigError, match=rf"holds fine-tuned weights .* \({run.resolve()}\)$"):
            open_run(folder)  # what finetune and evaluate open
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["hf", "cramkit"])
def test_export_or_finetune_of_an_export_says_what_it_is(tmp_path, small_tokenizer, fmt):
    """An export's folder given as the run (export it again, fine-tune it) was "config.json:
    unknown config key 'format'" (cramkit format) or "... 'add_cross_attention'" (hf): its config.json is
    the model's."""
    from cramkit.eval.finetune import open_run

    run, _ = _run(tmp_path, "bert-base", small_tokenizer)
    export(run, tmp_path / "out", format=fmt, log=lambda s: None)
    message = rf"out is a cramkit export \(cramkit export --out\), not a pretraining run: use the run it was exported from \({run}\)$"
    with pytest.raises(ConfigError, match=message):
        export(tmp_path / "out", tmp_path / "again", log=lambda s: None)
    with pytest.raises(ConfigError, match=message):
        open_run(tmp_path / "out")  # what finetune and evaluate open
    assert not (tmp_path / "again").exists()


def test_exported_tokenizer_names_a_class_every_transformers_version_has(tmp_path, small_tokenizer):
    """transformers 5 saved tokenizer_class "TokenizersBackend", a name 4.x (which cramkit[hf]
    allows) does not know: AutoTokenizer there refused the export (checked with 4.57)."""
    run, _ = _run(tmp_path, "bert-base", small_tokenizer)
    export(run, tmp_path / "out", log=lambda s: None)
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["split_special_tokens"] is True
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert isinstance(tok, transformers.PreTrainedTokenizerFast) and tok.is_fast
    assert tok("a [SEP] b")["input_ids"][2] != tok.sep_token_id


@pytest.mark.parametrize("out", [".", "absolute", ""])
def test_export_to_the_current_folder_is_refused(tmp_path, small_tokenizer, monkeypatch, out):
    """--out . in an empty folder was "error: .: Device or resource busy", and --out "" the
    same; the folder's absolute path (with --force, a previous export) was swapped for the
    export under the process and the user's shell, both left in the deleted old folder."""
    import os

    run, _ = _run(tmp_path, "tiny", small_tokenizer)
    here = tmp_path / "here"
    export(run, here, log=lambda s: None)
    monkeypatch.chdir(here)
    with pytest.raises(ConfigError, match="is the current folder"):
        export(run, here if out == "absolute" else out, overwrite=True, log=lambda s: None)
    assert Path.cwd().samefile(here) and os.path.exists(os.getcwd())
    assert (here / "cramkit_export.json").is_file()


def test_exported_tokenizer_pads_and_cuts_on_the_right_whatever_the_runs_file_says(tmp_path, small_tokenizer):
    """A reused tokenizer.json (data.prepare.tokenizer_file) may enable its own padding and
    truncation, on the left; transformers reads both sides from the file, so the exported
    tokenizer padded batches on the left (BERT's learned positions then moved: logits 0.95 off)
    and truncation=True kept a text's end. cramkit right-pads and keeps the start."""
    from tokenizers import Tokenizer

    from cramkit.eval.encoding import SpecialIds, TaskEncoder
    from cramkit.eval.tasks import Example

    tok = Tokenizer.from_str(small_tokenizer.to_str())
    tok.enable_padding(direction="left", pad_id=0, pad_token="[PAD]", length=16)
    tok.enable_truncation(8, direction="left")
    run, model = _run(tmp_path, "bert-base", tok)
    export(run, tmp_path / "out", log=lambda s: None)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path / "out")).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    texts = ["the quick brown fox jumps over the lazy dog " * 8, "a dog"]
    encoder = TaskEncoder(tok, SpecialIds.from_vocab(tok), 64, causal=False)
    ours = encoder.collate(encoder.encode([Example(t, None, 0) for t in texts]), regression=False)
    theirs = hf_tok(texts, padding=True, truncation=True, return_tensors="pt")
    assert theirs["input_ids"].tolist() == ours["input_ids"].tolist()
    keep = ours["attention_mask"].bool()
    with torch.no_grad():
        want = model(ours["input_ids"], attention_mask=ours["attention_mask"]).logits
        got = hf(**theirs).logits
    torch.testing.assert_close(got[keep], want[keep], atol=1e-4, rtol=0)
    export(run, tmp_path / "native", format="cramkit", log=lambda s: None)
    _, native_tok = load_exported(tmp_path / "native")
    short = ["the quick brown fox jumps over the lazy dog", "a dog"]  # no cut: load_exported's has none
    assert [e.ids for e in native_tok.encode_batch(short)] == [
        e.ids for e in small_tokenizer.encode_batch(short)]
