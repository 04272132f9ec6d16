"""Where a checkpoint may be saved, and writing it there without losing anybody's files.

A new folder is written whole beside its final place and renamed into it, so an interrupted save leaves nothing.
Into an existing folder every file is written to a hidden staging folder inside it first; only when all are
written does each replace its namesake (one `os.replace` per file, atomic), and weight files of an older save
that the new one does not use (shards, index) are removed. Nothing else in the folder is touched: tokenizer
files, notes, `runs/`, sub-folders stay. Folders get the mode `transformers`' `save_pretrained` gives (0777 less
the umask), not `tempfile`'s 0700, and files 0666 less the umask, as `open` gives them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

from .errors import SaveDestinationError

# Files a transformers checkpoint (or the output folder of a Trainer) holds: a folder with one of them is a
# checkpoint folder, and saving into it replaces only the files the save writes.
_CHECKPOINT_FILE = re.compile(
    r"config\.json|generation_config\.json|.+\.safetensors|.+\.safetensors\.index\.json|pytorch_model.*\.bin"
    r"|tokenizer(_config)?\.json|special_tokens_map\.json|sparsity_config\.json|training_args\.bin"
    r"|adapter_config\.json|preprocessor_config\.json"
)
_CHECKPOINT_DIR = re.compile(r"checkpoint-\d+")
# Weight files of our own layout; those an older save left and this one does not write are removed.
OWNED_WEIGHTS = re.compile(
    r"model\.safetensors|model\.safetensors\.index\.json|model-\d{5}-of-\d{5}\.safetensors"
)
_STAGING_PREFIX = ".hf_semisparse-save-"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def default_dir_mode() -> int:
    """0777 less the process umask: the mode `os.makedirs` (and so `save_pretrained`) gives a new folder."""
    return 0o777 & ~_umask()


def default_file_mode() -> int:
    """0666 less the process umask: the mode `open(path, "w")` gives a new file (safetensors writes 0600)."""
    return 0o666 & ~_umask()


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _holds_checkpoint(folder: str) -> bool:
    for entry in os.scandir(folder):
        if entry.is_dir() and _CHECKPOINT_DIR.fullmatch(entry.name):
            return True
        if entry.is_file() and _CHECKPOINT_FILE.fullmatch(entry.name):
            return True
    return False


def _holds_dense_weights(folder: str) -> bool:
    """Weight files whose `config.json` records no 2:4 format of ours (a dense or other checkpoint)."""
    weights = any(
        name.endswith((".safetensors", ".bin")) and not name.startswith(".") for name in os.listdir(folder)
    )
    if not weights:
        return False
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return True
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quant, dict):
        return True
    from .checkpoint_format import QUANT_METHOD, SPARSITY_FORMAT, is_legacy_sparse_24

    legacy = is_legacy_sparse_24(quant) and quant["sparsity_config"].get("format") == SPARSITY_FORMAT
    return not (quant.get("quant_method") == QUANT_METHOD or legacy)


def _visible_entries(folder: str) -> list[str]:
    return sorted(name for name in os.listdir(folder) if not name.startswith("."))


def check_save_destination(
    save_directory: str | os.PathLike, *, source: str | os.PathLike | None = None, overwrite: bool = False
) -> str:
    """Refuse a destination where saving could lose files; return its absolute real path.

    Refused unless `overwrite=True`: the current directory or a folder above it, a folder above `source` (the
    checkpoint the model came from), `source` itself when it holds weights in another format than our 2:4 one (a
    dense checkpoint: the save would replace its weights), a non-empty folder that holds no checkpoint (see
    `_CHECKPOINT_FILE`; names starting with "." do not count). Always refused: a path that is a file. Even with
    `overwrite=True` a save only replaces the files it writes.

    Raises:
        SaveDestinationError: with the reason and the keyword that allows it.
    """
    destination = os.path.realpath(os.fspath(save_directory))
    if os.path.exists(destination) and not os.path.isdir(destination):
        raise SaveDestinationError(f"cannot save to {destination}: it is a file, not a folder")
    if overwrite:
        return destination
    hint = (
        "choose a new or checkpoint folder, or pass overwrite=True (CLI: --overwrite) to write into it anyway"
    )
    cwd = os.path.realpath(os.getcwd())
    if _within(cwd, destination):
        where = (
            "the current directory" if cwd == destination else f"a folder above the current directory {cwd}"
        )
        raise SaveDestinationError(f"refusing to save into {destination}: it is {where}; {hint}")
    if source is not None and os.path.isdir(source):
        source = os.path.realpath(os.fspath(source))
        if source != destination and _within(source, destination):
            raise SaveDestinationError(
                f"refusing to save into {destination}: it holds the source checkpoint {source}; {hint}"
            )
        if source == destination and _holds_dense_weights(destination):
            raise SaveDestinationError(
                f"refusing to save into {destination}: it is the dense checkpoint the model was loaded from, and "
                f"the save would replace its weights with the compressed 2:4 ones; {hint}"
            )
    if os.path.isdir(destination) and not _holds_checkpoint(destination):
        entries = _visible_entries(destination)
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise SaveDestinationError(
                f"refusing to save into {destination}: it is not empty ({shown}) and holds no checkpoint; {hint}"
            )
    return destination


def stage(destination: str) -> str:
    """A fresh staging folder for a save to `destination`: beside it when it does not exist yet, else inside it."""
    if os.path.isdir(destination):
        return tempfile.mkdtemp(prefix=_STAGING_PREFIX, suffix=".partial", dir=destination)
    parent = os.path.dirname(destination)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(destination)}.", suffix=".partial", dir=parent)


def commit(staging: str, destination: str) -> list[str]:
    """Move every file of `staging` into `destination`; drop our stale weight files; return the names moved.

    Weight files move first and config files last, so that a reader never sees a config before its weights. Each
    file replaces its namesake atomically; if a move fails, every entry already replaced is put back and the
    error raised. Raises `SaveDestinationError`, before anything moves, where an entry of another kind (a file, a
    folder, a link) is in the way of one the save writes.
    """
    names = sorted(os.listdir(staging), key=lambda n: (not OWNED_WEIGHTS.fullmatch(n), n))
    for name in names:
        path = os.path.join(staging, name)  # a processor may write a folder (e.g. a chat template folder)
        os.chmod(path, default_dir_mode() if os.path.isdir(path) else default_file_mode())
    if not os.path.isdir(destination):
        os.chmod(staging, default_dir_mode())
        os.replace(staging, destination)
        return names
    for name in names:  # checked before anything moves: a failure here changes nothing
        target = os.path.join(destination, name)
        new_is_dir = os.path.isdir(os.path.join(staging, name))
        if os.path.islink(target) and new_is_dir:
            raise SaveDestinationError(f"cannot write the folder {target}: a link of that name is in the way")
        if os.path.isdir(target) and not os.path.islink(target) and not new_is_dir:
            raise SaveDestinationError(f"cannot write {target}: a folder of that name is in the way")
        if new_is_dir and os.path.lexists(target) and not os.path.isdir(target):
            raise SaveDestinationError(f"cannot write the folder {target}: a file of that name is in the way")
    backup = tempfile.mkdtemp(prefix=".hf_semisparse-previous-", dir=destination)
    moved: list[tuple[str, bool]] = []  # (name, whether an old entry was kept in `backup`)
    try:
        for name in names:
            source, target = os.path.join(staging, name), os.path.join(destination, name)
            kept = os.path.lexists(target)
            if kept and os.path.isdir(source):
                os.replace(target, os.path.join(backup, name))  # a folder: moved aside, then replaced
            elif kept:
                _keep_copy(target, os.path.join(backup, name))  # a file: replaced atomically below
            os.replace(source, target)
            moved.append((name, kept))
    except BaseException:
        for name, kept in reversed(moved):  # put back what this save replaced
            target = os.path.join(destination, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target, ignore_errors=True)
            elif os.path.lexists(target):
                os.remove(target)
            if kept:
                os.replace(os.path.join(backup, name), target)
        for name in os.listdir(backup):  # left: the entry of the move that failed (done ones were put back)
            if not os.path.lexists(os.path.join(destination, name)):  # a folder moved aside, not yet replaced
                os.replace(os.path.join(backup, name), os.path.join(destination, name))
        shutil.rmtree(backup, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)
    os.rmdir(staging)
    for name in os.listdir(destination):
        if OWNED_WEIGHTS.fullmatch(name) and name not in names:
            os.remove(os.path.join(destination, name))
    return names


def _keep_copy(path: str, copy: str) -> None:
    """A second name for the file at `path` (a hard link; a copy where links are not supported), so that it can be
    put back if the save fails after replacing it."""
    try:
        os.link(path, copy, follow_symlinks=False)
    except OSError:
        shutil.copy2(path, copy, follow_symlinks=False)


def discard(staging: str) -> None:
    shutil.rmtree(staging, ignore_errors=True)
