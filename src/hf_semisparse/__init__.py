"""hf_semisparse: 2:4 semi-structured sparsity for Hugging Face Transformers.

The public names below are imported on first use (PEP 562 module `__getattr__`): `import hf_semisparse` itself
loads no torch or transformers, so the `hf-semisparse` command starts fast and `from hf_semisparse import
SparsityTrainer` pulls in `transformers.trainer` only when asked for.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING

from .config import SparsityConfig

try:
    __version__ = _version("hf-semisparse")  # one source of truth: pyproject.toml's [project] version
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# public name -> submodule that defines it
_LAZY = {
    "AutoSparseModel": ".modeling",
    "CorruptCheckpointError": ".errors",
    "SaveDestinationError": ".errors",
    "SparseCheckpointError": ".errors",
    "NoTargetsError": ".targets",
    "SparsityReport": ".targets",
    "select_targets": ".targets",
    "SparsityCallback": ".training",
    "SparsityTrainer": ".training",
    "SparsityTrainingArguments": ".training",
    "sample_teacher_sequences": ".training.teacher_data",
    "Sparsifier": ".pruning",
    "prune_24": ".pruning",
    "save_sparse_pretrained": ".serialization",
    "check_nm_sparse": ".masks",
    "compute_nm_mask": ".masks",
    "find_nm_violation": ".masks",
    "is_nm_sparse": ".masks",
    "pack_mask": ".masks",
    "unpack_mask": ".masks",
}

__all__ = [
    "AutoSparseModel",
    "CorruptCheckpointError",
    "NoTargetsError",
    "SaveDestinationError",
    "SparseCheckpointError",
    "Sparsifier",
    "SparsityCallback",
    "SparsityConfig",
    "SparsityReport",
    "SparsityTrainer",
    "SparsityTrainingArguments",
    "__version__",
    "check_nm_sparse",
    "compute_nm_mask",
    "find_nm_violation",
    "is_nm_sparse",
    "pack_mask",
    "prune_24",
    "sample_teacher_sequences",
    "save_sparse_pretrained",
    "select_targets",
    "unpack_mask",
]


# quant_method "hf_semisparse" for plain from_pretrained: a post-import hook registers the quantizer when
# transformers imports its quantizer registry, so this line imports neither transformers nor torch
from .registration import install as _install_quantizer  # noqa: E402

_install_quantizer()


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs; at run time `__getattr__` imports these on first use
    from .errors import CorruptCheckpointError, SaveDestinationError, SparseCheckpointError
    from .masks import (
        check_nm_sparse,
        compute_nm_mask,
        find_nm_violation,
        is_nm_sparse,
        pack_mask,
        unpack_mask,
    )
    from .modeling import AutoSparseModel
    from .pruning import Sparsifier, prune_24
    from .serialization import save_sparse_pretrained
    from .targets import NoTargetsError, SparsityReport, select_targets
    from .training import SparsityCallback, SparsityTrainer, SparsityTrainingArguments
    from .training.teacher_data import sample_teacher_sequences
