"""Small helpers shared by several modules."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable

from torch import nn


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` for a temporary file beside `path`, then rename it onto `path`.

    A crash part-way leaves either the old file or none, never a truncated one.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would create it; mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    """`obj` as JSON at `path`, atomically; missing parent folders are made."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def output_head(model: nn.Module) -> nn.Module | None:
    """The module that computes a language model's logits (transformers' `get_output_embeddings()`), or None."""
    getter = getattr(model, "get_output_embeddings", None)
    try:
        output = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):  # transformers' models without an output head
        return None
    return output if isinstance(output, nn.Module) else None


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
            model = model.module
        else:
            return model
