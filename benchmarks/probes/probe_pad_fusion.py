"""Whether inductor can fuse the decode pad of a 2:4 GEMM's input into the kernel that computes that input.

The 2:4 GEMMs run token counts padded up to a multiple of 16 (`kernels/buckets.py`); at one decode token,
`SemiSparseLinear` copies the row into a 16-row buffer inside its custom op, one copy kernel per GEMM (4 per Llama
block and decode step). This probe compiles a stand-in of a decode block's GEMM inputs (residual add + RMSNorm ->
joined GEMM -> SiLU(gate) * up -> GEMM) with inductor, the GEMM an opaque custom op like `hf_semisparse::linear_24`,
for three ways of padding, and prints the kernels of one call:

- `op`: the op pads in its body (what the library does without pad buffers, December 2026);
- `graph`: `rows = x.new_empty(16, k); rows[:m] = x` in the graph. Functionalised into a `slice_scatter`, which
  inductor lowers as a pointwise kernel over all 16 rows (on the CPU, December 2026: fused into the RMSNorm
  kernel's function as a second loop nest; with Triton expected to be a kernel of its own);
- `static`: a persistent 16-row buffer per GEMM call site, marked with `torch._dynamo.mark_static_address`, written
  in the graph (`rows[:m].copy_(x)`), as `prepare_generation(..., pad_buffers=True)` does. Inductor reinplaces
  the write (a mutated graph input) and computes the RMSNorm straight into the buffer's first row, in the RMSNorm
  kernel (on the CPU, December 2026).

On CUDA it also counts the kernels of a replay under torch.profiler (`--mode reduce-overhead` uses CUDA graph
trees, as transformers' static-cache generate does) and checks that CUDA graphs were not skipped ("mutated
inputs").

    PYTHONPATH=src python benchmarks/probes/probe_pad_fusion.py --device cuda --mode reduce-overhead
"""

from __future__ import annotations

import argparse
import re

import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

ROWS = 16


@torch.library.custom_op("probe_pad::linear", mutates_args=())
def linear(x: torch.Tensor, w: torch.Tensor, pad: bool) -> torch.Tensor:
    """x @ w.T; with `pad`, x's rows copied into a 16-row buffer first, as `SemiSparseLinear` does."""
    if pad and x.shape[0] < ROWS:
        rows = x.new_empty(ROWS, x.shape[1])
        rows[: x.shape[0]].copy_(x)
        return (rows @ w.t())[: x.shape[0]].clone()
    return x @ w.t()


@linear.register_fake
def _(x, w, pad):
    return x.new_empty(x.shape[0], w.shape[0])


def rms_norm(h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    v = h.float().pow(2).mean(-1, keepdim=True)
    return g * (h.float() * torch.rsqrt(v + 1e-6)).to(h.dtype)


def block(variant: str, buffers: list[torch.Tensor]):
    def gemm(x, w, i):
        m = x.shape[0]
        if variant == "op":
            return linear(x, w, True)
        if variant == "graph":
            rows = x.new_empty(ROWS, x.shape[1])
            rows[:m] = x
        else:
            rows = buffers[i]
            rows[:m].copy_(x)
        return linear(rows, w, False)[:m]

    def fn(h, a, g, w_joined, w_down):
        h = h + a
        y = gemm(rms_norm(h, g), w_joined, 0)
        half = y.shape[1] // 2
        z = F.silu(y[:, :half]) * y[:, half:]
        return h + gemm(z, w_down, 1)

    return fn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graph trees)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    args = p.parse_args()
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    kw = dict(device=args.device, dtype=dtype)
    d, f = args.hidden, args.intermediate
    inputs = (torch.randn(1, d, **kw), torch.randn(1, d, **kw), torch.randn(d, **kw))
    weights = (torch.randn(2 * f, d, **kw) / d**0.5, torch.randn(d, f, **kw) / f**0.5)
    print(f"torch {torch.__version__}, {args.device}, mode {args.mode}")
    for variant in ("op", "graph", "static"):
        torch._dynamo.reset()
        buffers = [torch.empty(ROWS, d, **kw), torch.empty(ROWS, f, **kw)]
        for b in buffers:
            torch._dynamo.mark_static_address(b)
        fn = block(variant, buffers)
        compiled = torch.compile(fn, fullgraph=True, mode=args.mode)
        with torch.no_grad():
            want = fn(*inputs, *weights)
            got, codes = run_and_get_code(compiled, *inputs, *weights)
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        call = codes[-1][codes[-1].index("def call(") :]
        launches = re.findall(r"^\s*(triton_\w+|cpp_fused\w+)(?:\.run)?\(", call, re.M)
        print(f"\n{variant}: {len(launches)} generated kernels per call: {', '.join(launches)}")
        if args.device != "cuda":
            continue
        with torch.no_grad():
            for _ in range(3):
                compiled(*inputs, *weights)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                compiled(*inputs, *weights)
                torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        print(f"  CUDA kernels and copies in one call: {len(kernels)}")
        for e in kernels:
            print(f"    {e.name[:110]}")
    if args.mode == "reduce-overhead":
        from torch._dynamo.utils import counters

        print("\ninductor counters:", dict(counters["inductor"]))


if __name__ == "__main__":
    main()
