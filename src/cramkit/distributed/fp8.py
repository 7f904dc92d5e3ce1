"""FP8 training through torchao's float8 linear conversion, only where it pays off.

FP8 matmuls gain over bf16 only when the matrices are large enough for the saved tensor-core
time to exceed the cost of computing scales and casting; on H100 that is roughly when both
dimensions of a linear layer are at least ~2048 (torchao's own guidance and our measurements in
BENCHMARKS.md). Smaller layers stay in bf16, and the user is warned when nothing qualifies.
"""

from __future__ import annotations

import warnings

import torch

from ..errors import ConfigError

MIN_DIM = 2048


def worth_fp8(module: torch.nn.Module, min_dim: int = MIN_DIM) -> bool:
    """A linear layer whose shape lets FP8 beat bf16 (and that FP8 kernels accept)."""
    return (isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0
            and module.out_features % 16 == 0 and min(module.in_features, module.out_features) >= min_dim)


def convert_fp8(model: torch.nn.Module, device: torch.device, min_dim: int = MIN_DIM) -> torch.nn.Module:
    """Swap qualifying linears (not the decoder head) for torchao's float8 training linears."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise ConfigError("train.fp8 needs an NVIDIA GPU with FP8 tensor cores (Ada/Hopper or newer)")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise ConfigError("train.fp8 needs torchao: pip install 'cramkit[fp8]'") from None
    eligible = [n for n, m in model.named_modules() if worth_fp8(m, min_dim) and not n.startswith("head")]
    if not eligible:
        warnings.warn(f"train.fp8: no linear layer has both dimensions >= {min_dim}; FP8 would slow this model "
                      "down, so it stays in bf16", stacklevel=2)
        return model
    chosen = set(eligible)
    convert_to_float8_training(model, module_filter_fn=lambda m, fqn: fqn in chosen)
    return model
