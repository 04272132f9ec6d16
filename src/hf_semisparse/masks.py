"""N:M mask math on plain tensors.

Groups are `m` consecutive elements along the last dimension. For an `nn.Linear` weight `[out, in]` that is
the input dimension, which is the layout `torch.sparse.to_sparse_semi_structured` and cuSPARSELt expect.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class GroupViolation(NamedTuple):
    """The first group of `m` that holds more than `n` non-zeros."""

    index: tuple[int, ...]  # index of the group's first element in the tensor
    nonzeros: int


def _groups(tensor: torch.Tensor, m: int) -> torch.Tensor:
    if tensor.dim() == 0 or tensor.shape[-1] % m:
        raise ValueError(
            f"N:M sparsity groups {m} consecutive elements along the last dimension, but a tensor of shape "
            f"{tuple(tensor.shape)} has a last dimension that is not a multiple of {m}"
        )
    return tensor.reshape(-1, m)


def compute_nm_mask(
    weight: torch.Tensor, n: int = 2, m: int = 4, scores: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean mask keeping the `n` largest-scoring elements of every group of `m`.

    Scores default to `|weight|`. Ties are broken towards the lower index, so the result is deterministic.

    Example:
        >>> compute_nm_mask(torch.tensor([[0.1, -3.0, 2.0, 0.5]]))
        tensor([[False,  True,  True, False]])
    """
    scores = weight.detach().abs() if scores is None else scores.detach()
    if scores.shape != weight.shape:
        raise ValueError(
            f"scores shape {tuple(scores.shape)} differs from weight shape {tuple(weight.shape)}"
        )
    groups = _groups(scores, m).float()
    if not torch.isfinite(groups).all():
        raise ValueError("cannot choose an N:M mask: the scores hold NaN or infinite values")
    keep = torch.argsort(groups, dim=1, descending=True, stable=True)[:, :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return mask.reshape(weight.shape)


def compute_partial_nm_mask(
    weight: torch.Tensor,
    level: float,
    n: int = 2,
    m: int = 4,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask that N:M-prunes the share `level` of groups whose pruning removes the least score.

    `level=1.0` equals `compute_nm_mask`; `level=0.0` keeps everything. Groups that are already N:M (their
    dropped elements score zero) are chosen first, so raising `level` step by step never revives a weight.
    """
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"level must be in [0, 1], got {level}")
    full = compute_nm_mask(weight, n, m, scores)
    if level >= 1.0:
        return full
    scores = weight.detach().abs() if scores is None else scores.detach()
    groups = _groups(scores, m).float()
    full_groups = full.reshape(-1, m)
    cost = (groups * ~full_groups).sum(dim=1)
    n_pruned = int(math.floor(level * cost.numel() + 1e-9))
    mask = torch.ones_like(full_groups)
    if n_pruned:
        chosen = torch.argsort(cost, stable=True)[:n_pruned]
        mask[chosen] = full_groups[chosen]
    return mask.reshape(weight.shape)


def find_nm_violation(tensor: torch.Tensor, n: int = 2, m: int = 4) -> GroupViolation | None:
    """The first group (in row-major order) with more than `n` non-zeros, or None if `tensor` is N:M."""
    nonzeros = (_groups(tensor.detach(), m) != 0).sum(dim=1)
    bad = torch.nonzero(nonzeros > n)
    if bad.numel() == 0:
        return None
    g = int(bad[0, 0])
    flat = g * m
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tensor.shape))
    return GroupViolation(index=index, nonzeros=int(nonzeros[g]))


def is_nm_sparse(tensor: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every group of `m` along the last dimension has at most `n` non-zeros."""
    return find_nm_violation(tensor, n, m) is None


def check_nm_sparse(tensor: torch.Tensor, name: str, n: int = 2, m: int = 4) -> None:
    """Raise `ValueError` naming `name` and its first offending group if `tensor` is not N:M."""
    bad = find_nm_violation(tensor, n, m)
    if bad is not None:
        raise ValueError(
            f"{name} (shape {tuple(tensor.shape)}) is not {n}:{m} sparse: the group of {m} starting at index "
            f"{bad.index} has {bad.nonzeros} non-zeros (at most {n} allowed)"
        )


def apply_mask_(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero `weight` in place where `mask` is False."""
    with torch.no_grad():
        weight.mul_(mask.to(device=weight.device))
    return weight


_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean mask into bits along its last dimension (little-endian, like `np.packbits(bitorder="little")`).

    Returns uint8 of shape `[..., ceil(last / 8)]`.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_mask expects a bool tensor, got {mask.dtype}")
    last = mask.shape[-1]
    padded = math.ceil(last / 8) * 8
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, padded - last))
    bits = bits.reshape(*mask.shape[:-1], padded // 8, 8)
    return (bits * _BIT_WEIGHTS.to(bits.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of `pack_mask`: a bool tensor of `shape`."""
    shape = tuple(shape)
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_mask expects uint8, got {packed.dtype}")
    expected = (*shape[:-1], math.ceil(shape[-1] / 8))
    if tuple(packed.shape) != expected:
        raise ValueError(
            f"packed mask has shape {tuple(packed.shape)}, expected {expected} for a mask of {shape}"
        )
    bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS.to(packed.device)) != 0
    return bits.reshape(*shape[:-1], -1)[..., : shape[-1]].contiguous()
