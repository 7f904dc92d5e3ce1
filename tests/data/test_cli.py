"""``cramkit prepare`` through the data CLI's parser (the main cli.py may not exist yet)."""

from __future__ import annotations

import argparse
import json

from data_helpers import synthetic_docs, write_corpus

from cramkit.data.cli import add_parser, config_from_args


def _parse(argv):
    parser = argparse.ArgumentParser(prog="cramkit")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_prepare_cli_flags_overrides_reuse_and_conflict(tmp_path, capsys):
    src = write_corpus(tmp_path / "c.txt", synthetic_docs(80))
    out = tmp_path / "data"
    argv = [
        "prepare",
        str(src),
        "--out",
        str(out),
        "--vocab-size",
        "200",
        "--seq-len",
        "48",
        "--val-fraction",
        "0.1",
        "--objective",
        "clm",
        "--tokenizer",
        "bpe",
        "min_frequency=1",
        "ordering=source",
        "--no-progress",
    ]
    args = _parse(argv)
    assert args.func(args) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["seq_len"] == 48 and m["objective"] == "clm" and m["config"]["ordering"] == "source"
    assert m["config"]["vocab_size"] == 200 and m["tokenizer_kind"] == "bpe"
    capsys.readouterr()
    args = _parse(argv)
    assert args.func(args) == 0
    assert "reusing" in capsys.readouterr().err
    args = _parse([*argv, "seq_len=64"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--force" in err
    args = _parse([*argv, "seq_len=64", "--force"])
    assert args.func(args) == 0
    assert json.loads((out / "manifest.json").read_text())["seq_len"] == 64


def test_prepare_cli_bad_key(tmp_path, capsys):
    args = _parse(["prepare", "--out", str(tmp_path / "d"), "seqlen=3"])
    assert args.func(args) == 2
    assert "did you mean 'seq_len'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_prepare_cli_sources_given_twice_is_an_error(tmp_path, capsys):
    # One list replaced the other: `prepare a.txt sources=[b.txt]` read b.txt alone.
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    args = _parse(["prepare", str(a), "--out", str(tmp_path / "d"), f"sources=[{b}]"])
    assert args.func(args) == 2
    assert capsys.readouterr().err == (f"error: sources given twice, as arguments ({a}) and as sources=[{b}]; "
                                       "list them all in one place\n")
    assert not (tmp_path / "d").exists()


def test_prepare_cli_reuse_tokenizer_file(tmp_path):
    src = write_corpus(tmp_path / "c.txt", synthetic_docs(40))
    a = _parse(
        [
            "prepare",
            str(src),
            "--out",
            str(tmp_path / "a"),
            "--vocab-size",
            "128",
            "min_frequency=1",
            "--no-progress",
        ]
    )
    assert a.func(a) == 0
    tok = tmp_path / "a" / "tokenizer.json"
    b = _parse(
        [
            "prepare",
            str(src),
            "--out",
            str(tmp_path / "b"),
            "--tokenizer",
            str(tok),
            "--no-progress",
        ]
    )
    assert b.func(b) == 0
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == tok.read_bytes()


def test_prepare_cli_misspelt_tokenizer_kind(tmp_path, capsys):
    # Was taken for a tokenizer file: "error: tokenizer_file 'wordpeice': no such file".
    src = write_corpus(tmp_path / "c.txt", synthetic_docs(5))
    args = _parse(["prepare", str(src), "--out", str(tmp_path / "d"), "--tokenizer", "wordpeice"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err == ("error: --tokenizer 'wordpeice': unknown tokenizer kind (did you mean 'wordpiece'?); "
                   "use auto, wordpiece, bpe or the path of a tokenizer.json\n")
    assert not (tmp_path / "d").exists()


def test_prepare_cli_source_paths_with_an_equals_sign(tmp_path, monkeypatch):
    # Hive-style partition folders (lang=en/) were taken for key=value options: "unknown config
    # key 'data/lang'".
    monkeypatch.chdir(tmp_path)
    part = tmp_path / "data" / "lang=en"
    write_corpus(part / "part-0.txt", synthetic_docs(5))
    write_corpus(tmp_path / "seed=1", synthetic_docs(5))
    args = _parse(["prepare", str(part), "data/lang=en/part-0.txt", "seed=1", "seq_len=48",
                   "--out", str(tmp_path / "d")])
    cfg = config_from_args(args)
    assert cfg.sources == [str(part), "data/lang=en/part-0.txt", "seed=1"]
    assert cfg.seq_len == 48 and cfg.seed == 0


def test_prepare_cli_hub_specs_with_config_and_revision_are_sources():
    """``hf:NAME@REV:CONFIG:SPLIT`` holds neither ',' nor '=': a positional argument is a source,
    and an item of ``sources=[...]`` stays whole."""
    specs = ["hf:wikitext:wikitext-103-raw-v1:train", "hf:allenai/c4@1588ec4:en:validation",
             "hf:org/corpus@refs/convert/parquet"]
    cfg = config_from_args(_parse(["prepare", *specs, "seq_len=48", "--out", "d"]))
    assert cfg.sources == specs and cfg.seq_len == 48
    cfg = config_from_args(_parse(["prepare", f"sources=[{','.join(specs)}]", "--out", "d"]))
    assert cfg.sources == specs
