"""Which elementwise op zeroes pruned entries fastest: bert-base-shaped fp32 tensors (72 of them, as the
gradients or weights of SparsityTrainer's targets), each way timed over the whole set. Prints a table and
writes JSON. Not a test.

    python benchmarks/probes/probe_mask_ops.py --json outputs/probe_mask_ops.json
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_semisparse.masks import compute_nm_mask
from hf_semisparse.utils import write_json


def shapes(hidden: int = 768, layers: int = 12) -> list[tuple[int, int]]:
    block = [(hidden, hidden)] * 4 + [(4 * hidden, hidden), (hidden, 4 * hidden)]
    return block * layers


def timed(fn, iterations: int, device: str) -> float:
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / iterations


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.manual_seed(0)
    tensors = [torch.randn(s, device=a.device) for s in shapes()]
    keep = [compute_nm_mask(t) for t in tensors]
    pruned = [~m for m in keep]
    keep_f32 = [m.float() for m in keep]
    elements = sum(t.numel() for t in tensors)
    zero = torch.zeros((), device=a.device)

    ways = {
        "_foreach_mul_ by bool masks": lambda: torch._foreach_mul_(tensors, keep),
        "mul_ by bool mask, per tensor": lambda: [t.mul_(m) for t, m in zip(tensors, keep, strict=True)],
        "where(keep, t, 0, out=t), per tensor": lambda: [
            torch.where(m, t, zero, out=t) for t, m in zip(tensors, keep, strict=True)
        ],
        "masked_fill_(~keep, 0), per tensor": lambda: [
            t.masked_fill_(~m, 0.0) for t, m in zip(tensors, keep, strict=True)
        ],
        "masked_fill_(pruned, 0) (stored inverse), per tensor": lambda: [
            t.masked_fill_(m, 0.0) for t, m in zip(tensors, pruned, strict=True)
        ],
        "_foreach_mul_ by fp32 masks (4x mask memory)": lambda: torch._foreach_mul_(tensors, keep_f32),
    }
    reference = [t * m for t, m in zip(tensors, keep, strict=True)]
    rows = {}
    for name, fn in ways.items():
        ms = timed(fn, a.iterations, a.device)
        right = all(torch.equal(t, r) for t, r in zip(tensors, reference, strict=True))
        rows[name] = {"ms": ms, "correct": right}
        print(f"{name:<56}{ms:>9.3f} ms  {'ok' if right else 'WRONG'}")
    result = {
        "device": torch.cuda.get_device_name() if a.device == "cuda" else a.device,
        "torch": torch.__version__,
        "tensors": len(tensors),
        "elements": elements,
        "ms_per_pass": rows,
    }
    if a.json:
        write_json(a.json, result)


if __name__ == "__main__":
    main()
