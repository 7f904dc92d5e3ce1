"""Saved fine-tuned weights loaded back (cramkit.eval.load_finetuned, `cramkit predict`): the
reloaded classifier must give the logits the fine-tuning process itself gave before saving."""

from __future__ import annotations

import importlib
import json
import re
import shutil

import pytest
import torch

from cramkit.errors import CheckpointError, ConfigError, DataError
from cramkit.eval import load_finetuned
from cramkit.eval.finetune import (
    FinetuneConfig,
    batched_logits,
    finetune,
    finetune_save_dir,
    load_backbone,
)
from cramkit.eval.tasks import load_task, subsample

from .helpers import make_run_dir, train_wordpiece

FAST = {"seeds": [0], "progress": False, "pooling": "mean", "lr": 3e-3, "device": "cpu", "epochs": 1,
        "save": True}
# The package's `finetune` attribute is the function; the module is what train_one looks up.
finetune_module = importlib.import_module("cramkit.eval.finetune")


def _record_scoring(monkeypatch) -> list[tuple[list, torch.Tensor]]:
    """What fine-tuning's scoring (``predict``, run right before the weights are saved) gives:
    its predictions and the trained model's logits on the same examples, per call."""
    calls = []
    real = finetune_module.predict

    def recording(model, encoder, data, cfg, device, regression):
        predictions = real(model, encoder, data, cfg, device, regression)
        logits = {}
        for idx, batch in batched_logits(model, encoder, data, cfg.eval_batch_size, device, cfg.precision):
            logits.update(zip(idx, batch))
        calls.append((predictions, torch.stack([logits[i] for i in range(len(data))])))
        return predictions

    monkeypatch.setattr(finetune_module, "predict", recording)
    return calls


def _pair_task(folder, labels=("yes", "no")):
    """A pair task whose label order (``labels``) is not the sorted one."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["premise\thypothesis\tlabel"]
    words = ["market", "film", "match", "election", "phone", "music"]
    for i in range(60):
        a, b = words[i % 6], words[(i * 5 + 1) % 6]
        rows.append(f"the {a} story\tthe {b if i % 3 else a} news\t{labels[0] if i % 3 == 0 else labels[1]}")
    (folder / "train.tsv").write_text("\n".join(rows) + "\n")
    (folder / "dev.tsv").write_text("\n".join(rows[:1] + rows[1:40]) + "\n")
    return load_task(folder / "train.tsv", text_column="premise", text_pair_column="hypothesis",
                     labels=list(labels))


@pytest.fixture
def run(tiny_run, tmp_path):
    """A copy of the tiny run: the session's run is shared by other tests' outputs."""
    return shutil.copytree(tiny_run, tmp_path / "run")


@pytest.fixture
def pair_saved(run, tmp_path, monkeypatch):
    """A full fine-tune of a pair task saved in ``run``: (its folder, task, scoring calls)."""
    task = _pair_task(tmp_path / "pairs")
    calls = _record_scoring(monkeypatch)
    save_dir = finetune_save_dir(run, task.spec.name, False)
    finetune(load_backbone(run), task, FinetuneConfig.from_dict(FAST), save_dir=save_dir)
    return save_dir / "seed-0", task, calls


def test_full_fine_tune_reloads_with_its_labels_in_order(pair_saved, tmp_path):
    folder, task, calls = pair_saved
    (predictions, logits), = calls
    record = json.loads((folder / "classifier.json").read_text())
    assert record["task"]["labels"] == ["yes", "no"]  # the output order, not the sorted one
    assert record["task"]["text_pair_column"] == "hypothesis"
    clf = load_finetuned(folder)
    assert clf.labels == ("yes", "no") and clf.is_pair and not clf.model.training
    dev = [(e.text, e.text_pair) for e in task.evals[task.spec.name]]
    got = clf.logits(dev)
    assert torch.allclose(got, logits, atol=1e-6, rtol=0), (got - logits).abs().max()
    assert clf.predict(dev) == [task.spec.labels[i] for i in predictions]
    probs = clf.probabilities(dev)
    assert probs.shape == (len(dev), 2) and torch.allclose(probs.sum(-1), torch.ones(len(dev)))
    # The run moved, its fine-tunes with it: found as the folder the weights lie in.
    moved = shutil.move(str(folder.parents[2]), str(tmp_path / "moved"))
    again = load_finetuned(f"{moved}/finetune/{folder.parent.name}")  # the seed's parent: one seed
    assert torch.equal(again.logits(dev), got)
    with pytest.raises(DataError, match="classifies pairs of texts"):
        again.predict(["a single text"])


@pytest.mark.parametrize(("method", "random_init"), [("lora", False), ("lora", True), ("ia3", False)])
def test_peft_adapter_reloads_on_its_base_weights(run, bbc_task, monkeypatch, method, random_init):
    calls = _record_scoring(monkeypatch)
    cfg = FinetuneConfig.from_dict({**FAST, "peft": method, "max_train_examples": 48, "max_eval_examples": 70,
                                    "eval_batch_size": 32, "lr": 1e-2})
    save_dir = finetune_save_dir(run, "bbc", random_init, method)
    finetune(load_backbone(run, random_init=random_init), bbc_task, cfg, save_dir=save_dir)
    (predictions, logits), = calls
    clf = load_finetuned(save_dir / "seed-0")
    dev = [e.text for e in subsample(bbc_task.evals["bbc"], 70, seed=0)]
    got = clf.logits(dev)
    assert torch.allclose(got, logits, atol=1e-6, rtol=0), (got - logits).abs().max()
    assert clf.predict(dev) == [bbc_task.spec.labels[i] for i in predictions]
    assert clf.labels == bbc_task.spec.labels
    if not random_init:
        # The adapter is nothing without the checkpoint it was trained on.
        shutil.rmtree(run / "checkpoints")
        with pytest.raises(CheckpointError, match="adapter was trained on .*step-00000001, but it is no longer"):
            load_finetuned(save_dir / "seed-0")


def test_regression_pairs_on_a_causal_model_reload_as_floats(tmp_path, monkeypatch):
    from cramkit.models.presets import preset_config

    rows = ["sentence1\tsentence2\tscore"]
    words = ["market", "film", "match", "election", "phone", "music"]
    for i in range(48):
        rows.append(f"the {words[i % 6]} news\tthe {words[(i // 6) % 6]} story\t{float(i % 6)}")
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.tsv").write_text("\n".join(rows[:21]) + "\n")
    tokenizer = train_wordpiece([row.replace("\t", " ") for row in rows[1:]], vocab_size=1024)
    run = make_run_dir(tmp_path / "gpt", preset_config("tiny-gpt", vocab_size=1024), tokenizer,
                       special_ids={"pad": 0, "unk": 1, "cls": None, "sep": 3, "mask": None, "eod": 3})
    task = load_task(tmp_path / "train.tsv", text_column="sentence1", text_pair_column="sentence2",
                     label_column="score", is_regression=True)
    calls = _record_scoring(monkeypatch)
    save_dir = finetune_save_dir(run, task.spec.name, False)
    finetune(load_backbone(run), task, FinetuneConfig.from_dict({**FAST, "pooling": "auto"}), save_dir=save_dir)
    (predictions, logits), = calls
    clf = load_finetuned(save_dir)
    assert clf.is_regression and clf.labels is None
    got = clf.predict([(e.text, e.text_pair) for e in task.evals[task.spec.name]])
    assert all(isinstance(v, float) for v in got)
    assert got == pytest.approx(predictions, abs=1e-6) and got == pytest.approx(logits[:, 0].tolist(), abs=1e-6)
    with pytest.raises(ConfigError, match="is a regression"):
        clf.probabilities([("a", "b")])


def test_cli_predict_writes_the_reloaded_predictions(pair_saved, tmp_path, capsys):
    from cramkit.cli import main

    folder, task, _ = pair_saved
    clf = load_finetuned(folder)
    source = tmp_path / "pairs" / "dev.tsv"
    expected = clf.predict([(e.text, e.text_pair) for e in task.evals[task.spec.name]])
    out = tmp_path / "predictions.jsonl"
    assert main(["predict", str(folder), "--input", str(source), "--out", str(out)]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prediction"] for r in written] == expected
    assert [r["line"] for r in written] == list(range(2, 2 + len(expected)))
    assert list(written[0]["probabilities"]) == ["yes", "no"]
    assert f"{len(expected)} predictions" in capsys.readouterr().out
    # Without --out the lines go to standard output; other column names are given by flag.
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({"a": e.text, "b": e.text_pair}) + "\n"
                               for e in task.evals[task.spec.name]))
    assert main(["predict", str(folder), "--input", str(renamed), "--text-column", "a",
                 "--text-pair-column", "b"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prediction"] for r in shown] == expected


def test_cli_predict_reads_and_writes_a_chunk_at_a_time(pair_saved, tmp_path, monkeypatch, capsys):
    """Memory follows the chunk, not the input: 39 rows in chunks of 5 give the predictions of
    one pass; a bad row in a late chunk leaves no --out file behind, and the error names it."""
    import cramkit.eval.cli as eval_cli
    from cramkit.cli import main

    folder, task, _ = pair_saved
    clf = load_finetuned(folder)
    examples = task.evals[task.spec.name]
    expected = clf.probabilities([(e.text, e.text_pair) for e in examples])
    monkeypatch.setattr(eval_cli, "PREDICT_CHUNK", 5)
    scored = []
    real = clf.logits_of
    monkeypatch.setattr(type(clf), "logits_of", lambda self, chunk: scored.append(len(chunk)) or real(chunk))
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(folder), "--input", str(tmp_path / "pairs" / "dev.tsv"), "--out", str(out)]) == 0
    assert scored == [5] * 7 + [4]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    torch.testing.assert_close(torch.tensor([list(r["probabilities"].values()) for r in written]), expected)
    bad = tmp_path / "bad.tsv"
    rows = (tmp_path / "pairs" / "dev.tsv").read_text().splitlines()
    bad.write_text("\n".join([rows[0], *rows[1:30], "only one field", *rows[30:]]) + "\n")
    capsys.readouterr()
    assert main(["predict", str(folder), "--input", str(bad), "--out", str(tmp_path / "q.jsonl")]) == 2
    assert "bad.tsv:31" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".jsonl", ".tmp")) == ["p.jsonl"]


def test_cli_finetune_save_then_predict(run, tmp_path, capsys):
    """What `cramkit finetune ... save=true` keeps, `cramkit predict` uses (named by its task folder)."""
    from cramkit.cli import main

    _pair_task(tmp_path / "pairs")
    assert main(["finetune", str(run), "--task", str(tmp_path / "pairs" / "train.tsv"), "--labels", "yes,no",
                 "--text-column", "premise", "--text-pair-column", "hypothesis", "seeds=[0]", "epochs=1",
                 "progress=false", "device=cpu", "save=true"]) == 0
    capsys.readouterr()
    assert main(["predict", str(run / "finetune" / "pairs"), "--input", str(tmp_path / "pairs" / "dev.tsv"),
                 "--device", "cpu"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(shown) == 39 and {r["prediction"] for r in shown} <= {"yes", "no"}


def test_cli_predict_mistakes_are_one_line_errors(pair_saved, tmp_path, capsys):
    from cramkit.cli import main

    folder, _, _ = pair_saved
    run = folder.parents[2]
    good = tmp_path / "pairs" / "dev.tsv"
    single = tmp_path / "single.tsv"
    single.write_text("premise\nthe film story\n")

    def error(*argv: str) -> str:
        assert main(["predict", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err

    assert "missing column 'hypothesis'" in error(str(folder), "--input", str(single))
    assert "file not found" in error(str(folder), "--input", str(tmp_path / "absent.tsv"))
    assert "a folder: give a file of texts" in error(str(folder), "--input", str(tmp_path))
    assert "name the file .jsonl" in error(str(folder), "--input", str(good), "--out", str(tmp_path / "p.tsv"))
    assert "is a pretraining run, not fine-tuned weights: give one of its saved folders (finetune/pairs/seed-0)" \
        in error(str(run), "--input", str(good))
    assert "not found" in error(str(tmp_path / "nowhere"), "--input", str(good))
    header = tmp_path / "header.tsv"
    header.write_text("premise\thypothesis\n")
    assert "no rows to predict" in error(str(folder), "--input", str(header))
    assert "holds no fine-tuned weights" in error(str(tmp_path / "pairs"), "--input", str(good))
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert "model.safetensors has" in error(str(folder), "--input", str(good)) and "truncated" in \
        error(str(folder), "--input", str(good))
    weights.write_bytes(data)
    record = json.loads((folder / "classifier.json").read_text())
    (folder / "classifier.json").write_text(json.dumps({k: v for k, v in record.items() if k != "seed"}))
    assert "classifier.json or finetune_config.json is damaged" in error(str(folder), "--input", str(good))
    (folder / "classifier.json").unlink()  # what saves before the label order was recorded hold
    assert "earlier cramkit" in error(str(folder), "--input", str(good))


def test_the_help_lists_predict(capsys):
    from cramkit.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert "predict" in capsys.readouterr().out


def test_no_inputs_give_no_predictions(pair_saved):
    folder, _, _ = pair_saved
    clf = load_finetuned(folder)
    assert clf.predict([]) == [] and clf.logits([]).shape == (0, 2)
    for wrong in (["one text"], [("a", None)], [("a", 3)], [("a", "b", "c")]):  # a pair task's inputs
        with pytest.raises(DataError, match="give \\(text, text_pair\\) tuples of strings"):
            clf.predict(wrong)


def test_inputs_without_an_order_or_not_a_collection_are_refused(pair_saved):
    """A dict was labelled by its keys and a set in its own order, silently; None, a number and
    bytes were Python's "not iterable" or one input per byte. Each is a DataError; a generator
    or a tuple of pairs still reads as a list."""
    folder, _, _ = pair_saved
    clf = load_finetuned(folder)
    pairs = [("the market story", "the film news"), ("the match story", "the match news")]
    for wrong in ({"a": "b"}, {pairs[0]}, frozenset(pairs), None, 3, b"ab"):
        with pytest.raises(DataError, match=r"inputs: give a text or a list of \(text, text_pair\) tuples"):
            clf.predict(wrong)
    assert clf.predict(p for p in pairs) == clf.predict(tuple(pairs)) == clf.predict(pairs)


def test_a_dataframe_is_refused_not_read_as_its_column_names(pair_saved):
    """A pandas DataFrame iterates over its column names: a frame of two text columns was two
    predictions, of the strings "premise" and "hypothesis", whatever its rows."""
    pd = pytest.importorskip("pandas")
    folder, _, _ = pair_saved
    clf = load_finetuned(folder)
    df = pd.DataFrame({"premise": ["the market story"] * 3, "hypothesis": ["the film news"] * 3})
    with pytest.raises(DataError, match=re.escape("give its text columns, e.g. list(zip(df['premise'], "
                                                  "df['hypothesis']))")):
        clf.predict(df)
    assert clf.predict(list(zip(df["premise"], df["hypothesis"]))) == clf.predict([("the market story", "the film news")] * 3)


def test_a_txt_input_is_one_text_per_line_for_single_text_tasks(pair_saved, tmp_path, capsys):
    import gzip

    from cramkit.cli import main
    from cramkit.eval.tasks import TaskSpec, get_task, iter_inputs

    plain = tmp_path / "texts.txt"
    plain.write_bytes(b"Shares rose.\r\n\r\n  The striker scored.  \nlast line, no newline")
    assert [(n, e.text, e.text_pair) for n, e in list(iter_inputs(plain, get_task("bbc")))] == [
        (1, "Shares rose.", None), (3, "The striker scored.", None), (4, "last line, no newline", None)]
    packed = tmp_path / "texts.TXT.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert [e.text for _, e in list(iter_inputs(packed, get_task("bbc")))][1] == "The striker scored."
    pairs = TaskSpec("pairs", "premise", "label", text_pair_column="hypothesis", source="file")
    with pytest.raises(DataError, match="classifies pairs of texts, which a .txt file"):
        list(iter_inputs(plain, pairs))
    folder, _, _ = pair_saved  # a pair task: its .txt input is a one-line error
    assert main(["predict", str(folder), "--input", str(plain)]) == 2
    assert "which a .txt file (one text per line) cannot hold" in capsys.readouterr().err


def test_a_row_with_more_fields_than_the_header_is_an_error_in_prediction_inputs(tmp_path):
    """A predicted file is the user's own, also for a built-in task: a comma in an unquoted CSV
    field (or a tab in a TSV's text) must not cut the text short without a word."""
    from cramkit.eval.tasks import get_task, iter_inputs

    unquoted = tmp_path / "news.csv"
    unquoted.write_text("text\nShares rose, then fell.\n")
    with pytest.raises(DataError, match=r"news.csv:2: row has 2 fields, the header 1 \(a comma in an unquoted"):
        list(iter_inputs(unquoted, get_task("bbc")))
    tabbed = tmp_path / "news.tsv"
    tabbed.write_text("text\nShares rose\tthen fell.\n")
    with pytest.raises(DataError, match=r"news.tsv:2: row has 2 fields"):
        list(iter_inputs(tabbed, get_task("bbc")))
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('text\n"Shares rose, then fell."\n')
    assert [e.text for _, e in list(iter_inputs(quoted, get_task("bbc")))] == ["Shares rose, then fell."]


def test_predict_input_type_and_columns_are_checked_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """An input of no type predict reads is named with the types it reads (.txt among them), and
    column flags for a .txt input, which has no columns, are an error, not ignored; both before
    the weights are loaded."""
    from cramkit.cli import main
    from cramkit.eval import finetuned

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(finetuned, "load_finetuned", no_load)
    texts = tmp_path / "texts.txt"
    texts.write_text("Shares rose.\n")
    listing = tmp_path / "texts.json"
    listing.write_text('["Shares rose."]\n')
    assert main(["predict", str(tmp_path), "--input", str(listing)]) == 2
    assert capsys.readouterr().err == (f"error: {listing}: unsupported file type (use .tsv, .csv or .jsonl, "
                                       "or .txt with one text per line; each optionally .gz)\n")
    for flag in ("--text-column", "--text-pair-column"):
        assert main(["predict", str(tmp_path), "--input", str(texts), flag, "body"]) == 2
        assert capsys.readouterr().err == (f"error: {flag}: {texts} is a .txt file, one text per line, "
                                           "without columns\n")


@pytest.mark.parametrize("change", [
    {"base_checkpoint": "step-00000001"}, {"base_checkpoint": {"sha256": "0" * 64}}, {"run_dir": 5},
    {"tokenizer_sha256": 5}, {"init": "scratch"}, {"files": {}},
])
def test_a_damaged_classifier_record_is_a_one_line_error(pair_saved, change):
    """Any field of classifier.json of the wrong type or value is the damaged-file error, not a
    traceback, nor (an unknown init, no files to check) weights loaded as something else."""
    folder, _, _ = pair_saved
    record = json.loads((folder / "classifier.json").read_text())
    (folder / "classifier.json").write_text(json.dumps({**record, **change}))
    with pytest.raises(CheckpointError, match="classifier.json or finetune_config.json is damaged"):
        load_finetuned(folder)


def test_finetune_s_help_for_save_says_what_reloads_the_weights():
    import dataclasses

    save = next(f for f in dataclasses.fields(FinetuneConfig) if f.name == "save")
    assert "classifier.json" in save.metadata["help"] and "cramkit predict" in save.metadata["help"]


def test_an_adapter_whose_base_checksum_was_not_recorded_says_so(run, bbc_task):
    """A Backbone built without its checkpoint's checksum leaves it unrecorded: the adapter is
    refused for that reason, not as if its base's weights had changed."""
    cfg = FinetuneConfig.from_dict({**FAST, "peft": "lora", "max_train_examples": 16, "max_eval_examples": 8})
    save_dir = finetune_save_dir(run, "bbc", False, "lora")
    finetune(load_backbone(run), bbc_task, cfg, save_dir=save_dir)
    record_file = save_dir / "seed-0" / "classifier.json"
    record = json.loads(record_file.read_text())
    record["base_checkpoint"]["sha256"] = None  # what classifier_record writes then
    record_file.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="its checksum was not recorded") as err:
        load_finetuned(save_dir / "seed-0")
    assert "not the ones it held then" not in str(err.value)


def test_an_adapter_s_base_is_the_checkpoint_as_it_was_loaded(run, bbc_task):
    """A resume from an earlier step rewrites a step's checkpoint folder; when that happens
    while a LoRA fine-tune runs, the adapter was trained on the weights loaded before, and must
    not reload onto the new ones (their checksum is taken at loading, not at saving)."""
    from safetensors.torch import load_file, save_file

    from cramkit.train.checkpoint import file_record, latest_checkpoint

    backbone = load_backbone(run)
    ckpt = latest_checkpoint(run)
    weights = {k: v + 0.01 for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    save_file(weights, str(ckpt / "model.safetensors"))  # rewritten whole, meta.json to match
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"]["model.safetensors"] = file_record(ckpt / "model.safetensors")
    (ckpt / "meta.json").write_text(json.dumps(meta))
    cfg = FinetuneConfig.from_dict({**FAST, "peft": "lora", "max_train_examples": 16, "max_eval_examples": 8})
    save_dir = finetune_save_dir(run, "bbc", False, "lora")
    finetune(backbone, bbc_task, cfg, save_dir=save_dir)
    with pytest.raises(CheckpointError, match="its weights are not the ones it held then"):
        load_finetuned(save_dir / "seed-0")


def test_weights_of_a_run_with_a_plugin_s_init_name_the_plugin_not_a_damaged_file(pair_saved, tmp_path):
    """A run trained with a plugin's init scheme, its fine-tuned weights reloaded without the
    plugin: "classifier.json or finetune_config.json is damaged (... did you mean 'normal'?)"."""
    folder, _, _ = pair_saved
    record = json.loads((folder / "classifier.json").read_text())
    record["model_config"]["init"] = "halfinit"
    (folder / "classifier.json").write_text(json.dumps(record))
    plugin = tmp_path / "halfinit_plugin.py"  # recorded, never loaded
    run = folder.parents[2]
    env = json.loads((run / "environment.json").read_text()) if (run / "environment.json").is_file() else {}
    (run / "environment.json").write_text(json.dumps({**env, "plugins": [str(plugin)]}))
    with pytest.raises(CheckpointError) as err:
        load_finetuned(folder)
    assert "damaged" not in str(err.value)
    assert (f"unknown init scheme 'halfinit' (this run was trained with plugin {plugin}, which is no longer "
            "at that path: name it where it is now in CRAMKIT_PLUGINS)") in str(err.value)
