"""Building our CUDA kernels into shared libraries with nvcc, and finding them again.

Shared by `cutlass_sm90` (the fp16/bf16 2:4 kernels) and `cutlass_fp8` (the FP8 2:4 kernels): a library is
compiled into a temporary file beside its target and renamed into place, with the digest of its source in
`<library>.sha256`, so a reader never sees a half-written library and a library built from another version of
the source is not loaded.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable

from ..utils import atomic_write_text


def run_nvcc(command: list[str], progress: str | None = None) -> subprocess.CompletedProcess:
    """Run `command`; with `progress`, a tqdm line with that description counts the seconds meanwhile."""
    if progress is None:
        return subprocess.run(command, capture_output=True, text=True)
    from tqdm.auto import tqdm

    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = time.monotonic()
    with tqdm(desc=progress, bar_format="{desc}: {elapsed} elapsed") as bar:
        while True:
            try:
                stdout, stderr = proc.communicate(timeout=1.0)  # retrying after a timeout loses no output
                break
            except subprocess.TimeoutExpired:
                bar.set_postfix_str(f"{time.monotonic() - start:.0f} s", refresh=True)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def build_shared_library(
    command_fn: Callable[[str], list[str]],
    target: str,
    digest: str,
    progress: str | None = None,
    error: type[Exception] = RuntimeError,
) -> str:
    """Run the nvcc command `command_fn(output)` into a temporary file, rename it to `target`, and write `digest`
    to `target + ".sha256"`; returns `target`.

    `target`'s directory is created if missing. `progress`: the description of a progress line shown while nvcc
    runs (None: silent). Nothing is left behind when the build fails.

    Raises:
        error: nvcc exited non-zero (its exit status and the last 4000 characters of its stderr in the message).
    """
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".so.tmp")
    os.close(fd)
    try:
        result = run_nvcc(command_fn(tmp), progress)
        if result.returncode != 0:
            raise error(f"nvcc failed ({result.returncode}):\n{result.stderr[-4000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    atomic_write_text(target + ".sha256", digest)
    return target


def find_built_library(
    path: str, digest: str, said: set[str], advice: str, log: logging.Logger
) -> str | None:
    """`path` if it is a library built from the source of `digest`, else None.

    A library whose `.sha256` names another digest is warned about once per path (`said` remembers which; every
    layer asks), the warning ending with `advice` (how to rebuild it).
    """
    if not os.path.isfile(path):
        return None
    try:
        with open(path + ".sha256", encoding="utf-8") as f:
            if f.read().strip() != digest:
                if path not in said:
                    said.add(path)
                    log.warning("hf_semisparse: %s was built from another source; %s", path, advice)
                return None
    except OSError:
        return None
    return path
