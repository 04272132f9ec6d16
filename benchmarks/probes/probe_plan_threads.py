"""Whether cuSPARSELt plans (each with its own algorithm selection, about 0.2-0.3 s of host time) can be built in
parallel host threads, and how much faster a warm-up's candidate set would be built that way.

1. Where one plan's host time goes: `cusparseLtMatmulAlgSelectionInit` against `cusparseLtMatmulPlanInit`.
2. The plans of algorithm ids 0..35 at Llama-3-8B's four weight shapes (fp16, 16 tokens): built one after the
   other on one handle, then by T worker threads (each with a handle of its own), wall time per T.
3. Every plan a worker built, run on the main thread: relative error against a float32 reference.
4. Rankings: every id (CUDA graph replays) at 16, 32, 64, 128 and 256 tokens for the four shapes, and at 512 and
   2048 tokens ids 0-15, to judge which candidates a warm-up can skip.

    PYTHONPATH=src python benchmarks/probes/probe_plan_threads.py --json OUT.json

`benchmarks/results/h200_probe_plan_threads_2026-12-03.json` was recorded by this probe's own copy of that
scheme (a handle made in each worker thread), before `plan_threads.py` took it over; the probe now calls it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hf_semisparse import compute_nm_mask
from hf_semisparse.kernels import cusparselt as cl
from hf_semisparse.kernels.plan_threads import build_plans
from hf_semisparse.kernels.tuning import time_cuda_us
from hf_semisparse.utils import write_json

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def build_all(handle, problems, threads: int):
    """A fp16 MatmulPlan for each (n, k, m, alg_id) of `problems` (None where refused), built as the kernel search
    builds them (`plan_threads.build_plans`: on `handle` for one thread, else a sibling handle per worker), and
    the wall time in seconds."""
    specs = [
        {"n": n, "k": k, "m": m, "dtype": torch.float16, "alg": cl.AlgConfig(alg_id)}
        for n, k, m, alg_id in problems
    ]
    start = time.perf_counter()
    plans = build_plans(handle, specs, threads=threads)
    return plans, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--skip-rankings", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    out: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    handle = cl.Handle(device)
    out["cusparselt"] = handle.version
    lib = handle.lib

    # 1. where the host time goes
    spent: dict[str, list[float]] = {"AlgSelectionInit": [], "PlanInit": []}
    originals = {name: getattr(lib, f"cusparseLtMatmul{name}") for name in spent}

    def wrap(name):
        def timed(*a):
            start = time.perf_counter()
            r = originals[name](*a)
            spent[name].append(time.perf_counter() - start)
            return r

        return timed

    for name in spent:
        setattr(lib, f"cusparseLtMatmul{name}", wrap(name))
    for alg_id in (0, 15, 22):
        cl.MatmulPlan(handle, 6144, 4096, 16, torch.float16, alg=cl.AlgConfig(alg_id))
    for name, fn in originals.items():
        setattr(lib, f"cusparseLtMatmul{name}", fn)
    out["host_s_per_call"] = {name: sum(v) / len(v) for name, v in spent.items()}
    print("host time per call:", out["host_s_per_call"], flush=True)

    # 2. serial against threads, the same 4 x 36 plans
    problems = [(n, k, 16, alg_id) for n, k in SHAPES.values() for alg_id in range(36)]
    walls = {}
    _, walls[1] = build_all(cl.Handle(device), problems, 1)
    print(f"serial: {walls[1]:.1f} s for {len(problems)} plans", flush=True)
    built = None
    for threads in args.threads:
        built, walls[threads] = build_all(cl.Handle(device), problems, threads)
        print(f"{threads} threads: {walls[threads]:.1f} s ({walls[1] / walls[threads]:.2f}x)", flush=True)
    out["build_wall_s"] = walls
    out["plans"] = len(problems)

    # 3. plans built by workers, run on the main thread
    errors = {}
    stream = torch.cuda.current_stream().cuda_stream
    data = {}
    for n, k in SHAPES.values():
        w = torch.randn(n, k, device=device, dtype=torch.float16)
        w = w * compute_nm_mask(w)
        x = torch.randn(16, k, device=device, dtype=torch.float16)
        data[(n, k)] = (w, handle.compress(w), x, (x.float() @ w.float().t()))
    for (n, k, m, alg_id), plan in zip(problems, built or [], strict=False):
        if plan is None:
            continue
        w, comp, x, ref = data[(n, k)]
        y = torch.empty(m, n, device=device, dtype=torch.float16)
        ws = torch.empty(max(plan.workspace_size, 1), dtype=torch.uint8, device=device)
        plan.run(comp, x, y, ws, stream)
        torch.cuda.synchronize()
        errors[f"{n}x{k} id{alg_id}"] = ((y.float() - ref).norm() / ref.norm()).item()
    out["worker_plan_rel_err_max"] = max(errors.values()) if errors else None
    out["worker_plans_run"] = len(errors)
    print(f"worker-built plans run: {len(errors)}, max rel err {out['worker_plan_rel_err_max']}", flush=True)
    del built
    if args.json:
        write_json(args.json, out, indent=1)

    # 4. rankings
    if args.skip_rankings:
        return
    threads = max(walls, key=lambda t: walls[1] / walls[t])
    rankings = {}
    for name, (n, k) in SHAPES.items():
        w, comp, _, _ = data[(n, k)]
        for m, ids in [(m, range(36)) for m in (16, 32, 64, 128, 256)] + [
            (512, range(16)),
            (2048, range(16)),
        ]:
            problems = [(n, k, m, i) for i in ids]
            plans, wall = build_all(handle, problems, threads)
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            y = torch.empty(m, n, device=device, dtype=torch.float16)
            times = {}
            for (_, _, _, alg_id), plan in zip(problems, plans, strict=True):
                if plan is None:
                    continue
                ws = torch.empty(max(plan.workspace_size, 1), dtype=torch.uint8, device=device)
                try:
                    times[alg_id] = time_cuda_us(
                        lambda p=plan, ws=ws, c=comp, x=x, y=y: p.run(
                            c, x, y, ws, torch.cuda.current_stream().cuda_stream
                        ),
                        warmup=1,
                        repeats=3,
                        inner=10,
                        graph=m <= 256,
                    )
                except cl.CusparseLtError:
                    continue
            rankings[f"{name} M{m}"] = dict(sorted(times.items(), key=lambda kv: kv[1]))
            best = min(times, key=times.get)
            print(f"{name} M{m}: best id {best} {times[best]:.1f} us (built in {wall:.1f} s)", flush=True)
            del plans
        if args.json:
            out["rankings_us"] = rankings
            write_json(args.json, out, indent=1)
    print(json.dumps({k: list(v)[:6] for k, v in rankings.items()}, indent=0))


if __name__ == "__main__":
    main()
