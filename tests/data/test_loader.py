"""ShardLoader: determinism, exact resume in a new process, rank sharding, prefetch thread."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cramkit.data.dataset import TokenDataset
from cramkit.data.loader import ShardLoader, iterate_eval
from cramkit.errors import DataError

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_deterministic_and_epoch_shuffled(synth_mlm):
    a = _take(ShardLoader(synth_mlm, "train", 8, seed=3, epochs=None), 5)
    b = _take(ShardLoader(synth_mlm, "train", 8, seed=3, epochs=None, prefetch=0), 5)
    c = _take(ShardLoader(synth_mlm, "train", 8, seed=4, epochs=None), 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert a[0].dtype == torch.long and a[0].shape == (8, 32)
    loader = ShardLoader(synth_mlm, "train", 8, seed=3)
    assert not np.array_equal(loader.epoch_indices(0), loader.epoch_indices(1))


def test_finite_epochs_and_len(synth_mlm):
    loader = ShardLoader(synth_mlm, "train", 16, epochs=2)
    batches = list(loader)
    assert len(batches) == len(loader) == 2 * loader.batches_per_epoch
    n = TokenDataset.open(synth_mlm).num_sequences("train")
    first_epoch = torch.cat(batches[: loader.batches_per_epoch])
    assert len(first_epoch) == (n // 16) * 16


def test_resume_in_new_process(synth_mlm, tmp_path):
    n, m = 7, 5
    full = _take(ShardLoader(synth_mlm, "train", 4, seed=11, epochs=None), n + m)
    loader = ShardLoader(synth_mlm, "train", 4, seed=11, epochs=None, prefetch=3)
    _take(loader, n)
    state = loader.state_dict()
    assert state["position"] == 4 * n  # sequences; prefetched batches are not counted
    loader.close()
    (tmp_path / "state.json").write_text(json.dumps(state))
    code = (
        "import json, sys, torch\n"
        "from cramkit.data.loader import ShardLoader\n"
        f"l = ShardLoader({str(synth_mlm)!r}, 'train', 4, seed=11, epochs=None)\n"
        f"l.load_state_dict(json.load(open({str(tmp_path / 'state.json')!r})))\n"
        f"torch.save(torch.stack([next(l) for _ in range({m})]), {str(tmp_path / 'out.pt')!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    resumed = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(resumed, torch.stack(full[n:]))


def test_load_state_restarts_prefetch_and_across_epochs(synth_mlm):
    ref = ShardLoader(synth_mlm, "train", 16, seed=1, epochs=None)
    bpe = ref.batches_per_epoch
    full = _take(ref, bpe + 3)
    loader = ShardLoader(synth_mlm, "train", 16, seed=1, epochs=None)
    _take(loader, 2)
    loader.load_state_dict({"step": bpe - 1})
    got = _take(loader, 4)
    assert all(torch.equal(x, y) for x, y in zip(got, full[bpe - 1 : bpe + 3]))
    assert loader.state_dict()["epoch"] == 1
    with pytest.raises(DataError, match="seed"):
        loader.load_state_dict({**loader.state_dict(), "seed": 99})


def test_another_batch_size_resumes_the_same_stream_across_epochs(synth_mlm):
    """The position counts sequences and the epoch plan is fixed by epoch_unit: a loader with
    another batch size, built with the state's unit, goes on with the very sequences (and ids)
    the first one would have handed out, over epoch ends too (batches of 6 from an epoch of
    whole batches of 8 span them)."""
    def ids(loader, sequences):
        out = []
        while len(out) < sequences:
            out += next(loader)["ids"].tolist()
        return out

    make = lambda batch, **kw: ShardLoader(synth_mlm, "train", batch, seed=2, epochs=None,  # noqa: E731
                                          transform=lambda t, i: {"input_ids": t, "ids": i}, **kw)
    first = make(8)
    per_epoch = first.sequences_per_epoch
    assert per_epoch % 8 == 0 and per_epoch % 6 != 0
    whole = ids(first, 3 * per_epoch)
    first = make(8)
    ids(first, per_epoch - 16)
    state = first.state_dict()
    assert state["epoch_unit"] == 8 and state["position"] == per_epoch - 16
    assert ShardLoader.epoch_unit_of(state) == 8
    for batch in (2, 6, 16):
        later = make(batch, epoch_unit=ShardLoader.epoch_unit_of(state), prefetch=batch % 3)
        later.load_state_dict(state)
        got = ids(later, 2 * per_epoch)
        assert got == whole[per_epoch - 16:per_epoch - 16 + len(got)], batch
        assert later.state_dict()["position"] == per_epoch - 16 + len(got)
    # The plan is the unit's: another unit is another plan, and the error says how to build it.
    with pytest.raises(DataError, match=r"epoch_unit=8 in the state, 6 now \(build the loader with "
                                        r"epoch_unit=ShardLoader.epoch_unit_of\(state\)\)"):
        make(6).load_state_dict(state)


def test_a_state_of_the_earlier_format_resumes_at_its_batch(synth_mlm):
    """Loader states saved before positions were counted in sequences hold ``step``, the batches
    of their batch size consumed; their epochs were whole batches of it (the epoch unit)."""
    ref = ShardLoader(synth_mlm, "train", 4, seed=7, epochs=None, prefetch=0)
    bpe = ref.batches_per_epoch
    full = torch.cat(_take(ref, bpe + 5))
    old = {"step": bpe - 2, "epoch": 0, "batch_in_epoch": bpe - 2, "seed": 7, "rank": 0, "world_size": 1,
           "batch_size": 4, "num_sequences": ref.num_sequences, "shuffle": True}
    assert ShardLoader.epoch_unit_of(old) == 4
    same = ShardLoader(synth_mlm, "train", 4, seed=7, epochs=None)
    same.load_state_dict(old)
    assert torch.equal(torch.cat(_take(same, 7)), full[(bpe - 2) * 4:])
    other = ShardLoader(synth_mlm, "train", 2, seed=7, epochs=None, epoch_unit=4)
    other.load_state_dict(old)
    assert torch.equal(torch.cat(_take(other, 14)), full[(bpe - 2) * 4:])


def test_transform_gets_each_sequences_id(synth_mlm):
    """seq_ids = epoch * N + row: which sequence on which pass, unique over ranks and epochs."""
    n = TokenDataset.open(synth_mlm).num_sequences("train")
    seen = []
    for rank in range(2):
        loader = ShardLoader(synth_mlm, "train", 4, rank=rank, world_size=2, epochs=2, prefetch=0,
                             transform=lambda tokens, ids: {"input_ids": tokens, "ids": ids})
        out = list(loader)
        ids = torch.cat([o["ids"] for o in out])
        assert ids.dtype == torch.long and all(len(o["ids"]) == 4 for o in out)
        rows = [loader.epoch_indices(e) for e in range(2)]
        assert ids.tolist() == [*rows[0].tolist(), *(rows[1] + n).tolist()]
        view = TokenDataset.open(synth_mlm).sequences("train")
        assert torch.equal(torch.cat([o["input_ids"] for o in out]),
                           torch.from_numpy(view[(ids % n).numpy()].astype("int64")))
        seen += ids.tolist()
    assert len(set(seen)) == len(seen)


def test_two_ranks_disjoint_and_cover_epoch(tmp_path, synth_corpus):
    from data_helpers import small_cfg

    from cramkit.data.prepare import prepare

    ds = TokenDataset.open(prepare(small_cfg([synth_corpus]), tmp_path / "d", progress=False))
    n = ds.num_sequences("train")
    batch = 3
    per_rank = [
        ShardLoader(ds, "train", batch, seed=5, rank=r, world_size=2, epochs=1) for r in range(2)
    ]
    assert per_rank[0].batches_per_epoch == per_rank[1].batches_per_epoch
    rows = [set(ds.sequences("train")[i].tobytes() for i in lo.epoch_indices(0)) for lo in per_rank]
    idx = [set(lo.epoch_indices(0).tolist()) for lo in per_rank]
    assert not (idx[0] & idx[1])
    covered = len(idx[0] | idx[1])
    assert covered == 2 * per_rank[0].batches_per_epoch * batch
    assert n - covered < 2 * batch  # only the truncated tail is left out
    # The batches actually yielded match the plan.
    got = torch.cat(list(per_rank[0]))
    assert {r.numpy().astype(np.uint16).tobytes() for r in got} <= rows[0]


def test_ranks_cover_everything_when_divisible(synth_mlm):
    ds = TokenDataset.open(synth_mlm)
    n = ds.num_sequences("train")
    world = 4
    batch = 1
    loaders = [ShardLoader(ds, "train", batch, rank=r, world_size=world) for r in range(world)]
    allidx = np.concatenate([lo.epoch_indices(2) for lo in loaders])
    assert len(np.unique(allidx)) == len(allidx) == (n // world) * world


def test_prefetch_thread_stops_on_close_and_gc(synth_mlm):
    before = threading.active_count()
    loader = ShardLoader(synth_mlm, "train", 4, epochs=None, prefetch=2)
    next(loader)
    assert threading.active_count() == before + 1
    loader.close()
    assert threading.active_count() == before
    next(loader)  # re-created lazily
    assert threading.active_count() == before + 1
    del loader
    gc.collect()
    assert threading.active_count() == before


def test_too_few_sequences_is_clear(synth_mlm):
    with pytest.raises(DataError, match="not enough for one batch"):
        ShardLoader(synth_mlm, "val", 10_000)
    with pytest.raises(DataError, match="no split 'test'"):
        ShardLoader(synth_mlm, "test", 4)


def test_iterate_eval_fixed_order(synth_mlm):
    ds = TokenDataset.open(synth_mlm)
    batches = list(iterate_eval(ds, "val", 7))
    allrows = torch.cat(batches)
    assert len(allrows) == ds.num_sequences("val")
    n = ds.num_sequences("val")
    assert torch.equal(
        allrows, torch.from_numpy(ds.sequences("val")[np.arange(n)].astype(np.int64))
    )
    assert all(torch.equal(a, b) for a, b in zip(batches, iterate_eval(ds, "val", 7)))
