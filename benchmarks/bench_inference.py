"""Dense vs torch's stock 2:4 vs hf_semisparse, end to end and per GEMM, in ONE run on one GPU.

    PYTHONPATH=src python benchmarks/bench_inference.py --json outputs/bench_inference.json

End to end: BERT-base and BERT-large question answering (random weights pruned to 2:4 with `prune_24`; speed
does not depend on the values), fp16, sequence 384, batch 4/16/64/256, eager, `torch.inference_mode`:
- dense: the pruned model as it is (cuBLAS);
- torch-2:4: every target weight replaced by `to_sparse_semi_structured` (torch's default cuSPARSELt path);
- ours: `accelerate_24(model)` (keep_dense=True; query/key/value joined into one GEMM per layer, the residual
  adds of BERT's output blocks fused into the 2:4 GEMMs), then `tune_dispatch(model, input_ids=batch)`: sparse or
  dense per layer shape, chosen from timings of the whole eager forward (the report is in the JSON);
- ours-cusparselt: `accelerate_24(model, kernel="cusparselt")` + `tune_dispatch`: ours on cuSPARSELt only. "ours"
  (`kernel="auto"`) runs the output and intermediate projections (residual add, GELU in the epilogue) on our
  CUTLASS kernels when they are built (`hf-semisparse build-kernels`; `HF_SEMISPARSE_KERNEL_DIR`); the JSON's
  "kernels" counts the layers on each;
- ours-unfused: the same with `fuse_projections=False, fuse_residual=False` (what both fusions add);
- ours-all-dense: `accelerate_24(model)` with every layer dispatched dense (the joined query/key/value GEMM
  included): what the restructuring alone gives, without any 2:4 kernel;
- ours-sparse-only: `accelerate_24(model, keep_dense=False)` (every target runs sparse; compressed weights only).
With --graphs (default) also, each forward replayed from a CUDA graph per batch size (`CUDAGraphedModel`):
- dense+graphs: the dense model so wrapped, the fair baseline for graph replay;
- ours+graphs: `accelerate_24(model)` (a copy of its own) so wrapped, which tunes the dispatch from replayed
  graphs at each capture (the report is in the JSON).
With --fp8, the same models in `--fp8-dtype` (bf16 by default), apart, in a table of their own (JSON "fp8_models"):
- dense: the pruned model as it is, the baseline of the ratios;
- dense-fp8: `DenseFp8Linear` (benchmarks/dense_fp8.py: `torch._scaled_mm`, rowwise scales, fast accumulation, the
  activations quantised per token by `cutlass_fp8.quantize_rows`' formula) on the layers ours runs in FP8;
- ours-fp8: `accelerate_24(model, weights="fp8")` (FP8 2:4; every layer of BERT-base and BERT-large qualifies);
each eager and, with --graphs, replayed from CUDA graphs (`CUDAGraphedModel(tune=False)`); ratios
`ours-fp8_vs_dense`, `ours-fp8_vs_dense-fp8`, `dense-fp8_vs_dense` (and "+graphs" against "+graphs"). Skipped
per model, with the reason, where the FP8 kernels cannot run its shapes; `--skip-models --skip-gemms --fp8` runs
the FP8 rows alone.
Timing: CUDA events around one forward; 3 warm-ups per variant (ours tunes there), 0.3 s of dense forwards to
raise the clocks, then rounds in which each variant runs once, in turn, the order rotating every round (at least
5 rounds); torch-2:4 afterwards, on its own (5 forwards); min/median/max ms.
Correctness: ||logits - dense logits|| / ||dense logits|| for start and end logits (must be < 2e-3).

GEMM table: y = x @ W^T, fp16, no bias, the reference README's shapes: cuBLAS eager, torch's cuSPARSELt with
its searched algorithm replayed from a CUDA graph (the kernel ceiling with host cost removed), ours (cuSPARSELt,
the `SemiSparseLinear` default) eager and graph-replayed, and ours on our CUTLASS kernels (`kernel="cutlass"`,
where built) eager; microseconds per call over 20 back-to-back calls.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import transformers
from transformers import BertConfig, BertForQuestionAnswering

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # dense_fp8.py, beside this script

from hf_semisparse import compute_nm_mask, prune_24, select_targets  # noqa: E402
from hf_semisparse.config import SparsityConfig  # noqa: E402
from hf_semisparse.kernels import (  # noqa: E402
    CUDAGraphedModel,
    accelerate_24,
    semi_sparse_layers,
    tune_dispatch,
)
from hf_semisparse.kernels.cutlass_sm90 import why_unavailable  # noqa: E402
from hf_semisparse.kernels.linear import SemiSparseLinear  # noqa: E402
from hf_semisparse.utils import write_json  # noqa: E402

MODELS = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
}
SLOW = "torch-2:4"  # timed apart from the others (time_round_robin)
GEMMS = [
    (6144, 768, 3072),
    (6144, 3072, 768),
    (24576, 768, 3072),
    (24576, 3072, 768),
    (98304, 768, 3072),
    (98304, 3072, 768),
    (8192, 4096, 14336),
    (8192, 14336, 4096),
]


def env_info() -> dict:
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
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "driver": driver,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cusparselt": torch.backends.cusparselt.version(),
        "transformers": transformers.__version__,
    }


def timing_row(times: list[float], error: float) -> dict:
    """One variant's row of the JSON: its forward times (ms) and its logits' relative error against the reference."""
    return {
        "min_ms": min(times),
        "median_ms": statistics.median(times),
        "max_ms": max(times),
        "n": len(times),
        "rel_err": error,
    }


def time_round_robin(variants: dict, ids, budget_ms: float, skip: set) -> dict[str, list[float]]:
    """Time one forward of each variant in turn, round after round, so clock and thermal drift hit all alike.

    The order rotates every round, so no variant always follows the same one, and torch's stock 2:4 path (10x
    to 30x slower, with a plan built and freed per call) is timed on its own afterwards: in turn with the others
    it slowed whichever variant came next (2026-11-24: bert-base batch 4 ran at 4.5 ms alone, 8 ms after it).
    """
    active = {k: v for k, v in variants.items() if k not in skip and k != SLOW}
    with torch.inference_mode():
        for model in active.values():  # warm-up: ours tunes each new shape here
            for _ in range(3):
                model(input_ids=ids)
        warm_until = time.perf_counter() + 0.3  # bring the GPU clocks up before the first timed round
        while time.perf_counter() < warm_until:
            variants["dense"](input_ids=ids)
        times: dict[str, list[float]] = {k: [] for k in active}
        names = list(active)
        spent, rounds = 0.0, 0
        while rounds < 5 or (spent < budget_ms and rounds < 40):
            for name in names[rounds % len(names) :] + names[: rounds % len(names)]:
                times[name].append(time_one(active[name], ids))
                spent += times[name][-1]
            rounds += 1
        if SLOW in variants and SLOW not in skip:
            slow = variants[SLOW]
            slow(input_ids=ids)
            times[SLOW] = [time_one(slow, ids) for _ in range(5)]
    return times


def time_one(model, ids) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    model(input_ids=ids)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def logits(model, ids):
    with torch.inference_mode():
        out = model(input_ids=ids)
    return torch.cat([out.start_logits, out.end_logits]).float()


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def stock_24(model) -> torch.nn.Module:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    model = copy.deepcopy(model)
    for t in select_targets(model, SparsityConfig())[0]:
        t.module.weight = torch.nn.Parameter(
            to_sparse_semi_structured(t.module.weight.detach()), requires_grad=False
        )
    return model


def all_dense(model, ids) -> None:
    """Dispatch every 2:4 layer of `model` dense for the token count of `ids` (run once first)."""
    with torch.inference_mode():
        model(input_ids=ids)
    for layer in semi_sparse_layers(model):
        for m in layer.token_counts():
            layer.set_dispatch(m, False)


def residual_choices(model, m: int) -> dict[tuple[int, int], bool]:
    """Per (N, K) of the layers that were called with a residual for `m` tokens: whether it went into the epilogue."""
    choices = {}
    for layer in semi_sparse_layers(model):
        fused_add = layer.adds_residual_in_epilogue(m)
        if fused_add is not None:
            choices[(layer.out_features, layer.in_features)] = fused_add
    return choices


def weight_bytes(model) -> dict:
    dense = comp = 0
    for m in semi_sparse_layers(model):
        dense += m.out_features * m.in_features * 2
        comp += m.compressed.numel()
    return {
        "dense_target_bytes": dense,
        "compressed_target_bytes": comp,
        "compressed_over_dense": comp / dense if dense else None,
    }


def bench_models(args, save) -> list[dict]:
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, **MODELS[name])
        dense = BertForQuestionAnswering(cfg).eval().half().cuda()
        prune_24(dense)  # on the GPU: pruning bert-large on the host takes longer than the benchmark
        variants = {"dense": dense, "torch-2:4": stock_24(dense)}
        ours = copy.deepcopy(dense)
        fused = accelerate_24(ours, keep_dense=True)
        print(f"{name}: {fused}", flush=True)
        variants["ours"] = ours
        on_cusparselt = copy.deepcopy(dense)
        accelerate_24(on_cusparselt, keep_dense=True, kernel="cusparselt")
        variants["ours-cusparselt"] = on_cusparselt
        unfused = restructured = None
        if args.ablations:
            unfused = copy.deepcopy(dense)
            accelerate_24(unfused, keep_dense=True, fuse_residual=False, fuse_projections=False)
            variants["ours-unfused"] = unfused
            restructured = copy.deepcopy(dense)
            accelerate_24(restructured, keep_dense=True)
            variants["ours-all-dense"] = restructured
        lean = copy.deepcopy(dense)
        accelerate_24(lean, keep_dense=False)
        variants["ours-sparse-only"] = lean
        if args.graphs:
            variants["dense+graphs"] = CUDAGraphedModel(dense, tune=False)
            ours_graphed = copy.deepcopy(dense)  # its own layers: graph tuning must not change eager ours
            accelerate_24(ours_graphed, keep_dense=True)
            variants["ours+graphs"] = CUDAGraphedModel(ours_graphed)
        memory = weight_bytes(lean)
        for batch in args.batches:
            ids = torch.randint(1000, 30000, (batch, args.seq), device="cuda")
            ref = logits(dense, ids)
            row = {
                "model": name,
                "batch": batch,
                "seq": args.seq,
                "weights": memory,
                "fused_projections": len(fused.fused_projections),
                "fused_residual": len(fused.fused_residual),
                "fused_gelu": len(fused.fused_gelu),
                "kernels": fused.kernels,
            }
            report = tune_dispatch(ours, input_ids=ids)  # whole-forward choice per layer shape, eager
            row["ours_dispatch"] = dataclasses.asdict(report)
            print(f"{name} b{batch} eager dispatch: {report}", flush=True)
            report = tune_dispatch(on_cusparselt, input_ids=ids)
            row["ours-cusparselt_dispatch"] = dataclasses.asdict(report)
            print(f"{name} b{batch} eager dispatch, cuSPARSELt: {report}", flush=True)
            if args.ablations:
                report = tune_dispatch(unfused, input_ids=ids)
                row["ours-unfused_dispatch"] = dataclasses.asdict(report)
                print(f"{name} b{batch} eager dispatch, unfused: {report}", flush=True)
                all_dense(restructured, ids)
            skip = {"torch-2:4"} if batch > args.max_stock_batch else set()
            timings = time_round_robin(variants, ids, args.budget_ms, skip)
            for vname, times in timings.items():
                row[vname] = timing_row(times, rel_err(logits(variants[vname], ids), ref))
                print(f"{name} b{batch} {vname}: {row[vname]['median_ms']:.2f} ms", flush=True)
            if args.graphs:
                graph_report = list(variants["ours+graphs"].reports.values())[-1]  # this batch's capture
                row["ours+graphs_dispatch"] = dataclasses.asdict(graph_report)
                print(f"{name} b{batch} graph dispatch: {graph_report}", flush=True)
            m = batch * args.seq
            row[
                "residual_in_epilogue"
            ] = [  # per output projection shape: measured faster than a separate add
                {"n": n, "k": k, "m": m, "fused": fused_add}
                for (n, k), fused_add in residual_choices(ours, m).items()
            ]
            print(f"{name} b{batch} residual in the epilogue: {row['residual_in_epilogue']}", flush=True)
            row["gelu_in_epilogue"] = [
                {
                    "n": layer.out_features,
                    "k": layer.in_features,
                    "m": m,
                    "fused": layer.applies_gelu_in_epilogue(m),
                }
                for layer in semi_sparse_layers(ours)
                if layer.applies_gelu_in_epilogue(m) is not None
            ][:1]  # one intermediate layer's choice (every layer of a model has the same shape)
            print(f"{name} b{batch} GELU in the epilogue: {row['gelu_in_epilogue']}", flush=True)
            rows.append(row)
            save(rows)  # partial results survive a time limit
            del ids, ref
        del variants, ours, on_cusparselt, unfused, restructured, lean, dense
        torch.cuda.empty_cache()
    return rows


def time_calls_us(fn, calls: int = 20, repeats: int = 15) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def graph_us(fn, calls: int = 20) -> float:
    fn()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return time_calls_us(g.replay, calls=1) / calls


def torch_best(w, x):
    """torch's cuSPARSELt with its searched algorithm (the reference README's ceiling)."""
    wc = torch._cslt_compress(w)
    xt = x.t()
    try:
        found = torch._C._cusparselt.mm_search(wc, xt, None, None, None, False)
        alg, split_k, mode = int(found[0]), int(found[1]), int(found[2])

        def fn():
            return torch._cslt_sparse_mm(wc, xt, None, None, None, False, alg, split_k, mode)

        fn()
        return fn, [alg, split_k, mode]
    except (AttributeError, RuntimeError, TypeError, ValueError, IndexError):
        alg = torch._cslt_sparse_mm_search(wc, xt)

        def fn0():
            return torch._cslt_sparse_mm(wc, xt, alg_id=alg)

        return fn0, [alg]


def bench_gemm(m: int, k: int, n: int) -> dict:
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=torch.float16)
    w = w * compute_nm_mask(w)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.float16)
    lin.weight.data.copy_(w)
    ours = SemiSparseLinear(lin, keep_dense=False)  # cuSPARSELt, what accelerate_24 uses for plain GEMMs
    on_cutlass = None
    if why_unavailable(w.device, w.dtype, n, k) is None:
        on_cutlass = SemiSparseLinear(lin, keep_dense=False, kernel="cutlass")
    err = rel_err(ours(x).double(), F.linear(x.double(), w.double()))
    best_fn, alg = torch_best(w, x)
    return {
        "M": m,
        "K": k,
        "N": n,
        "dense_us": time_calls_us(lambda: F.linear(x, w)),
        "torch_best_graph_us": graph_us(best_fn),
        "torch_alg": alg,
        "ours_eager_us": time_calls_us(lambda: ours(x)),
        "ours_graph_us": graph_us(lambda: ours(x)),
        "ours_rel_err": err,
        "ours_cutlass_eager_us": time_calls_us(lambda: on_cutlass(x)) if on_cutlass else None,
    }


def bench_gemms(args) -> list[dict]:
    rows = []
    for m, k, n in GEMMS:
        row = bench_gemm(m, k, n)
        rows.append(row)
        print(
            f"GEMM {m}x{k}x{n}: dense {row['dense_us']:.1f} us, ours {row['ours_eager_us']:.1f} us, "
            f"err {row['ours_rel_err']:.1e}",
            flush=True,
        )
    return rows


def print_tables(rows, gemms, info) -> None:
    print(
        f"\n{info['gpu']}, driver {info['driver']}, torch {info['torch']} (CUDA {info['cuda']}), "
        f"cuSPARSELt {info['cusparselt']}, transformers {info['transformers']}"
    )
    print("\nEnd to end, fp16, seq 384, median ms (speedup = dense / variant), rel err of logits vs dense")
    print(
        f"{'model':<11}{'batch':>6}{'dense':>9}{'torch2:4':>10}{'ours':>9}{'speedup':>9}{'cuSPARSELt':>11}"
        f"{'speedup':>9}{'unfused':>9}"
        f"{'speedup':>9}{'all-dense':>10}{'speedup':>9}{'sparse-only':>12}{'speedup':>9}{'err ours':>10}"
    )
    for r in rows:
        d = r["dense"]["median_ms"]
        st = r.get("torch-2:4", {}).get("median_ms", float("nan"))
        o, oc, u, ad, so = (
            r.get(k, {}).get("median_ms", float("nan"))
            for k in ("ours", "ours-cusparselt", "ours-unfused", "ours-all-dense", "ours-sparse-only")
        )
        print(
            f"{r['model']:<11}{r['batch']:>6}{d:>9.2f}{st:>10.2f}{o:>9.2f}{d / o:>8.2f}x{oc:>11.2f}{d / oc:>8.2f}x"
            f"{u:>9.2f}{d / u:>8.2f}x"
            f"{ad:>10.2f}{d / ad:>8.2f}x{so:>12.2f}{d / so:>8.2f}x{r['ours']['rel_err']:>10.1e}"
        )
    graphed = [r for r in rows if "ours+graphs" in r]
    if graphed:
        print("\nReplayed from CUDA graphs (CUDAGraphedModel), median ms")
        print(
            f"{'model':<11}{'batch':>6}{'dense':>9}{'dense+graphs':>14}{'ours+graphs':>13}"
            f"{'vs dense+graphs':>17}{'vs dense':>10}{'err':>9}"
        )
        for r in graphed:
            d, dg, og = (r[k]["median_ms"] for k in ("dense", "dense+graphs", "ours+graphs"))
            print(
                f"{r['model']:<11}{r['batch']:>6}{d:>9.2f}{dg:>14.2f}{og:>13.2f}{dg / og:>16.2f}x{d / og:>9.2f}x"
                f"{r['ours+graphs']['rel_err']:>9.1e}"
            )
    if rows:
        w = rows[-1]["weights"]
        print(
            f"\nTarget weights: dense {w['dense_target_bytes'] / 2**20:.1f} MiB, compressed "
            f"{w['compressed_target_bytes'] / 2**20:.1f} MiB ({w['compressed_over_dense']:.3f}x) for "
            f"{rows[-1]['model']}; keep_dense=True keeps both (1 + {w['compressed_over_dense']:.3f})x"
        )
    print("\nGEMM y = x @ W^T, fp16, us per call")
    print(
        f"{'M x K x N':<22}{'dense':>9}{'torch best (graph)':>20}{'ours eager':>12}{'ours graph':>12}"
        f"{'dense/ours':>12}{'ours/torch':>12}{'ours on CUTLASS':>17}"
    )
    for g in gemms:
        print(
            f"{g['M']}x{g['K']}x{g['N']:<10}{g['dense_us']:>9.1f}{g['torch_best_graph_us']:>20.1f}"
            f"{g['ours_eager_us']:>12.1f}{g['ours_graph_us']:>12.1f}{g['dense_us'] / g['ours_eager_us']:>11.2f}x"
            f"{g['ours_eager_us'] / g['torch_best_graph_us']:>11.2f}x{g['ours_cutlass_eager_us'] or float('nan'):>17.1f}"
        )


FP8_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FP8_BASES = (
    "dense",
    "dense-fp8",
    "ours-fp8",
)  # dense: the model's dtype (the baseline); then FP8 dense, FP8 2:4


def fp8_skip_reason(name: str, dtype: torch.dtype) -> str | None:
    """None if every 2:4 layer shape of `MODELS[name]` can run on the FP8 2:4 kernels here, else why not."""
    from hf_semisparse.kernels import cutlass_fp8

    cfg = MODELS[name]
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    for n, k in ((h, h), (i, h), (h, i)):  # query/key/value/attention output, intermediate, output
        why = cutlass_fp8.why_unavailable(torch.device("cuda"), dtype, n, k)
        if why is not None:
            return f"{name}: FP8 2:4 cannot run its {n}x{k} layers: {why}"
    return None


def fp8_ratios(row: dict, graphs: bool) -> None:
    """Speed-ups from the median times of an FP8 row: `ours-fp8_vs_dense`, `ours-fp8_vs_dense-fp8`,
    `dense-fp8_vs_dense`, and the same of the "+graphs" variants (each against the baseline replayed likewise)."""
    for suffix in ("", "+graphs") if graphs else ("",):
        ms = {base: row[base + suffix]["median_ms"] for base in FP8_BASES if base + suffix in row}
        for model, baseline in (("ours-fp8", "dense"), ("ours-fp8", "dense-fp8"), ("dense-fp8", "dense")):
            if model in ms and baseline in ms:  # a variant that failed has no ratios
                row[f"{model}{suffix}_vs_{baseline}{suffix}"] = ms[baseline] / ms[model]


def fp8_weight_bytes(dense, dense_fp8, ours) -> dict:
    """Bytes of the FP8 layers' weights in each model: the dense weights they replace, e4m3 dense weights and
    scales, compressed e4m3 2:4 weights and scales."""
    from dense_fp8 import fp8_linear_bytes

    from hf_semisparse.kernels.fp8_linear import Fp8SemiSparseLinear

    layers = [(n, m) for n, m in ours.named_modules() if isinstance(m, Fp8SemiSparseLinear)]
    modules = dict(dense.named_modules())
    return {
        "dense": sum(modules[n].weight.numel() * modules[n].weight.element_size() for n, _ in layers),
        "dense-fp8": fp8_linear_bytes(dense_fp8),
        "ours-fp8": sum(m.compressed.numel() + m.weight_scale.numel() * 4 for _, m in layers),
    }


def bench_fp8_models(args, save) -> list[dict]:
    """The same models in `args.fp8_dtype`: dense, dense FP8 (`DenseFp8Linear` on the layers ours runs in FP8) and
    FP8 2:4 (`accelerate_24(weights="fp8")`), eager and (with --graphs) replayed from CUDA graphs."""
    from dense_fp8 import to_dense_fp8

    from hf_semisparse.kernels.fp8_linear import Fp8SemiSparseLinear

    dtype = FP8_DTYPES[args.fp8_dtype]
    rows = []
    for name in args.models:
        reason = fp8_skip_reason(name, dtype)
        if reason is not None:
            print(f"FP8 rows skipped: {reason}", flush=True)
            rows.append({"model": name, "dtype": args.fp8_dtype, "skipped": reason})
            save(rows)
            continue
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, **MODELS[name])
        dense = BertForQuestionAnswering(cfg).eval().to("cuda", dtype)
        prune_24(dense)
        ours = copy.deepcopy(dense)
        report = accelerate_24(ours, weights="fp8")
        mirrored = [n for n, m in ours.named_modules() if isinstance(m, Fp8SemiSparseLinear)]
        dense_fp8 = copy.deepcopy(dense)
        fp8_report = to_dense_fp8(dense_fp8, targets=mirrored)
        print(f"{name} FP8 2:4: {report}\n{name} dense FP8: {fp8_report}", flush=True)
        variants = {"dense": dense, "dense-fp8": dense_fp8, "ours-fp8": ours}
        if args.graphs:
            for base in FP8_BASES:
                variants[base + "+graphs"] = CUDAGraphedModel(variants[base], tune=False)
        memory = fp8_weight_bytes(dense, dense_fp8, ours)
        for batch in args.batches:
            ids = torch.randint(1000, 30000, (batch, args.seq), device="cuda")
            ref = logits(dense, ids)
            row = {
                "model": name,
                "batch": batch,
                "seq": args.seq,
                "dtype": args.fp8_dtype,
                "fp8_layers": len(mirrored),
                "accelerate_report": str(report),
                "dense_fp8_report": str(fp8_report),
                "fp8_weight_bytes": memory,
            }
            failed = set()
            for vname, model in variants.items():  # a variant that cannot run loses no other measurement
                if vname == "dense":
                    continue
                try:
                    logits(model, ids)
                except Exception as exc:  # noqa: BLE001 - recorded, and the others are timed
                    row[f"{vname}_error"] = repr(exc)[:2000]
                    print(f"{name} b{batch} {vname}: FAILED {exc!r}"[:2000], flush=True)
                    failed.add(vname)
            timings = time_round_robin(variants, ids, args.budget_ms, failed)
            for vname, times in timings.items():
                row[vname] = timing_row(times, rel_err(logits(variants[vname], ids), ref))
                print(
                    f"{name} b{batch} {args.fp8_dtype} {vname}: {row[vname]['median_ms']:.2f} ms", flush=True
                )
            fp8_ratios(row, args.graphs)
            rows.append(row)
            save(rows)
            del ids, ref
        del variants, ours, dense_fp8, dense
        torch.cuda.empty_cache()
    return rows


def print_fp8_table(rows: list[dict]) -> None:
    """The FP8 rows: median ms of dense, dense FP8 and FP8 2:4, ours against both, logits error against dense."""
    for r in rows:
        if "skipped" in r:
            print(f"\nFP8 rows skipped: {r['skipped']}")
    measured = [r for r in rows if "skipped" not in r]
    if not measured:
        return
    print(
        f"\nFP8 end to end, {measured[0]['dtype']} models, seq {measured[0]['seq']}, median ms; "
        "ratios are speed-ups (baseline ms / ms); rel err of logits vs dense"
    )
    print(
        "| model | batch | path | dense | dense FP8 | FP8 2:4 | vs dense | vs dense FP8 | dense FP8 vs dense "
        "| err dense FP8 | err FP8 2:4 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in measured:
        for suffix in ("", "+graphs"):
            if "dense" + suffix not in r:
                continue
            path = "graphs" if suffix else "eager"
            for base in FP8_BASES:
                if f"{base}{suffix}_error" in r:
                    print(
                        f"| {r['model']} | {r['batch']} | {path} | {base} failed: {r[f'{base}{suffix}_error'][:200]} |"
                    )
            cell = {base: r.get(base + suffix, {}) for base in FP8_BASES}

            def num(value, fmt):
                return "-" if value is None else format(value, fmt)

            ratios = [
                r.get(f"{m}{suffix}_vs_{b}{suffix}")
                for m, b in (("ours-fp8", "dense"), ("ours-fp8", "dense-fp8"), ("dense-fp8", "dense"))
            ]
            print(
                f"| {r['model']} | {r['batch']} | {path} | "
                + " | ".join(num(cell[base].get("median_ms"), ".2f") for base in FP8_BASES)
                + " | "
                + " | ".join("-" if x is None else f"{x:.2f}x" for x in ratios)
                + f" | {num(cell['dense-fp8'].get('rel_err'), '.1e')} | {num(cell['ours-fp8'].get('rel_err'), '.1e')} |"
            )
    w = measured[-1]["fp8_weight_bytes"]
    print(
        f"FP8 layers' weights ({measured[-1]['model']}): dense {w['dense'] / 2**20:.1f} MiB, dense FP8 "
        f"{w['dense-fp8'] / 2**20:.1f} MiB, FP8 2:4 {w['ours-fp8'] / 2**20:.1f} MiB"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[4, 16, 64, 256])
    p.add_argument("--seq", type=int, default=384)
    p.add_argument("--budget-ms", type=float, default=4000.0, help="timing budget per batch, all variants")
    p.add_argument("--max-stock-batch", type=int, default=256, help="skip torch's slow path above this batch")
    p.add_argument(
        "--graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time dense and ours replayed from CUDA graphs",
    )
    p.add_argument(
        "--ablations",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time ours-unfused and ours-all-dense",
    )
    p.add_argument(
        "--fp8",
        action="store_true",
        help="also time dense, dense FP8 and FP8 2:4 end to end (Hopper, `hf-semisparse build-kernels --fp8`)",
    )
    p.add_argument(
        "--fp8-dtype", default="bf16", choices=list(FP8_DTYPES), help="the models' dtype for --fp8"
    )
    p.add_argument("--skip-models", action="store_true", help="skip the fp16 end-to-end models (not --fp8's)")
    p.add_argument("--skip-gemms", action="store_true")
    p.add_argument("--json", default="outputs/bench_inference.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_inference.py needs a CUDA GPU")
    info = env_info()
    result = {"env": info, "args": vars(args), "models": [], "gemms": []}

    def save(models=None, gemms=None, fp8=None):
        if models is not None:
            result["models"] = models
        if gemms is not None:
            result["gemms"] = gemms
        if fp8 is not None:
            result["fp8_models"] = fp8
        write_json(args.json, result)

    if not args.skip_gemms:
        save(gemms=bench_gemms(args))
    if not args.skip_models:
        bench_models(args, lambda rows: save(models=rows))
    if args.fp8:
        bench_fp8_models(args, lambda rows: save(fp8=rows))
    print_tables(result["models"], result["gemms"], info)
    if args.fp8:
        print_fp8_table(result["fp8_models"])


if __name__ == "__main__":
    main()
