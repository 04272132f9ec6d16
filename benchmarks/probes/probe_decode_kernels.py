"""Per GEMM, at decode and prefill token counts: dense (cuBLAS), cuSPARSELt (full search) and each tile configuration
of our CUTLASS 2:4 kernels, for Llama-3-8B's four GEMM shapes, fp16 and bf16. One run:

    HF_SEMISPARSE_KERNEL_DIR=<built kernels> PYTHONPATH=src python benchmarks/probes/probe_decode_kernels.py \
        --json $OUT/probe_decode_kernels.json

The question it answers: cuSPARSELt 0.8's bf16 kernels ran 1.5-1.9x slower than dense bf16 at 16 tokens on an H200
(2026-12-01, `probe_decode_profile.py`) while its fp16 ones ran up to 1.6x faster; do our CUTLASS kernels (the same
sparse tensor-core instructions, with small token tiles and Stream-K for decode) do better? Every time is the median
of CUDA graph replays (events around 20 back-to-back calls). Each CUTLASS configuration and cuSPARSELt's chosen
kernel are checked against a float64 reference (the relative error is recorded; a CUTLASS configuration over 5e-3
is not timed). The
copy bandwidth gives the time reading the weight once would take (the decode bound; 0.5625x the bytes for 2:4).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_generate import copy_bandwidth  # noqa: E402

from hf_semisparse.kernels import cutlass_sm90  # noqa: E402
from hf_semisparse.kernels.cusparselt import AlgConfig, Handle, MatmulPlan  # noqa: E402
from hf_semisparse.kernels.tuning import search_alg, time_cuda_us  # noqa: E402
from hf_semisparse.masks import compute_nm_mask  # noqa: E402
from hf_semisparse.utils import write_json  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def cutlass_times(w, x, ref, graph: bool) -> dict:
    """Microseconds per CUTLASS tile configuration (or why it could not run / was wrong)."""
    n, k = w.shape
    m = x.shape[0]
    handle = cutlass_sm90.CutlassHandle(w.device, w.dtype)
    compressed = handle.compress(w)
    out = torch.empty(m, n, dtype=w.dtype, device=w.device)
    times = {}
    for config in range(handle.num_configs):
        try:
            plan = cutlass_sm90.CutlassPlan(handle, n, k, m, alg=AlgConfig(config))
            ws = torch.empty(max(plan.workspace_size, 1), dtype=torch.uint8, device=w.device)

            def run(plan=plan, ws=ws):
                plan.run(compressed, x, out, ws, torch.cuda.current_stream().cuda_stream)

            out.fill_(float("nan"))
            run()
            error = rel(out, ref)
            if not error < 5e-3:
                times[str(config)] = f"wrong: relative error {error:.2e}"
                continue
            times[str(config)] = time_cuda_us(run, graph=graph, inner=20)
        except cutlass_sm90.CutlassUnavailable as exc:
            times[str(config)] = repr(exc)[:160]
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 32, 64, 128, 2048])
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=sorted(DTYPES))
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--json", default="outputs/probe_decode_kernels.json")
    args = ap.parse_args()
    bandwidth = copy_bandwidth()
    results = {
        "command": " ".join(sys.argv),
        "args": vars(args),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "cutlass": {},
        "rows": [],
    }
    print(f"{results['gpu']}, copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    handle = Handle(torch.device("cuda"))
    stream = torch.cuda.current_stream().cuda_stream
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        why = cutlass_sm90.why_unavailable(torch.device("cuda"), dtype, 4096, 4096)
        results["cutlass"][dtype_name] = why or "available"
        print(f"CUTLASS {dtype_name}: {results['cutlass'][dtype_name]}", flush=True)
        for shape in args.shapes:
            n, k = SHAPES[shape]
            torch.manual_seed(0)
            w = torch.randn(n, k, dtype=dtype, device="cuda")
            w = (w * compute_nm_mask(w, 2, 4)).contiguous()
            compressed = handle.compress(w)
            for m in args.tokens:
                graph = m <= 256
                x = torch.randn(m, k, dtype=dtype, device="cuda")
                ref = F.linear(x.double(), w.double())
                dense_us = time_cuda_us(lambda x=x, w=w: F.linear(x, w), graph=graph, inner=20)
                alg, cusparselt_us, _ = search_alg(handle, n, k, m, dtype, None, False, compressed, x, stream)
                plan = MatmulPlan(handle, n, k, m, dtype, alg=alg)  # the winner, checked as CUTLASS's are
                ws = torch.empty(max(plan.workspace_size, 1), dtype=torch.uint8, device="cuda")
                out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
                plan.run(compressed, x, out, ws, stream)
                cusparselt_error = rel(out, ref)
                row = {
                    "dtype": dtype_name,
                    "shape": shape,
                    "n": n,
                    "k": k,
                    "m": m,
                    "dense_us": dense_us,
                    "cusparselt_us": cusparselt_us,
                    "cusparselt_alg": alg.to_dict(),
                    "cusparselt_rel_error": cusparselt_error,
                    "dense_bound_us": n * k * w.element_size() / bandwidth * 1e6,
                }
                row["sparse_bound_us"] = row["dense_bound_us"] * 0.5625
                if why is None:
                    row["cutlass_us"] = cutlass_times(w, x, ref, graph)
                timed = [v for v in row.get("cutlass_us", {}).values() if isinstance(v, float)]
                row["cutlass_best_us"] = min(timed) if timed else None
                results["rows"].append(row)
                best = row["cutlass_best_us"]
                print(
                    f"{dtype_name} {shape:8s} N{n} K{k} M{m:5d}: dense {dense_us:7.1f}  cuSPARSELt "
                    f"{cusparselt_us:7.1f}  CUTLASS best {best if best is None else round(best, 1)}  bound "
                    f"{row['sparse_bound_us']:.1f} | "
                    + " ".join(
                        f"{c}:{v:.1f}" if isinstance(v, float) else f"{c}:{v[:40]}"
                        for c, v in row.get("cutlass_us", {}).items()
                    ),
                    flush=True,
                )
            write_json(args.json, results)


if __name__ == "__main__":
    main()
