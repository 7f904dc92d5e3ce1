"""Muon on fused matrices: pytorch_optimizer's ``Muon`` orthogonalising each stacked part on its
own, and under FSDP2 each whole matrix (``optim.name=muon``, registered in :mod:`.optimizers`).
Its own module so that importing cramkit does not import pytorch_optimizer before a run needs it."""

from __future__ import annotations

import torch
from pytorch_optimizer import Muon
from pytorch_optimizer.optimizer.muon.base import MuonBase, get_adjusted_lr
from pytorch_optimizer.optimizer.utils.matrix import DTensor, has_dtensor


class StackedMuon(Muon):
    """pytorch_optimizer's ``Muon`` that orthogonalises a fused matrix part by part.

    A Muon group with ``blocks=k`` holds matrices whose rows are k matrices of equal height
    stacked (``attn.qkv`` = [q | k | v], a GLU's ``ffn.up`` = [value | gate]). Each part is
    orthogonalised on its own (one batched Newton-Schulz) and gets its own shape factor
    sqrt(max(1, rows / cols)), as when Q, K and V are separate matrices (modded-nanogpt);
    orthogonalising the stack as one matrix would couple the parts' singular vectors and scale
    all of them by the stack's height.

    Under FSDP2 each rank holds a shard of rows of every matrix (a DTensor). Newton-Schulz on a
    shard would orthogonalise another matrix, so each update is gathered whole on every rank,
    orthogonalised (part by part) exactly as without FSDP2, and each rank keeps its own rows: the
    same update as under DDP, at the cost of one all-gather and one whole matrix in memory at a
    time.
    """

    @staticmethod
    def _orthogonalize(group, updates):
        if any(has_dtensor and isinstance(u, DTensor) for u in updates):
            return [_shard_like(StackedMuon._orthogonalize(group, [u.full_tensor()])[0], u) for u in updates]
        blocks = group.get("blocks", 1)
        if blocks == 1:
            return MuonBase._orthogonalize(group, updates)
        out = []
        for update in updates:
            matrix = update.reshape(update.size(0), -1)
            parts = MuonBase._orthogonalize(group, list(matrix.chunk(blocks, dim=0)))
            rows, cols = matrix.shape
            # The library scales the step by the whole stack's shape factor; each part's own
            # is the one a separate matrix would get.
            adjusted = group.get("use_adjusted_lr", False)
            scale = (get_adjusted_lr(1.0, (rows // blocks, cols), adjusted)
                     / get_adjusted_lr(1.0, (rows, cols), adjusted))
            out.append(torch.cat(parts, dim=0).mul_(scale))
        return out


def _shard_like(whole: torch.Tensor, like: DTensor) -> DTensor:
    """``whole`` (the same on every rank) as a DTensor placed like ``like``: each rank's rows."""
    return DTensor.from_local(whole, device_mesh=like.device_mesh).redistribute(placements=like.placements)

