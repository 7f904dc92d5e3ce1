"""Export of fine-tuned weights (`cramkit finetune save=true`) as transformers
BertForSequenceClassification: the same logits as load_finetuned, or a one-line refusal."""

from __future__ import annotations

import json

import pytest
import torch

from cramkit.errors import CheckpointError, ConfigError
from cramkit.eval import load_finetuned
from cramkit.eval.finetune import FinetuneConfig, finetune, finetune_save_dir, load_backbone
from cramkit.eval.tasks import load_task
from cramkit.export import export

from .helpers import perturbed_run, train_wordpiece

transformers = pytest.importorskip("transformers")

FAST = {"seeds": [0], "progress": False, "pooling": "cls", "lr": 3e-3, "device": "cpu", "epochs": 1,
        "save": True, "seq_len": 32, "max_train_examples": 24}
WORDS = ["market", "film", "match", "election", "phone", "music"]
# Output order, not the sorted one: id2label must follow it.
LABELS = ("tech", "business", "sport")


def _texts():
    return [f"the {WORDS[i % 6]} story about the {WORDS[(i * 5 + 1) % 6]} news" for i in range(36)]


def _task(folder, regression=False):
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["text\tlabel"] + [
        f"{t}\t{float(i % 5) if regression else LABELS[i % 3]}" for i, t in enumerate(_texts())
    ]
    (folder / "train.tsv").write_text("\n".join(rows) + "\n")
    (folder / "dev.tsv").write_text("\n".join(rows[:13]) + "\n")
    if regression:
        return load_task(folder / "train.tsv", text_column="text", label_column="label", is_regression=True)
    return load_task(folder / "train.tsv", text_column="text", label_column="label", labels=list(LABELS))


def _run(tmp_path, preset="bert-base", **overrides):
    tokenizer = train_wordpiece(_texts(), vocab_size=200)
    return perturbed_run(tmp_path / preset, preset, tokenizer, **overrides)[0]


def _saved(run, task, **cfg):
    cfg = FinetuneConfig.from_dict({**FAST, **cfg})
    save_dir = finetune_save_dir(run, task.spec.name, False, cfg.peft)
    finetune(load_backbone(run), task, cfg, save_dir=save_dir)
    return save_dir / "seed-0"


def _same_logits(folder, out):
    clf = load_finetuned(folder)
    texts = ["the market story", "a film about the election and the phone news", "music"]
    ours = clf.logits(texts)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == "BertForSequenceClassification"
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = hf(**batch).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    return clf, hf


@pytest.mark.parametrize("peft", ["none", "lora", "loha", "ia3"])
def test_classifier_exports_with_its_label_order(tmp_path, peft):
    run = _run(tmp_path)
    folder = _saved(run, _task(tmp_path / "task"), peft=peft, **({"lr": 1e-2} if peft != "none" else {}))
    out = tmp_path / "out"
    info = export(folder, out, log=lambda s: None)
    assert info["loadable_by_hf"] and info["auto_class"] == "AutoModelForSequenceClassification"
    clf, hf = _same_logits(folder, out)
    assert hf.config.id2label == dict(enumerate(LABELS)) == dict(enumerate(clf.labels))
    assert hf.config.label2id == {name: i for i, name in enumerate(LABELS)}
    assert hf.config.problem_type == "single_label_classification"
    meta = json.loads((out / "cramkit_export.json").read_text())
    assert meta["labels"] == list(LABELS) and meta["peft_merged"] == (peft != "none")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    # A folder above the saved one that holds only it names it, as for load_finetuned.
    export(folder.parent, out, overwrite=True, log=lambda s: None)
    _same_logits(folder, out)


@pytest.mark.parametrize("damage", ["missing", "directory"])
def test_a_run_without_its_config_json_is_not_exported_as_its_fine_tune(tmp_path, damage):
    """A run whose config.json was lost, holding one saved fine-tune, was taken for a folder
    above that fine-tune: `cramkit export RUN` wrote the classifier, not the pretrained model."""
    run = _run(tmp_path)
    _saved(run, _task(tmp_path / "task"))
    (run / "config.json").unlink()
    if damage == "directory":
        (run / "config.json").mkdir()
    with pytest.raises(CheckpointError, match=r"is not a cramkit run directory \(no config.json\)"):
        export(run, tmp_path / "out", log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_the_mlm_heads_shape_does_not_stop_a_classifier_export(tmp_path):
    """A post-LN BERT whose MLM head has no transform is no BertForMaskedLM, but its classifier
    is exactly BertForSequenceClassification, which has no MLM head: it was refused."""
    folder = _saved(_run(tmp_path, head_transform=False), _task(tmp_path / "task"))
    export(folder, tmp_path / "out", log=lambda s: None)
    _same_logits(folder, tmp_path / "out")


def test_regression_exports_as_a_regression(tmp_path):
    run = _run(tmp_path)
    folder = _saved(run, _task(tmp_path / "task", regression=True))
    out = tmp_path / "out"
    export(folder, out, log=lambda s: None)
    _, hf = _same_logits(folder, out)
    assert hf.config.problem_type == "regression" and hf.config.num_labels == 1


@pytest.mark.parametrize(
    "preset, cfg, reason",
    [
        ("bert-base", {"pooling": "mean"}, "finetune.pooling='mean'"),
        ("bert-base", {"head_width": 48}, "finetune.head_width=48"),
        ("gpt2-small", {"pooling": "auto"}, "arch='gpt'.*finetune.pooling='auto' .last."),
    ],
)
def test_a_fine_tune_without_an_exact_counterpart_is_a_one_line_error(tmp_path, preset, cfg, reason):
    overrides = {"type_vocab_size": 0} if preset.startswith("gpt") else {}
    run = _run(tmp_path, preset, **overrides)
    folder = _saved(run, _task(tmp_path / "task"), **cfg)
    with pytest.raises(ConfigError, match=f"not exactly transformers BertForSequenceClassification .*{reason}") as exc:
        export(folder, tmp_path / "out", log=lambda s: None)
    message = str(exc.value)
    assert "\n" not in message and "load_finetuned use" in message and "--format cramkit" not in message
    with pytest.raises(ConfigError, match="--format cramkit holds pretraining runs"):
        export(folder, tmp_path / "out", format="cramkit", log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_export_says_that_inputs_are_cut_only_on_request(tmp_path):
    """transformers' tokenizers and pipelines do not truncate unless asked: a text longer than
    finetune.seq_len reached the exported classifier whole (up to 512 tokens) and got another
    prediction than `cramkit predict` gives, which cuts it to seq_len. The export says so."""
    folder = _saved(_run(tmp_path), _task(tmp_path / "task"), seq_len=8)
    said = []
    export(folder, tmp_path / "out", log=said.append)
    assert any("8 tokens" in line and "truncation=True" in line for line in said)
    long = " ".join(_texts()[:3])
    clf = load_finetuned(folder)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out")).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    with torch.no_grad():
        cut = hf(**tok([long], truncation=True, return_tensors="pt")).logits
    torch.testing.assert_close(cut, clf.logits([long]), atol=1e-4, rtol=0)


def test_export_writes_what_it_loaded_without_reading_the_folder_again(tmp_path, monkeypatch):
    """export_finetuned read classifier.json and the run's tokenizer.json a second time after
    load_finetuned had read and checked them: a folder re-saved or damaged in between (here
    classifier.json rewritten as ``{}``, and the run's tokenizer.json removed) failed with a
    KeyError traceback, or could pair the loaded weights with other files. It exports what was
    loaded."""
    from cramkit.eval import finetuned

    run = _run(tmp_path)
    folder = _saved(run, _task(tmp_path / "task"))
    texts = ["the market story", "a film about the election and the phone news"]
    expected = load_finetuned(folder).logits(texts)
    real = finetuned.load_finetuned

    def then_changed(*args, **kwargs):
        clf = real(*args, **kwargs)
        (folder / "classifier.json").write_text("{}")
        (run / "tokenizer.json").rename(tmp_path / "tokenizer.json")
        return clf

    monkeypatch.setattr(finetuned, "load_finetuned", then_changed)
    export(folder, tmp_path / "out", log=lambda s: None)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out")).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    with torch.no_grad():
        theirs = hf(**tok(texts, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(theirs, expected, atol=1e-4, rtol=0)
