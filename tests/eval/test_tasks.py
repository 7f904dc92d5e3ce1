"""Task loading: real GLUE files with official row counts, user files, bad input messages."""

from __future__ import annotations

import gzip
from collections import Counter

import pytest

from cramkit.errors import DataError
from cramkit.eval.tasks import (
    TASKS,
    count_rows,
    file_task,
    find_split,
    get_task,
    glue_available,
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
    assert (len(bbc_task.train), len(bbc_task.evals["bbc"])) == (1780, 445)
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
    (tmp_path / "d.csv").write_text("text,score\nfour,0.5\n")
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


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("train.tsv", b"sentence\tlabel\ngood\t1\ncaf\xe9\t0\n",
         r"train.tsv:3: not valid UTF-8 \(invalid continuation byte\)"),
        ("train.tsv", b"sentence\tlabel\n\x93\x01\x00\x00PK\x03\x04",
         r"train.tsv:2: NUL byte found; this looks like a binary file"),
        ("train.tsv.gz", gzip.compress(b"sentence\tlabel\ngood\t1\n" * 50)[:40],
         r"train.tsv.gz: cannot read \(Compressed file ended"),
        ("train.tsv.gz", b"sentence\tlabel\ngood\t1\n", r"train.tsv.gz: cannot read \(Not a gzipped file"),
        ("train.csv", b'sentence,label\ngood,1\n"unclosed quote,0\n' + b"more text,1\n" * 20_000,
         r"train.csv:\d+: malformed CSV \(field larger than field limit"),
    ],
)
def test_unreadable_task_file_names_file_and_line(tmp_path, name, content, message):
    """A binary, non-UTF-8, truncated or mis-quoted task file used to be a UnicodeDecodeError,
    EOFError, BadGzipFile or csv.Error traceback."""
    (tmp_path / name).write_bytes(content)
    (tmp_path / name.replace("train", "dev")).write_bytes(b"sentence\tlabel\nok\t1\n")
    with pytest.raises(DataError, match=message):
        load_task(tmp_path / name)


def test_missing_file_and_dev(tmp_path):
    with pytest.raises(DataError, match="nothere.tsv: file not found"):
        load_task(tmp_path / "nothere.tsv")
    (tmp_path / "only.tsv").write_text("sentence\tlabel\na\t1\nb\t0\n")
    with pytest.raises(DataError, match="no dev file given"):
        load_task(tmp_path / "only.tsv")


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
    data = load_task("mnli")
    assert calls == [("glue", "mnli")]
    assert len(data.train) == 3 and {k: len(v) for k, v in data.evals.items()} == {
        "mnli-m": 1,
        "mnli-mm": 2,
    }
    assert data.spec.labels[data.train[0].label] == "contradiction"
    assert data.train[0].text_pair == "h"
