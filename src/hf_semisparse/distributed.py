"""Helpers for parameters sharded as DTensors (FSDP2 `fully_shard`): the mask math sees whole tensors when it
must (saving, loading, checking), and every per-step operation stays on the local shards."""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed support
    DTensor = None
    distribute_tensor = None


def is_dtensor(tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank for a DTensor (a collective: call it on every rank)."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `reference`: sharded the same way for a DTensor (a collective), else on its device."""
    if is_dtensor(reference):
        return distribute_tensor(full.to(reference.device), reference.device_mesh, reference.placements)
    return full.to(reference.device)
