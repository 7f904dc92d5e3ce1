"""Process groups from torchrun's environment, collectives the trainer needs, DDP / FSDP2."""

from __future__ import annotations

import contextlib
import datetime
import gc
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import ConfigError, CramkitError, RankFailed, Terminated
from ..utils import launched_by_torchrun
from .config import ParallelConfig

T = TypeVar("T")

#: How long the other ranks wait for rank 0's work alone (:meth:`Parallel.on_main`): preparing a
#: large corpus can take hours, far beyond the process group's timeout. A rank that dies still
#: ends the wait at once (its connections close).
PATIENT_TIMEOUT = datetime.timedelta(days=7)


class Parallel:
    """This process's place among data-parallel ranks, and the few collectives training needs.

    With one process every method is a cheap identity, so the trainer has a single code path.

    Host numbers (target counts, clocks, stop flags, objects) are agreed over ``control``, a gloo
    group on the CPU: under NCCL, reading the result of a collective on a device tensor would
    make the host wait for every kernel queued before it, once per step. Device tensors (the
    loss) go over the default group and stay on the device. ``patient`` is a gloo group like
    ``control`` with a long timeout, on which the other ranks wait for rank 0's work alone.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 strategy: str = "none", device: torch.device | None = None, launched: bool = False,
                 control: Any = None, patient: Any = None) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        # Under torchrun even one process joins a group, so FSDP2 (e.g. its CPU offload) works.
        self.launched = launched
        self.strategy = strategy if launched else "none"
        self.device = device or torch.device("cpu")
        self.control = control
        self.patient = patient if patient is not None else control

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.launched

    def _host_reduce(self, values: list[float], op) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=op, group=self.control)
        return t.tolist()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (one small collective on the CPU)."""
        return self._host_reduce(values, dist.ReduceOp.SUM) if self.distributed else list(values)

    def all_max(self, values: list[float]) -> list[float]:
        """Element-wise maximum over ranks (one small collective on the CPU)."""
        return self._host_reduce(values, dist.ReduceOp.MAX) if self.distributed else list(values)

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a 0-d tensor over ranks, as a float64 tensor on ``t``'s device, without reading
        it on the host (with NCCL the collective is queued on the device like any kernel; with
        gloo and a CUDA tensor the copy to the CPU waits for the device)."""
        if not self.distributed:
            return t
        # "nccl", or a per-device string such as "cpu:gloo,cuda:nccl" (CPU offload): NCCL for CUDA.
        comm = self.device if "nccl" in str(dist.get_backend()) else torch.device("cpu")
        buf = t.detach().to(comm, torch.float64)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(t.device, non_blocking=True)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (on every rank)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def on_main(self, work: Callable[[], T], what: str) -> T:
        """``work()`` on rank 0 alone; its result (picklable) on every rank.

        The other ranks wait for it however long it takes (up to :data:`PATIENT_TIMEOUT`). When
        it fails, rank 0 tells them before it re-raises, and they raise :class:`RankFailed`
        (``what``: what rank 0 was doing, for its message), or the same kind of interrupt, at
        once: waiting in a collective that rank 0 never joins, they would otherwise hang until
        the group's timeout, or die of a lost connection with a traceback.
        """
        if not self.distributed:
            return work()
        outcome: tuple[str, Any] | None = None
        if self.is_main:
            try:
                outcome = ("done", work())
            except BaseException as exc:
                try:
                    self._from_main(("failed", _describe(exc)))
                except Exception:  # noqa: BLE001 - rank 0's own error is the one to report
                    pass
                raise
        kind, value = self._from_main(outcome)
        if kind == "failed":
            interrupt, message = value
            if interrupt:  # ^C or SIGTERM on rank 0: these ranks stop as interrupted too
                raise (Terminated if interrupt == "terminated" else KeyboardInterrupt)()
            raise RankFailed(f"rank 0 failed while {what}: {message}")
        return value

    def _from_main(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.patient)
        return box[0]

    @contextlib.contextmanager
    def accumulate(self, model: torch.nn.Module, last: bool) -> Iterator[None]:
        """Skip gradient synchronisation on all but the last micro-batch of a step."""
        if not self.distributed or last:
            yield
            return
        if self.strategy == "ddp":
            with model.no_sync():
                yield
        else:
            # FSDP2 reduce-scatters every micro-batch: with set_requires_gradient_sync(False) it
            # would hold each gradient unsharded (and upcast to fp32) until the last one, i.e. a
            # whole model's fp32 gradients per GPU, which is what sharding is meant to avoid.
            yield


def init_parallel(cfg: ParallelConfig, device_name: str, cpu_collectives: bool = False) -> Parallel:
    """Join torchrun's process group when launched by torchrun, else a single-process Parallel.

    ``cpu_collectives``: some collectives run on host tensors (FSDP2's CPU offload keeps the
    gradients on the host, so clipping all-reduces a CPU tensor), which NCCL cannot do: the auto
    backend on CUDA is then ``cpu:gloo,cuda:nccl``.
    """
    if not launched_by_torchrun():
        from ..train.device import resolve_device

        return Parallel(device=resolve_device(device_name))
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if device_name.startswith("cuda:"):
        raise ConfigError("under torchrun leave train.device=auto or cuda: each rank uses cuda:LOCAL_RANK")
    if device_name == "cuda" and not torch.cuda.is_available():  # as a single process says it
        raise ConfigError("device 'cuda' needs CUDA, but no CUDA device is available")
    if cfg.backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend=nccl needs CUDA GPUs; leave parallel.backend=auto (gloo on CPUs)")
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    auto = ("cpu:gloo,cuda:nccl" if cpu_collectives else "nccl") if use_cuda else "gloo"
    backend = cfg.backend if cfg.backend != "auto" else auto
    timeout = datetime.timedelta(minutes=10)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout, **({"device_id": device} if use_cuda else {}))
    control, patient = _control_groups(timeout)
    return Parallel(rank, world, local, cfg.strategy, device, launched=True, control=control, patient=patient)


_CONTROL: list[Any] = []  # [default group, its gloo control group, its patient one], once made


def _control_groups(timeout: datetime.timedelta) -> tuple[Any, Any]:
    """The gloo groups for host numbers (``timeout``) and for waiting on rank 0
    (:data:`PATIENT_TIMEOUT`), made once per default process group: every new group holds
    sockets and threads of its own, and a process may call ``pretrain`` many times. Groups of
    their own even when the default one is gloo already: one code path, tested on CPU."""
    world = dist.group.WORLD
    if not _CONTROL or _CONTROL[0] is not world:  # none yet, or the default group was remade
        _CONTROL[:] = [world, dist.new_group(backend="gloo", timeout=timeout),
                       dist.new_group(backend="gloo", timeout=PATIENT_TIMEOUT)]
    return _CONTROL[1], _CONTROL[2]


def _describe(exc: BaseException) -> tuple[str | None, str]:
    """``(interrupt, message)`` of rank 0's exception for the other ranks: ``interrupt`` is
    "terminated" or "interrupted" for a stop signal, else None; a message as the command line
    prints it (a cramkit error's own, else with the exception's type)."""
    if isinstance(exc, KeyboardInterrupt):
        return ("terminated" if isinstance(exc, Terminated) else "interrupted"), ""
    if isinstance(exc, (CramkitError, OSError)):
        return None, str(exc)
    return None, f"{type(exc).__name__}: {exc}"


#: Why memory.offload_optimizer cannot run in a process that torchrun did not start.
OFFLOAD_NEEDS_TORCHRUN = ("memory.offload_optimizer uses FSDP2's CPU offload: run under torchrun with "
                          "parallel.strategy=fsdp (one process is fine: torchrun --nproc-per-node 1 ...)")


def shard_model(model: torch.nn.Module, par: Parallel, cfg: ParallelConfig, precision: str,
                offload_optimizer: bool = False, unused_parameters: bool = False) -> torch.nn.Module:
    """Wrap for data parallelism: DDP, or FSDP2 ``fully_shard`` on each block then the root.

    ``unused_parameters``: a step may leave some parameters out of the forward pass (a technique
    skipping blocks); DDP must then look for them every step or it fails at the next one.
    """
    if not par.distributed:
        if offload_optimizer:
            raise ConfigError(OFFLOAD_NEEDS_TORCHRUN)
        return model
    if par.strategy == "ddp":
        if offload_optimizer:
            raise ConfigError("memory.offload_optimizer needs parallel.strategy=fsdp")
        from torch.nn.parallel import DistributedDataParallel

        ids = [par.device.index] if par.device.type == "cuda" else None
        # Gradients as views of DDP's buckets: no second copy of every gradient (4 bytes per
        # parameter). No buffer broadcast: cramkit's buffers are fixed tables (sinusoids, rotary
        # caches), identical on every rank, and broadcasting them costs a collective per forward.
        # torch 2.13 renamed the switch (the old name warns on every rank); its one sync at
        # wrap time, which broadcast_buffers=False skipped, is harmless for such buffers.
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
        no_sync = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused_parameters,
                                       gradient_as_bucket_view=True, **no_sync)
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        cfg.fsdp_param_dtype if cfg.fsdp_param_dtype != "auto" else precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    kwargs: dict[str, Any] = {"mp_policy": policy, "reshard_after_forward": cfg.fsdp_reshard}
    if offload_optimizer:
        # Pinned host copies need an accelerator: without one (CPU runs, tests) pinning raises.
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=par.device.type == "cuda")
    for block in model.layers:
        fully_shard(block, **kwargs)
    # The root keeps FSDP's own default: its parameters stay gathered after forward, since the
    # head and embeddings are needed again at once in backward. Passing reshard_after_forward=True
    # to the root crashes the first backward on torch 2.11 ("setStorage ... storage of size 0").
    fully_shard(model, **{k: v for k, v in kwargs.items() if k != "reshard_after_forward"})
    return model


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or gathered whole on every rank where it is an FSDP2 DTensor (a norm over
    shards, a sharded weight): a collective then, so every rank calls it together."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def drop_gathered_parameters(model: torch.nn.Module) -> None:
    """Free the parameters FSDP2 gathered and keeps after a forward pass without backward (the
    root's always, the blocks' under ``parallel.fsdp_reshard=false``); a no-op without FSDP2.

    The next forward pass uses such copies as they are: where the sharded weights were changed
    outside an optimizer step (Schedule-Free's switch to its evaluation weights and back), it
    would compute with stale ones.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def leave_process_group(clean: bool) -> None:
    """Leave torchrun's process group, if this process joined one, and stop its threads.

    Each gloo group runs worker threads that drop a finished collective's tensors a moment
    after the caller sees it complete, and that drop takes the GIL. A thread that asks for the
    GIL once the interpreter is shutting down is ended in a way C++ code cannot survive: the
    process aborts (SIGABRT, "terminate called without an active exception") after a run that
    succeeded, and torchrun reports the rank failed. So the threads finish here, while the
    interpreter runs: after a clean run every rank meets at a barrier in each group (waiting
    there, a rank leaves the GIL to the threads still dropping tensors), then the groups are
    destroyed and collected, which joins their threads. torch itself keeps the default group
    alive once DDP or FSDP2 used it; its threads have passed the barrier and sit idle. After a
    failure the groups are only destroyed: the other ranks may never arrive.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        ours = _CONTROL[1:] if _CONTROL and _CONTROL[0] is dist.group.WORLD else []
        for group in [None, *ours]:
            dist.barrier(group=group)
    dist.destroy_process_group()
    _CONTROL.clear()
    if clean:
        # Our groups (and the models and Parallel objects holding them, often in reference
        # cycles) are freed now, not by the collector during shutdown: freeing a group joins its
        # threads. Not after a failure: a thread may still be in a collective that no other rank
        # will join, and joining it would wait out the group's timeout.
        gc.collect()
