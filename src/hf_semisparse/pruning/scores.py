"""Importance scores that decide which weights of each group survive."""

from __future__ import annotations

import torch

from ..config import METHODS


def compute_scores(method: str, weight: torch.Tensor) -> torch.Tensor:
    """Scores of `weight` (`[out, in]` layout) under `method`; larger means keep."""
    if method in ("magnitude", "wanda", "sparsegpt"):
        # wanda and sparsegpt have already zeroed the weights they drop (calibrated_prune_): what is left is the mask
        return weight.detach().abs()
    raise ValueError(f"Unknown pruning method {method!r}; choose one of {METHODS}")
