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
