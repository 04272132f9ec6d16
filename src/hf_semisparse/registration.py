"""Registers our quantization method with transformers, cheaply: `import hf_semisparse` imports no transformers.

transformers reads its quantization registry (`transformers.quantizers.auto`) only inside `from_pretrained`. If that
module is already imported, `install` registers `quantizer.SemiSparseHfQuantizer` at once; otherwise a post-import
hook registers it right after transformers imports the module (PEP 451 finder wrapping the real loader), so the
cost of the quantizer API (about 3 s on a 2-core CPU after torch) is paid only by programs that load models.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.abc
import importlib.util
import logging
import sys

logger = logging.getLogger(__name__)

_TARGET = "transformers.quantizers.auto"

# Options of the current load, set by `AutoSparseModel.from_pretrained` (plain from_pretrained gets the defaults).
_DEFAULT_OPTIONS = (("accelerate", "auto"), ("keep_dense", None), ("verified_files", ()))
_LOAD_OPTIONS: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "hf_semisparse_load_options", default=None
)


def current_load_options() -> dict:
    """The options of the load in progress (`load_options`), or the defaults."""
    return {**dict(_DEFAULT_OPTIONS), **(_LOAD_OPTIONS.get() or {})}


@contextlib.contextmanager
def load_options(**options):
    """Options for the 2:4 layers of the models loaded inside the block.

    `accelerate`: True runs `kernels.accelerate_24` (which reports why where it cannot), False never, "auto" (plain
    `from_pretrained`) when the model has weights on a CUDA device. `keep_dense`: passed to `accelerate_24` (None: its default).
    `verified_files`: weight files whose recorded digests were already checked (the quantizer skips checking them
    again).
    """
    token = _LOAD_OPTIONS.set({**current_load_options(), **options})
    try:
        yield
    finally:
        _LOAD_OPTIONS.reset(token)


def _register() -> None:
    from . import quantizer  # noqa: F401 - registers on import


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds `transformers.quantizers.auto` through the other finders and registers us after it has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # once: the real finders find the module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module):
            original(module)
            _register()

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Make transformers know quant_method "hf_semisparse" (and our reading of legacy 2:4 compressed-tensors)."""
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())
