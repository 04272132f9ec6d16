"""The exceptions hf_semisparse raises for bad checkpoints and unsafe save destinations."""

from __future__ import annotations


class SparseCheckpointError(ValueError):
    """A checkpoint is malformed; the message names the file or tensor and what is wrong."""


class CorruptCheckpointError(SparseCheckpointError):
    """A file's bytes disagree with the digests recorded when it was written; the message names file and tensor."""


class SaveDestinationError(SparseCheckpointError):
    """Saving to this folder could lose files (the current directory, a folder above the source, a non-empty
    folder holding no checkpoint); the message says why and how to save there anyway."""
