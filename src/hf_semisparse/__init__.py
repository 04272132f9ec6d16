"""hf_semisparse: 2:4 semi-structured sparsity for Hugging Face Transformers."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("hf-semisparse")  # one source of truth: pyproject.toml's [project] version
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

from .registration import install as _install_quantizer  # noqa: E402

_install_quantizer()  # quant_method "hf_semisparse" for plain from_pretrained (registered lazily)
from .config import SparsityConfig  # noqa: E402
from .masks import (  # noqa: E402
    check_nm_sparse,
    compute_nm_mask,
    find_nm_violation,
    is_nm_sparse,
    pack_mask,
    unpack_mask,
)
from .modeling import AutoSparseModel  # noqa: E402
from .pruning import Sparsifier, prune_24  # noqa: E402
from .serialization import SparseCheckpointError, save_sparse_pretrained  # noqa: E402
from .targets import NoTargetsError, SparsityReport, select_targets  # noqa: E402
from .training import SparsityCallback, SparsityTrainer, SparsityTrainingArguments  # noqa: E402

__all__ = [
    "AutoSparseModel",
    "SparseCheckpointError",
    "NoTargetsError",
    "SparsityCallback",
    "SparsityConfig",
    "SparsityReport",
    "SparsityTrainer",
    "SparsityTrainingArguments",
    "Sparsifier",
    "__version__",
    "check_nm_sparse",
    "compute_nm_mask",
    "find_nm_violation",
    "is_nm_sparse",
    "pack_mask",
    "prune_24",
    "save_sparse_pretrained",
    "select_targets",
    "unpack_mask",
]
