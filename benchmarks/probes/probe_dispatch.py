"""Where our 2:4 GEMM path still loses time, measured on the GPU (issue 4). Parts, one run:

    PYTHONPATH=src python benchmarks/probes/probe_dispatch.py --json $OUT/probe_dispatch.json

1. host: wall-clock microseconds of host time per call at a tiny GEMM (M=16, 768x768, fp16), where the GPU is
   idle and only host time shows: `nn.Linear`, `SemiSparseLinear` sparse and dense-dispatched, and the pieces
   of the sparse path (raw `MatmulPlan.run`, `torch.empty`, a trivial ctypes call).
2. split: per (N, K, M) of bert-base/large with bias: dense, the best plain algorithm id, and split-K and
   Segment-K (split_k = -1) variants of the two best ids, each timed with CUDA events.
3. residual: per (N, K, M) of the output projections, GPU time of the 2:4 GEMM alone, with the residual added
   in its epilogue (cuSPARSELt's C operand, beta = 1), and followed by a separate add; dense likewise.
4. siblings: projections that read the same input (BERT's query/key/value, LLaMA's gate/up), per (K, outputs,
   M) with bias: each on its own against one GEMM over the concatenated weights, 2:4 and dense, us per set.
5. gelu: the up-projection with bias then GELU: dense `F.linear` + `F.gelu` (what transformers runs), sparse +
   `F.gelu`, and sparse with cuSPARSELt's fused GELU epilogue; relative error of the fused output against
   float64 erf-GELU and tanh-GELU references.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))

from hf_semisparse.kernels import cusparselt as cl  # noqa: E402
from hf_semisparse.kernels.linear import SemiSparseLinear, get_backend  # noqa: E402
from hf_semisparse.kernels.tuning import SAFE_MAX_ALG_ID, time_cuda_us  # noqa: E402
from hf_semisparse.masks import compute_nm_mask  # noqa: E402
from hf_semisparse.utils import write_json  # noqa: E402

SPLIT_VARIANTS = ((-1, 1), (-1, 2), (2, 1), (4, 1), (2, 2), (4, 2))


def pruned_linear(n: int, k: int, bias: bool = True) -> torch.nn.Linear:
    lin = torch.nn.Linear(k, n, bias=bias, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
        lin.weight.mul_(compute_nm_mask(lin.weight))
        if bias:
            lin.bias.normal_(0, 0.02)
    return lin


def host_table(fns: dict, calls: int = 300, rounds: int = 9) -> dict:
    """Per function, the median over rounds of the wall-clock time per call of enqueueing `calls` calls (GPU
    drained before each); the functions take turns within every round, so drift hits them alike."""
    for fn in fns.values():
        for _ in range(20):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) * 1e6 / calls)
    torch.cuda.synchronize()
    return {name: sorted(ts)[len(ts) // 2] for name, ts in samples.items()}


def part_host() -> dict:
    lin = pruned_linear(768, 768)
    x = torch.randn(1, 16, 768, device="cuda", dtype=torch.float16)
    r = torch.randn(1, 16, 768, device="cuda", dtype=torch.float16)
    sparse = SemiSparseLinear(lin)
    dense_dispatched = SemiSparseLinear(lin)
    with torch.inference_mode():
        sparse(x)  # searches this token count
        dense_dispatched(x)
        sparse.set_dispatch(16, True)
        dense_dispatched.set_dispatch(16, False)
        plan = sparse._fast[(0, x.numel())]
        handle = get_backend().handle(x.device)
        x2 = x.view(16, 768)
        out = torch.empty(16, 768, device="cuda", dtype=torch.float16)
        ws = torch.empty(max(plan.workspace_size, 1), dtype=torch.uint8, device="cuda")
        stream = torch.cuda.current_stream().cuda_stream
        version = ctypes.c_int(0)
        lib = handle.lib
        rows = host_table(
            {
                "nn.Linear (3D input)": lambda: lin(x),
                "F.linear (2D input)": lambda: F.linear(x2, lin.weight, lin.bias),
                "SemiSparseLinear, sparse": lambda: sparse(x),
                "SemiSparseLinear, dense-dispatched": lambda: dense_dispatched(x),
                "nn.Linear + residual add": lambda: lin(x) + r,
                "SemiSparseLinear, sparse, residual in the epilogue": lambda: sparse(x, residual=r),
                "SemiSparseLinear, dense-dispatched + residual add": lambda: dense_dispatched(x, residual=r),
                "MatmulPlan.run (ctypes cusparseLtMatmul)": lambda: plan.run(
                    sparse.compressed, x2, out, ws, stream
                ),
                "torch.empty(16, 768)": lambda: torch.empty(16, 768, device="cuda", dtype=torch.float16),
                "x.reshape + out.view": lambda: x.reshape(16, 768).view(1, 16, 768),
                "ctypes: cusparseLtGetVersion": lambda: lib.cusparseLtGetVersion(
                    handle.ref, ctypes.byref(version)
                ),
            }
        )
    print("\n## host time per call, us (M=16, 768x768, fp16, bias)")
    for name, us in rows.items():
        print(f"| {name} | {us:.2f} |")
    return rows


def time_plan(handle, n, k, m, alg, compressed, x, bias, gelu=False) -> float | None:
    try:
        plan = cl.MatmulPlan(handle, n, k, m, x.dtype, bias=bias, gelu=gelu, alg=alg)
    except cl.CusparseLtError:
        return None
    ws = torch.empty(max(plan.workspace_size, 1), dtype=torch.uint8, device="cuda")
    out = torch.empty(m, n, dtype=x.dtype, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    try:
        return time_cuda_us(lambda: plan.run(compressed, x, out, ws, stream), warmup=2, repeats=7, inner=5)
    except cl.CusparseLtError:
        return None


def part_split(problems: list[tuple[int, int, int]]) -> list[dict]:
    handle = get_backend().handle(torch.device("cuda", 0))
    rows = []
    print("\n## split-K and Segment-K, us (fp16, bias)")
    print("| N | K | M | dense | best plain (id) | best split (config) | best Segment-K (config) |")
    for n, k, m in problems:
        rows.append(split_one(handle, n, k, m))
    return rows


def split_one(handle, n: int, k: int, m: int) -> dict:
    lin = pruned_linear(n, k)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    compressed = handle.compress(lin.weight.detach())
    with torch.inference_mode():
        dense = time_cuda_us(lambda: F.linear(x, lin.weight, lin.bias), repeats=7, inner=5)
    probe = handle.selection(n, k, m, x.dtype, True, False)
    plain = {}
    for alg_id in range(min(probe.max_alg_id(), SAFE_MAX_ALG_ID) + 1):
        t = time_plan(handle, n, k, m, cl.AlgConfig(alg_id), compressed, x, lin.bias)
        if t is not None:
            plain[alg_id] = t
    best_ids = sorted(plain, key=plain.get)[:2]
    variants = {}
    for alg_id in best_ids:
        for split_k, mode in SPLIT_VARIANTS:
            if split_k > 1 and k // split_k < 64:
                continue
            alg = cl.AlgConfig(alg_id, split_k, mode, max(split_k - 1, 1))
            t = time_plan(handle, n, k, m, alg, compressed, x, lin.bias)
            variants[str(alg.to_dict())] = t

    # re-time the best of each family more carefully
    def retime(alg):
        return time_plan(handle, n, k, m, alg, compressed, x, lin.bias)

    best_plain_id = best_ids[0]
    best_plain = retime(cl.AlgConfig(best_plain_id))
    split = {a: t for a, t in variants.items() if t is not None and "'split_k': -1" not in a}
    seg = {a: t for a, t in variants.items() if t is not None and "'split_k': -1" in a}
    best_split = min(split, key=split.get) if split else None
    best_seg = min(seg, key=seg.get) if seg else None
    row = {
        "n": n,
        "k": k,
        "m": m,
        "dense_us": dense,
        "plain": plain,
        "variants": variants,
        "best_plain_id": best_plain_id,
        "best_plain_us": best_plain,
        "best_split": best_split,
        "best_split_us": split.get(best_split),
        "best_segment_k": best_seg,
        "best_segment_k_us": seg.get(best_seg),
        "segment_k_failed": sum(1 for a, t in variants.items() if t is None and "'split_k': -1" in a),
    }
    print(
        f"| {n} | {k} | {m} | {dense:.1f} | {best_plain:.1f} ({best_plain_id}) | "
        f"{row['best_split_us'] or float('nan'):.1f} ({best_split}) | "
        f"{row['best_segment_k_us'] or float('nan'):.1f} ({best_seg}) |",
        flush=True,
    )
    return row


def part_gelu(problems: list[tuple[int, int, int]], split_rows: list[dict]) -> list[dict]:
    handle = get_backend().handle(torch.device("cuda", 0))
    best = {(r["n"], r["k"], r["m"]): r["best_plain_id"] for r in split_rows}
    rows = []
    print("\n## GELU epilogue, us (fp16, bias); rel. error of the fused output vs float64 references")
    print(
        "| N | K | M | dense+gelu | sparse+gelu | sparse fused | fused vs erf | fused vs tanh | unfused vs erf |"
    )
    for n, k, m in problems:
        rows.append(gelu_one(handle, n, k, m, cl.AlgConfig(best.get((n, k, m), 0))))
    return rows


def gelu_one(handle, n: int, k: int, m: int, alg) -> dict:
    lin = pruned_linear(n, k)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    compressed = handle.compress(lin.weight.detach())
    plan = cl.MatmulPlan(handle, n, k, m, x.dtype, bias=lin.bias, alg=alg)
    fused = cl.MatmulPlan(handle, n, k, m, x.dtype, bias=lin.bias, gelu=True, alg=alg)
    ws = torch.empty(max(plan.workspace_size, fused.workspace_size, 1), dtype=torch.uint8, device="cuda")
    out = torch.empty(m, n, dtype=x.dtype, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream

    def unfused():
        plan.run(compressed, x, out, ws, stream)
        return F.gelu(out)

    with torch.inference_mode():
        t_dense = time_cuda_us(lambda: F.gelu(F.linear(x, lin.weight, lin.bias)), repeats=7, inner=5)
        t_unfused = time_cuda_us(unfused, repeats=7, inner=5)
        t_fused = time_cuda_us(lambda: fused.run(compressed, x, out, ws, stream), repeats=7, inner=5)
        fused.run(compressed, x, out, ws, stream)
        y_fused = out.double()
        y_unfused = unfused().double()
        ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
        ref_erf, ref_tanh = F.gelu(ref), F.gelu(ref, approximate="tanh")

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    row = {
        "n": n,
        "k": k,
        "m": m,
        "alg": alg.to_dict(),
        "dense_gelu_us": t_dense,
        "sparse_gelu_us": t_unfused,
        "sparse_fused_us": t_fused,
        "fused_vs_erf": rel(y_fused, ref_erf),
        "fused_vs_tanh": rel(y_fused, ref_tanh),
        "unfused_vs_erf": rel(y_unfused, ref_erf),
        "fused_max_abs_vs_erf": (y_fused - ref_erf).abs().max().item(),
    }
    print(
        f"| {n} | {k} | {m} | {t_dense:.1f} | {t_unfused:.1f} | {t_fused:.1f} | {row['fused_vs_erf']:.1e} | "
        f"{row['fused_vs_tanh']:.1e} | {row['unfused_vs_erf']:.1e} |",
        flush=True,
    )
    return row


RESIDUAL_COLUMNS = ("sparse", "sparse_c", "sparse_add", "dense", "dense_add", "add")


def part_residual(problems: list[tuple[int, int, int]]) -> list[dict]:
    rows = []
    print("\n## residual add: in the 2:4 GEMM's epilogue or a pass of its own, us (fp16, bias)")
    print("| N | K | M | sparse | sparse, C epilogue | sparse + add | dense | dense + add | add alone |")
    for n, k, m in problems:
        row = residual_one(n, k, m)
        rows.append(row)
        print(f"| {n} | {k} | {m} | " + " | ".join(f"{row[c]:.1f}" for c in RESIDUAL_COLUMNS) + " |")
    return rows


def residual_one(n: int, k: int, m: int) -> dict:
    lin = pruned_linear(n, k)
    layer = SemiSparseLinear(lin)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    r = torch.randn(m, n, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        layer(x)
        layer.set_dispatch(m, True)
        fns = {
            "sparse": lambda: layer(x),
            "sparse_c": lambda: layer(x, residual=r),
            "sparse_add": lambda: layer(x) + r,
            "dense": lambda: F.linear(x, lin.weight, lin.bias),
            "dense_add": lambda: F.linear(x, lin.weight, lin.bias) + r,
            "add": lambda: r + r,
        }
        row = {"n": n, "k": k, "m": m}
        for _ in range(2):  # two passes; the second is kept (clocks and caches warm)
            row.update({name: time_cuda_us(fn, warmup=2, repeats=7, inner=5) for name, fn in fns.items()})
    return row


def part_siblings(problems: list[tuple[int, tuple[int, ...], int]]) -> list[dict]:
    rows = []
    print(
        "\n## sibling projections: separate GEMMs or one over the concatenated weights, us per set (fp16, bias)"
    )
    print("| K | outputs | M | sparse, separate | sparse, one | dense, separate | dense, one |")
    for k, outs, m in problems:
        row = siblings_one(k, outs, m)
        rows.append(row)
        print(
            f"| {k} | {'+'.join(map(str, outs))} | {m} | "
            + " | ".join(f"{row[c]:.1f}" for c in SIBLING_COLUMNS)
            + " |"
        )
    return rows


SIBLING_COLUMNS = ("sparse_separate", "sparse_one", "dense_separate", "dense_one")


def siblings_one(k: int, outs: tuple[int, ...], m: int) -> dict:
    lins = [pruned_linear(n, k) for n in outs]
    joined = torch.nn.Linear(k, sum(outs), device="cuda", dtype=torch.float16)
    with torch.no_grad():
        joined.weight.copy_(torch.cat([lin.weight for lin in lins]))
        joined.bias.copy_(torch.cat([lin.bias for lin in lins]))
    layers = [SemiSparseLinear(lin) for lin in lins]
    one = SemiSparseLinear(joined)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        for layer in (*layers, one):
            layer(x)
            layer.set_dispatch(m, True)
        fns = {
            "sparse_separate": lambda: [layer(x) for layer in layers],
            "sparse_one": lambda: one(x),
            "dense_separate": lambda: [F.linear(x, lin.weight, lin.bias) for lin in lins],
            "dense_one": lambda: F.linear(x, joined.weight, joined.bias),
        }
        row = {"k": k, "outs": list(outs), "m": m}
        for _ in range(2):  # two passes; the second is kept (clocks and caches warm)
            row.update({name: time_cuda_us(fn, warmup=2, repeats=7, inner=5) for name, fn in fns.items()})
    return row


def part_gelu_attr() -> dict:
    """Status of each way to ask cuSPARSELt for a GELU epilogue (768 -> 3072, M=1536, fp16, sparse_a layout)."""
    handle = get_backend().handle(torch.device("cuda", 0))
    lib, h = handle.lib, handle.ref
    n, k, m = 3072, 768, 1536
    t = cl.DTYPES[torch.float16]
    bias = torch.zeros(n, dtype=torch.float16, device="cuda")
    results = {}
    for name, attr, value, with_bias, bias_first in (
        ("GELU int 1, bias after", cl.MATMUL_ACTIVATION_GELU, ctypes.c_int(1), True, False),
        ("GELU int 1, bias before", cl.MATMUL_ACTIVATION_GELU, ctypes.c_int(1), True, True),
        ("GELU int 1, no bias", cl.MATMUL_ACTIVATION_GELU, ctypes.c_int(1), False, False),
        ("GELU_SCALING float 1.0, bias before", 4, ctypes.c_float(1.0), True, True),
        ("GELU_SCALING float 1.0, no bias", 4, ctypes.c_float(1.0), False, False),
        ("RELU int 1, bias before", 0, ctypes.c_int(1), True, True),
    ):
        mw, mx, mc, mm = cl._opaque(), cl._opaque(), cl._opaque(), cl._opaque()
        lib.cusparseLtStructuredDescriptorInit(h, cl._ref(mw), n, k, k, 16, t, cl.CUSPARSE_ORDER_ROW, 0)
        lib.cusparseLtDenseDescriptorInit(h, cl._ref(mx), m, k, k, 16, t, cl.CUSPARSE_ORDER_ROW)
        lib.cusparseLtDenseDescriptorInit(h, cl._ref(mc), n, m, n, 16, t, cl.CUSPARSE_ORDER_COL)
        st_init = lib.cusparseLtMatmulDescriptorInit(
            h, cl._ref(mm), cl.OP_N, cl.OP_T, cl._ref(mw), cl._ref(mx), cl._ref(mc), cl._ref(mc), 2
        )
        ptr = ctypes.c_void_p(bias.data_ptr())
        st_bias = st_act = None
        if with_bias and bias_first:
            st_bias = lib.cusparseLtMatmulDescSetAttribute(h, cl._ref(mm), 8, ctypes.byref(ptr), 8)
        st_act = lib.cusparseLtMatmulDescSetAttribute(
            h, cl._ref(mm), attr, ctypes.byref(value), ctypes.sizeof(value)
        )
        if with_bias and not bias_first:
            st_bias = lib.cusparseLtMatmulDescSetAttribute(h, cl._ref(mm), 8, ctypes.byref(ptr), 8)
        results[name] = {"init": st_init, "activation": st_act, "bias": st_bias}
        for d in (mw, mx, mc):
            lib.cusparseLtMatDescriptorDestroy(cl._ref(d))
    print("\n## activation attribute status (0 = success)")
    for name, r in results.items():
        print(f"| {name} | {r} |")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", required=True)
    parser.add_argument(
        "--parts", nargs="+", default=["gelu_attr", "host", "residual", "siblings", "split", "gelu"]
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_SEMISPARSE_TUNING_CACHE", "0")
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    if "gelu_attr" in args.parts:
        result["gelu_attr"] = part_gelu_attr()
    if "host" in args.parts:
        result["host"] = part_host()
    if "residual" in args.parts:
        residual_problems = [(768, 768, 24576), (768, 3072, 24576), (768, 3072, 98304)] + [
            (1024, 1024, 24576),
            (1024, 4096, 24576),
        ]
        result["residual"] = part_residual(residual_problems)
    if "siblings" in args.parts:
        sibling_problems = (
            [(768, (768,) * 3, m) for m in (1536, 6144, 24576, 98304)]
            + [(1024, (1024,) * 3, m) for m in (1536, 24576, 98304)]
            + [(4096, (4096, 1024, 1024), 8192), (4096, (14336, 14336), 8192)]
        )
        result["siblings"] = part_siblings(sibling_problems)
    split_problems = [
        (768, 768, 1536),
        (3072, 768, 1536),
        (768, 3072, 1536),
        (768, 768, 24576),
        (3072, 768, 24576),
        (768, 3072, 24576),
        (768, 768, 98304),
        (3072, 768, 98304),
        (768, 3072, 98304),
        (1024, 1024, 1536),
        (4096, 1024, 1536),
        (1024, 4096, 1536),
        (1024, 1024, 24576),
        (4096, 1024, 24576),
        (1024, 4096, 24576),
    ]
    result["split"] = part_split(split_problems) if "split" in args.parts else []
    write_json(args.json, result)
    if "gelu" in args.parts:
        gelu_problems = [(3072, 768, m) for m in (1536, 24576, 98304)] + [
            (4096, 1024, m) for m in (1536, 24576)
        ]
        result["gelu"] = part_gelu(gelu_problems, result["split"])
    write_json(args.json, result)


if __name__ == "__main__":
    main()
