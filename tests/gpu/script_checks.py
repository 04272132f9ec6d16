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
    """What a result JSON must say about its run: UTC date, the command, GPU, driver and software versions."""
    import datetime
    import shlex
    import subprocess
    import sys

    import torch
    import transformers

    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        driver = "?"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "driver": driver.splitlines()[0] if driver else "?",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
    }
