"""Scaling out and fitting more: torchrun process groups, DDP / FSDP2, activation checkpointing,
offloading, and a memory estimate.

The same ``cramkit pretrain`` entry point runs single-process by default and, under ``torchrun``,
joins the process group that torchrun's environment describes. Order of application:
technique surgery → (FP8 conversion →) activation checkpointing → DDP or FSDP2 → compile (the
compiled wrapper runs the wrapped or sharded module; ``fully_shard`` works in place).
"""

from .config import MemoryConfig, ParallelConfig
from .memory import apply_activation_checkpointing, estimate_memory
from .parallel import Parallel, init_parallel, shard_model

__all__ = [
    "MemoryConfig", "ParallelConfig", "Parallel", "init_parallel", "shard_model",
    "apply_activation_checkpointing", "estimate_memory",
]
