"""``ShardLoader``: a deterministic, resumable, rank-sharded batch iterator over packed shards.

Epoch ``e`` visits the permutation ``numpy.random.default_rng((seed, e)).permutation(N)`` (or
``0..N-1`` without shuffling). Rank ``r`` of ``W`` takes the strided slice ``perm[r::W]``,
truncated to a whole number of ``epoch_unit`` sequences (``(N // W) // epoch_unit * epoch_unit``;
the unit is ``batch_size`` unless given) so every rank reads as many and no two ranks see the same
sequence in an epoch.

Each rank reads its epochs one after the other as one stream, and a batch is the next
``batch_size`` sequences of it. The position (``state_dict()["position"]``) counts the sequences
this rank has consumed since the start of epoch 0: it does not depend on the batch size, so a
loader with another batch size (a resume on a GPU with less memory, say) built with the same
``epoch_unit`` goes on at the same sequence of the same epoch plan and hands out the same stream.
A batch may then span the end of one epoch and the start of the next (when ``batch_size`` does
not divide the epoch's length); with the default unit it never does.

``transform(tokens, seq_ids)`` gets, beside the ``[B, L]`` tokens, each sequence's identity:
``seq_ids[i] = epoch * N + row`` (a LongTensor ``[B]``), where ``row`` is the sequence's index in
the split. It depends on which sequence is read on which pass over the data, never on the batch
size, the number of ranks, the rank that reads it or its place in the batch: a transform that
draws each sequence's randomness from ``(seed, its id)`` (as MLM masking does) treats a sequence
alike with any micro-batch and under data parallelism, reproduces exactly after a resume, and
draws anew on the next epoch. Ids are unique over every batch of every rank (so ``seq_ids[0]``
also tells batches apart).

A background thread prepares up to ``prefetch`` batches ahead. ``state_dict()`` records the
position of the next batch the *consumer* will receive, never the producer's.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from .dataset import TokenDataset

_STOP = object()


class _Producer:
    """A daemon thread filling a bounded queue with ``(position, batch)`` from ``make(position)``,
    for the positions ``start, start + stride, ...`` whose batch ends by ``end``."""

    def __init__(self, make: Callable[[int], Any], start: int, stride: int, end: int | None, depth: int):
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop_event = threading.Event()
        self.thread = threading.Thread(
            target=_produce, args=(make, start, stride, end, self.queue, self.stop_event), daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        # Drain so a producer blocked on put() sees the event promptly.
        while self.thread.is_alive():
            try:
                self.queue.get_nowait()
            except queue.Empty:
                pass
            self.thread.join(timeout=0.05)


def _produce(make, start, stride, end, q: queue.Queue, stop: threading.Event) -> None:
    step = start
    while not stop.is_set() and (end is None or step + stride <= end):
        try:
            item = (step, make(step), None)
        except BaseException as exc:  # hand the error to the consumer instead of dying silently
            item = (step, None, exc)
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        if item[2] is not None:
            return
        step += stride
    while not stop.is_set():
        try:
            q.put((step, _STOP, None), timeout=0.1)
            return
        except queue.Full:
            continue


class _Plan:
    """What the batch at a position contains: everything the producer thread needs, without the
    loader."""

    def __init__(self, loader: ShardLoader):
        self.view, self.transform = loader.view, loader.transform
        self.seed, self.shuffle = loader.seed, loader.shuffle
        self.rank, self.world_size = loader.rank, loader.world_size
        self.batch_size, self.sequences_per_epoch = loader.batch_size, loader.sequences_per_epoch
        self.num_sequences = loader.num_sequences
        self.pin_memory = loader.pin_memory
        self._cache: tuple[int, np.ndarray] | None = None

    def epoch_indices(self, epoch: int) -> np.ndarray:
        cache = self._cache
        if cache is not None and cache[0] == epoch:
            return cache[1]
        n = len(self.view)
        if self.shuffle:
            perm = np.random.default_rng((self.seed, epoch)).permutation(n)
        else:
            perm = np.arange(n)
        mine = perm[self.rank :: self.world_size][: self.sequences_per_epoch]
        self._cache = (epoch, mine)
        return mine

    def rows(self, position: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The rows of the ``count`` sequences from ``position`` on, and each one's epoch."""
        rows, epochs = [], []
        while count > 0:
            epoch, offset = divmod(position, self.sequences_per_epoch)
            part = self.epoch_indices(epoch)[offset : offset + count]
            rows.append(part)
            epochs.append(np.full(len(part), epoch, dtype=np.int64))
            position, count = position + len(part), count - len(part)
        if len(rows) == 1:
            return rows[0], epochs[0]
        return np.concatenate(rows), np.concatenate(epochs)

    def make(self, position: int) -> Any:
        idx, epochs = self.rows(position, self.batch_size)
        tokens = torch.from_numpy(self.view[idx].astype(np.int64))
        if self.transform is None:
            out = tokens
        else:
            ids = idx.astype(np.int64) + epochs * self.num_sequences
            out = self.transform(tokens, torch.from_numpy(ids))
        return _pinned(out) if self.pin_memory else out


def _pinned(batch: Any) -> Any:
    # A copy to the GPU from ordinary (pageable) memory is staged through a driver buffer and can
    # make the host wait for the device even with non_blocking=True; from page-locked memory it is
    # a true asynchronous DMA. Pinning here runs in the producer thread, off the training loop.
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: _pinned(v) for k, v in batch.items()}
    return batch


class ShardLoader:
    """Iterate ``transform(tokens[B, L] LongTensor, seq_ids[B] LongTensor)`` (or the tensor) over
    one split; ``seq_ids`` as in the module docstring.

    Args:
        dataset: a :class:`TokenDataset` (or a path to one).
        split: ``train`` or ``val``.
        batch_size: sequences per batch on this rank.
        seed: seeds the per-epoch permutation.
        rank, world_size: data-parallel position; ranks get disjoint sequences.
        shuffle: permute sequences each epoch (off: stored order, e.g. for a curriculum).
        epochs: number of epochs, ``None`` for an infinite stream.
        prefetch: batches prepared ahead in a background thread (0 = none, synchronous).
        transform: ``(tokens, seq_ids) -> anything``, e.g. an objective from ``build_objective``.
        pin_memory: hand out page-locked tensors (a tensor or a dict of them) for asynchronous
            copies to a GPU; needs CUDA.
        epoch_unit: each rank's epoch is a whole number of these many sequences (default
            ``batch_size``: whole batches). It fixes the epoch plan independently of the batch
            size: a resume with another batch size passes the state's
            (:meth:`epoch_unit_of`).
    """

    def __init__(
        self,
        dataset: TokenDataset | str,
        split: str = "train",
        batch_size: int = 32,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        epochs: int | None = 1,
        prefetch: int = 2,
        transform: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
        pin_memory: bool = False,
        epoch_unit: int | None = None,
    ):
        if not isinstance(dataset, TokenDataset):
            dataset = TokenDataset.open(dataset)
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        if epochs is not None and epochs < 1:
            raise DataError(f"epochs must be >= 1 or None, got {epochs}")
        epoch_unit = batch_size if epoch_unit is None else epoch_unit
        if epoch_unit < 1:
            raise DataError(f"epoch_unit must be >= 1, got {epoch_unit}")
        self.dataset, self.split, self.batch_size = dataset, split, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.epochs, self.prefetch, self.transform = (
            shuffle,
            epochs,
            prefetch,
            transform,
        )
        self.pin_memory, self.epoch_unit = pin_memory, epoch_unit
        self.view = dataset.sequences(split)
        self.num_sequences = len(self.view)
        self.sequences_per_epoch = (self.num_sequences // world_size) // epoch_unit * epoch_unit
        if self.sequences_per_epoch == 0 or (epochs is not None and self.sequences_per_epoch * epochs < batch_size):
            raise DataError(
                f"split '{split}' has {self.num_sequences} sequences: not enough for one batch of "
                f"{max(batch_size, epoch_unit)} on each of {world_size} rank(s)"
            )
        # Whole batches in an epoch (with the default unit, every sequence of it is in one).
        self.batches_per_epoch = self.sequences_per_epoch // batch_size
        self._position = 0  # sequences this rank's consumer has received, over all epochs
        self._producer: _Producer | None = None
        self._finalizer = None
        self._plan = _Plan(self)

    # ---- positions -------------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches left from the start (a last partial batch is dropped)."""
        if self.epochs is None:
            raise TypeError("an infinite ShardLoader (epochs=None) has no length")
        return self.sequences_per_epoch * self.epochs // self.batch_size

    @property
    def position(self) -> int:
        """Sequences this rank has handed to the consumer, counted over all epochs."""
        return self._position

    @property
    def epoch(self) -> int:
        """The epoch of the next sequence the consumer receives."""
        return self._position // self.sequences_per_epoch

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's sequence indices for ``epoch`` in visiting order (``sequences_per_epoch``)."""
        return self._plan.epoch_indices(epoch)

    def _end(self) -> int | None:
        return None if self.epochs is None else self.epochs * self.sequences_per_epoch

    # ---- iteration -------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        end = self._end()
        if end is not None and self._position + self.batch_size > end:
            self.close()
            raise StopIteration
        if self.prefetch <= 0:
            out = self._plan.make(self._position)
            self._position += self.batch_size
            return out
        if self._producer is None:
            self._start()
        step, item, exc = self._producer.queue.get()
        if exc is not None:
            self.close()
            raise exc
        if item is _STOP:
            self.close()
            raise StopIteration
        if step != self._position:  # cannot happen unless the thread was restarted wrongly
            raise RuntimeError(f"loader out of sync: got the batch at {step}, expected {self._position}")
        self._position += self.batch_size
        return item

    def _start(self) -> None:
        # The thread only references the plan, never the loader, so the loader can be garbage
        # collected while it runs; the finalizer then stops the thread.
        self._producer = _Producer(self._plan.make, self._position, self.batch_size, self._end(), self.prefetch)
        self._finalizer = weakref.finalize(self, self._producer.stop)

    def close(self) -> None:
        """Stop the prefetch thread (it is re-created on the next ``next()``)."""
        if self._finalizer is not None:
            self._finalizer()
        self._producer = None
        self._finalizer = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ---- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where the consumer is: the sequences it has received (``position``), and the plan that
        orders them (plain ints: weights_only safe). ``batch_size`` is a record, not part of the
        plan: a loader with another one resumes the same stream."""
        return {
            "position": self._position,
            "epoch": self.epoch,
            "sequence_in_epoch": self._position % self.sequences_per_epoch,
            "epoch_unit": self.epoch_unit,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_sequences": self.num_sequences,
            "shuffle": self.shuffle,
        }

    @staticmethod
    def epoch_unit_of(state: dict[str, Any]) -> int | None:
        """The ``epoch_unit`` of the plan ``state`` was saved from (None when it does not say).
        A state from before positions were counted in sequences counted batches of its
        ``batch_size``, and truncated epochs to whole ones: that is its unit."""
        unit = state.get("epoch_unit", state.get("batch_size"))
        return None if unit is None else int(unit)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s position; the plan (seed, epoch unit, sizes, ranks) must match,
        the batch size need not.

        A state of the earlier format (``step``: batches of its ``batch_size`` consumed) is read
        as the position ``step * batch_size``."""
        for key in ("seed", "world_size", "num_sequences", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(
                    f"loader state does not match: {key}={state[key]!r} in the state, "
                    f"{getattr(self, key)!r} now"
                )
        unit = self.epoch_unit_of(state)
        if unit is not None and unit != self.epoch_unit:
            raise DataError(
                f"loader state does not match: epoch_unit={unit!r} in the state, {self.epoch_unit!r} "
                "now (build the loader with epoch_unit=ShardLoader.epoch_unit_of(state))"
            )
        if "position" in state:
            position = int(state["position"])
        else:  # the earlier format
            position = int(state["step"]) * int(state.get("batch_size", self.batch_size))
        self.close()
        self._position = position


def iterate_eval(
    dataset: TokenDataset | str, split: str = "val", batch_size: int = 32
) -> Iterator[torch.Tensor]:
    """All sequences of ``split`` in stored order, as LongTensor batches (the last may be short)."""
    if not isinstance(dataset, TokenDataset):
        dataset = TokenDataset.open(dataset)
    view = dataset.sequences(split)
    for start in range(0, len(view), batch_size):
        idx = np.arange(start, min(start + batch_size, len(view)))
        yield torch.from_numpy(view[idx].astype(np.int64))
