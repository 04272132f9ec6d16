"""Our own CUTLASS 2:4 GEMM for Hopper against cuSPARSELt and dense, per GEMM (issue 4). One run:

    HF_SEMISPARSE_KERNEL_DIR=<built kernels> PYTHONPATH=src python benchmarks/probes/probe_cutlass_sm90.py \
        --tokens 24576 98304 --json $OUT/probe.json

(the kernels built with `hf-semisparse build-kernels`).

cuSPARSELt 0.8 offers no GELU epilogue in fp16/bf16, so the up-projection pays a separate GELU pass (about 100 us
per bert-base layer at batch 64). `kernels/csrc/sm90_sparse_gemm.cu` is a CUTLASS 3 sparse GEMM with bias+GELU
and bias+residual epilogues. Per problem (N out, K in, M tokens), fp16, bias:
- correctness of every tile configuration, each epilogue, against float32 on the same fp16 inputs (output
  poisoned with NaN first), relative error ||y - ref|| / ||ref||, tolerance 2e-3;
- GPU time (CUDA events, 5 back-to-back calls, median of 7, second pass kept) of: dense `F.linear` (+ GELU or +
  residual as the layer needs), cuSPARSELt through `SemiSparseLinear` (searched algorithm, forced sparse) with
  the same extra pass or its residual epilogue, and each CUTLASS configuration with the fused epilogue.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))

from hf_semisparse.kernels.cusparselt import AlgConfig  # noqa: E402
from hf_semisparse.kernels.cutlass_sm90 import CutlassHandle, CutlassPlan, CutlassUnavailable  # noqa: E402
from hf_semisparse.kernels.linear import SemiSparseLinear  # noqa: E402
from hf_semisparse.kernels.tuning import time_cuda_us  # noqa: E402
from hf_semisparse.masks import compute_nm_mask  # noqa: E402
from hf_semisparse.utils import write_json  # noqa: E402


class Runner:
    """Every tile configuration of our CUTLASS kernels for one fp16 weight, through `kernels/cutlass_sm90.py`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, m: int, gelu: bool):
        self.handle = CutlassHandle(weight.device, weight.dtype)
        self.compressed = self.handle.compress(weight)
        n, k = weight.shape
        self.plans = [
            CutlassPlan(self.handle, n, k, m, bias=bias, gelu=gelu, alg=AlgConfig(c))
            for c in range(self.handle.num_configs)
        ]
        size = max(plan.workspace_size for plan in self.plans)
        self.workspace = torch.empty(max(size, 1), dtype=torch.uint8, device=weight.device)

    def __call__(self, config: int, x, residual=None, out=None):
        plan = self.plans[config]
        y = torch.empty(x.shape[0], plan.n, dtype=x.dtype, device=x.device) if out is None else out
        plan.run(self.compressed, x, y, self.workspace, torch.cuda.current_stream().cuda_stream, c=residual)
        return y


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("nan")
    return ((y.float() - ref).norm() / ref.norm()).item()


def problem(n: int, k: int, m: int, epilogue: str) -> dict:
    lin = torch.nn.Linear(k, n, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
        lin.weight.mul_(compute_nm_mask(lin.weight))
        lin.bias.normal_(0, 0.02)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    r = torch.randn(m, n, device="cuda", dtype=torch.float16)
    ref = x.float() @ lin.weight.float().t() + lin.bias.float()
    gelu = epilogue == "gelu"
    res = r if epilogue == "residual" else None
    if gelu:
        ref = F.gelu(ref)
    elif res is not None:
        ref = ref + r.float()
    cutlass = Runner(lin.weight.detach(), lin.bias.detach(), m, gelu)
    configs = range(len(cutlass.plans))
    row = {"n": n, "k": k, "m": m, "epilogue": epilogue, "errors": {}, "us": {}}
    for c in configs:
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
        try:
            cutlass(c, x, residual=res, out=out)
            torch.cuda.synchronize()
            row["errors"][c] = rel(out, ref)
        except CutlassUnavailable as err:
            row["errors"][c] = str(err)
    layer = SemiSparseLinear(lin)
    with torch.inference_mode():
        layer(x)
        layer.set_dispatch(m, True)
        if gelu:
            fns = {
                "dense": lambda: F.gelu(F.linear(x, lin.weight, lin.bias)),
                "cusparselt": lambda: F.gelu(layer(x)),
            }
        elif res is not None:
            fns = {
                "dense": lambda: F.linear(x, lin.weight, lin.bias) + r,
                "cusparselt": lambda: layer(x, residual=r),
            }
        else:
            fns = {"dense": lambda: F.linear(x, lin.weight, lin.bias), "cusparselt": lambda: layer(x)}
        row["errors"]["cusparselt"] = rel(fns["cusparselt"](), ref)
        for c in configs:
            if isinstance(row["errors"][c], float):
                fns[f"cutlass{c}"] = lambda c=c: cutlass(c, x, residual=res)
        for _ in range(2):  # two passes; the second is kept (clocks and caches warm)
            row["us"] = {name: time_cuda_us(fn, warmup=2, repeats=7, inner=5) for name, fn in fns.items()}
    return row


BERT = [
    (3072, 768, "gelu"),
    (768, 3072, "residual"),
    (2304, 768, "bias"),
    (768, 768, "residual"),
    (4096, 1024, "gelu"),
    (1024, 4096, "residual"),
    (3072, 1024, "bias"),
    (1024, 1024, "residual"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[6144, 24576, 98304])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    names = None
    for m in args.tokens:
        for n, k, epi in BERT:
            row = problem(n, k, m, epi)
            rows.append(row)
            if names is None:
                names = list(row["us"])
                print(
                    "| N | K | M | epilogue | "
                    + " | ".join(names)
                    + " | best cutlass / cusparselt | max err |"
                )
            us = row["us"]
            best = min((v for kk, v in us.items() if kk.startswith("cutlass")), default=float("nan"))
            errs = [v for v in row["errors"].values() if isinstance(v, float)]
            print(
                f"| {n} | {k} | {m} | {epi} | "
                + " | ".join(f"{us.get(c, float('nan')):.1f}" for c in names)
                + f" | {best / us['cusparselt']:.3f} | {max(errs):.2e} |",
                flush=True,
            )
            bad = {c: v for c, v in row["errors"].items() if not isinstance(v, float) or not v < 2e-3}
            if bad:
                print(f"   errors above 2e-3 or failures: {bad}", flush=True)
    if args.json:
        write_json(
            args.json, {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
        )


if __name__ == "__main__":
    main()
