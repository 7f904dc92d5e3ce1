"""prepare(): exact token accounting, split disjointness, manifest, reuse, packing layouts."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from data_helpers import small_cfg, synthetic_docs, write_corpus

from cramkit.data.dataset import TokenDataset
from cramkit.data.prepare import cached_prepare, prepare
from cramkit.errors import DataError


def _docs_of(path) -> list[str]:
    return [d.strip("\n") for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]


def _content_stream(ds: TokenDataset, split: str) -> np.ndarray:
    specials = [v for v in ds.special_ids.values() if v is not None]
    seqs = ds.sequences(split)[np.arange(ds.num_sequences(split))].ravel()
    return seqs[~np.isin(seqs, specials)]


def _check_reconstruction(ds: TokenDataset, cfg, docs: list[str]) -> None:
    """Every kept document appears exactly once, whole, in exactly one split, in source order."""
    tok = ds.load_tokenizer()
    # Normalisation lives in the saved tokenizer, so encoding the raw text applies it.
    assert (tok.normalizer is not None) == any(cfg.normalisation().values())
    texts = [d for d in docs if len(d) >= cfg.min_chars]
    encoded = tok.encode_batch_fast(texts, add_special_tokens=False)
    seen, kept = set(), []
    for text, enc in zip(texts, encoded):
        if tuple(enc.ids) not in seen:  # exact duplicates of the normalised, tokenized text
            seen.add(tuple(enc.ids))
            kept.append((text, np.asarray(enc.ids)))
    train, val = _content_stream(ds, "train"), _content_stream(ds, "val")
    assert len(train) + len(val) == sum(len(ids) for _, ids in kept)
    pos = {"train": 0, "val": 0}
    streams = {"train": train, "val": val}
    split_of = {}
    for text, ids in kept:
        for split in ("train", "val"):
            s, p = streams[split], pos[split]
            if np.array_equal(s[p : p + len(ids)], ids):
                pos[split] += len(ids)
                split_of[text] = split
                break
        else:
            raise AssertionError("a document is missing from both splits")
    assert pos == {"train": len(train), "val": len(val)}
    val_texts = {t for t, s in split_of.items() if s == "val"}
    train_texts = {t for t, s in split_of.items() if s == "train"}
    assert val_texts and not (val_texts & train_texts)
    assert len(val_texts) == ds.manifest["splits"]["val"]["docs"]


def _check_accounting(ds: TokenDataset) -> None:
    for split, info in ds.manifest["splits"].items():
        view = ds.sequences(split)
        assert view.shape == (info["sequences"], ds.seq_len)
        assert info["tokens"] == view.shape[0] * view.shape[1]
        assert info["tokens"] == (
            info["content_tokens"]
            + info["separator_tokens"]
            + info["framing_tokens"]
            + info["pad_tokens"]
            - info["dropped_tokens"]
        )
        arr = view[np.arange(len(view))]
        assert int((arr == ds.special_ids["pad"]).sum()) == info["pad_tokens"]


@pytest.mark.shared_data
def test_enwiki_slice_token_count_and_disjoint_splits(enwiki_slice, tmp_path):
    cfg = small_cfg(
        [enwiki_slice],
        vocab_size=2048,
        seq_len=128,
        val_fraction=0.05,
        lowercase=True,
        strip_accents=True,
        min_chars=200,
    )
    ds = TokenDataset.open(prepare(cfg, tmp_path / "d", progress=False))
    docs = _docs_of(enwiki_slice)
    assert len(docs) == 200
    _check_reconstruction(ds, cfg, docs)
    _check_accounting(ds)
    stats = ds.manifest["filter_stats"]
    assert stats["read"]["docs"] == 200
    assert stats["kept"]["docs"] + stats["too_short"]["docs"] + stats["duplicate"]["docs"] == 200
    kept_tokens = sum(ds.manifest["splits"][s]["content_tokens"] for s in ("train", "val"))
    assert kept_tokens == stats["kept"]["tokens"]


@pytest.mark.parametrize("objective", ["mlm", "clm"])
@pytest.mark.parametrize("last", ["pad", "drop"])
def test_synthetic_reconstruction(tmp_path, synth_corpus, objective, last):
    cfg = small_cfg([synth_corpus], objective=objective, last_sequence=last, shard_tokens=512)
    ds = TokenDataset.open(prepare(cfg, tmp_path / "d", progress=False))
    _check_accounting(ds)
    if last == "pad":  # with dropping, the tail is missing by design; accounting covers it
        _check_reconstruction(ds, cfg, _docs_of(synth_corpus))
    assert len(ds.manifest["splits"]["train"]["shards"]) > 1


def test_mlm_framing_and_clm_separators(tmp_path, synth_corpus):
    ds = TokenDataset.open(prepare(small_cfg([synth_corpus]), tmp_path / "m", progress=False))
    ids = ds.special_ids
    seqs = ds.sequences("train")[np.arange(ds.num_sequences("train"))]
    assert (seqs[:, 0] == ids["cls"]).all() and (seqs[:, -1] == ids["sep"]).all()
    assert ids["eod"] is None and ids["mask"] is not None
    # [SEP] only *between* documents: none before the first, so the [SEP]s are one per
    # sequence's frame plus docs - 1 separators.
    train = ds.manifest["splits"]["train"]
    assert seqs[0, 1] != ids["sep"]
    assert train["separator_tokens"] == train["docs"] - 1
    assert int((seqs == ids["sep"]).sum()) == len(seqs) + train["docs"] - 1
    cfg = small_cfg([synth_corpus], objective="clm")
    ds = TokenDataset.open(prepare(cfg, tmp_path / "c", progress=False))
    seqs = ds.sequences("train")[np.arange(ds.num_sequences("train"))]
    assert int((seqs == ds.special_ids["eod"]).sum()) == ds.manifest["splits"]["train"]["docs"]
    assert ds.special_ids["cls"] is None


def test_manifest_fields(synth_mlm):
    ds = TokenDataset.open(synth_mlm)
    m = ds.manifest
    assert m["vocab_size"] % 64 == 0 and m["vocab_size"] >= m["tokenizer_vocab_size"] == 256
    assert m["dtype"] == "uint16" and m["seq_len"] == 32
    assert m["config"]["seq_len"] == 32 and len(m["fingerprint"]) == 64
    assert m["inputs"][0][1][0][1] > 0  # (path, size, mtime) of the input file
    for shard in m["splits"]["train"]["shards"]:
        assert {"file", "sequences", "shape", "sha256"} <= set(shard)
    ds.verify()
    assert ds.tokenizer_path.name == "tokenizer.json"


def test_tokenizer_loads_in_transformers(synth_mlm):
    transformers = pytest.importorskip("transformers")
    ds = TokenDataset.open(synth_mlm)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ds.tokenizer_path))
    out = fast("Kalo mine ruta.")["input_ids"]
    assert out[0] == ds.special_ids["cls"] and out[-1] == ds.special_ids["sep"]
    assert fast.convert_tokens_to_ids("[MASK]") == ds.special_ids["mask"]


def test_reuse_conflict_and_force(tmp_path, synth_corpus, capsys):
    cfg = small_cfg([synth_corpus])
    out = prepare(cfg, tmp_path / "d", progress=False)
    before = (out / "manifest.json").read_text()
    prepare(cfg, out, progress=False)
    assert "reusing" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as env:  # another GPU's process of this machine under torchrun
        env.setenv("LOCAL_RANK", "1")
        env.delenv("TORCHELASTIC_RUN_ID", raising=False)
        env.delenv("WORLD_SIZE", raising=False)
        prepare(cfg, out, progress=False)  # a LOCAL_RANK left in a shell, outside torchrun: it reports
        assert "reusing" in capsys.readouterr().err
        env.setenv("TORCHELASTIC_RUN_ID", "x")
        prepare(cfg, out, progress=False)
    assert capsys.readouterr().err == ""
    changed = cfg.replace(seq_len=64)
    with pytest.raises(DataError, match=r"seq_len=32 \(now 64\).*--force"):
        prepare(changed, out, progress=False)
    assert (out / "manifest.json").read_text() == before
    prepare(changed, out, force=True, progress=False)
    assert json.loads((out / "manifest.json").read_text())["seq_len"] == 64
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


@pytest.mark.parametrize("damage, named", [
    (lambda out: (out / "tokenizer.json").unlink(), r"tokenizer.json: missing \(the dataset's tokenizer\)"),
    (lambda out: (out / "tokenizer.json").write_bytes(b"\x89garbage"),
     r"tokenizer.json is not the tokenizer this data was encoded with"),
    (lambda out: _truncate(out / "train-00000.bin"), r"train-00000.bin: missing or truncated shard"),
    (lambda out: (out / "val-00000.bin").unlink(), r"val-00000.bin: missing or truncated shard"),
    (lambda out: (out / "manifest.json").write_text(json.dumps(
        {k: v for k, v in json.loads((out / "manifest.json").read_text()).items() if k != "splits"})),
     r"manifest.json: damaged manifest \(no splits\)"),
    (lambda out: (out / "manifest.json").write_text(json.dumps(
        {**json.loads((out / "manifest.json").read_text()), "seq_len": "long"})),
     r"manifest.json: damaged manifest \(ValueError: "),
])
def test_a_damaged_dataset_of_the_same_inputs_is_prepared_again_not_reused(tmp_path, synth_corpus, damage, named):
    """Reused, a dataset with a missing or truncated file failed every run that read it, whose
    error says to prepare it again, and preparing it again (a cache entry: every run) reused it."""
    cfg = small_cfg([synth_corpus])
    out = prepare(cfg, tmp_path / "d", progress=False)
    tokens = TokenDataset.open(out).sequences("train")[:]
    damage(out)
    with pytest.warns(UserWarning, match=f"{named}.*; preparing it again"):
        prepare(cfg, out, progress=False)
    again = TokenDataset.open(out)
    again.check_tokenizer()
    np.testing.assert_array_equal(again.sequences("train")[:], tokens)
    assert len(again.sequences("val")) > 0 and sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_changed_input_is_detected(tmp_path):
    src = write_corpus(tmp_path / "c.txt", synthetic_docs(60))
    out = prepare(small_cfg([src]), tmp_path / "d", progress=False)
    write_corpus(src, synthetic_docs(61))
    with pytest.raises(DataError, match="other input files"):
        prepare(small_cfg([src]), out, progress=False)


def test_data_of_an_older_format_is_named_as_such(tmp_path, synth_corpus):
    """Same options, older cramkit: the fingerprint differs (what the options produce changed),
    and the refusal must say so rather than blame the input files."""
    cfg = small_cfg([synth_corpus])
    out = prepare(cfg, tmp_path / "d", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(format_version=1, fingerprint="0" * 64)
    (out / "manifest.json").write_text(json.dumps(manifest))
    from cramkit.data.prepare import FORMAT_VERSION

    with pytest.raises(DataError, match=f"older cramkit .data format 1, now {FORMAT_VERSION}"):
        prepare(cfg, out, progress=False)


def test_cached_prepare_keys_by_fingerprint(tmp_path, synth_corpus):
    a = cached_prepare(small_cfg([synth_corpus]), tmp_path, progress=False)
    b = cached_prepare(small_cfg([synth_corpus]), tmp_path, progress=False)
    c = cached_prepare(small_cfg([synth_corpus], seq_len=16), tmp_path, progress=False)
    assert a == b != c and a.name.startswith("mlm-")


def test_options_that_cannot_change_the_output_reuse_the_data(tmp_path, synth_corpus, capsys):
    # batch_docs (an encoding batch size), or vocab_size next to a reused tokenizer_file, made
    # prepare refuse the folder ("prepared from other options: batch_docs=256 (now 64)") and
    # pretraining prepare its cache entry again.
    cfg = small_cfg([synth_corpus])
    out = prepare(cfg, tmp_path / "d", progress=False)
    for same in (cfg.replace(batch_docs=7), cfg.replace(order_buffer_tokens=100)):
        assert prepare(same, out, progress=False) == out
    tok = str(out / "tokenizer.json")
    reused = prepare(cfg.replace(tokenizer_file=tok), tmp_path / "r", progress=False)
    again = cfg.replace(tokenizer_file=tok, vocab_size=999, min_frequency=3, tokenizer_sample_mb=1.0)
    assert prepare(again, reused, progress=False) == reused
    assert capsys.readouterr().err.count("reusing") == 3
    for other in (cfg.replace(ordering="random", order_buffer_tokens=100), cfg.replace(vocab_size=200)):
        with pytest.raises(DataError, match="other options"):
            prepare(other, out, progress=False)
    # Options at their defaults hash as before, so existing datasets and cache entries stay valid.
    import hashlib

    from cramkit.data.prepare import FORMAT_VERSION, fingerprint
    from cramkit.data.sources import open_sources, sources_fingerprint

    blob = json.dumps({"format": FORMAT_VERSION, "config": cfg.to_dict(),
                       "inputs": sources_fingerprint(open_sources(cfg))}, sort_keys=True)
    assert fingerprint(cfg) == hashlib.sha256(blob.encode()).hexdigest()


def test_filters_dedup_min_chars_and_compressibility(tmp_path):
    docs = synthetic_docs(80)
    docs += [docs[3], docs[5].upper(), "tiny", "x7 q9 z3 j2 w8 k1 v5 b4 m6 p0 " * 3]
    src = write_corpus(tmp_path / "c.txt", docs)
    cfg = small_cfg([src], lowercase=True, min_chars=10, max_token_ratio=0.6)
    ds = TokenDataset.open(prepare(cfg, tmp_path / "d", progress=False))
    s = ds.manifest["filter_stats"]
    assert s["duplicate"]["docs"] == 2  # exact copy and the upper-cased copy after lowercasing
    assert s["too_short"]["docs"] == 1 and s["too_short"]["tokens"] > 0
    assert s["compressibility"]["docs"] >= 1
    assert s["kept"]["docs"] == 84 - 2 - 1 - s["compressibility"]["docs"]


def test_compressibility_counts_characters_of_the_normalised_text(tmp_path):
    """Under ascii_only a Chinese article folds to a few digits and commas: a handful of tokens
    over 340 raw characters looked compressible (0.03) and was kept, although cramming's
    tokenizer-on-raw-text ratio drops it. Over the normalised characters it is dropped; one that
    folds to nothing has no tokens and is dropped as empty. min_chars still counts source text."""
    chinese = "".join(chr(0x4E00 + (i * 37) % 2000) for i in range(325))
    junk = f"2015年{chinese[:100]}，12月{chinese[100:200]}，第3{chinese[200:]}。"
    blank_a, blank_b = chinese, chinese[::-1]  # nothing ASCII at all; distinct documents
    docs = synthetic_docs(60) + [junk, blank_a, blank_b]
    src = write_corpus(tmp_path / "c.txt", docs)
    cfg = small_cfg([src], ascii_only=True, min_chars=20, max_token_ratio=0.25, val_fraction=0.0,
                    vocab_size=640)
    ds = TokenDataset.open(prepare(cfg, tmp_path / "d", progress=False))
    s = ds.manifest["filter_stats"]
    assert s["compressibility"]["docs"] == 1 and s["compressibility"]["chars"] == len(junk)
    assert s["empty"]["docs"] == 2 and s["empty"]["tokens"] == 0
    assert s["too_short"]["docs"] == 0  # 340 source characters, though only ~15 survive folding
    assert s["kept"]["docs"] == 60
    # Junk so filtered also leaves no trace in the shards: no document of digits and commas.
    tok = ds.load_tokenizer()
    assert "2015" not in tok.decode(_train_rows(ds).ravel().tolist())


def test_compressibility_keeps_a_document_the_exact_length_clears_when_the_floor_cannot(tmp_path):
    """Collapsing whitespace, the cheap floor of the normalised length is 0 (runs of spaces
    shrink): every document then needs the exact count, and only the junk is above the ratio.
    min_chars keeps a document of exactly that many characters ("fewer than" drops)."""
    import random
    import string

    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + "#$%&*+/<=>@^~"
    junk = ["".join(rng.choice(alphabet) for _ in range(200)) for _ in range(10)]  # ~1 token a character
    normal = synthetic_docs(40)  # under 0.4 tokens a character
    src = write_corpus(tmp_path / "c.txt", normal + junk)
    cfg = small_cfg([src], collapse_whitespace=True, max_token_ratio=0.6, min_chars=min(map(len, normal)))
    s = TokenDataset.open(prepare(cfg, tmp_path / "d", progress=False)).manifest["filter_stats"]
    assert s["compressibility"]["docs"] == 10 and s["compressibility"]["chars"] == 2000
    assert s["too_short"]["docs"] == 0
    assert s["kept"]["docs"] == 40


def test_empty_documents_are_dropped_without_the_filter(tmp_path, capsys):
    src = write_corpus(tmp_path / "c.txt", synthetic_docs(20) + ["日本語の文書", "中文文档"])
    cfg = small_cfg([src], ascii_only=True, val_fraction=0.0)
    ds = TokenDataset.open(prepare(cfg, tmp_path / "d", progress=False))
    assert ds.manifest["filter_stats"]["empty"]["docs"] == 2
    assert ds.manifest["splits"]["train"]["docs"] == 20
    assert "removed: empty 2 docs / 0 tokens" in capsys.readouterr().err


def test_random_ordering_permutes_documents(tmp_path, synth_corpus):
    def train_stream(ordering):
        cfg = small_cfg([synth_corpus], ordering=ordering, val_fraction=0.0, objective="clm")
        return _content_stream(TokenDataset.open(prepare(cfg, tmp_path / ordering, progress=False)), "train")

    src, rnd = train_stream("source"), train_stream("random")
    assert len(src) == len(rnd)
    assert not np.array_equal(src, rnd) and np.array_equal(np.sort(src), np.sort(rnd))


def _train_rows(ds: TokenDataset, split: str = "train") -> np.ndarray:
    return ds.sequences(split)[np.arange(ds.num_sequences(split))]


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_curriculum_sorts_all_training_sequences_globally(tmp_path, objective, monkeypatch):
    """cramming's sentence-length curriculum: every packed training sequence, across shards and
    far more tokens than order_buffer_tokens, by descending count of '.' tokens (ties in packed
    order); the same sequences as the unsorted preparation, the validation split untouched."""
    from cramkit.data import curriculum

    monkeypatch.setattr(curriculum, "_BLOCK_ROWS", 7)  # several blocks on a tiny corpus
    src = write_corpus(tmp_path / "c.txt", synthetic_docs(300))
    base = dict(objective=objective, shard_tokens=600, order_buffer_tokens=200)
    plain = prepare(small_cfg([src], ordering="source", **base), tmp_path / "source", progress=False)
    tok_file = str(plain / "tokenizer.json")  # WordPiece training is not reproducible: share it
    plain = prepare(small_cfg([src], ordering="source", tokenizer_file=tok_file, **base),
                    tmp_path / "source2", progress=False)
    sorted_dir = prepare(small_cfg([src], ordering="curriculum", tokenizer_file=tok_file, **base),
                         tmp_path / "curriculum", progress=False)
    ds_plain, ds = TokenDataset.open(plain), TokenDataset.open(sorted_dir)
    ds.verify()
    _check_accounting(ds)
    assert len(ds.manifest["splits"]["train"]["shards"]) > 2
    assert not any(p.name.startswith("unsorted") for p in sorted_dir.iterdir())

    dot = ds.load_tokenizer().token_to_id(".")
    rows, plain_rows = _train_rows(ds), _train_rows(ds_plain)
    keys, plain_keys = (rows == dot).sum(axis=1), (plain_rows == dot).sum(axis=1)
    assert len(set(keys.tolist())) > 2  # a corpus with something to sort
    assert (np.diff(keys) <= 0).all(), "not one descending run over the whole split"
    # Exactly the stable descending permutation of the packed order.
    expected = plain_rows[np.argsort(-plain_keys, kind="stable")]
    assert np.array_equal(rows, expected)
    assert np.array_equal(_train_rows(ds, "val"), _train_rows(ds_plain, "val"))
    order = ds.manifest["train_order"]
    assert order["ordering"] == "curriculum" and order["key_first"] == keys.max()
    assert "curriculum_sorting.py" in order["reference"]


def test_failed_curriculum_sort_leaves_nothing(tmp_path, synth_corpus, monkeypatch):
    from cramkit.data import curriculum

    class Failing(curriculum.SequenceView):
        calls = 0

        def __getitem__(self, index):
            Failing.calls += 1
            if Failing.calls > 2:
                raise OSError("No space left on device")
            return super().__getitem__(index)

    monkeypatch.setattr(curriculum, "_BLOCK_ROWS", 5)
    monkeypatch.setattr(curriculum, "SequenceView", Failing)
    corpus = tmp_path / "in" / "c.txt"
    corpus.parent.mkdir()
    corpus.write_bytes(synth_corpus.read_bytes())
    with pytest.raises(OSError, match="No space"):
        prepare(small_cfg([corpus], ordering="curriculum"), tmp_path / "out" / "d", progress=False)
    assert Failing.calls == 3  # it failed part-way through writing the sorted shards
    assert not (tmp_path / "out").exists()  # nor the folder it created for d


def test_val_split_at_least_one_document(tmp_path):
    src = write_corpus(tmp_path / "c.txt", synthetic_docs(12))
    cfg = small_cfg([src], val_fraction=0.001)
    ds = TokenDataset.open(prepare(cfg, tmp_path / "d", progress=False))
    assert ds.manifest["splits"]["val"]["docs"] == 1
    assert ds.manifest["splits"]["train"]["docs"] == 11


def test_weights_repeat_into_train_only(tmp_path):
    a = write_corpus(tmp_path / "a.txt", synthetic_docs(30, seed=1))
    b = write_corpus(tmp_path / "b.txt", synthetic_docs(30, seed=2))
    cfg = small_cfg([a, b], weights=[2.0, 0.5], val_fraction=0.0)
    ds = TokenDataset.open(prepare(cfg, tmp_path / "d", progress=False))
    s = ds.manifest["filter_stats"]
    assert 5 <= s["weight_zero"]["docs"] <= 25
    assert s["repeated"]["docs"] == 30
    assert ds.manifest["splits"]["train"]["docs"] == s["kept"]["docs"] + 30


def test_progress_bar_on_request_only(tmp_path, synth_corpus, capsys):
    prepare(small_cfg([synth_corpus]), tmp_path / "a", progress=True)
    err = capsys.readouterr().err
    assert "prepare:" in err and "docs=" in err and "B/s" in err
    prepare(small_cfg([synth_corpus]), tmp_path / "b", progress=None)  # stderr is not a TTY
    assert "docs=" not in capsys.readouterr().err


def test_compressibility_floor_applies_to_the_tokenizer_prepare_trains(tmp_path, synth_corpus):
    """The cheap floor (data.tokenizer.normalised_length) is only used for cramkit's own
    normalisers; the tokenizer prepare trains and saves must still be recognised as one, or every
    document is normalised a second time."""
    from cramkit.data.tokenizer import encoding_copy, load_tokenizer, normalised_length

    cfg = small_cfg([synth_corpus], lowercase=True, ascii_only=True)
    out = prepare(cfg, tmp_path / "d", progress=False)
    encoder = encoding_copy(load_tokenizer(str(out / "tokenizer.json")))
    floor, exact = normalised_length(encoder.normalizer, cfg)
    assert floor("Fine Text") == exact("Fine Text") == 9


def test_runs_that_need_the_same_cached_data_at_once_prepare_it_once(tmp_path, synth_corpus, monkeypatch):
    """A sweep's runs start together: without a lock each prepared the same data, and all but
    one then failed at the final rename. The second waits (and says so), then reuses it."""
    import threading

    import cramkit.data.prepare as prep

    cfg = small_cfg([synth_corpus])
    waiting, builds, results = threading.Event(), [], {}
    real_build, real_log = prep._build, prep._log

    def log(msg):
        if msg.startswith("waiting for another process preparing"):
            waiting.set()
        real_log(msg)

    def second():
        results["second"] = cached_prepare(cfg, tmp_path, progress=False)

    def build(*args, **kwargs):
        builds.append(1)
        if len(builds) == 1:  # the first, holding the lock, lets the second run into it
            threading.Thread(target=second).start()
            assert waiting.wait(60), "the second caller did not wait for the lock"
        return real_build(*args, **kwargs)

    monkeypatch.setattr(prep, "_log", log)
    monkeypatch.setattr(prep, "_build", build)
    results["first"] = cached_prepare(cfg, tmp_path, progress=False)
    for t in threading.enumerate():
        if t is not threading.current_thread() and t.name.startswith("Thread"):
            t.join(60)
    assert builds == [1] and results["second"] == results["first"]
    assert TokenDataset.open(results["second"]).manifest["fingerprint"]


def test_a_reused_tokenizer_with_unused_ids_sizes_vocab_and_dtype_by_its_largest_id(tmp_path):
    # The vocabulary was sized by the token count: id 70000 of a 9-token tokenizer went into
    # uint16 shards as 4464 (wrapped), beyond the model's 64 embedding rows.
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "ka": 5, "lo": 6, ".": 7,
             "mi": 70_000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.save(str(tmp_path / "tok.json"))
    corpus = write_corpus(tmp_path / "c.txt", ["ka lo mi. mi ka", "lo lo mi", "mi mi ka lo"] * 4)
    out = prepare(small_cfg([corpus], tokenizer_file=str(tmp_path / "tok.json"), seq_len=8, dedup=False),
                  tmp_path / "out", progress=False)
    ds = TokenDataset.open(out)
    tokens = ds.sequences("train")[np.arange(ds.num_sequences("train"))]
    assert ds.tokenizer_vocab_size == 70_001 and ds.vocab_size == 70_016
    assert tokens.dtype == np.uint32 and tokens.max() == 70_000


def test_a_long_document_is_encoded_in_pieces_to_the_same_tokens(tmp_path, monkeypatch):
    # A file of one enormous line was encoded whole, and tokenizers keeps tens of bytes per
    # character of a text it encodes: a 10 MB line peaked at 1.3 GB.
    from cramkit.data import prepare as prepare_mod

    docs = synthetic_docs(60)
    long_doc = "  ".join(d.replace("\n", " ") for d in docs[5:])  # double spaces: no cut there
    corpus = write_corpus(tmp_path / "c.txt", [*docs[:5], long_doc])
    tok = str(prepare(small_cfg([corpus]), tmp_path / "first", progress=False) / "tokenizer.json")
    ref = prepare(small_cfg([corpus], tokenizer_file=tok), tmp_path / "ref", progress=False)
    encoded: list[int] = []

    class Spy:
        def __init__(self, encoder):
            self.encoder = encoder

        def __getattr__(self, name):
            return getattr(self.encoder, name)

        def encode_batch_fast(self, texts, **kwargs):
            encoded.extend(len(t) for t in texts)
            return self.encoder.encode_batch_fast(texts, **kwargs)

    real = prepare_mod.encoding_copy
    monkeypatch.setattr(prepare_mod, "encoding_copy", lambda t: Spy(real(t)))
    monkeypatch.setattr(prepare_mod, "PIECE_CHARS", 300)
    pieces = prepare(small_cfg([corpus], tokenizer_file=tok), tmp_path / "pieces", progress=False)
    assert len(long_doc) > 3000 and max(encoded) <= 300
    files = sorted(p.name for p in ref.glob("*.bin"))
    assert files and files == sorted(p.name for p in pieces.glob("*.bin"))
    assert all((ref / f).read_bytes() == (pieces / f).read_bytes() for f in files)


def test_the_tokenizer_sample_stops_at_its_size_inside_a_document_and_comes_in_pieces(monkeypatch):
    from cramkit.data import tokenizer as tokenizer_mod

    monkeypatch.setattr(tokenizer_mod, "PIECE_CHARS", 100)
    sample = list(tokenizer_mod._bounded_sample(["ab " * 1000, "never read"], 1000))
    assert "".join(sample) == ("ab " * 1000)[:1000] and max(map(len, sample)) <= 100


def test_a_reused_tokenizers_own_padding_and_truncation_do_not_reach_the_shards(synth_corpus, tmp_path):
    """A tokenizer.json that pads and truncates (sentence-transformers files do) packs the same
    tokens as the one without: no [PAD] ids as text, no document cut at its max_length."""
    from tokenizers import Tokenizer

    plain = prepare(small_cfg([synth_corpus]), tmp_path / "plain", progress=False)
    tok = Tokenizer.from_file(str(plain / "tokenizer.json"))
    tok.enable_padding(length=48)
    tok.enable_truncation(max_length=6)
    tok.save(str(tmp_path / "padding.json"))
    reused = prepare(small_cfg([synth_corpus], tokenizer_file=str(tmp_path / "padding.json")), tmp_path / "r",
                     progress=False)
    a, b = TokenDataset.open(plain), TokenDataset.open(reused)
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(a.sequences(split)), np.asarray(b.sequences(split)))


def test_a_missing_tokenizer_file_is_named_on_the_cached_path_too(tmp_path, monkeypatch):
    """A run's data (a recipe's `tokenizer_file = "tok.json"`) is prepared through the cache,
    whose fingerprint hashed the file first: "tok.json: No such file or directory", with no key
    and no word that a relative path is read from the working directory."""
    src = write_corpus(tmp_path / "c.txt", synthetic_docs(5))
    monkeypatch.chdir(tmp_path)
    for make in (lambda cfg: cached_prepare(cfg, tmp_path / "cache"), lambda cfg: prepare(cfg, tmp_path / "d")):
        with pytest.raises(DataError, match=rf"^tokenizer_file 'tok\.json': no such file in the working "
                                            rf"directory, {re.escape(str(tmp_path))}$"):
            make(small_cfg([src], tokenizer_file="tok.json"))
