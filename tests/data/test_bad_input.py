"""Every bad input gives one clear DataError/ConfigError naming the file (and line), and leaves
nothing behind that a later run could take as a finished dataset."""

from __future__ import annotations

import gzip
import json
import re
import warnings
from pathlib import Path

import pytest
from data_helpers import small_cfg, synthetic_docs, write_corpus

from cramkit.data import prepare as prepare_mod
from cramkit.data.config import PrepareConfig
from cramkit.data.prepare import prepare
from cramkit.errors import ConfigError, DataError


def _nothing_left(tmp_path, out_name="out"):
    leftovers = [p.name for p in tmp_path.iterdir() if p.name == out_name or p.name.startswith(".")]
    assert leftovers == [], leftovers


def _fails(tmp_path, cfg, match, exc=DataError):
    with pytest.raises(exc, match=match):
        prepare(cfg, tmp_path / "out", progress=False)
    _nothing_left(tmp_path)


def test_missing_path(tmp_path):
    _fails(tmp_path, small_cfg([tmp_path / "nope.txt"]), r"nope\.txt': no such file")


def test_empty_file_and_folder(tmp_path):
    empty = tmp_path / "src" / "empty.txt"
    empty.parent.mkdir()
    empty.write_text("\n\n  \n")
    _fails(tmp_path, small_cfg([empty]), r"empty\.txt' contains no documents")
    (tmp_path / "emptydir").mkdir()
    _fails(tmp_path, small_cfg([tmp_path / "emptydir"]), "emptydir': the folder is empty")


def test_binary_file(tmp_path):
    f = tmp_path / "src" / "blob.txt"
    f.parent.mkdir()
    f.write_bytes(b"fine first line\nsecond\x00\x01\x02 line\n")
    _fails(tmp_path, small_cfg([f]), r"blob\.txt:2: NUL byte")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_text_is_named_as_such_not_binary(tmp_path, encoding):
    # Notepad's "Unicode" files were called "a binary file" (their ASCII has NUL bytes).
    f = tmp_path / "src" / "notes.txt"
    f.parent.mkdir()
    text = "\n\n".join(synthetic_docs(20))
    f.write_bytes(("\ufeff" if encoding == "utf-16-be" else "").encode(encoding) + text.encode(encoding))
    _fails(tmp_path, small_cfg([f]), r"notes\.txt: UTF-16 or UTF-32 text .*convert the file to UTF-8")


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_text_without_byte_order_mark_is_named_as_such_not_binary(tmp_path, encoding):
    # What Python's "utf-16-le" and iconv's UTF-16LE write: no BOM, still no binary file.
    f = tmp_path / "src" / "notes.txt"
    f.parent.mkdir()
    f.write_bytes("\n\n".join(synthetic_docs(20)).encode(encoding))
    _fails(tmp_path, small_cfg([f]), r"notes\.txt:1: .*UTF-16 text without a byte-order mark.*convert the file to UTF-8")


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
@pytest.mark.parametrize("first, newline", [("T", "\n"), ("Title", "\r\n"), ("T", "\r\n"), ("", "\r\n")])
def test_utf16_text_without_byte_order_mark_is_named_whatever_its_first_line(tmp_path, encoding, first, newline):
    # Windows' CRLF: split at the lone CR, the first line's bytes before it ("T\0") or after it
    # (a lone "\0") were too short to tell, and the file was "a binary file" again.
    f = tmp_path / "src" / "notes.txt"
    f.parent.mkdir()
    text = newline.join([first, *synthetic_docs(20)])
    f.write_bytes(text.encode(encoding))
    _fails(tmp_path, small_cfg([f]), r"notes\.txt:\d+: .*UTF-16 text without a byte-order mark.*convert the file to UTF-8")


def test_non_utf8_names_file_and_line(tmp_path):
    docs = synthetic_docs(20)
    f = tmp_path / "src" / "latin1.txt.gz"
    f.parent.mkdir()
    text = "\n\n".join(docs) + "\n\ncaf\xe9 au lait\n"
    with gzip.open(f, "wb") as fh:
        fh.write(text.encode("latin-1"))
    line = text.count("\n")  # the bad line is the last one
    _fails(tmp_path, small_cfg([f]), rf"latin1\.txt\.gz:{line}: not valid UTF-8")


def test_jsonl_missing_field_and_invalid_json(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    f = src / "rows.jsonl"
    rows = [json.dumps({"text": d}) for d in synthetic_docs(10)]
    f.write_text("\n".join(rows + [json.dumps({"body": "x"})]) + "\n")
    _fails(tmp_path, small_cfg([f]), r"rows\.jsonl:11: no field 'text' \(found \['body'\]\)")
    f.write_text("\n".join(rows[:3] + ["{not json"]) + "\n")
    _fails(tmp_path, small_cfg([f]), r"rows\.jsonl:4: invalid JSON")
    # Valid JSON too deep for the parser was a RecursionError traceback.
    f.write_text("\n".join(rows[:3] + ["[" * 100_000 + "]" * 100_000]) + "\n")
    _fails(tmp_path, small_cfg([f]), r"rows\.jsonl:4: JSON nested too deeply")


def test_damaged_parquet_row_group_names_the_file(tmp_path):
    """A readable footer over a damaged data page was "error: Corrupt snappy compressed data."
    without the file's name (pyarrow's OSError, raised while iterating the rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "src" / "rows.parquet"
    f.parent.mkdir()
    pq.write_table(pa.table({"text": synthetic_docs(200)}), f, row_group_size=20, compression="snappy")
    data = bytearray(f.read_bytes())
    data[len(data) // 3:len(data) // 3 + 2000] = b"A" * 2000  # the data pages, not the footer
    f.write_bytes(bytes(data))
    _fails(tmp_path, small_cfg([f]), r"rows\.parquet: cannot read \(after row \d+: ")


def test_parquet_column_that_is_not_text(tmp_path):
    # Numbers were a TypeError traceback from tokenizer training; lists were taken as text.
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"text": list(range(10))}), src / "ints.parquet")
    _fails(tmp_path, small_cfg([src / "ints.parquet"]), r"ints\.parquet: column 'text' holds int64, not text")
    pq.write_table(pa.table({"text": [["a", "b"]] * 10}), src / "lists.parquet")
    _fails(tmp_path, small_cfg([src / "lists.parquet"]), r"lists\.parquet: column 'text' holds list")


def test_vocab_larger_than_corpus(tmp_path):
    """The error says what would fit: the size training reached, and min_frequency=1 where a
    pair seen once could not merge."""
    f = write_corpus(tmp_path / "src" / "c.txt", synthetic_docs(20))
    _fails(tmp_path, small_cfg([f], vocab_size=50_000, min_frequency=2),
           r"vocab_size=50000 is larger than this corpus supports: training stopped at \d+ tokens .*; "
           r"set vocab_size to \d+ or less, or min_frequency=1 \(now 2\), or add text")
    _fails(tmp_path, small_cfg([f], vocab_size=50_000, min_frequency=1), r"or less, or add text")
    # A sample cut at tokenizer_sample_mb: the corpus has more text already (was "or add text").
    _fails(tmp_path, small_cfg([f], vocab_size=50_000, min_frequency=1, tokenizer_sample_mb=0.0001),
           r"from 1 documents in the tokenizer sample.*or less, or raise tokenizer_sample_mb \(now 0.0001\)$")


def test_a_tokenizer_larger_than_vocab_size_warns_why(tmp_path):
    """WordPiece keeps every character of the corpus: hundreds of distinct ones made a vocabulary
    over twice the 256 asked, and only the summary's size said so."""
    chars = [chr(0x4E00 + i) for i in range(600)]
    docs = [" ".join(chars[(7 * d + i) % 600] * (1 + i % 3) for i in range(60)) for d in range(40)]
    f = write_corpus(tmp_path / "src" / "c.txt", docs)
    with pytest.warns(UserWarning, match=r"the tokenizer has \d+ tokens, more than vocab_size=256: the sample "
                                         r"holds \d+ distinct characters.*ascii_only=true"):
        prepare(small_cfg([f]), tmp_path / "cjk", progress=False)
    with warnings.catch_warnings():  # an ordinary corpus fits its vocab_size: no warning
        warnings.simplefilter("error")
        prepare(small_cfg([write_corpus(tmp_path / "src" / "en.txt", synthetic_docs(20))]), tmp_path / "en",
                progress=False)


def test_compressibility_filter_that_drops_everything_says_why(tmp_path):
    f = write_corpus(tmp_path / "src" / "c.txt", synthetic_docs(20))
    _fails(tmp_path, small_cfg([f], max_token_ratio=0.01),
           r"compressibility: 20 docs .*raise max_token_ratio \(0 = off\) or vocab_size")


@pytest.mark.parametrize("seq_len", [0, 3])
def test_seq_len_too_small(seq_len):
    with pytest.raises(ConfigError, match=f"seq_len: {seq_len} is too small"):
        PrepareConfig.from_dict({"seq_len": seq_len})


def test_config_errors_have_hints():
    with pytest.raises(ConfigError, match="did you mean 'seq_len'"):
        PrepareConfig.from_dict({"seqlen": 64})
    with pytest.raises(ConfigError, match="ordering"):
        PrepareConfig.from_dict({"ordering": "sorted"})
    with pytest.raises(ConfigError, match="2 weights for 1 sources"):
        PrepareConfig.from_dict({"weights": [1, 2]})
    # A weight is a repeat count: 1e12 ran for ever.
    for weight in (-1, 1e12):
        with pytest.raises(ConfigError, match=r"weights: .* is not in \[0, 1000\]"):
            PrepareConfig.from_dict({"weights": [weight]})
    PrepareConfig.from_dict({"weights": [1000]})
    # The tokenizer trainer reserved memory for 1e12 tokens and aborted the process (SIGABRT).
    with pytest.raises(ConfigError, match=r"^vocab_size: 1000000000000 is too large \(at most 2\*\*24 = 16777216\)$"):
        PrepareConfig.from_dict({"vocab_size": 10**12})
    PrepareConfig.from_dict({"vocab_size": 2**24})


def test_too_few_documents_for_a_split(tmp_path):
    f = write_corpus(tmp_path / "src" / "c.txt", [" ".join(synthetic_docs(30))])
    _fails(tmp_path, small_cfg([f], vocab_size=64, val_fraction=0.1), "no training documents")


def test_corpus_shorter_than_one_sequence_when_dropping(tmp_path):
    f = write_corpus(tmp_path / "src" / "c.txt", synthetic_docs(30))
    cfg = small_cfg([f], seq_len=100_000, last_sequence="drop", val_fraction=0.0)
    _fails(tmp_path, cfg, "fewer than one sequence")


def test_validation_split_shorter_than_one_sequence_when_dropping(tmp_path):
    """The held-out documents' tokens were all dropped: prepare reported "val 1 docs / 0
    sequences" and pretraining failed at its first evaluation."""
    docs = synthetic_docs(200)
    f = write_corpus(tmp_path / "src" / "c.txt", docs[:-1] + ["Tiny."])  # the last goes to val
    cfg = small_cfg([f], seq_len=64, last_sequence="drop", val_fraction=1e-9)
    _fails(tmp_path, cfg, "the validation split has .* fewer than one sequence")


def test_interrupted_prepare_leaves_nothing(tmp_path, monkeypatch):
    f = write_corpus(tmp_path / "src" / "c.txt", synthetic_docs(50))

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_mod.Packer, "finish", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare(small_cfg([f]), tmp_path / "out", progress=False)
    _nothing_left(tmp_path)
    monkeypatch.undo()
    out = prepare(small_cfg([f]), tmp_path / "out", progress=False)
    assert (out / "manifest.json").is_file()


def test_non_dataset_folder_is_not_overwritten(tmp_path):
    f = write_corpus(tmp_path / "src" / "c.txt", synthetic_docs(30))
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    for force in (False, True):  # --force rebuilds a dataset; it used to delete this folder
        with pytest.raises(DataError, match="not a cramkit dataset"):
            prepare(small_cfg([f]), out, force=force, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "manifest",
    [b'{"name": "my app"}', b'{"format": "cramkit-tokens-v9"}', b"\xff\xfe\x00binary", b"{trunc"],
)
def test_folder_with_a_foreign_manifest_is_not_overwritten(tmp_path, manifest):
    """A web app's (or any other tool's) manifest.json made the folder "a dataset", and --force
    then replaced it, index.html and all; only a cramkit-tokens manifest marks a dataset."""
    f = write_corpus(tmp_path / "src" / "c.txt", synthetic_docs(30))
    out = tmp_path / "app"
    out.mkdir()
    (out / "manifest.json").write_bytes(manifest)
    (out / "index.html").write_text("<html></html>")
    for force in (False, True):
        with pytest.raises(DataError, match="not a cramkit dataset") as exc:
            prepare(small_cfg([f]), out, force=force, progress=False)
        assert "use --force" not in str(exc.value)
    assert (out / "manifest.json").read_bytes() == manifest
    assert (out / "index.html").read_text() == "<html></html>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app", "src"]


def test_missing_tokenizer_file(tmp_path):
    f = write_corpus(tmp_path / "src" / "c.txt", synthetic_docs(5))
    _fails(tmp_path, small_cfg([f], tokenizer_file=str(tmp_path / "tok.json")), "no such file")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda m: [1, 2], r"manifest\.json: expected a JSON object, got list"),
        (lambda m: {k: v for k, v in m.items() if k != "seq_len"}, r"damaged manifest \(no seq_len\)"),
    ],
)
def test_damaged_manifest_is_a_data_error(tmp_path, damage, message):
    """A manifest that is JSON but not a dataset's used to be an AttributeError or KeyError
    traceback, from pretraining on it and from preparing into its folder."""
    from cramkit.data.dataset import TokenDataset

    f = write_corpus(tmp_path / "src" / "c.txt", synthetic_docs(30))
    out = prepare(small_cfg([f]), tmp_path / "out", progress=False)
    manifest = out / "manifest.json"
    manifest.write_text(json.dumps(damage(json.loads(manifest.read_text()))))
    with pytest.raises(DataError, match=message):
        TokenDataset.open(out)
    if isinstance(damage({}), list):
        # Not a cramkit manifest (any more): --force must not be what the answer suggests, and
        # it must not replace the folder either.
        for force in (False, True):
            with pytest.raises(DataError, match="expected a JSON object") as exc:
                prepare(small_cfg([f]), out, force=force, progress=False)
            assert "use --force" not in str(exc.value)
        assert (out / "manifest.json").read_text() == "[1, 2]"


def test_force_never_replaces_a_source_or_a_file(tmp_path):
    """`prepare corpus --out corpus` answers "not a cramkit dataset; use --force", and --force
    then replaced the folder, sources and all, with the dataset (a file --out likewise)."""
    corpus = tmp_path / "corpus"
    f = write_corpus(corpus / "c.txt", synthetic_docs(30))
    text = f.read_text()
    for source, out in ((corpus, corpus), (f, corpus), (corpus, corpus / "prepared")):
        with pytest.raises(DataError, match=f"--out {out} overlaps the source '{source}'"):
            prepare(small_cfg([source]), out, force=True, progress=False)
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    with pytest.raises(DataError, match="notes.txt exists and is not a directory"):
        prepare(small_cfg([f]), notes, force=True, progress=False)
    assert f.read_text() == text and notes.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "notes.txt"]


def test_reused_tokenizer_with_other_normalisation(tmp_path):
    """lowercase=true with a tokenizer_file that does not lowercase was recorded in the
    manifest and silently not applied."""
    f = write_corpus(tmp_path / "src" / "c.txt", synthetic_docs(30))
    cased = prepare(small_cfg([f]), tmp_path / "cased", progress=False) / "tokenizer.json"
    lower = prepare(small_cfg([f], lowercase=True), tmp_path / "lower", progress=False) / "tokenizer.json"
    # The file's own switches, or none, reuse it.
    prepare(small_cfg([f], tokenizer_file=str(lower), lowercase=True), tmp_path / "a", progress=False)
    prepare(small_cfg([f], tokenizer_file=str(lower)), tmp_path / "b", progress=False)
    _fails(tmp_path, small_cfg([f], tokenizer_file=str(cased), lowercase=True),
           "lowercase=true asks for another normalisation")


def test_a_reused_gpt2_style_tokenizer_without_a_pad_token(tmp_path):
    """GPT-2's tokenizer has <|endoftext|> and no pad token. CLM data pads only its last sequence,
    yet every pad-less tokenizer was refused ("no pad token", no spelling, no way out); with
    last_sequence=drop it prepares, and the export's pad fallback serves the run."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    f = write_corpus(tmp_path / "src" / "c.txt", synthetic_docs(30))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(synthetic_docs(30), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "gpt2ish.json"))
    cfg = dict(tokenizer_file=str(tmp_path / "gpt2ish.json"), objective="clm")
    _fails(tmp_path, small_cfg([f], **cfg), r"no pad token \(pad \[PAD\] or <\|pad\|>\), needed for objective=clm to pad its last sequence \(or set last_sequence=drop\)")
    out = prepare(small_cfg([f], last_sequence="drop", **cfg), tmp_path / "out", progress=False)
    ids = json.loads((out / "manifest.json").read_text())["special_ids"]
    assert ids["pad"] is None and ids["eod"] == 0


@pytest.mark.parametrize("objective, kind", [("mlm", "bpe"), ("clm", "wordpiece")])
def test_tokenizer_kind_without_the_objectives_special_tokens(objective, kind):
    """tokenizer=bpe with objective=mlm (or wordpiece with clm) trained a tokenizer first and
    only then failed: "the tokenizer has no cls/sep/mask token"."""
    with pytest.raises(ConfigError, match=f"tokenizer: {kind} has no .* objective={objective} needs"):
        PrepareConfig.from_dict({"objective": objective, "tokenizer": kind})
    PrepareConfig.from_dict({"objective": objective, "tokenizer": "auto"})


def test_jsonl_unpaired_surrogate(tmp_path):
    """A JSON escape of a lone surrogate ("\\ud800") decodes to a str the tokenizer cannot encode:
    a UnicodeEncodeError traceback from tokenizer training (a TypeError when reusing a tokenizer)."""
    f = tmp_path / "src" / "s.jsonl"
    f.parent.mkdir()
    lines = [json.dumps({"text": d}) for d in synthetic_docs(20)] + ['{"text": "bad \\ud800 here"}']
    f.write_text("\n".join(lines) + "\n")
    _fails(tmp_path, small_cfg([f]), r"s\.jsonl:21: field 'text' is not valid Unicode \(an unpaired surrogate")


@pytest.mark.parametrize("absolute", [False, True])
def test_out_is_the_current_folder(tmp_path, monkeypatch, absolute):
    """--out . in an empty folder was "error: .: Device or resource busy"; its absolute path
    swapped the dataset in under the process, whose working folder was then a deleted one."""
    import os

    f = write_corpus(tmp_path / "src" / "c.txt", synthetic_docs(30))
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    with pytest.raises(DataError, match="is the current folder"):
        prepare(small_cfg([f]), here if absolute else ".", progress=False)
    assert os.listdir(here) == [] and Path.cwd().samefile(here) and os.path.exists(os.getcwd())


@pytest.mark.parametrize("name", ["rows.json", "rows.csv", "rows.tsv.gz", "corpus.txt.bz2", "corpus.tar.gz"])
def test_formats_no_reader_parses_are_refused_not_read_as_text(tmp_path, name):
    # A .json or .csv file was read as plain text: the model trained on braces, quotes and field
    # names, and the manifest looked like any other.
    (tmp_path / name).write_text('{"text": "hello world"}\n' * 50)
    _fails(tmp_path, small_cfg([tmp_path / name]), rf"{re.escape(name)}: cramkit does not read \.\w+ files")


def test_a_folder_saved_with_save_to_disk_points_to_hf_disk(tmp_path):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "data-00000-of-00001.arrow").write_bytes(b"\x00\x01" * 100)
    (folder / "state.json").write_text("{}")
    _fails(tmp_path, small_cfg([folder]), "source .*saved.*: .*arrow files; .*hf-disk:")


def test_a_data_dir_that_does_not_exist_is_not_called_an_unprepared_dataset(tmp_path, monkeypatch):
    """A recipe's `data.dir = "prepared/x"`, relative to the working directory (not the recipe),
    run from another folder: "prepared/x: not a prepared dataset (no manifest.json; run cramkit
    prepare)" sent the user to prepare data that exists elsewhere."""
    from cramkit.data.dataset import TokenDataset

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"^prepared/x: no such folder in the working directory, "
                                        rf"{re.escape(str(tmp_path))}$"):
        TokenDataset.open("prepared/x")
    (tmp_path / "empty").mkdir()  # a folder without a manifest is still that
    with pytest.raises(DataError, match=r"^empty: not a prepared dataset \(no manifest\.json"):
        TokenDataset.open("empty")
