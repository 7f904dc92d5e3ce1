"""FP8 training through torchao's float8 linear conversion, only where it pays off.

FP8 matmuls gain over bf16 only when the matrices are large enough for the saved tensor-core
time to exceed the cost of computing scales and casting. Which layers qualify follows the rule
torchao derives from its H100 microbenchmarks for its default (tensorwise) recipe
(``torchao/float8/float8_linear_utils.py``, ``_auto_filter_for_tensorwise``): both dimensions
multiples of 16 (the FP8 kernels need it), and not both ``out_features <= 4096`` and
``in_features <= 1024``. In crammed-bert (hidden 768) only the feed-forward down-projection
(1536 -> 768) qualifies. The decoder head never converts; the user is warned when nothing
qualifies. FP8 also needs ``train.compile=true`` to be fast (torchao's training docs;
pytorch/ao#685): eager float8 linears are slower than bf16, and the run warns.
"""

from __future__ import annotations

import warnings

import torch

from ..errors import ConfigError


def worth_fp8(module: torch.nn.Module, everything: bool = False) -> bool:
    """A linear layer whose shape lets FP8 beat bf16 (``everything``: any the kernels accept)."""
    if not isinstance(module, torch.nn.Linear):
        return False
    out_features, in_features = module.weight.shape
    if out_features % 16 or in_features % 16:
        return False
    return everything or not (out_features <= 4096 and in_features <= 1024)


def check_fp8(device: torch.device) -> None:
    """ConfigError unless ``device`` and this installation can train FP8 linears."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise ConfigError("train.fp8 needs an NVIDIA GPU with FP8 tensor cores (Ada/Hopper or newer)")
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise ConfigError("train.fp8 needs torchao: pip install 'cramkit[fp8]'") from None


def convert_fp8(model: torch.nn.Module, device: torch.device, everything: bool = False) -> torch.nn.Module:
    """Swap qualifying linears (not the decoder head) for torchao's float8 training linears
    (``everything``: every linear the kernels accept, to measure FP8 where the rule says no)."""
    check_fp8(device)
    from torchao.float8 import convert_to_float8_training

    eligible = [n for n, m in model.named_modules() if worth_fp8(m, everything) and not n.startswith("head")]
    if not eligible:
        warnings.warn("train.fp8: no linear layer is large enough for FP8 to beat bf16 (torchao's rule: "
                      "out_features > 4096 or in_features > 1024); FP8 would slow this model down, so it "
                      "stays in bf16", stacklevel=2)
        return model
    chosen = set(eligible)
    # torchao builds a new module around the same weight: the fused matrices' part counts that
    # Muon orthogonalises by (cramkit.optim.parameter_groups) would be lost with the old one.
    stacked = {n: m.stacked_matrices for n, m in model.named_modules()
               if n in chosen and hasattr(m, "stacked_matrices")}
    convert_to_float8_training(model, module_filter_fn=lambda m, fqn: fqn in chosen)
    for name, parts in stacked.items():
        model.get_submodule(name).stacked_matrices = parts
    return model
