"""Our own CUTLASS 2:4 GEMM for Hopper against cuSPARSELt and dense, per GEMM (issue 4). One run:

    PYTHONPATH=src python benchmarks/probe_cutlass_sm90.py --lib path/to/libhss_fp16.so --json $OUT/probe.json

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
import ctypes
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from hf_semisparse.kernels.linear import SemiSparseLinear  # noqa: E402
from hf_semisparse.kernels.tuning import time_cuda_us  # noqa: E402
from hf_semisparse.masks import compute_nm_mask  # noqa: E402
from hf_semisparse.utils import write_json  # noqa: E402


class Lib:
    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        p, i, i64, sz, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_size_t, ctypes.c_float
        self.lib.hss_num_configs.restype = i
        self.lib.hss_compressed_sizes.argtypes = [i, i, ctypes.POINTER(i64), ctypes.POINTER(i64)]
        self.lib.hss_compress.argtypes = [p, p, p, i, i, p, sz, p]
        self.lib.hss_compress_workspace.argtypes = [i, i]
        self.lib.hss_compress_workspace.restype = sz
        self.lib.hss_gemm_workspace.argtypes = [i, i, i, i, i, ctypes.POINTER(sz)]
        self.lib.hss_gemm.argtypes = [i, i, p, p, p, p, p, p, i, i, i, f, p, sz, p]
        self.num_configs = self.lib.hss_num_configs()
        self.workspaces: dict = {}

    def compress(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = w.shape
        a_el, e_bytes = ctypes.c_int64(), ctypes.c_int64()
        check(self.lib.hss_compressed_sizes(n, k, ctypes.byref(a_el), ctypes.byref(e_bytes)), "sizes")
        a_c = torch.empty(a_el.value, dtype=w.dtype, device=w.device)
        e = torch.empty(e_bytes.value, dtype=torch.uint8, device=w.device)
        ws = torch.empty(max(1, self.lib.hss_compress_workspace(n, k)), dtype=torch.uint8, device=w.device)
        stream = torch.cuda.current_stream().cuda_stream
        check(
            self.lib.hss_compress(
                w.data_ptr(), a_c.data_ptr(), e.data_ptr(), n, k, ws.data_ptr(), ws.numel(), stream
            ),
            "compress",
        )
        return a_c, e

    def gemm(self, config, a_c, e, n, x, bias, residual=None, gelu=False, out=None):
        m, k = x.shape
        key = (config, gelu, n, m, k)
        ws = self.workspaces.get(key)
        if ws is None:
            size = ctypes.c_size_t()
            check(self.lib.hss_gemm_workspace(config, int(gelu), n, m, k, ctypes.byref(size)), "workspace")
            ws = self.workspaces[key] = torch.empty(max(1, size.value), dtype=torch.uint8, device=x.device)
        y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
        check(
            self.lib.hss_gemm(
                config,
                int(gelu),
                a_c.data_ptr(),
                e.data_ptr(),
                x.data_ptr(),
                None if bias is None else bias.data_ptr(),
                None if residual is None else residual.data_ptr(),
                y.data_ptr(),
                n,
                m,
                k,
                1.0,
                ws.data_ptr(),
                ws.numel(),
                torch.cuda.current_stream().cuda_stream,
            ),
            f"gemm config {config}",
        )
        return y


def check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with status {status}")


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("nan")
    return ((y.float() - ref).norm() / ref.norm()).item()


def problem(lib: Lib, n: int, k: int, m: int, epilogue: str) -> dict:
    lin = torch.nn.Linear(k, n, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
        lin.weight.mul_(compute_nm_mask(lin.weight))
        lin.bias.normal_(0, 0.02)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    r = torch.randn(m, n, device="cuda", dtype=torch.float16)
    a_c, e = lib.compress(lin.weight)
    ref = x.float() @ lin.weight.float().t() + lin.bias.float()
    gelu = epilogue == "gelu"
    res = r if epilogue == "residual" else None
    if gelu:
        ref = F.gelu(ref)
    elif res is not None:
        ref = ref + r.float()
    row = {"n": n, "k": k, "m": m, "epilogue": epilogue, "errors": {}, "us": {}}
    for c in range(lib.num_configs):
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
        try:
            lib.gemm(c, a_c, e, n, x, lin.bias, residual=res, gelu=gelu, out=out)
            torch.cuda.synchronize()
            row["errors"][c] = rel(out, ref)
        except RuntimeError as err:
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
        for c in range(lib.num_configs):
            if isinstance(row["errors"][c], float):
                fns[f"cutlass{c}"] = lambda c=c: lib.gemm(c, a_c, e, n, x, lin.bias, residual=res, gelu=gelu)
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
    ap.add_argument("--lib", required=True)
    ap.add_argument("--tokens", type=int, nargs="+", default=[6144, 24576, 98304])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    lib = Lib(args.lib)
    torch.manual_seed(0)
    rows = []
    names = None
    for m in args.tokens:
        for n, k, epi in BERT:
            row = problem(lib, n, k, m, epi)
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
