"""The pass/fail recorder of the script-style GPU checks (`check_fp8_gpu.py`, `check_lora_gpu.py`): each check
prints one `ok` / `FAIL` line; the script writes `CHECKS` and `FAILURES` to its JSON and exits 1 on any failure.
(Imported as a sibling module: `python tests/gpu/<script>.py` puts tests/gpu on sys.path.)"""

from __future__ import annotations

FAILURES: list[str] = []
CHECKS: list[str] = []


def check(ok: bool, what: str) -> None:
    line = ("ok    " if ok else "FAIL  ") + what
    print(line, flush=True)
    CHECKS.append(line)
    if not ok:
        FAILURES.append(what)


def run_record() -> dict:
    """What a result JSON must say about its run: UTC date, the command, and the GPU, driver and software versions
    (`benchmarks/bench_inference.py`'s `env_info`, as the benchmarks record them)."""
    import datetime
    import os
    import shlex
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
    from bench_inference import env_info

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        **env_info(),
    }
