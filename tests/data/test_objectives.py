"""Objectives: MLM masking statistics and determinism, CLM labels at document boundaries."""

from __future__ import annotations

import pytest
import torch

from cramkit.data.dataset import TokenDataset
from cramkit.data.loader import ShardLoader
from cramkit.errors import ConfigError, DataError
from cramkit.objectives import IGNORE_INDEX, OBJECTIVES, build_objective


def test_registry():
    assert set(OBJECTIVES) >= {"mlm", "clm"}
    with pytest.raises(ConfigError, match="did you mean 'mlm'"):
        build_objective("mlmm", None)


def test_mlm_rates_and_special_tokens(synth_mlm):
    ds = TokenDataset.open(synth_mlm)
    mlm = build_objective("mlm", ds, mask_rate=0.15, seed=1)
    loader = ShardLoader(ds, "train", 64, epochs=None, transform=mlm, prefetch=0)
    ids = ds.special_ids
    specials = torch.tensor([v for v in ids.values() if v is not None])
    n_cand = n_sel = n_mask = n_rand = n_keep = 0
    for _ in range(30):
        tokens_batch = next(loader)
        inputs, labels = tokens_batch["input_ids"], tokens_batch["labels"]
        selected = labels != IGNORE_INDEX
        original = torch.where(selected, labels, inputs)
        is_special = torch.isin(original, specials)
        assert not (selected & is_special).any()
        assert torch.equal(inputs[is_special], original[is_special])
        n_cand += int((~is_special).sum())
        n_sel += int(selected.sum())
        n_mask += int((selected & (inputs == ids["mask"])).sum())
        n_keep += int((selected & (inputs == labels)).sum())
        changed = selected & (inputs != ids["mask"]) & (inputs != labels)
        n_rand += int(changed.sum())
        assert (inputs[changed] < ds.tokenizer_vocab_size).all()
        assert not torch.isin(inputs[changed], specials).any()
    rate = n_sel / n_cand
    # ~60k candidates: the std of the rate is ~0.0015; allow > 4 sigma.
    assert abs(rate - 0.15) < 0.007, rate
    # A random replacement equal to the original counts as "kept": p(keep) = 0.1 + 0.1/|pool|.
    assert abs(n_mask / n_sel - 0.8) < 0.02
    assert abs(n_rand / n_sel - 0.1) < 0.015
    assert abs(n_keep / n_sel - 0.1) < 0.015


def test_mlm_deterministic_per_sequence_id_and_fixed_mode(synth_mlm):
    ds = TokenDataset.open(synth_mlm)
    tokens = torch.from_numpy(ds.sequences("train")[[0, 1, 2, 3]].astype("int64"))
    mlm = build_objective("mlm", ds, seed=7)
    ids = torch.tensor([5, 6, 7, 8])
    a, b, c = mlm(tokens, ids), mlm(tokens, 5), mlm(tokens, ids + 100)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])  # int: first id
    assert not torch.equal(a["labels"], c["labels"])
    fixed = build_objective("mlm", ds, seed=7, fixed=True)
    assert torch.equal(fixed(tokens, 0)["labels"], fixed(tokens, 0)["labels"])
    assert not torch.equal(fixed(tokens, 0)["labels"], mlm(tokens, 0)["labels"])
    with pytest.raises(ValueError, match="3 sequence ids for a batch of 4"):
        mlm(tokens, ids[:3])


def test_validation_masks_follow_the_sequence_not_the_batch_it_is_evaluated_in(synth_mlm):
    """Fixed masks were drawn over a whole batch, so runs evaluating with micro-batches 256 and
    1024 scored the same validation split under different masks."""
    ds = TokenDataset.open(synth_mlm)
    rows = ds.sequences("train")
    tokens = torch.from_numpy(rows[torch.arange(150) % len(rows)].astype("int64"))
    fixed = build_objective("mlm", ds, seed=7, fixed=True)
    whole = fixed(tokens, 0)
    cuts = [0, 37, 100, 150]  # index: the first sequence's position
    parts = [fixed(tokens[a:b], a) for a, b in zip(cuts, cuts[1:])]
    for key in ("labels", "input_ids"):
        assert torch.equal(whole[key], torch.cat([p[key] for p in parts]))
    assert not torch.equal(fixed(tokens[4:8], 4)["labels"], fixed(tokens[4:8], 0)["labels"])


def _by_id(outs: list[tuple[torch.Tensor, dict]]) -> dict[int, tuple[list, list]]:
    return {int(i): (out["input_ids"][r].tolist(), out["labels"][r].tolist())
            for ids, out in outs for r, i in enumerate(ids)}


def test_a_sequences_mask_is_the_same_in_any_micro_batch_at_any_position(synth_mlm):
    """Training masks were drawn for the whole micro-batch from (seed, step * world_size + rank):
    a sequence was masked differently when the micro-batch size, the accumulation or the number
    of ranks changed. Now it depends on the sequence (and epoch) alone."""
    ds = TokenDataset.open(synth_mlm)
    mlm = build_objective("mlm", ds, seed=3)
    rows = torch.arange(16)
    tokens = torch.from_numpy(ds.sequences("train")[rows.numpy()].astype("int64"))
    ids = rows + 1000
    whole = _by_id([(ids, mlm(tokens, ids))])
    for size in (2, 4, 16):
        for order in (torch.arange(16), torch.randperm(16, generator=torch.Generator().manual_seed(size))):
            outs = [(ids[order[a:a + size]], mlm(tokens[order[a:a + size]], ids[order[a:a + size]]))
                    for a in range(0, 16, size)]
            assert _by_id(outs) == whole, (size, order)


def test_the_loader_masks_a_sequence_alike_whatever_its_batch_size_and_ranks(synth_mlm):
    """Through ShardLoader: micro-batches of 2, 4 and 16 on one process and 4 on each of 2
    ranks mask each sequence of the first epoch the same; the next epoch masks it anew."""
    ds = TokenDataset.open(synth_mlm)
    mlm = build_objective("mlm", ds, seed=3, mask_rate=0.3)
    n = ds.num_sequences("train")

    def seen(batch: int, world: int = 1, sequences: int = 16) -> dict[int, tuple[list, list]]:
        outs = []
        for rank in range(world):
            loader = ShardLoader(ds, "train", batch, seed=5, rank=rank, world_size=world, epochs=None,
                                 prefetch=0)
            for step in range(sequences // (batch * world)):
                tokens = next(loader)
                epoch, b = divmod(step, loader.batches_per_epoch)
                ids = torch.from_numpy(loader.epoch_indices(epoch)[b * batch:(b + 1) * batch]) + epoch * n
                outs.append((ids, mlm(tokens, ids)))
                direct = ShardLoader(ds, "train", batch, seed=5, rank=rank, world_size=world, epochs=None,
                                     prefetch=0, transform=mlm)
                direct.load_state_dict({**direct.state_dict(), "position": step * batch})
                assert torch.equal(next(direct)["labels"], outs[-1][1]["labels"])  # what the loader hands over
        return _by_id(outs)

    one = seen(16)
    assert len(one) == 16
    for batch, world in ((2, 1), (4, 1), (4, 2)):
        assert seen(batch, world) == one, (batch, world)
    # The second pass over the same sequences (ids + n) draws other masks.
    mlm_rows = torch.arange(16)
    tokens = torch.from_numpy(ds.sequences("train")[mlm_rows.numpy()].astype("int64"))
    assert not torch.equal(mlm(tokens, mlm_rows)["labels"], mlm(tokens, mlm_rows + n)["labels"])


def test_mask_statistics_over_a_million_candidates():
    """Selection at mask_rate, the 80/10/10 split, uniform random tokens over the real
    vocabulary, no special token ever selected, and masks independent between neighbours,
    epochs and seeds."""
    from cramkit.objectives import MaskedLM

    ids = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    pool = 64  # real vocabulary 5..68; the rows up to 128 are padding
    mlm = MaskedLM(ids, 69, seed=11)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, 5 + pool, (4096, 256), generator=gen)
    tokens[:, 0], tokens[:, -1] = 2, 3
    tokens[torch.rand(tokens.shape, generator=gen) < 0.02] = 0
    special = tokens < 5
    seq_ids = torch.arange(4096) * 7919 + 3  # any ids
    out = mlm(tokens, seq_ids)
    selected = out["labels"] != IGNORE_INDEX
    assert not (selected & special).any() and torch.equal(out["input_ids"][special], tokens[special])
    assert torch.equal(out["labels"][selected], tokens[selected])
    candidates = int((~special).sum())
    assert candidates > 1_000_000
    n_sel = int(selected.sum())
    assert abs(n_sel / candidates - 0.15) < 0.002, n_sel / candidates  # std 0.00036
    inputs = out["input_ids"][selected]
    masked = inputs == 4
    changed = ~masked & (inputs != tokens[selected])
    assert abs(float(masked.float().mean()) - 0.8) < 0.005  # std 0.001
    # A random token equal to the original counts as unchanged: p = 0.1 * (1 - 1/64).
    assert abs(float(changed.float().mean()) - 0.1 * (1 - 1 / pool)) < 0.004
    # Random replacements (every one, with mask_prob 0) are uniform over the 64 real tokens.
    drawn = MaskedLM(ids, 69, seed=11, mask_prob=0.0, random_prob=1.0)(tokens, seq_ids)
    replaced = drawn["input_ids"][drawn["labels"] != IGNORE_INDEX]
    counts = torch.bincount(replaced, minlength=5 + pool)[5:].double()
    assert counts.sum() == len(replaced) and replaced.min() >= 5 and replaced.max() < 5 + pool
    expected = len(replaced) / pool
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 63 + 6 * (2 * 63) ** 0.5, chi2  # 63 degrees of freedom
    # No correlation between neighbouring positions or sequences: P(both) = rate**2.
    sel = selected.float()
    both_cand = (~special[:, 1:] & ~special[:, :-1]).float()
    assert abs(float((sel[:, 1:] * sel[:, :-1]).sum() / both_cand.sum()) - 0.15**2) < 0.002
    both_rows = (~special[1:] & ~special[:-1]).float()
    assert abs(float((sel[1:] * sel[:-1]).sum() / both_rows.sum()) - 0.15**2) < 0.002
    # Another epoch (ids + N) or another seed: an independent mask, not merely a different one.
    for other in (mlm(tokens, seq_ids + 1_000_000), MaskedLM(ids, 69, seed=12)(tokens, seq_ids),
                  MaskedLM(ids, 69, seed=11, fixed=True)(tokens, seq_ids)):
        again = other["labels"] != IGNORE_INDEX
        assert abs(float((selected & again).sum()) / candidates - 0.15**2) < 0.002
    # Ids past 2**32 (a long run over a large corpus) mask as well.
    big = mlm(tokens[:256], seq_ids[:256] + (5 << 32))["labels"] != IGNORE_INDEX
    assert abs(float(big.sum()) / float((~special[:256]).sum()) - 0.15) < 0.01
    assert not torch.equal(big, selected[:256])


def test_training_masks_are_pinned():
    """Pinned: a change to the masks would silently change every run's data, and what a resumed
    run sees after an upgrade. (Updated once, on purpose, when masks became a per-sequence hash
    instead of generator draws for a whole micro-batch.)"""
    import hashlib

    from cramkit.objectives import MaskedLM

    tokens = torch.arange(6 * 40).reshape(6, 40) % 500 + 5
    special = {"mask": 4, "pad": 0, "cls": 1, "sep": 2, "unk": 3}
    pins = {False: ("7251459668cc7833", 35), True: ("0f4270c4caea9170", 37)}  # training, validation
    for fixed, (expected, targets) in pins.items():
        out = MaskedLM(special, 512, seed=0 if fixed else 1, fixed=fixed)(tokens, torch.arange(5, 11))
        digest = hashlib.sha256(out["input_ids"].numpy().tobytes() + out["labels"].numpy().tobytes()).hexdigest()
        assert digest[:16] == expected and int((out["labels"] != -100).sum()) == targets, fixed


def test_validation_masks_do_not_follow_the_runs_seed(tiny_mlm_data, tmp_path):
    """Runs with other seeds scored the same validation split under different masks."""
    from train.helpers import tiny_config

    from cramkit.train.run import _objective_options

    ds = TokenDataset.open(tiny_mlm_data)
    tokens = torch.from_numpy(ds.sequences("val")[:4].astype("int64"))
    masks = [build_objective("mlm", ds, **_objective_options(tiny_config(tiny_mlm_data, tmp_path, f"seed={seed}"),
                                                             "mlm", fixed=True))(tokens, 0)["labels"]
             for seed in (1, 2)]
    assert torch.equal(*masks)
    train = [build_objective("mlm", ds, **_objective_options(tiny_config(tiny_mlm_data, tmp_path, f"seed={seed}"),
                                                             "mlm"))(tokens, 0)["labels"] for seed in (1, 2)]
    assert not torch.equal(*train)  # training masks do follow it


def test_mlm_masks_follow_the_seed(synth_mlm):
    # Two runs with different seeds must not mask the same positions of the same batch, and a
    # rebuilt objective with the same seed (a resumed run) must reproduce the masks exactly.
    ds = TokenDataset.open(synth_mlm)
    tokens = torch.from_numpy(ds.sequences("train")[[0, 1, 2, 3]].astype("int64"))
    one, again, two = (build_objective("mlm", ds, seed=s)(tokens, 5) for s in (1, 1, 2))
    assert torch.equal(one["labels"], again["labels"]) and torch.equal(one["input_ids"], again["input_ids"])
    assert not torch.equal(one["labels"], two["labels"])


def test_mlm_option_errors(synth_mlm):
    with pytest.raises(ConfigError, match="mask_rate"):
        build_objective("mlm", synth_mlm, mask_rate=0.0)
    with pytest.raises(ConfigError, match="random_prob"):
        build_objective("mlm", synth_mlm, mask_prob=0.9, random_prob=0.2)
    with pytest.raises(ConfigError, match="unexpected keyword"):
        build_objective("mlm", synth_mlm, rate=0.2)


def test_clm_labels_do_not_cross_documents():
    ids = {"pad": 0, "eod": 1, "unk": None, "cls": None, "sep": None, "mask": None}

    class Fake:
        special_ids = ids
        vocab_size = 64

    clm = build_objective("clm", Fake())
    tokens = torch.tensor([[5, 6, 1, 7, 8, 1, 0, 0]])
    out = clm(tokens, 0)
    assert torch.equal(out["input_ids"], tokens)
    assert out["labels"].tolist() == [[6, 1, -100, 8, 1, -100, -100, -100]]
    # A row cut mid-document and padded has no end-of-document token: the last real token's
    # target is a pad, which is no target either.
    out = clm(torch.tensor([[5, 6, 7, 0, 0]]), 0)
    assert out["labels"].tolist() == [[6, 7, -100, -100, -100]]


def test_clm_on_prepared_data_and_mlm_needs_mask(tmp_path, synth_corpus):
    from data_helpers import small_cfg

    from cramkit.data.prepare import prepare

    ds = TokenDataset.open(
        prepare(small_cfg([synth_corpus], objective="clm"), tmp_path / "c", progress=False)
    )
    clm = build_objective("clm", ds)
    tokens = torch.from_numpy(ds.sequences("train")[[0, 1]].astype("int64"))
    out = clm(tokens, 0)
    assert torch.equal(
        out["labels"][:, :-1][tokens[:, :-1] != 1], tokens[:, 1:][tokens[:, :-1] != 1]
    )
    assert (out["labels"][:, -1] == IGNORE_INDEX).all()
    with pytest.raises(DataError, match=r"\[MASK\]"):
        build_objective("mlm", ds)


def test_random_replacements_skip_padding_rows():
    ids = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4, "eod": None}

    class Fake:
        special_ids = ids
        tokenizer_vocab_size = 70
        vocab_size = 128

    mlm = build_objective("mlm", Fake(), mask_rate=0.5, mask_prob=0.0, random_prob=1.0)
    tokens = torch.randint(5, 70, (64, 64))
    out = mlm(tokens, 3)
    replaced = out["input_ids"][out["labels"] != IGNORE_INDEX]
    assert len(replaced) > 1000
    assert replaced.min() >= 5 and replaced.max() < 70
