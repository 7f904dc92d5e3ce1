"""Configs for parallelism and memory-saving switches."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..configbase import Config, field
from ..errors import ConfigError


@dataclasses.dataclass
class ParallelConfig(Config):
    """How several processes (under torchrun) share the work."""

    strategy: Literal["ddp", "fsdp"] = field("ddp", help="ddp: replicate the model; fsdp: shard it (FSDP2 fully_shard; refuses lamb, lars and adamw8bit, whose updates need whole tensors)")
    backend: Literal["auto", "nccl", "gloo"] = field("auto", help="auto: nccl on CUDA, gloo on CPU")
    fsdp_reshard: bool = field(True, help="FSDP2: free gathered parameters after forward (less memory, more traffic)")
    fsdp_param_dtype: Literal["auto", "fp32", "bf16"] = field(
        "auto", help="FSDP2 mixed-precision policy for parameters in compute (auto: the training precision)")


@dataclasses.dataclass
class MemoryConfig(Config):
    """Trade compute or host memory for device memory."""

    activation_checkpointing: Literal["none", "full", "selective"] = field(
        "none", help="full: recompute every block in backward; selective: every `checkpoint_every`-th block")
    checkpoint_every: int = field(2, help="selective checkpointing: recompute every k-th block")
    offload_activations: bool = field(False, help="keep saved activations in host memory (save_on_cpu)")
    offload_optimizer: bool = field(False, help="keep parameters' optimizer state and update on the CPU (FSDP2 CPU offload)")

    def validate(self) -> None:
        if self.checkpoint_every < 1:
            raise ConfigError("memory.checkpoint_every must be >= 1")
