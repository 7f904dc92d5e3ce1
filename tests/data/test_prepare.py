"""prepare(): exact token accounting, split disjointness, manifest, reuse, packing layouts."""

from __future__ import annotations

import json

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
    changed = cfg.replace(seq_len=64)
    with pytest.raises(DataError, match=r"seq_len=32 \(now 64\).*--force"):
        prepare(changed, out, progress=False)
    assert (out / "manifest.json").read_text() == before
    prepare(changed, out, force=True, progress=False)
    assert json.loads((out / "manifest.json").read_text())["seq_len"] == 64
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_changed_input_is_detected(tmp_path):
    src = write_corpus(tmp_path / "c.txt", synthetic_docs(60))
    out = prepare(small_cfg([src]), tmp_path / "d", progress=False)
    write_corpus(src, synthetic_docs(61))
    with pytest.raises(DataError, match="other input files"):
        prepare(small_cfg([src]), out, progress=False)


def test_cached_prepare_keys_by_fingerprint(tmp_path, synth_corpus):
    a = cached_prepare(small_cfg([synth_corpus]), tmp_path, progress=False)
    b = cached_prepare(small_cfg([synth_corpus]), tmp_path, progress=False)
    c = cached_prepare(small_cfg([synth_corpus], seq_len=16), tmp_path, progress=False)
    assert a == b != c and a.name.startswith("mlm-")


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


def test_orderings(tmp_path, synth_corpus):
    def train_stream(ordering):
        cfg = small_cfg([synth_corpus], ordering=ordering, val_fraction=0.0, objective="clm")
        ds = TokenDataset.open(prepare(cfg, tmp_path / ordering, progress=False))
        return ds, _content_stream(ds, "train")

    ds_src, src = train_stream("source")
    _, rnd = train_stream("random")
    ds_cur, cur = train_stream("curriculum")
    assert len(src) == len(rnd) == len(cur)
    assert not np.array_equal(src, rnd) and np.array_equal(np.sort(src), np.sort(rnd))
    # Curriculum: documents by ascending tokens per sentence.
    tok = ds_cur.load_tokenizer()
    eod = ds_cur.special_ids["eod"]
    seqs = ds_cur.sequences("train")[np.arange(ds_cur.num_sequences("train"))].ravel()
    keys = []
    for piece in np.split(seqs, np.flatnonzero(seqs == eod) + 1):
        piece = piece[piece != eod]
        piece = piece[piece != ds_cur.special_ids["pad"]]
        if len(piece):
            text = tok.decode(piece.tolist())
            ends = sum(text.count(c) for c in ".!?")
            keys.append(len(piece) / max(1, ends))
    assert keys == sorted(keys)


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
