"""Dense vs hf_semisparse text generation of a Llama-3-8B-shaped decoder, in ONE run on one GPU.

    PYTHONPATH=src python benchmarks/bench_generate.py --out outputs/bench_generate.json

Model: Llama-3-8B's shapes (hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocabulary 128256), `--layers` blocks
(32 = the whole model), random weights pruned to 2:4 with `prune_24` (magnitude; speed does not depend on the
values; `lm_head` stays dense unless `--sparse-lm-head`). Both models hold the same pruned weights:
- dense: the pruned model as it is (cuBLAS);
- ours: a copy after `accelerate_24(model)` (a decoder: compressed weights only; q/k/v and gate/up each one
  joined 2:4 GEMM, unless `--no-fuse-projections`) and `prepare_token_counts(model, max_tokens)` (the warm-up, timed; `prepare_generation` with the
  largest batch x prompt of the run).
For each dtype and batch size, both models generate `--new-tokens` tokens greedily after a `--prompt`-token
random prompt (EOS disabled), on two paths:
- compiled: `generate(..., cache_implementation="static")`, transformers' static KV cache with the decode step
  compiled by `torch.compile(mode="reduce-overhead")` (CUDA graph trees). One untimed generate first compiles.
- eager: plain `generate` (dynamic cache, no compile), for `--eager-batches`.
With `--dtypes fp8` (alone or beside fp16/bf16), one run holds three models built from the same bf16 2:4 weights:
- dense: the bf16 model as it is (cuBLAS), the baseline of every ratio;
- dense_fp8: a copy whose linear layers (those ours runs in FP8) are `DenseFp8Linear` (benchmarks/dense_fp8.py:
  e4m3 weights per output channel, activations quantised per token by `cutlass_fp8.quantize_rows`' formula,
  `torch._scaled_mm` with rowwise scales and fast accumulation);
- ours: a copy after `accelerate_24(model, weights="fp8")` (FP8 2:4, `Fp8SemiSparseLinear`; layers the FP8 kernels
  cannot take stay on the bf16 2:4 path), warmed up by `prepare_fp8` (every FP8 weight shape at the run's token
  counts) and `prepare_token_counts` (the bf16 2:4 layers, if any).
Ratios against dense bf16 (`*_speedup`, `*_dense_fp8_vs_dense`) and against dense FP8 (`*_ours_vs_dense_fp8`);
accuracy of both FP8 models against dense bf16. Where the FP8 kernels cannot run (not Hopper, not built), the fp8
run is skipped, the reason printed once and kept in the JSON's "skipped"; the other dtypes still run.
Decode tokens/s: batch x (steps - 1) over the GPU time between the first and the last decode step (CUDA events
recorded by a logits processor, so nothing synchronises in between). Time to first token (`--ttft`, batch x
prompt): `generate(max_new_tokens=1)` (the prefill, eager on both paths: transformers' compiled static-cache
generate compiles the decode step only), median of 3 after a warm-up.
Memory: bytes of parameters, buffers and compressed weights; peak allocated during each generate (all the
run's models are resident: `peak_bytes` counts them all) and the peak above what was allocated before it (`peak_extra_bytes`:
KV cache, activations, CUDA graphs).
Accuracy: per decode step, ||logits - dense logits|| / ||dense logits|| (fp16 and bf16 models each against the
dense model of the same dtype), over the steps before the first differing token, and the fraction of equal tokens;
for `--reference-batches`, both models' logits also against the dense model in float32 (teacher-forced on each
model's own tokens), which shows how much of the difference is fp16/bf16 rounding that dense has too, and the
dense model's decode-step logits against its own eager teacher-forced forward (`dense_vs_itself`: how far apart
two computations of one dense model land in fp16/bf16 on the same tokens; on the compiled path the two differ in
more than the GEMMs: inductor's fused kernels, attention over the static cache against attention without one).
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
from dense_fp8 import DenseFp8Linear, to_dense_fp8  # noqa: E402

from hf_semisparse import SparsityConfig, compute_nm_mask, prune_24  # noqa: E402
from hf_semisparse.kernels import accelerate_24, prepare_token_counts, semi_sparse_layers  # noqa: E402
from hf_semisparse.kernels.buckets import DECODE_MAX, ladder  # noqa: E402
from hf_semisparse.kernels.fp8_linear import Fp8SemiSparseLinear  # noqa: E402
from hf_semisparse.kernels.linear import SemiSparseLinear  # noqa: E402
from hf_semisparse.utils import write_json  # noqa: E402

# the model's dtype per run; "fp8" runs a bf16 model three ways (dense bf16, dense FP8, FP8 2:4)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.bfloat16}
DEVICE = "cuda"
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


PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(
    layers: int, dtype: torch.dtype, seed: int = 0, sparse_lm_head: bool = False
) -> LlamaForCausalLM:
    config = LlamaConfig(num_hidden_layers=layers, torch_dtype=dtype, **LLAMA3_8B)
    config.eos_token_id = None  # generate exactly the tokens asked for
    config.pad_token_id = 0
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(DEVICE):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    # the output head stays dense unless named (exclude_modules' default, as SparseGPT and Wanda do)
    sparsity = (
        SparsityConfig(target_modules=[*PROJECTIONS, "lm_head"], exclude_modules=[])
        if sparse_lm_head
        else None
    )
    prune_24(model, sparsity, show_progress=False)
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
    ids = torch.randint(1, vocab, (batch, prompt), device=DEVICE)
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
def reference_error(reference, sequences, logits, prompt: int, steps: int, first_step: int = 0) -> dict:
    """||logits - ref|| / ||ref|| per decode step against `reference` (the dense model in float32), teacher-forced
    on `sequences` (`[batch, prompt + new]`), over steps `first_step` to `steps - 1`; one sequence per forward."""
    errors = []
    for row in range(sequences.shape[0]):
        ids = sequences[row : row + 1, : prompt + steps - 1]  # the logits at position p choose token p + 1
        ref = reference(ids, use_cache=False).logits[0, prompt - 1 :].float()  # [steps, V]
        got = torch.stack([step[row].float() for step in logits[:steps]])
        errors.append(((got - ref).norm(dim=-1) / ref.norm(dim=-1))[first_step:])
    errors = torch.cat(errors)
    return {
        "median_rel_error": float(errors.median()),
        "max_rel_error": float(errors.max()),
        "values": errors.numel(),  # sequences x steps compared
    }


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


def labels_of(name: str) -> tuple[str, ...]:
    """The models of a run, in order: "dense" (the baseline of every ratio) first."""
    return ("dense", "dense_fp8", "ours") if name == "fp8" else ("dense", "ours")


def accuracy_key(path: str, label: str) -> str:
    """`{path}_accuracy` for ours against dense (the key of fp16/bf16 runs), `{path}_{label}_accuracy` otherwise."""
    return f"{path}_accuracy" if label == "ours" else f"{path}_{label}_accuracy"


def add_ratios(row: dict, prefix: str, labels: tuple[str, ...], field: str = "tokens_per_s") -> None:
    """Ratios of higher-is-better `{prefix}{label}_{field}` values: `{prefix}speedup` (ours / dense), and with a
    dense FP8 model, `{prefix}ours_vs_dense_fp8` and `{prefix}dense_fp8_vs_dense`. Times (`field="ms"`) are
    inverted, so every ratio above 1 means the first-named model is faster. Ratios of a model missing from
    `labels` (it failed) are left out."""

    def rate(label: str) -> float:
        value = row[f"{prefix}{label}_{field}"]
        return 1.0 / value if field == "ms" else value

    pairs = (("speedup", "ours", "dense"), ("ours_vs_dense_fp8", "ours", "dense_fp8"))
    pairs += (("dense_fp8_vs_dense", "dense_fp8", "dense"),)
    for key, model, baseline in pairs:
        if model in labels and baseline in labels:
            row[f"{prefix}{key}"] = rate(model) / rate(baseline)


def record_failure(row: dict, key: str, what: str, exc: Exception) -> None:
    row[key] = repr(exc)[:2000]
    print(f"{what}: FAILED {exc!r}"[:2000], flush=True)


def measure_path(args, row: dict, path: str, models: dict, ids, batch: int, name: str) -> None:
    """Generate with each of `models` (label -> model; "dense" the baseline) on `path` ("compiled" or "eager"): the
    first call (compiles), then a timed call of each in the reverse order; tokens/s, memory, ratios and each
    model's accuracy against dense into `row`."""
    compiled = path == "compiled"
    runs = {}
    for label, model in models.items():
        t0 = time.perf_counter()
        try:  # one model failing (a baseline untried on this GPU) must not lose the others' measurements
            # the first call compiles; its logits are compared (kept only up to batch 32: 8 GB at batch 128)
            runs[label] = generate(model, ids, args.new_tokens, compiled, scores=batch <= 32)
        except Exception as exc:  # noqa: BLE001 - recorded, and the other models go on
            record_failure(row, f"{path}_{label}_error", f"[{name}] batch {batch} {path} {label}", exc)
            continue
        row[f"{path}_{label}_first_call_s"] = time.perf_counter() - t0
    if "dense" not in runs:
        raise RuntimeError(f"the dense baseline failed: {row.get(f'{path}_dense_error')}")
    labels = tuple(label for label in models if label in runs)
    for label in reversed(labels):  # timed, in the other order
        try:
            timed = generate(models[label], ids, args.new_tokens, compiled)
        except Exception as exc:  # noqa: BLE001
            record_failure(row, f"{path}_{label}_error", f"[{name}] batch {batch} {path} {label}", exc)
            del runs[label]
            continue
        row[f"{path}_{label}_tokens_per_s"] = timed["tokens_per_s"]
        row[f"{path}_{label}_peak_bytes"] = timed["peak_bytes"]
        row[f"{path}_{label}_peak_extra_bytes"] = timed["peak_extra_bytes"]
    labels = tuple(label for label in labels if label in runs)
    add_ratios(row, f"{path}_", labels)
    d = runs["dense"]["out"]
    itself = None  # computed once per row (an fp8 run compares two models with dense)
    for label in labels[1:]:
        o = runs[label]["out"]
        key = accuracy_key(path, label)
        if batch <= 32:
            row[key] = logits_error(
                d.logits, o.logits, d.sequences[:, args.prompt :], o.sequences[:, args.prompt :]
            )
            reference = getattr(args, "fp32_reference", None)
            if reference is not None and batch in args.reference_batches:
                steps = row[key]["steps_compared"]  # where dense and this model chose the same tokens
                row[key]["vs_fp32"] = {
                    lab: reference_error(reference, out.sequences, out.logits, args.prompt, steps)
                    for lab, out in (("dense", d), (label, o))
                }
                # two computations of the same dense model on the same tokens: its decode steps against one
                # eager teacher-forced forward of it, over every step after the first (whose logits the
                # prefill computed: the same forward)
                if itself is None:
                    itself = reference_error(
                        models["dense"], d.sequences, d.logits, args.prompt, len(d.logits), 1
                    )
                row[key]["dense_vs_itself"] = itself
        else:
            row[key] = {"equal_tokens": float((d[:, args.prompt :] == o[:, args.prompt :]).float().mean())}
    del runs, d
    rates = ", ".join(f"{label} {row[f'{path}_{label}_tokens_per_s']:.0f}" for label in labels)
    names = {
        "speedup": "ours/dense",
        "ours_vs_dense_fp8": "ours/dense_fp8",
        "dense_fp8_vs_dense": "dense_fp8/dense",
    }
    ratios = ", ".join(
        f"{text} {row[f'{path}_{key}']:.2f}x" for key, text in names.items() if f"{path}_{key}" in row
    )
    accuracy = {label: row[accuracy_key(path, label)] for label in labels[1:]}
    print(f"[{name}] batch {batch} {path}: tok/s {rates} ({ratios}); {accuracy}", flush=True)


def fp8_unavailable() -> str | None:
    """None if the fp8 run can go (FP8 2:4 kernels and dense FP8 on this GPU), else why not."""
    from hf_semisparse.kernels import cutlass_fp8

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return cutlass_fp8.why_unavailable(torch.device("cuda"), torch.bfloat16, 64, 256)


def prepare_fp8(model: torch.nn.Module, token_counts: list[int]) -> dict:
    """Every FP8 2:4 weight shape of `model` called once at each of `token_counts` (its tile configuration is timed
    at the first call of each shape and token count, rounded up to 16, and shared by the layers of that shape):
    what `prepare_token_counts` does for the bf16 2:4 layers."""
    shapes: dict[tuple[int, int], Fp8SemiSparseLinear] = {}
    for module in model.modules():
        if isinstance(module, Fp8SemiSparseLinear):
            shapes.setdefault((module.out_features, module.in_features), module)
    counts = sorted(set(token_counts))
    with torch.inference_mode():
        for (_, k), layer in shapes.items():
            for m in counts:
                layer.run(torch.randn(m, k, device=layer.compressed.device, dtype=layer.compute_dtype))
    return {"shapes": len(shapes), "token_counts": counts}


def linear_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the decoder blocks' linear weights as they run (`lm_head` excluded): dense weights, e4m3 weights
    and their scales, and the bf16/fp16 2:4 layers' compressed weights."""
    body = model.model
    total = sum(layer.compressed.numel() for layer in semi_sparse_layers(body))
    for m in body.modules():
        if isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, Fp8SemiSparseLinear):
            total += m.compressed.numel() + m.weight_scale.numel() * 4
        elif isinstance(m, DenseFp8Linear):
            total += m.weight_fp8.numel() + m.weight_scale.numel() * 4
    return total


def build_variants(args, name: str, result: dict) -> dict:
    """The models of one run (label -> model, `labels_of(name)`), built, converted and warmed up; what that took
    and reported goes into `result`."""
    t0 = time.perf_counter()
    dense = build_model(args.layers, DTYPES[name], sparse_lm_head=args.sparse_lm_head)
    result["build_s"] = time.perf_counter() - t0
    ours = copy.deepcopy(dense)
    fp8 = name == "fp8"
    report = accelerate_24(
        ours, fuse_projections=not args.no_fuse_projections, weights="fp8" if fp8 else "native"
    )
    result["accelerate_report"] = str(report)
    models = {"dense": dense}
    if fp8:
        dense_fp8 = copy.deepcopy(dense)
        mirrored = [n for n, m in ours.named_modules() if isinstance(m, Fp8SemiSparseLinear)]
        fp8_report = to_dense_fp8(dense_fp8, targets=mirrored)
        result["dense_fp8_report"] = str(fp8_report)
        result["dense_fp8_fast_accum"] = fp8_report.fast_accum
        models["dense_fp8"] = dense_fp8
        print(f"[{name}] dense FP8: {result['dense_fp8_report']}", flush=True)
    models["ours"] = ours
    gc.collect()
    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    max_tokens = max(max(args.batches) * args.prompt, *(b * p for b, p in args.ttft), args.new_prompt)
    prep = []
    if semi_sparse_layers(ours):  # a 2:4 lm_head computes the last position of each sequence only
        head_tokens = max(*args.batches, *(b for b, _ in args.ttft), 1)
        prep.append(str(prepare_token_counts(ours, max_tokens, head_max_tokens=head_tokens)))
    if fp8:
        counts = [*args.batches, *(b * args.prompt for b in args.batches), *(b * p for b, p in args.ttft)]
        prep.append(f"FP8 2:4: {prepare_fp8(ours, counts)}")
    result["warmup_s"] = time.perf_counter() - t0
    result["warmup"] = "; ".join(prep)
    if args.pad_buffers and semi_sparse_layers(
        ours
    ):  # prepare_generation(..., pad_buffers=True), batches <= N
        ladder_sizes = ladder(min(args.pad_buffers, DECODE_MAX))
        result["pad_buffer_bytes"] = sum(
            layer.add_pad_buffers(ladder_sizes) for layer in semi_sparse_layers(ours)
        )
    return models


def run_dtype(args, name: str, dtype: torch.dtype, results: dict) -> dict:
    result: dict = {"dtype": name, "decode": [], "ttft": []}
    if name == "fp8":
        result["models"] = {"dense": "bf16", "dense_fp8": "DenseFp8Linear", "ours": "FP8 2:4"}
    results["runs"].append(result)  # written after every measurement: a run cut short keeps what it measured
    models = build_variants(args, name, result)
    labels = tuple(models)
    result["weight_bytes"] = {label: model_bytes(model) for label, model in models.items()}
    result["linear_weight_bytes"] = {label: linear_weight_bytes(model) for label, model in models.items()}
    sizes = ", ".join(f"{label} {result['weight_bytes'][label] / 1e9:.2f}" for label in labels)
    print(
        f"[{name}] warm-up {result['warmup_s']:.1f} s ({result['warmup']}); weights GB: {sizes}", flush=True
    )
    dense = models["dense"]
    vocab = dense.config.vocab_size
    # the dense model in float32 (same 2:4 weights): the reference the fp16/bf16/FP8 models are compared with
    args.fp32_reference = copy.deepcopy(dense).float() if args.reference_batches else None
    for batch in args.batches:
        ids = torch.randint(1, vocab, (batch, args.prompt), device=DEVICE)
        row: dict = {"batch": batch}
        for path in ("compiled", "eager"):
            if path == "eager" and batch not in args.eager_batches:
                continue
            try:
                measure_path(args, row, path, models, ids, batch, name)
            except Exception as exc:  # noqa: BLE001 - recorded, and the other measurements go on
                row[f"{path}_error"] = repr(exc)[:2000]
                print(f"[{name}] batch {batch} {path}: FAILED {exc!r}"[:2000], flush=True)
        result["decode"].append(row)
        write_json(args.out, results)
    for batch, prompt in args.ttft:
        row = {"batch": batch, "prompt": prompt}
        for label, model in models.items():
            try:
                row[f"{label}_ms"] = ttft_ms(model, batch, prompt, vocab)
            except Exception as exc:  # noqa: BLE001 - recorded, and the other models go on
                record_failure(row, f"{label}_error", f"[{name}] TTFT {batch}x{prompt} {label}", exc)
        add_ratios(row, "", tuple(label for label in labels if f"{label}_ms" in row), field="ms")
        result["ttft"].append(row)
        write_json(args.out, results)
        times = ", ".join(f"{label} {row[f'{label}_ms']:.1f} ms" for label in labels if f"{label}_ms" in row)
        print(f"[{name}] TTFT {batch}x{prompt}: {times}", flush=True)
    ids = torch.randint(1, vocab, (1, args.new_prompt), device=DEVICE)
    for label, model in models.items():  # a prompt length no call used before
        t0 = time.perf_counter()
        try:
            generate(model, ids, 2, compiled=False)
        except Exception as exc:  # noqa: BLE001
            record_failure(
                result, f"new_prompt_length_error_{label}", f"[{name}] new prompt length {label}", exc
            )
            continue
        result[f"new_prompt_length_first_call_s_{label}"] = time.perf_counter() - t0
    result["new_prompt_length_first_call_s"] = result.get("new_prompt_length_first_call_s_ours")
    del models, dense
    args.fp32_reference = None
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return result


def _rate(row: dict, key: str, fmt: str = ".0f") -> str:
    return format(row[key], fmt) if row.get(key) is not None else "-"


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}x" if row.get(key) is not None else "-"


def print_tables(results: dict) -> None:
    gpu = results["env"]["gpu"]
    for reason in results.get("skipped", {}).values():
        print(f"\n{reason}")
    for r in results["runs"]:
        print(
            f"\n{gpu}, {r['dtype']}, {results['layers']} blocks of Llama-3-8B shape; decode tokens/s, "
            f"prompt {results['prompt']}, {results['new_tokens']} new tokens"
        )
        if r["dtype"] == "fp8":
            print_fp8_table(r)
        else:
            print(
                "| batch | compiled dense | compiled ours | speedup | eager dense | eager ours | speedup | logits err |"
            )
            print("| --- | --- | --- | --- | --- | --- | --- | --- |")
            for row in r["decode"]:
                if "compiled_speedup" not in row:
                    error = row.get("compiled_error") or row.get("compiled_ours_error", "?")
                    print(f"| {row['batch']} | failed: {error[:200]} |")
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
                    f"TTFT {row['batch']}x{row['prompt']}: dense {_rate(row, 'dense_ms', '.1f')} ms, ours "
                    f"{_rate(row, 'ours_ms', '.1f')} ms, {_ratio(row, 'speedup')}"
                )
        wb = r["weight_bytes"]
        lb = r["linear_weight_bytes"]
        print(
            f"weights: ours {wb['ours'] / 1e9:.2f} GB / dense {wb['dense'] / 1e9:.2f} GB = {wb['ours'] / wb['dense']:.3f}"
            f" (2:4 layers alone {lb['ours'] / lb['dense']:.4f}); warm-up {r['warmup_s']:.1f} s; "
            f"a new prompt length: {_rate(r, 'new_prompt_length_first_call_s', '.2f')} s "
            f"(dense {_rate(r, 'new_prompt_length_first_call_s_dense', '.2f')} s)"
        )
        if "dense_fp8" in wb:
            print(
                f"dense FP8 weights {wb['dense_fp8'] / 1e9:.2f} GB ({wb['dense_fp8'] / wb['dense']:.3f} of dense; "
                f"its linear layers {lb['dense_fp8'] / lb['dense']:.4f})"
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


def print_fp8_table(r: dict) -> None:
    """The fp8 run's tables: dense bf16, dense FP8 and FP8 2:4 (ours), with ours against both."""
    print(
        "| batch | path | dense bf16 | dense FP8 | FP8 2:4 | vs dense bf16 | vs dense FP8 | dense FP8 vs bf16 "
        "| logits err FP8 2:4 | logits err dense FP8 | equal tokens FP8 2:4 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in r["decode"]:
        for path in ("compiled", "eager"):
            for label in ("dense", "dense_fp8", "ours"):
                if f"{path}_{label}_error" in row:
                    print(
                        f"| {row['batch']} | {path} | {label} failed: {row[f'{path}_{label}_error'][:200]} |"
                    )
            if f"{path}_dense_tokens_per_s" not in row:
                if f"{path}_error" in row:
                    print(f"| {row['batch']} | {path} | failed: {row[f'{path}_error'][:200]} |")
                continue
            ours_acc = row.get(accuracy_key(path, "ours"), {})
            fp8_acc = row.get(accuracy_key(path, "dense_fp8"), {})
            print(
                f"| {row['batch']} | {path} | {_rate(row, f'{path}_dense_tokens_per_s')} | "
                f"{_rate(row, f'{path}_dense_fp8_tokens_per_s')} | {_rate(row, f'{path}_ours_tokens_per_s')} | "
                f"{_ratio(row, f'{path}_speedup')} | {_ratio(row, f'{path}_ours_vs_dense_fp8')} | "
                f"{_ratio(row, f'{path}_dense_fp8_vs_dense')} | {ours_acc.get('max_rel_error', float('nan')):.1e} | "
                f"{fp8_acc.get('max_rel_error', float('nan')):.1e} | {ours_acc.get('equal_tokens', float('nan')):.2f} |"
            )
    for row in r["ttft"]:
        print(
            f"TTFT {row['batch']}x{row['prompt']}: dense bf16 {_rate(row, 'dense_ms', '.1f')} ms, dense FP8 "
            f"{_rate(row, 'dense_fp8_ms', '.1f')} ms, FP8 2:4 {_rate(row, 'ours_ms', '.1f')} ms; vs dense bf16 "
            f"{_ratio(row, 'speedup')}, vs dense FP8 {_ratio(row, 'ours_vs_dense_fp8')}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["fp16", "bf16"],
        choices=sorted(DTYPES),
        help="fp8: dense bf16, dense FP8 and FP8 2:4 in one run (Hopper, `hf-semisparse build-kernels --fp8`)",
    )
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
        "--sparse-lm-head",
        action="store_true",
        help="prune lm_head 2:4 too (both models; named in target_modules), so ours runs it on 2:4 kernels",
    )
    parser.add_argument(
        "--pad-buffers",
        type=int,
        default=0,
        metavar="N",
        help="give 2:4 layers decode pad buffers for batches up to N (prepare_generation(pad_buffers=True))",
    )
    args = parser.parse_args(argv)
    try:
        args.ttft = [tuple(int(v) for v in spec.split("x")) for spec in args.ttft]
        if any(len(spec) != 2 for spec in args.ttft):
            raise ValueError
    except ValueError:
        parser.error(f"--ttft takes BATCHxPROMPT values such as 1x2048, got {args.ttft}")
    args.dtypes = list(dict.fromkeys(args.dtypes))  # each run once, in the order given
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
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
        "sparse_lm_head": args.sparse_lm_head,
        "runs": [],
    }
    if "fp8" in args.dtypes:
        why = fp8_unavailable()
        if why is not None:
            results["skipped"] = {"fp8": f"fp8 rows skipped: {why}"}
            print(results["skipped"]["fp8"], flush=True)
            args.dtypes = [name for name in args.dtypes if name != "fp8"]
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
