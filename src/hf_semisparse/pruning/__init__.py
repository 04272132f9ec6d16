"""Mask selection and the one-shot entry point."""

from .sparsifier import MASKS_NAME, Sparsifier, prune_24, record_sparsity_in_config

__all__ = ["MASKS_NAME", "Sparsifier", "prune_24", "record_sparsity_in_config"]
