"""Dense vs hf_semisparse text generation of a Llama-3-8B-shaped decoder, in ONE run on one GPU.

    PYTHONPATH=src python benchmarks/bench_generate.py --out outputs/bench_generate.json

Model: Llama-3-8B's shapes (hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocabulary 128256), `--layers` blocks
(32 = the whole model), random weights pruned to 2:4 with `prune_24` (magnitude; speed does not depend on the
values). Both models hold the same pruned weights:
- dense: the pruned model as it is (cuBLAS);
- ours: a copy after `accelerate_24(model)` (a decoder: compressed weights only; q/k/v and gate/up each one
  joined 2:4 GEMM, unless `--no-fuse-projections`) and `prepare_token_counts(model, max_tokens)` (the warm-up, timed; `prepare_generation` with the
  largest batch x prompt of the run).
For each dtype and batch size, both models generate `--new-tokens` tokens greedily after a `--prompt`-token
random prompt (EOS disabled), on two paths:
- compiled: `generate(..., cache_implementation="static")`, transformers' static KV cache with the decode step
  compiled by `torch.compile(mode="reduce-overhead")` (CUDA graph trees). One untimed generate first compiles.
- eager: plain `generate` (dynamic cache, no compile), for `--eager-batches`.
Decode tokens/s: batch x (steps - 1) over the GPU time between the first and the last decode step (CUDA events
recorded by a logits processor, so nothing synchronises in between). Time to first token (`--ttft`, batch x
prompt): `generate(max_new_tokens=1)` (the prefill, eager on both paths), median of 3 after a warm-up.
Memory: bytes of parameters, buffers and compressed weights; peak allocated during each generate (both
models are resident: `peak_bytes` counts both) and the peak above what was allocated before it (`peak_extra_bytes`:
KV cache, activations, CUDA graphs).
Accuracy: per decode step, ||logits - dense logits|| / ||dense logits|| (fp16 and bf16 models each against the
dense model of the same dtype), over the steps before the first differing token, and the fraction of equal tokens;
for `--reference-batches`, both models' logits also against the dense model in float32 (teacher-forced on each
model's own tokens), which shows how much of the difference is fp16/bf16 rounding that dense has too.
Per GEMM (`--gemm-table`): each projection of one block at decode sizes, dense and 2:4 replayed from CUDA graphs
(100 calls per graph, inputs rotating), against the time to read the compressed weight at the measured copy
bandwidth.
Prints tables and writes everything to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from datetime import date

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from bench_inference import env_info  # noqa: E402

from hf_semisparse import compute_nm_mask, prune_24  # noqa: E402
from hf_semisparse.kernels import accelerate_24, prepare_token_counts, semi_sparse_layers  # noqa: E402
from hf_semisparse.kernels.buckets import DECODE_MAX, ladder  # noqa: E402
from hf_semisparse.kernels.linear import SemiSparseLinear  # noqa: E402
from hf_semisparse.utils import write_json  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
)


class StepClock(LogitsProcessor):
    """Records a CUDA event at every generation step (after the step's forward), without synchronising."""

    def __init__(self) -> None:
        self.events: list[torch.cuda.Event] = []

    def __call__(self, input_ids, scores):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.events.append(event)
        return scores


def build_model(layers: int, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(num_hidden_layers=layers, torch_dtype=dtype, **LLAMA3_8B)
    config.eos_token_id = None  # generate exactly the tokens asked for
    config.pad_token_id = 0
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    prune_24(model, show_progress=False)
    return model.eval()


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, and of its 2:4 layers' compressed weights (the joined layers
    of sibling projections are not modules of the model), each storage once."""
    tensors = [*model.parameters(), *model.buffers()]
    for layer in semi_sparse_layers(model):
        tensors += [layer.compressed, layer.weight, layer.bias]
    seen, total = set(), 0
    for tensor in tensors:
        if tensor is not None and tensor.untyped_storage().data_ptr() not in seen:
            seen.add(tensor.untyped_storage().data_ptr())
            total += tensor.untyped_storage().nbytes()
    return total


def generate(model, ids, new_tokens: int, compiled: bool, scores: bool = False):
    clock = StepClock()
    kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([clock]),
        attention_mask=torch.ones_like(ids),
    )
    if compiled:
        kwargs["cache_implementation"] = "static"
    if scores:
        kwargs.update(return_dict_in_generate=True, output_logits=True)
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()  # both models and whatever else is alive
    start = torch.cuda.Event(enable_timing=True)
    start.record()
    with torch.inference_mode():
        out = model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    steps = len(clock.events)
    decode_ms = clock.events[0].elapsed_time(clock.events[-1])
    return {
        "out": out,
        "tokens_per_s": ids.shape[0] * (steps - 1) / (decode_ms / 1e3) if steps > 1 else None,
        "first_step_ms": start.elapsed_time(clock.events[0]),
        "peak_bytes": torch.cuda.max_memory_allocated(),
        "peak_extra_bytes": torch.cuda.max_memory_allocated() - resident,  # KV cache, activations, graphs
    }


def ttft_ms(model, batch: int, prompt: int, vocab: int) -> float:
    ids = torch.randint(1, vocab, (batch, prompt), device="cuda")
    generate(model, ids, 1, compiled=False)  # warm-up (and, for ours, any search the warm-up did not cover)
    return statistics.median(generate(model, ids, 1, compiled=False)["first_step_ms"] for _ in range(3))


def logits_error(dense_logits, ours_logits, dense_tokens, ours_tokens) -> dict:
    same = (dense_tokens == ours_tokens).all(dim=0)  # per step, over the batch
    agree = int(same.long().cumprod(0).sum())  # steps before the first differing token
    errors = [
        float((o.float() - d.float()).norm() / d.float().norm())
        for d, o in zip(dense_logits[: max(agree, 1)], ours_logits[: max(agree, 1)], strict=True)
    ]
    return {
        "steps_compared": len(errors),
        "max_rel_error": max(errors),
        "median_rel_error": statistics.median(errors),
        "equal_tokens": float(same.float().mean()),
    }


@torch.no_grad()
def reference_error(reference, sequences, logits, prompt: int, steps: int) -> dict:
    """||logits - ref|| / ||ref|| per decode step against `reference` (the dense model in float32), teacher-forced
    on `sequences` (`[batch, prompt + new]`), over the first `steps` steps; one sequence per forward."""
    errors = []
    for row in range(sequences.shape[0]):
        ids = sequences[row : row + 1, : prompt + steps - 1]  # the logits at position p choose token p + 1
        ref = reference(ids, use_cache=False).logits[0, prompt - 1 :].float()  # [steps, V]
        got = torch.stack([step[row].float() for step in logits[:steps]])
        errors.append((got - ref).norm(dim=-1) / ref.norm(dim=-1))
    errors = torch.cat(errors)
    return {"median_rel_error": float(errors.median()), "max_rel_error": float(errors.max())}


def gemm_table(dtype: torch.dtype, sizes: list[int], bandwidth: float) -> list[dict]:
    h, f = LLAMA3_8B["hidden_size"], LLAMA3_8B["intermediate_size"]
    kv = h // LLAMA3_8B["num_attention_heads"] * LLAMA3_8B["num_key_value_heads"]
    shapes = {
        "q/o_proj": (h, h),
        "k/v_proj": (kv, h),
        "qkv_proj (joined)": (h + 2 * kv, h),
        "gate/up_proj": (f, h),
        "gate_up_proj (joined)": (2 * f, h),
        "down_proj": (h, f),
    }
    rows = []
    for name, (n, k) in shapes.items():
        # enough copies of the weight that they do not fit in L2 together, as in a model whose layers take turns
        copies = max(2, -(-256 * 2**20 // (n * k * 2)))
        weights = [torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5 for _ in range(copies)]
        weights = [w * compute_nm_mask(w) for w in weights]
        ours = []
        for w in weights:
            lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=dtype)
            lin.weight.data.copy_(w)
            ours.append(SemiSparseLinear(lin, keep_dense=False))
        prepare_token_counts(torch.nn.Sequential(*ours), max(sizes), progress=False)
        for m in sizes:
            xs = [torch.randn(m, k, device="cuda", dtype=dtype) for _ in range(copies)]
            times = {
                "dense": graph_us(lambda i, xs=xs, ws=weights: F.linear(xs[i], ws[i]), copies),
                "ours": graph_us(lambda i, xs=xs, layers=ours: layers[i].run(xs[i]), copies),
            }
            floor = ours[0].compressed.numel() / bandwidth * 1e6
            rows.append(
                {
                    "gemm": name,
                    "n": n,
                    "k": k,
                    "tokens": m,
                    "dense_us": times["dense"],
                    "ours_us": times["ours"],
                    "speedup": times["dense"] / times["ours"],
                    "read_floor_us": floor,
                    "ours_of_floor": floor / times["ours"],
                }
            )
    return rows


def graph_us(fn, copies: int, calls: int = 96) -> float:
    """Median over 5 replays of a CUDA graph of `calls` calls `fn(i)`, `i` rotating over `copies`, per call (us)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for i in range(copies):
            fn(i)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        for i in range(calls):
            fn(i % copies)
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written (METHOD.md's ceiling)."""
    a = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        b.copy_(a)
    end.record()
    end.synchronize()
    rate = 2 * a.numel() * 5 / (start.elapsed_time(end) / 1e3)
    del a, b
    return rate


def measure_path(args, row: dict, path: str, dense, ours, ids, batch: int, name: str) -> None:
    compiled = path == "compiled"
    runs = {}

    for label, model in (("dense", dense), ("ours", ours)):
        t0 = time.perf_counter()
        # the first call compiles; its logits are compared (kept only up to batch 32: 8 GB at batch 128)
        first = generate(model, ids, args.new_tokens, compiled, scores=batch <= 32)
        row[f"{path}_{label}_first_call_s"] = time.perf_counter() - t0
        runs[label] = first
    for label, model in (("ours", ours), ("dense", dense)):  # timed, in the other order
        timed = generate(model, ids, args.new_tokens, compiled)
        row[f"{path}_{label}_tokens_per_s"] = timed["tokens_per_s"]
        row[f"{path}_{label}_peak_bytes"] = timed["peak_bytes"]
        row[f"{path}_{label}_peak_extra_bytes"] = timed["peak_extra_bytes"]
    row[f"{path}_speedup"] = row[f"{path}_ours_tokens_per_s"] / row[f"{path}_dense_tokens_per_s"]
    d, o = runs["dense"]["out"], runs["ours"]["out"]
    if batch <= 32:
        row[f"{path}_accuracy"] = logits_error(
            d.logits, o.logits, d.sequences[:, args.prompt :], o.sequences[:, args.prompt :]
        )
        reference = getattr(args, "fp32_reference", None)
        if reference is not None and batch in args.reference_batches:
            steps = row[f"{path}_accuracy"]["steps_compared"]  # where dense and ours chose the same tokens
            row[f"{path}_accuracy"]["vs_fp32"] = {
                label: reference_error(reference, out.sequences, out.logits, args.prompt, steps)
                for label, out in (("dense", d), ("ours", o))
            }
    else:
        row[f"{path}_accuracy"] = {
            "equal_tokens": float((d[:, args.prompt :] == o[:, args.prompt :]).float().mean())
        }
    del runs, d, o
    print(
        f"[{name}] batch {batch} {path}: dense {row[f'{path}_dense_tokens_per_s']:.0f} tok/s, ours "
        f"{row[f'{path}_ours_tokens_per_s']:.0f} tok/s ({row[f'{path}_speedup']:.2f}x); {row[f'{path}_accuracy']}",
        flush=True,
    )


def run_dtype(args, name: str, dtype: torch.dtype, results: dict) -> dict:
    result: dict = {"dtype": name, "decode": [], "ttft": []}
    results["runs"].append(result)  # written after every measurement: a run cut short keeps what it measured
    t0 = time.perf_counter()
    dense = build_model(args.layers, dtype)
    result["build_s"] = time.perf_counter() - t0
    ours = copy.deepcopy(dense)
    report = accelerate_24(ours, fuse_projections=not args.no_fuse_projections)
    result["accelerate_report"] = str(report)
    gc.collect()
    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    max_tokens = max(max(args.batches) * args.prompt, *(b * p for b, p in args.ttft), args.new_prompt)
    prep = prepare_token_counts(ours, max_tokens)
    result["warmup_s"] = time.perf_counter() - t0
    result["warmup"] = str(prep)
    if args.pad_buffers:  # what prepare_generation(..., pad_buffers=True) adds, for decode batches up to N
        sizes = ladder(min(args.pad_buffers, DECODE_MAX))
        result["pad_buffer_bytes"] = sum(layer.add_pad_buffers(sizes) for layer in semi_sparse_layers(ours))
    result["weight_bytes"] = {"dense": model_bytes(dense), "ours": model_bytes(ours)}
    linear_dense = sum(
        m.weight.numel() * m.weight.element_size()
        for m in dense.model.modules()
        if isinstance(m, torch.nn.Linear)
    )
    linear_ours = sum(layer.compressed.numel() for layer in semi_sparse_layers(ours))
    result["linear_weight_bytes"] = {"dense": linear_dense, "ours": linear_ours}
    print(
        f"[{name}] warm-up {result['warmup_s']:.1f} s ({prep}); weights {result['weight_bytes']['ours'] / 1e9:.2f} "
        f"vs {result['weight_bytes']['dense'] / 1e9:.2f} GB",
        flush=True,
    )
    vocab = dense.config.vocab_size
    # the dense model in float32 (same 2:4 weights): the reference both fp16/bf16 models are compared with
    args.fp32_reference = copy.deepcopy(dense).float() if args.reference_batches else None
    for batch in args.batches:
        ids = torch.randint(1, vocab, (batch, args.prompt), device="cuda")
        row: dict = {"batch": batch}
        for path in ("compiled", "eager"):
            if path == "eager" and batch not in args.eager_batches:
                continue
            try:
                measure_path(args, row, path, dense, ours, ids, batch, name)
            except Exception as exc:  # noqa: BLE001 - recorded, and the other measurements go on
                row[f"{path}_error"] = repr(exc)[:2000]
                print(f"[{name}] batch {batch} {path}: FAILED {exc!r}"[:2000], flush=True)
        result["decode"].append(row)
        write_json(args.out, results)
    for batch, prompt in args.ttft:
        row = {"batch": batch, "prompt": prompt}
        row["dense_ms"] = ttft_ms(dense, batch, prompt, vocab)
        row["ours_ms"] = ttft_ms(ours, batch, prompt, vocab)
        row["speedup"] = row["dense_ms"] / row["ours_ms"]
        result["ttft"].append(row)
        write_json(args.out, results)
        print(
            f"[{name}] TTFT {batch}x{prompt}: dense {row['dense_ms']:.1f} ms, ours {row['ours_ms']:.1f} ms",
            flush=True,
        )
    ids = torch.randint(1, vocab, (1, args.new_prompt), device="cuda")
    for label, model in (("dense", dense), ("ours", ours)):  # a prompt length no call used before
        t0 = time.perf_counter()
        generate(model, ids, 2, compiled=False)
        result[f"new_prompt_length_first_call_s_{label}"] = time.perf_counter() - t0
    result["new_prompt_length_first_call_s"] = result["new_prompt_length_first_call_s_ours"]
    del dense, ours
    args.fp32_reference = None
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return result


def print_tables(results: dict) -> None:
    gpu = results["env"]["gpu"]
    for r in results["runs"]:
        print(
            f"\n{gpu}, {r['dtype']}, {results['layers']} blocks of Llama-3-8B shape; decode tokens/s, "
            f"prompt {results['prompt']}, {results['new_tokens']} new tokens"
        )
        print(
            "| batch | compiled dense | compiled ours | speedup | eager dense | eager ours | speedup | logits err |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for row in r["decode"]:
            if "compiled_speedup" not in row:
                print(f"| {row['batch']} | failed: {row.get('compiled_error', '?')[:200]} |")
                continue
            eager = (
                f"{row['eager_dense_tokens_per_s']:.0f} | {row['eager_ours_tokens_per_s']:.0f} | "
                f"{row['eager_speedup']:.2f}x"
                if "eager_speedup" in row
                else "- | - | -"
            )
            print(
                f"| {row['batch']} | {row['compiled_dense_tokens_per_s']:.0f} | {row['compiled_ours_tokens_per_s']:.0f}"
                f" | {row['compiled_speedup']:.2f}x | {eager} | {row['compiled_accuracy'].get('max_rel_error', float('nan')):.1e} |"
            )
        for row in r["ttft"]:
            print(
                f"TTFT {row['batch']}x{row['prompt']}: dense {row['dense_ms']:.1f} ms, ours {row['ours_ms']:.1f} ms, "
                f"{row['speedup']:.2f}x"
            )
        wb = r["weight_bytes"]
        lb = r["linear_weight_bytes"]
        print(
            f"weights: ours {wb['ours'] / 1e9:.2f} GB / dense {wb['dense'] / 1e9:.2f} GB = {wb['ours'] / wb['dense']:.3f}"
            f" (2:4 layers alone {lb['ours'] / lb['dense']:.4f}); warm-up {r['warmup_s']:.1f} s; "
            f"a new prompt length: {r['new_prompt_length_first_call_s']:.2f} s "
            f"(dense {r.get('new_prompt_length_first_call_s_dense', float('nan')):.2f} s)"
        )
    if results.get("gemms"):
        print(
            f"\n{gpu}: per GEMM at decode sizes, CUDA-graph replay, us per call "
            f"(copy bandwidth {results['copy_bandwidth'] / 1e12:.2f} TB/s)"
        )
        print("| GEMM | tokens | dense | ours | speedup | compressed-read floor | ours at % of floor |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for row in results["gemms"]:
            print(
                f"| {row['gemm']} {row['n']}x{row['k']} | {row['tokens']} | {row['dense_us']:.1f} | {row['ours_us']:.1f} | "
                f"{row['speedup']:.2f}x | {row['read_floor_us']:.1f} | {100 * row['ours_of_floor']:.0f}% |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--eager-batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--ttft", nargs="*", default=["1x2048", "8x2048"], help="BATCHxPROMPT")
    parser.add_argument(
        "--new-prompt", type=int, default=1999, help="a prompt length no run used, timed once"
    )
    parser.add_argument(
        "--reference-batches",
        type=int,
        nargs="*",
        default=[1, 8],
        help="batches whose per-step logits are also compared with the dense model in float32",
    )
    parser.add_argument("--gemm-table", type=int, nargs="*", default=[16, 32, 64, 128, 256])
    parser.add_argument("--out", default="outputs/bench_generate.json")
    parser.add_argument(
        "--no-fuse-projections", action="store_true", help="q/k/v and gate/up as separate 2:4 GEMMs"
    )
    parser.add_argument(
        "--pad-buffers",
        type=int,
        default=0,
        metavar="N",
        help="give 2:4 layers decode pad buffers for batches up to N (prepare_generation(pad_buffers=True))",
    )
    args = parser.parse_args()
    args.ttft = [tuple(int(v) for v in spec.split("x")) for spec in args.ttft]
    if not torch.cuda.is_available():
        sys.exit("bench_generate.py needs a CUDA GPU")
    results = {
        "date": date.today().isoformat(),
        "command": " ".join(sys.argv),
        "env": env_info(),
        "layers": args.layers,
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "fuse_projections": not args.no_fuse_projections,
        "pad_buffers": args.pad_buffers,
        "runs": [],
    }
    bandwidth = copy_bandwidth()
    results["copy_bandwidth"] = bandwidth
    if args.gemm_table:
        results["gemms"] = gemm_table(torch.float16, args.gemm_table, bandwidth)
    if args.gemm_table:
        write_json(args.out, results)
    for name in args.dtypes:
        run_dtype(args, name, DTYPES[name], results)
        write_json(args.out, results)  # a run cut short keeps the dtypes done
    print_tables(results)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
