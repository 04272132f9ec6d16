"""Importance scores that decide which weights of each group survive."""

from __future__ import annotations

import torch

from ..config import METHODS


def compute_scores(method: str, weight: torch.Tensor) -> torch.Tensor:
    """Scores of `weight` (`[out, in]` layout) under `method`; larger means keep."""
    if method == "magnitude":
        return weight.detach().abs()
    raise ValueError(f"Unknown pruning method {method!r}; choose one of {METHODS}")
