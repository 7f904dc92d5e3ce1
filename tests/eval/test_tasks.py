"""Task loading: real GLUE files with official row counts, user files, bad input messages."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from cramkit.errors import DataError
from cramkit.eval import tasks as tasks_mod
from cramkit.eval.tasks import (
    TASKS,
    count_rows,
    file_task,
    find_split,
    get_task,
    glue_available,
    iter_rows,
    load_task,
)

# Official GLUE row counts (shared/data/README.md); None = split not shipped there.
GLUE_ROWS = {
    "CoLA": {"train": 8551, "dev": 1043, "test": 1063},
    "SST-2": {"train": 67349, "dev": 872, "test": 1821},
    "MRPC": {"train": 3668, "dev": 408, "test": 1725},
    "STS-B": {"train": 5749, "dev": 1500, "test": 1379},
    "RTE": {"train": 2490, "dev": 277, "test": 3000},
    "WNLI": {"train": 635, "dev": 71, "test": 146},
    "QNLI": {"dev": 5463, "test": 5463},
}


@pytest.mark.shared_data
@pytest.mark.parametrize("folder", sorted(GLUE_ROWS))
def test_glue_files_have_official_row_counts(glue_dir, folder):
    for split, rows in GLUE_ROWS[folder].items():
        path = find_split(glue_dir / folder, split)
        assert path is not None, f"{folder}/{split}"
        header = not (folder == "CoLA" and split != "test")
        assert count_rows(path, has_header=header) == rows, f"{folder}/{split}"


@pytest.mark.shared_data
def test_glue_loaders_parse_labels_and_pairs(glue_dir):
    expected = {
        "cola": (8551, 1043),
        "sst2": (67349, 872),
        "mrpc": (3668, 408),
        "stsb": (5749, 1500),
        "rte": (2490, 277),
        "wnli": (635, 71),
    }
    for name, (n_train, n_dev) in expected.items():
        data = load_task(name, glue_dir)
        assert len(data.train) == n_train
        assert [len(v) for v in data.evals.values()] == [n_dev]
        spec = data.spec
        assert (data.train[0].text_pair is not None) == (spec.text_pair_column is not None)
        if spec.is_regression:
            assert all(0.0 <= e.label <= 5.0 for e in data.train)
        else:
            assert set(Counter(e.label for e in data.train)) == set(range(len(spec.labels)))
    # MRPC's header carries a UTF-8 BOM; its first column must still be found.
    assert load_task("mrpc", glue_dir).train[0].label == 1
    # MNLI/QQP files are not shipped; QNLI has no train split.
    assert not glue_available(get_task("mnli"), glue_dir)
    assert not glue_available(get_task("qnli"), glue_dir)


def test_registry_names_and_unknown_task_lists_known():
    assert {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "bbc"} <= set(
        TASKS
    )
    assert get_task("SST-2").name == "sst2" and get_task("sts_b").name == "stsb"
    assert get_task("mnli").entries == ["mnli-m", "mnli-mm"]
    with pytest.raises(
        DataError,
        match=r"unknown task 'colaa' \(did you mean 'cola'\?\); known "
        r"tasks: bbc, cola, mnli",
    ):
        get_task("colaa")


def test_bbc_split_is_fixed_and_stratified(bbc_task):
    assert len(bbc_task.spec.labels) == 5
    assert (len(bbc_task.train), len(bbc_task.evals["bbc"])) == (1699, 425)
    again = load_task("bbc")
    assert [e.text for e in again.evals["bbc"]] == [e.text for e in bbc_task.evals["bbc"]]
    train, dev = (
        Counter(e.label for e in bbc_task.train),
        Counter(e.label for e in bbc_task.evals["bbc"]),
    )
    for label in train:
        assert dev[label] / len(bbc_task.evals["bbc"]) == pytest.approx(
            train[label] / len(bbc_task.train), abs=0.01
        )


def test_file_tasks_tsv_csv_jsonl_gz(tmp_path):
    (tmp_path / "train.tsv").write_text('a\tb\ty\nhello\tthere\tpos\n"q\tz\tneg\n')
    (tmp_path / "dev.tsv").write_text("a\tb\ty\nhi\tyou\tneg\n")
    data = file_task(
        tmp_path / "train.tsv", text_column="a", text_pair_column="b", label_column="y"
    )
    assert data.spec.labels == ("neg", "pos")
    assert [(e.text, e.text_pair, e.label) for e in data.train] == [
        ("hello", "there", 1),
        ('"q', "z", 0),
    ]
    assert data.evals[data.spec.name][0].label == 0

    (tmp_path / "t.csv").write_text('text,score\n"one, two",1.5\nthree,2\n')
    (tmp_path / "d.csv").write_text("text,score\nfour,0.5\nfive,3\n")  # a correlation needs two
    reg = load_task(
        tmp_path / "t.csv",
        dev=tmp_path / "d.csv",
        text_column="text",
        label_column="score",
        is_regression=True,
    )
    assert reg.spec.is_regression and reg.spec.metrics == ("pearson", "spearman")
    assert [e.label for e in reg.train] == [1.5, 2.0] and reg.train[0].text == "one, two"

    with gzip.open(tmp_path / "train.jsonl.gz", "wt") as f:
        f.write('{"sentence": "x", "label": 1}\n{"sentence": "y", "label": 0}\n')
    (tmp_path / "dev.jsonl").write_text('{"sentence": "z", "label": 1}\n')
    js = load_task(tmp_path / "train.jsonl.gz", dev=tmp_path / "dev.jsonl")
    assert js.spec.labels == ("0", "1") and [e.label for e in js.train] == [1, 0]


def test_a_data_folder_that_a_task_does_not_read_is_named_in_a_warning(tmp_path, recwarn):
    (tmp_path / "train.jsonl").write_text('{"sentence": "x", "label": 1}\n{"sentence": "y", "label": 0}\n')
    (tmp_path / "dev.jsonl").write_text('{"sentence": "z", "label": 1}\n')
    with pytest.warns(UserWarning, match=rf"--data {tmp_path}/glue is only read for GLUE tasks; task 'bbc'"):
        load_task("bbc", tmp_path / "glue")
    with pytest.warns(UserWarning, match="is only read for GLUE tasks"):
        load_task(tmp_path / "train.jsonl", tmp_path / "glue")
    recwarn.clear()
    load_task(tmp_path / "train.jsonl")
    assert not [w for w in recwarn if "only read for GLUE" in str(w.message)]


def test_missing_column_names_file_and_line(tmp_path):
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t1\nbroken line\n")
    with pytest.raises(DataError, match=rf"{tmp_path}/dev.tsv:3: missing column 'label'"):
        file_task(train)
    with pytest.raises(
        DataError, match=r"train.tsv:1: missing column 'text' \(columns: sentence, label\)"
    ):
        file_task(train, text_column="text")


@pytest.mark.parametrize(("row", "message"), [("some text\t", "train.tsv:4: empty label in column 'label'"),
                                            ("some text", "train.tsv:4: missing column 'label'")])
def test_an_inferred_label_set_refuses_empty_and_missing_labels(tmp_path, row, message):
    """With the labels read off the training file, an empty one became a class of its own (and a
    short row's missing one the class 'None'); with --labels given it was refused. Both are errors."""
    (tmp_path / "train.tsv").write_text(f"sentence\tlabel\ngood\t1\nbad\t0\n{row}\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(DataError, match=message):
        file_task(tmp_path / "train.tsv")


def test_label_outside_label_set_names_file_and_line(tmp_path, glue_dir):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t1\nodd\t7\n")
    with pytest.raises(DataError, match=r"dev.tsv:3: label '7' is not in the label set .*\(0, 1\)"):
        file_task(tmp_path / "train.tsv")
    # A GLUE-layout folder with a corrupted row.
    rte = tmp_path / "glue" / "RTE"
    rte.mkdir(parents=True)
    text = (glue_dir / "RTE" / "train.tsv").read_text().splitlines()
    text[5] = text[5].rsplit("\t", 1)[0] + "\tmaybe"
    (rte / "train.tsv").write_text("\n".join(text) + "\n")
    (rte / "dev.tsv").write_text((glue_dir / "RTE" / "dev.tsv").read_text())
    with pytest.raises(
        DataError,
        match=r"RTE/train.tsv:6: label 'maybe' is not in the label set "
        r"of task 'rte' \(entailment, not_entailment\)",
    ):
        load_task("rte", tmp_path / "glue")


def test_missing_file_and_dev(tmp_path):
    with pytest.raises(DataError, match="nothere.tsv: file not found"):
        load_task(tmp_path / "nothere.tsv")
    (tmp_path / "only.tsv").write_text("sentence\tlabel\na\t1\nb\t0\n")
    with pytest.raises(DataError, match=r"only.tsv: no dev file to score on: pass --dev FILE, or put dev.tsv "
                                        r"\(or validation.tsv, valid.tsv, test.tsv\) beside it"):
        load_task(tmp_path / "only.tsv")
    # The file type is checked first: a dev file would not make a .txt readable.
    (tmp_path / "notes.txt").write_text("a\t1\n")
    with pytest.raises(DataError, match="notes.txt: unsupported file type"):
        load_task(tmp_path / "notes.txt")


def test_hf_datasets_source_is_optional(monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails: not installed
    with pytest.raises(DataError, match="HF 'datasets' is not installed.*--data DIR"):
        load_task("rte")

    calls = []

    def load_dataset(name, config):
        calls.append((name, config))
        rows = [{"premise": "p", "hypothesis": "h", "label": 2}]
        return {"train": rows * 3, "validation_matched": rows, "validation_mismatched": rows * 2}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(tasks_mod, "hub_unreachable", lambda: None)
    data = load_task("mnli")
    assert calls == [("nyu-mll/glue", "mnli")]  # the Hub id itself, not the redirected "glue"
    assert len(data.train) == 3 and {k: len(v) for k, v in data.evals.items()} == {
        "mnli-m": 1,
        "mnli-mm": 2,
    }
    assert data.spec.labels[data.train[0].label] == "contradiction"
    assert data.train[0].text_pair == "h"


def test_glue_from_the_hub_offline_reads_the_cache_at_once(monkeypatch):
    """Offline, the hub client retried for half a minute before using its cache (or failing)."""
    import sys
    import types

    config = types.ModuleType("datasets.config")
    config.HF_HUB_OFFLINE = False
    offline_during_load = []
    rows = [{"sentence1": "a", "sentence2": "b", "label": 1}]

    def load_dataset(name, subset):
        offline_during_load.append(config.HF_HUB_OFFLINE)
        if subset != "rte":
            raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")
        return {"train": rows * 2, "validation": rows}

    fake = types.ModuleType("datasets")
    fake.config, fake.load_dataset = config, load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setitem(sys.modules, "datasets.config", config)
    monkeypatch.setattr(tasks_mod, "hub_unreachable", lambda: "huggingface.co:443: Network is unreachable")
    data = load_task("rte")  # a cached copy: read with the cache only, and the flag put back
    assert len(data.train) == 2 and offline_during_load == [True] and config.HF_HUB_OFFLINE is False
    with pytest.raises(DataError, match=r"task 'mrpc': cannot reach the Hugging Face Hub \(huggingface.co:443: "
                                        r"Network is unreachable\), and the datasets cache holds no copy of "
                                        r"nyu-mll/glue/mrpc .*pass --data DIR"):
        load_task("mrpc")
    assert config.HF_HUB_OFFLINE is False
    monkeypatch.setattr(tasks_mod, "hub_unreachable", lambda: None)  # online: the client as it is
    load_task("rte")
    assert offline_during_load[-1] is False


def test_unreadable_files_are_one_line_errors_naming_file_and_line(tmp_path):
    """Malformed CSV, text that is not UTF-8 and a .gz that is not gzip were tracebacks
    (csv.Error, UnicodeDecodeError, BadGzipFile, EOFError); they are DataErrors naming the
    file, and the line where there is one."""
    (tmp_path / "dev.csv").write_text("text,label\nok,1\nfine,0\n")
    # An unbalanced quote on line 3 swallows the rest of the file into one field.
    rows = ["text,label", "good,1", '"open quote,0'] + [f"row {i} {'x' * 300},1" for i in range(500)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"train.csv:3: malformed CSV \(field larger.*quote left open"):
        file_task(tmp_path / "train.csv", text_column="text")

    # Latin-1 bytes early (line 3) and far beyond the decoder's first read-ahead block.
    early = ["sentence\tlabel", "plain\t1", "caf\xe9\t0"] + ["a\t1"] * 5000
    late = ["sentence\tlabel"] + ["a\t1"] * 5000 + ["caf\xe9\t0"]
    for name, lines, lineno in (("early.tsv", early, 3), ("late.tsv", late, 5002)):
        (tmp_path / name).write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
        with pytest.raises(DataError, match=rf"{name}:{lineno}: not UTF-8 text"):
            count_rows(tmp_path / name)
    jsonl = b'{"sentence": "a", "label": 1}\n' * 5000 + b'{"sentence": "caf\xe9", "label": 0}\n'
    (tmp_path / "late.jsonl").write_bytes(jsonl)
    with pytest.raises(DataError, match=r"late.jsonl:5001: not UTF-8 text"):
        count_rows(tmp_path / "late.jsonl")

    (tmp_path / "binary.tsv").write_bytes(b"sentence\tlabel\n\x01\x00\x00PK\x03\x04\t1\n")  # decodes, yet binary
    with pytest.raises(DataError, match=r"binary.tsv:2: NUL byte found; this looks like a binary file"):
        count_rows(tmp_path / "binary.tsv")

    (tmp_path / "plain.tsv.gz").write_text("sentence\tlabel\nok\t1\n")  # named .gz, not gzip'd
    with pytest.raises(DataError, match=r"plain.tsv.gz: not a readable gzip file"):
        count_rows(tmp_path / "plain.tsv.gz")
    with gzip.open(tmp_path / "cut.tsv.gz", "wt") as f:
        f.write("sentence\tlabel\n" + "".join(f"text {i}\t1\n" for i in range(5000)))
    data = (tmp_path / "cut.tsv.gz").read_bytes()
    (tmp_path / "cut.tsv.gz").write_bytes(data[: len(data) // 2])  # a truncated download
    with pytest.raises(DataError, match=r"cut.tsv.gz: not a readable gzip file"):
        count_rows(tmp_path / "cut.tsv.gz")

    # UTF-8 with a BOM and non-ASCII text reads as before.
    (tmp_path / "ok.tsv").write_text("\ufeffsentence\tlabel\ncafé ☕\t1\n", encoding="utf-8")
    assert [r for _, r in iter_rows(tmp_path / "ok.tsv")] == [{"sentence": "café ☕", "label": "1"}]


def test_csv_rows_are_numbered_by_their_first_line(tmp_path):
    (tmp_path / "train.csv").write_text('text,label\n"two\nlines",1\nbad\n')
    (tmp_path / "dev.csv").write_text("text,label\nok,1\n")
    assert [n for n, _ in iter_rows(tmp_path / "train.csv")] == [2, 4]
    with pytest.raises(DataError, match=r"train.csv:4: missing column 'label'"):
        file_task(tmp_path / "train.csv", text_column="text")


@pytest.mark.parametrize("bad", ["nan", "inf", "-Infinity"])
def test_regression_labels_must_be_finite(tmp_path, bad):
    (tmp_path / "train.tsv").write_text(f"sentence\tscore\na\t1.5\nb\t{bad}\n")
    (tmp_path / "dev.tsv").write_text("sentence\tscore\nc\t2\n")
    with pytest.raises(DataError, match=rf"train.tsv:3: label '{bad}' is not a finite number"):
        file_task(tmp_path / "train.tsv", label_column="score", is_regression=True)


def test_file_task_metrics_are_checked_when_the_task_is_loaded(tmp_path):
    """Metrics are computed after fine-tuning: an unknown name, binary F1 on three classes or
    accuracy on a regression target used to fail only then (the last one as scikit-learn's
    traceback). file_task refuses them up front."""
    from cramkit.errors import ConfigError

    (tmp_path / "train.tsv").write_text("sentence\tlabel\na\tx\nb\ty\nc\tz\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nd\tx\n")
    with pytest.raises(ConfigError, match=r"unknown metric 'acuracy' \(did you mean 'accuracy'"):
        file_task(tmp_path / "train.tsv", metrics=["acuracy"])
    with pytest.raises(ConfigError, match=r"metrics f1: binary .* the task has 3 labels \(use macro_f1\)"):
        file_task(tmp_path / "train.tsv", metrics=["accuracy", "f1"])
    assert file_task(tmp_path / "train.tsv", metrics=["macro_f1", "matthews"]).spec.metrics == (
        "macro_f1",
        "matthews",
    )
    (tmp_path / "two.tsv").write_text("sentence\tlabel\na\tx\nb\ty\n")
    assert file_task(tmp_path / "two.tsv", tmp_path / "dev.tsv", metrics=["f1"]).spec.labels == (
        "x",
        "y",
    )
    (tmp_path / "r.tsv").write_text("sentence\tscore\na\t0.5\nb\t1\n")
    (tmp_path / "rdev.tsv").write_text("sentence\tscore\nc\t2\n")
    with pytest.raises(ConfigError, match=r"metrics accuracy: .* not a regression task \(use pearson, spearman\)"):
        file_task(tmp_path / "r.tsv", tmp_path / "rdev.tsv", label_column="score",
                  is_regression=True, metrics=["accuracy"])
    with pytest.raises(ConfigError, match="at least one metric"):
        file_task(tmp_path / "train.tsv", metrics=[])


@pytest.mark.parametrize(("columns", "message"), [
    ({"text_column": "label"}, "--text-column 'label' is the --label-column too: the model would read the label"),
    ({"text_pair_column": "label"}, "--text-pair-column 'label' is the --label-column too"),
    ({"text_column": "s", "label_column": "s"}, "--text-column 's' is the --label-column too"),
    ({"text_pair_column": "sentence"}, "--text-pair-column 'sentence' is the --text-column too: each text would be paired"),
])
def test_file_task_columns_must_differ(tmp_path, columns, message):
    """--text-column label fine-tuned on each example's label as its text, without a word."""
    from cramkit.errors import ConfigError

    (tmp_path / "train.tsv").write_text("sentence\tlabel\na\tx\nb\ty\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nc\tx\nd\ty\n")
    with pytest.raises(ConfigError, match=message):
        file_task(tmp_path / "train.tsv", **columns)


def test_file_tasks_are_named_after_the_file_unless_it_only_names_the_split(tmp_path, monkeypatch):
    # Two task files side by side were both named after their folder, so the second one's
    # eval/finetune-NAME.json replaced the first one's.
    folder = tmp_path / "mydata"
    folder.mkdir()
    for stem in ("reviews", "questions", "dev"):
        (folder / f"{stem}.tsv").write_text("sentence\tlabel\nhello\tpos\nbye\tneg\n")
    assert file_task(folder / "reviews.tsv").spec.name == "reviews"
    assert file_task(folder / "questions.tsv").spec.name == "questions"
    sst = tmp_path / "sst"
    sst.mkdir()
    (sst / "train.tsv").write_text("sentence\tlabel\nhello\tpos\nbye\tneg\n")
    (sst / "dev.tsv").write_text("sentence\tlabel\nhi\tpos\n")
    assert file_task(sst / "train.tsv").spec.name == "sst"
    monkeypatch.chdir(sst)  # `--task train.tsv` in the task's folder: still the folder's name
    assert file_task("train.tsv").spec.name == "sst"


def test_a_task_folder_is_read_through_its_training_file(tmp_path):
    """`--task DIR` said "file not found" for an existing folder holding train/dev files."""
    folder = tmp_path / "reviews"
    folder.mkdir()
    with pytest.raises(DataError, match="is a folder with no training file"):
        load_task(folder)
    rows = "sentence\tlabel\n" + "".join(f"text {i}\t{i % 2}\n" for i in range(6))
    (folder / "train.tsv").write_text(rows)
    (folder / "dev.tsv").write_text(rows[: rows.index("text 2")])
    task = load_task(folder)
    assert task.spec.name == "reviews" and len(task.train) == 6 and len(task.evals["reviews"]) == 2
    (folder / "train.csv").write_text(rows.replace("\t", ","))
    with pytest.raises(DataError, match="more than one training file.*train.tsv, train.csv"):
        load_task(folder)


def test_file_task_names_keep_every_dot_but_the_file_type(tmp_path):
    # Cut at the first dot, reviews.v1.tsv and reviews.v2.tsv were both "reviews": the second
    # one's eval/finetune-reviews.json replaced the first one's.
    from cramkit.eval.tasks import file_task_name

    assert file_task_name(tmp_path / "reviews.v1.tsv") == "reviews.v1"
    assert file_task_name(tmp_path / "reviews.v2.TSV.GZ") == "reviews.v2"
    assert file_task_name(tmp_path / "my.data.jsonl") == "my.data"
    assert file_task_name(tmp_path / "reviews.tsv") == "reviews"
    assert file_task_name(tmp_path / "sst" / "train.tsv.gz") == "sst"


@pytest.mark.shared_data
def test_file_task_options_are_refused_for_a_glue_task_folder(glue_dir, tmp_path):
    """`--task glue/RTE --dev mine.tsv` scored on RTE's own dev.tsv without a word (and the result
    recorded --dev as one of its options): a GLUE folder is read in GLUE's layout."""
    (tmp_path / "mine.tsv").write_text("sentence1\tsentence2\tlabel\na\tb\tentailment\n")
    with pytest.raises(DataError, match=r"GLUE task 'rte'.*options do not apply to it \(given: dev, text_column\)"):
        load_task(glue_dir / "RTE", dev=tmp_path / "mine.tsv", text_column="sentence1")
    assert load_task(glue_dir / "RTE").spec.name == "rte"


@pytest.mark.shared_data
def test_a_glue_task_folder_loads_as_that_glue_task(glue_dir, tmp_path, monkeypatch):
    """`--task glue/CoLA` read CoLA's header-less train.tsv as a generic file task: its first
    sentence became a column name and the metric was accuracy instead of Matthews."""
    task = load_task(glue_dir / "CoLA")
    assert task.spec.name == "cola" and task.spec.metrics == ("matthews",)
    assert len(task.train) == GLUE_ROWS["CoLA"]["train"]
    # However it is reached: the folder itself (`--task .`), a link to it, another case.
    (tmp_path / "mycola").symlink_to(glue_dir / "CoLA")
    assert load_task(tmp_path / "mycola").spec.name == "cola"
    monkeypatch.chdir(glue_dir / "CoLA")
    assert load_task(".").spec.name == "cola"
    # A folder named like a GLUE task is read in GLUE's layout; a missing split or rows in
    # another layout are a one-line error naming the file, not a silently different task.
    folder = tmp_path / "cola"
    folder.mkdir()
    (folder / "train.tsv").write_text("sentence\tlabel\nhello\t1\n")
    with pytest.raises(DataError, match=r"task 'cola': no dev.tsv\[.gz\] in .*cola"):
        load_task(folder)
    (folder / "dev.tsv").write_text("sentence\tlabel\nhello\t1\n")
    with pytest.raises(DataError, match=r"cola/dev.tsv:1: .*column #3 missing"):
        load_task(folder)


def test_each_glue_task_lists_cramming_target_metric_first():
    # The GLUE average scores an entry by its first metric (cramming's target_metrics).
    target = {"cola": "matthews", "mrpc": "f1", "qqp": "f1", "stsb": "pearson"}
    for name in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"):
        assert get_task(name).metrics[0] == target.get(name, "accuracy"), name


_QQP_HEADER = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"


def test_malformed_rows_of_a_glue_release_are_skipped_with_one_warning(tmp_path):
    """The original QQP release has rows broken by a newline inside a question (GLUE-baselines
    issue #5): one row becomes a 4-field and a 3-field line. The loader stopped at the first with
    "missing column 'question2'", so `cramkit evaluate --suite glue` could not run QQP; GLUE's
    own loaders skip such rows."""
    qqp = tmp_path / "glue" / "QQP"
    qqp.mkdir(parents=True)
    (qqp / "train.tsv").write_text(
        _QQP_HEADER
        + '1\t1\t2\tWhat is "x"?\tWhat\'s x?\t1\n'
        + "2\t3\t4\tHow do I\nlearn?\tHow to learn?\t0\n"  # one row, split in two lines
        + "3\t5\t6\tq\tr\t0\n"
    )
    (qqp / "dev.tsv").write_text(_QQP_HEADER + "1\t1\t2\ta\tb\t1\n3\t5\t6\tq\tr\t0\n")
    with pytest.warns(UserWarning) as record:
        data = load_task("qqp", tmp_path / "glue")
    assert [(e.text, e.text_pair, e.label) for e in data.train] == [
        ('What is "x"?', "What's x?", 1),
        ("q", "r", 0),
    ]
    assert len(data.evals["qqp"]) == 2
    messages = [str(w.message) for w in record]
    assert messages == [f"{qqp / 'train.tsv'}: skipped 2 malformed rows (a text or label field "
                        "missing, e.g. a question split by a newline)"]
    assert data.skipped_rows == {str(qqp / "train.tsv"): 2}


def test_malformed_rows_of_a_user_file_stay_an_error(tmp_path):
    (tmp_path / "train.tsv").write_text(
        "question1\tquestion2\tlabel\nwhat\tWhat?\t1\nHow do I\nlearn?\tHow to learn?\t0\nq\tr\t0\n"
    )
    (tmp_path / "dev.tsv").write_text("question1\tquestion2\tlabel\na\tb\t1\n")
    with pytest.raises(DataError, match=r"train.tsv:3: missing column 'question2' \(row has 1 of 3"):
        file_task(tmp_path / "train.tsv", text_column="question1", text_pair_column="question2",
                  labels=["0", "1"])


def test_labels_given_for_a_regression_task_are_an_error(tmp_path):
    """--labels with --regression was dropped without a word: one of the two is a mistake."""
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na\t0.5\nb\t1.5\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nc\t1.0\nd\t2.0\n")
    with pytest.raises(DataError, match="--labels: a regression task has no classes"):
        file_task(tmp_path / "train.tsv", labels=["0.5", "1.5"], is_regression=True)
    assert file_task(tmp_path / "train.tsv", is_regression=True).spec.labels is None


def test_a_regression_dev_file_with_one_target_is_an_error(tmp_path):
    """HF's STS-B test split, exported beside train as test.csv (the dev file by default when
    there is no dev), holds -1 for every hidden score: correlations on a constant target were
    scored 0 after the whole fine-tune."""
    (tmp_path / "train.csv").write_text("sentence,label\na,0.5\nb,4.5\n")
    (tmp_path / "test.csv").write_text("sentence,label\nc,-1\nd,-1\n")
    with pytest.raises(DataError, match=r"test.csv: every target is -1, so a correlation cannot score it"):
        file_task(tmp_path / "train.csv", is_regression=True)
    (tmp_path / "test.csv").write_text("sentence,label\nc,-1\nd,2\n")
    assert len(file_task(tmp_path / "train.csv", is_regression=True).evals[tmp_path.name]) == 2


def test_positive_label_is_the_class_f1_scores(tmp_path):
    """F1 scores label index 1; with sorted labels duplicate/not_duplicate that is the negative
    class, and only an error text said so. --positive-label names the class to score."""
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na\tduplicate\nb\tnot_duplicate\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nc\tduplicate\n")
    train = tmp_path / "train.tsv"
    assert file_task(train, metrics=["f1"]).spec.labels == ("duplicate", "not_duplicate")
    data = file_task(train, metrics=["f1"], positive_label="duplicate")
    assert data.spec.labels == ("not_duplicate", "duplicate")
    assert [e.label for e in data.train] == [1, 0] and data.evals[data.spec.name][0].label == 1
    given = file_task(train, labels=["duplicate", "not_duplicate"], positive_label=" duplicate")
    assert given.spec.labels == ("not_duplicate", "duplicate")
    with pytest.raises(DataError, match=r"--positive-label 'dup' is not a label of the task "
                                        r"\(duplicate, not_duplicate\)"):
        file_task(train, positive_label="dup")
    (tmp_path / "three.tsv").write_text("sentence\tlabel\na\tx\nb\ty\nc\tz\n")
    with pytest.raises(DataError, match="--positive-label needs a task with two labels, this one has 3"):
        file_task(tmp_path / "three.tsv", dev=tmp_path / "dev.tsv", positive_label="x")



def test_a_row_with_more_fields_than_the_header_is_an_error_in_a_task_file(tmp_path):
    """A tab inside a TSV's text shifts the label column: the label read is a piece of text,
    which a training file's label set would take as a class of its own. GLUE's files keep their
    leniency (some of their rows carry extra fields)."""
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\ngood film\tpos\nbad\tfilm, really\tneg\nfine\tpos\t\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\tpos\nmeh\tneg\n")
    with pytest.raises(DataError, match=r"train.tsv:3: row has 3 fields, the header 2 \(a tab inside a text field"):
        load_task(train)
    train.write_text("sentence\tlabel\ngood film\tpos\nbad\tneg\nfine\tpos\t\n")  # an empty trailing field is fine
    assert len(load_task(train).train) == 3


@pytest.mark.parametrize(("second", "message"), [
    ("1.0", r"train.jsonl:2: label 1.0 is a float, but the label on line 1 is an integer"),
    ('"1"', r"train.jsonl:2: label \"1\" is a string, but the label on line 1 is an integer"),
    ("[1]", r"train.jsonl:2: label \[1\] in column 'label' is not a string or a number"),
])
def test_an_inferred_label_set_refuses_a_label_column_of_mixed_types(tmp_path, second, message):
    """JSON labels 1 and 1.0 became two classes, "1" and "1.0" (a list the class "[1]"), silently."""
    rows = [{"sentence": "good", "label": 1}, {"sentence": "fine", "label": None}, {"sentence": "bad", "label": 0}]
    text = "\n".join(json.dumps(r) for r in rows).replace("null", second)
    (tmp_path / "train.jsonl").write_text(text + "\n")
    (tmp_path / "dev.jsonl").write_text('{"sentence": "ok", "label": 1}\n')
    with pytest.raises(DataError, match=message):
        file_task(tmp_path / "train.jsonl")


@pytest.mark.parametrize("name", ["my.reviews.tsv", "reviews.v1.TSV.gz"])
def test_the_default_dev_file_has_the_training_file_s_extension_whatever_dots_its_name_has(tmp_path, name):
    """A training file ``my.reviews.tsv`` looked for ``dev.reviews.tsv``, not the ``dev.tsv`` beside it."""
    ext = name[name.lower().index(".tsv"):]
    rows = b"sentence\tlabel\ngood\t1\nbad\t0\n"
    (tmp_path / name).write_bytes(gzip.compress(rows) if ext.endswith(".gz") else rows)
    (tmp_path / f"dev{ext}").write_bytes(gzip.compress(rows) if ext.endswith(".gz") else rows)
    task = file_task(tmp_path / name)
    assert [e.label for e in task.evals[task.spec.name]] == [1, 0]


@pytest.mark.parametrize(("labels", "message"), [(["0", "1", "0"], r"--labels names '0' twice \(0, 1, 0\)"),
                                                 (["1"], r"--labels needs at least two labels, got 1")])
def test_a_given_label_set_names_two_labels_or_more_each_once(tmp_path, labels, message):
    """--labels 0,1,0 made a three-class head whose class 0 no example had ('0' took index 2);
    --labels 1 a one-class head that scores 100 % by construction."""
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t1\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(DataError, match=message):
        file_task(tmp_path / "train.tsv", labels=labels)


@pytest.mark.parametrize("text", ["", "sentence\tlabel\n"])
def test_an_empty_training_file_says_it_has_no_examples(tmp_path, text):
    """An empty (or header-only) training file was refused for having 'fewer than two distinct
    labels', which sent the user looking at the labels of a file that has none."""
    (tmp_path / "train.tsv").write_text(text)
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(DataError, match=r"train.tsv: no examples$"):
        file_task(tmp_path / "train.tsv")


@pytest.mark.parametrize(("name", "text"), [("train.csv", "sentence,label,label\na,pos,x\nb,neg,y\n"),
                                            ("train.tsv", "label\tsentence\tlabel\npos\ta\tx\nneg\tb\ty\n")])
def test_a_column_named_twice_in_a_task_file_header_is_an_error(tmp_path, name, text):
    """The second of two 'label' columns was read without a word (the labels x, y)."""
    (tmp_path / name).write_text(text)
    (tmp_path / ("dev" + name[5:])).write_text(text)
    with pytest.raises(DataError, match=rf"{name}:1: column 'label' appears twice in the header"):
        file_task(tmp_path / name)


def test_a_glue_task_named_twice_in_tasks_is_fine_tuned_once(tmp_path):
    """`cramkit evaluate --tasks rte,RTE` fine-tuned RTE twice and listed it twice in the report."""
    from cramkit.eval.suite import select_glue_tasks

    rte = tmp_path / "RTE"
    rte.mkdir()
    for split in ("train", "dev"):
        (rte / f"{split}.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    chosen, _ = select_glue_tasks(tmp_path, ["rte", "RTE", "r-te"])
    assert [s.name for s in chosen] == ["rte"]



@pytest.mark.parametrize(("name", "message"), [
    ("colaa", r"^unknown GLUE task 'colaa' \(did you mean 'cola'\?\); GLUE tasks: cola, sst2, "),
    ("data/my.tsv", r"^unknown GLUE task 'data/my.tsv'; GLUE tasks: cola, "),
    ("bbc", r"^task 'bbc' is not a GLUE task"),
])
def test_evaluate_tasks_that_are_not_glue_tasks_name_the_glue_tasks(tmp_path, name, message):
    """`cramkit evaluate --tasks data/my.tsv` said "unknown task ... (or give a path to a .tsv
    training file)" when given one: --tasks takes GLUE task names only."""
    from cramkit.errors import DataError
    from cramkit.eval.suite import select_glue_tasks

    with pytest.raises(DataError, match=message) as error:
        select_glue_tasks(tmp_path, [name])
    assert "training file" not in str(error.value)

def test_glue_folders_are_found_in_any_case(tmp_path):
    """`--task glue/rte` read a lower-case folder, while `--suite glue` looked for `RTE` only."""
    from cramkit.eval.suite import select_glue_tasks
    from cramkit.eval.tasks import load_task

    rte = tmp_path / "rte"
    rte.mkdir()
    for split in ("train", "dev"):
        (rte / f"{split}.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    chosen, skipped = select_glue_tasks(tmp_path)
    assert [s.name for s in chosen] == ["rte"] and "rte" not in skipped
    assert [e.label for e in load_task("rte", tmp_path).train] == [0]


@pytest.mark.parametrize(("name", "text"), [("train.csv", "\nsentence,label\na,pos\nb,neg\n"),
                                            ("train.tsv", "\r\n\nsentence\tlabel\na\tpos\nb\tneg\n")])
def test_blank_lines_before_the_header_are_skipped_like_those_after_it(tmp_path, name, text):
    """A blank first line was taken for the header: 'row has 2 fields, the header 0'."""
    (tmp_path / name).write_text(text)
    (tmp_path / ("dev" + name[5:])).write_text(text)
    task = file_task(tmp_path / name)
    assert task.spec.labels == ("neg", "pos") and [e.text for e in task.train] == ["a", "b"]


def test_scores_read_as_classes_suggest_regression_and_the_error_stays_one_short_line(tmp_path):
    """A regression file without --regression made a class of each distinct score, and the dev
    file's first unseen score got an error listing all of them (60 in a user's STS-B copy)."""
    scores = [f"{i / 10:.1f}" for i in range(40)]
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"s {s}\t{s}\n" for s in scores))
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\ns\t1.25\n")
    with pytest.raises(DataError, match=r"dev.tsv:2: label '1.25' is not in .*\(28 more\)\); .* --regression") as err:
        file_task(tmp_path / "train.tsv")
    assert len(str(err.value)) < 300
    # Word labels: no such hint, and a short set is listed whole.
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na\tpos\nb\tneg\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\na\tneutral\n")
    with pytest.raises(DataError, match=r"label 'neutral' is not in the label set of task '\w+' \(neg, pos\)$"):
        file_task(tmp_path / "train.tsv")
