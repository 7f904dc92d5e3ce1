"""``ShardLoader``: a deterministic, resumable, rank-sharded batch iterator over packed shards.

Epoch ``e`` visits the permutation ``numpy.random.default_rng((seed, e)).permutation(N)`` (or
``0..N-1`` without shuffling). Rank ``r`` of ``W`` takes the strided slice ``perm[r::W]``,
truncated to ``(N // W) // batch_size`` full batches so every rank runs the same number of steps
and no two ranks see the same sequence in an epoch.

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
    """A daemon thread filling a bounded queue with ``(step, batch)`` from ``make(step)``."""

    def __init__(self, make: Callable[[int], Any], start: int, end: int | None, depth: int):
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop_event = threading.Event()
        self.thread = threading.Thread(
            target=_produce, args=(make, start, end, self.queue, self.stop_event), daemon=True
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


def _produce(make, start, end, q: queue.Queue, stop: threading.Event) -> None:
    step = start
    while not stop.is_set() and (end is None or step < end):
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
        step += 1
    while not stop.is_set():
        try:
            q.put((step, _STOP, None), timeout=0.1)
            return
        except queue.Full:
            continue


class _Plan:
    """What batch ``step`` contains: everything the producer thread needs, without the loader."""

    def __init__(self, loader: ShardLoader):
        self.view, self.transform = loader.view, loader.transform
        self.seed, self.shuffle = loader.seed, loader.shuffle
        self.rank, self.world_size = loader.rank, loader.world_size
        self.batch_size, self.batches_per_epoch = loader.batch_size, loader.batches_per_epoch
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
        mine = perm[self.rank :: self.world_size][: self.batches_per_epoch * self.batch_size]
        self._cache = (epoch, mine)
        return mine

    def make(self, step: int) -> Any:
        epoch, b = divmod(step, self.batches_per_epoch)
        idx = self.epoch_indices(epoch)[b * self.batch_size : (b + 1) * self.batch_size]
        tokens = torch.from_numpy(self.view[idx].astype(np.int64))
        if self.transform is None:
            out = tokens
        else:
            out = self.transform(tokens, torch.from_numpy(idx.astype(np.int64)) + epoch * self.num_sequences)
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
    ):
        if not isinstance(dataset, TokenDataset):
            dataset = TokenDataset.open(dataset)
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        if epochs is not None and epochs < 1:
            raise DataError(f"epochs must be >= 1 or None, got {epochs}")
        self.dataset, self.split, self.batch_size = dataset, split, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.epochs, self.prefetch, self.transform = (
            shuffle,
            epochs,
            prefetch,
            transform,
        )
        self.pin_memory = pin_memory
        self.view = dataset.sequences(split)
        self.num_sequences = len(self.view)
        self.batches_per_epoch = (self.num_sequences // world_size) // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"split '{split}' has {self.num_sequences} sequences: not enough for one batch of "
                f"{batch_size} on each of {world_size} rank(s)"
            )
        self._step = 0  # next batch the consumer receives, counted over all epochs
        self._producer: _Producer | None = None
        self._finalizer = None
        self._plan = _Plan(self)

    # ---- positions -------------------------------------------------------------------------

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an infinite ShardLoader (epochs=None) has no length")
        return self.batches_per_epoch * self.epochs

    @property
    def epoch(self) -> int:
        return self._step // self.batches_per_epoch

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's sequence indices for ``epoch`` in visiting order (full batches only)."""
        return self._plan.epoch_indices(epoch)

    def _end(self) -> int | None:
        return None if self.epochs is None else self.epochs * self.batches_per_epoch

    # ---- iteration -------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        end = self._end()
        if end is not None and self._step >= end:
            self.close()
            raise StopIteration
        if self.prefetch <= 0:
            out = self._plan.make(self._step)
            self._step += 1
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
        if step != self._step:  # cannot happen unless the thread was restarted wrongly
            raise RuntimeError(f"loader out of sync: got batch {step}, expected {self._step}")
        self._step += 1
        return item

    def _start(self) -> None:
        # The thread only references the plan, never the loader, so the loader can be garbage
        # collected while it runs; the finalizer then stops the thread.
        self._producer = _Producer(self._plan.make, self._step, self._end(), self.prefetch)
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
        """The position of the next batch the consumer receives (plain ints: weights_only safe)."""
        return {
            "step": self._step,
            "epoch": self.epoch,
            "batch_in_epoch": self._step % self.batches_per_epoch,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_sequences": self.num_sequences,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s position; the plan (seed, sizes, ranks) must match."""
        for key in ("seed", "world_size", "batch_size", "num_sequences", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(
                    f"loader state does not match: {key}={state[key]!r} in the state, "
                    f"{getattr(self, key)!r} now"
                )
        self.close()
        self._step = int(state["step"])


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
