"""Unmerged masked-LoRA serving on a CUDA GPU: the 2:4 base on our kernels (`accelerate_24(peft_model)`) beside the
adapter path, against the merged model, for correctness, speed and memory:

    PYTHONPATH=src python tests/gpu/check_lora_gpu.py --json $OUT/lora_gpu.json

Model: a random Llama (hidden 1024, intermediate 2816, 4 layers, 16 heads, 4 KV heads, vocab 8192), pruned 2:4 by
magnitude in fp32, with a masked LoRA (`mask_lora`; rank 16, alpha 32, all seven projections, B drawn nonzero)
that changes the logits by more than 1% (checked). Variants, all fp16 but the reference:

  ref           fp32 dense: `merge_sparse_lora` of the fp32 PEFT model (exactly 2:4, checked)
  peft_dense    fp16 PEFT model, unmerged, base on PyTorch's dense GEMMs (no kernels)
  unmerged_24   (b) fp16 PEFT model, unmerged, `accelerate_24(peft_model)`: base layers on 2:4 kernels with
                compressed weights only (the decoder default), masks kept as 1-bit buffers
  merged_24     (c) fp16 `merge_sparse_lora`, then `accelerate_24`
  merged_dense  fp16 merged model on dense GEMMs (the dense baseline)

Checks (exit status 1 on any failure, each printed): every LoRA base layer of (b) is a `SemiSparseLinear` with
no dense weight and a kept mask; ||logits - ref|| / ||ref|| < 5e-3 for (b), (c) and peft_dense (fp16 rounding,
fp32 accumulation; an unmasked or misplaced mask gives errors of order the adapter's effect, > 1e-2), on a
1x512 prompt and on 16 one-token sequences; (b) against peft_dense under 5e-3; `merge_and_unload()` of (b)
raises `MergeOnKernelsError` and leaves its logits unchanged.

Timings: the median of `--reps` forwards (CUDA events, `torch.inference_mode`, `use_cache=False`), after
`--warmup` calls (the first calls also search the kernels' algorithms), eager, and replayed from a CUDA graph
where the forward can be captured (host overhead removed; "-" where it cannot). Shapes: 1 sequence of 512
tokens (prefill) and 16 sequences of 1 token (decode-like, M = 16 in every GEMM). Memory: the bytes of each
model's parameters and buffers (the compressed weights and kept masks included), and the peak allocated during
the 512-token forward above what the model holds.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
import traceback

import torch
from script_checks import CHECKS, FAILURES, check  # tests/gpu, beside this script
from transformers import LlamaConfig, LlamaForCausalLM

from hf_semisparse import is_nm_sparse, prune_24
from hf_semisparse.kernels import accelerate_24, why_not_accelerated
from hf_semisparse.kernels.linear import SemiSparseLinear
from hf_semisparse.lora_serving import MASK_BITS, MergeOnKernelsError

DEV = torch.device("cuda")
TOL = 5e-3  # fp16 logits against the fp32 reference, relative (Frobenius)
# the adapter must move the reference logits by more than this (else the checks cannot see a wrong mask)
ADAPTER_EFFECT = 1e-2
SHAPES = {"prefill 1x512": (1, 512), "decode-like 16x1": (16, 1)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def build_peft_fp32(layers: int, rank: int):
    """The fp32 2:4 Llama on the GPU wrapped with a masked LoRA whose B is nonzero."""
    import peft

    from hf_semisparse.lora import mask_lora

    config = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=8192,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(DEV).eval()
    prune_24(model, show_progress=False)
    cfg = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    peft_model = peft.get_peft_model(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: a trained adapter is not
                param.normal_(0.0, 0.02)
    masked = mask_lora(peft_model)
    check(len(masked) == 7 * layers, f"mask_lora masked {len(masked)} of {7 * layers} LoRA layers")
    return peft_model.eval()


def fp16_copy(model):
    return copy.deepcopy(model).to(torch.float16).eval()


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of `model`'s parameters and buffers, with the joined 2:4 layers of its projection slices (which are
    not modules of the model), each storage once."""
    from hf_semisparse.kernels import semi_sparse_layers

    tensors = list(model.parameters()) + list(model.buffers())
    for layer in semi_sparse_layers(model):
        tensors += list(layer.parameters()) + list(layer.buffers())
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def inputs(shape, seed=3):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randint(1, 8192, shape, device=DEV, generator=g)


def forward(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def logits(model, ids):
    with torch.inference_mode():
        return forward(model, ids).float()


def time_eager(model, ids, warmup: int, reps: int) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            forward(model, ids)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            forward(model, ids)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def time_graph(model, ids, reps: int) -> float | None:
    """Median us per forward replayed from a CUDA graph, or None where the forward cannot be captured (it is
    warmed up by `time_eager` first, so no algorithm search runs in the capture)."""
    try:
        with torch.inference_mode():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                forward(model, ids)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                forward(model, ids)
            for _ in range(3):
                graph.replay()
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
        del graph
        return sorted(times)[len(times) // 2]
    except Exception as exc:  # noqa: BLE001 - reported, and the eager timing stands
        print(f"      (no CUDA graph timing: {type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
        torch.cuda.synchronize()
        return None


def peak_extra_bytes(model, ids) -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    with torch.inference_mode():
        forward(model, ids)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - held


def run_checks(args) -> dict:
    from hf_semisparse.lora import merge_sparse_lora

    peft32 = build_peft_fp32(args.layers, args.rank)
    ref_model = merge_sparse_lora(copy.deepcopy(peft32))
    targets = (
        ref_model.config.sparsity_config["targets"] if hasattr(ref_model.config, "sparsity_config") else None
    )
    linears = {
        n: m.weight
        for n, m in ref_model.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head" and (targets is None or n in targets)
    }
    check(
        all(is_nm_sparse(w) for w in linears.values()),
        f"the fp32 merged model is exactly 2:4 ({len(linears)} layers)",
    )
    ids = {label: inputs(shape) for label, shape in SHAPES.items()}
    refs = {label: logits(ref_model, x) for label, x in ids.items()}
    with peft32.disable_adapter():
        effect = rel(logits(peft32, ids["prefill 1x512"]), refs["prefill 1x512"])
    check(effect > ADAPTER_EFFECT, f"the adapter moves the fp32 logits by {effect:.3g} (> {ADAPTER_EFFECT})")
    del ref_model
    gc.collect()

    variants: dict[str, torch.nn.Module] = {}
    variants["peft_dense"] = fp16_copy(peft32)
    unmerged = fp16_copy(peft32)
    report = accelerate_24(unmerged)
    print(report)
    variants["unmerged_24"] = unmerged
    from peft.tuners.lora.layer import Linear as LoraLinear

    lora_layers = {n: m for n, m in unmerged.named_modules() if isinstance(m, LoraLinear)}
    on_kernels = [
        n
        for n, m in lora_layers.items()
        if isinstance(m.get_base_layer(), SemiSparseLinear)
        and m.get_base_layer().weight is None
        and MASK_BITS in m._buffers
    ]
    check(
        report.ok and len(on_kernels) == len(lora_layers) == 7 * args.layers,
        f"(b) {len(on_kernels)} of {len(lora_layers)} LoRA base layers on 2:4 kernels, compressed only, mask kept",
    )
    merged = merge_sparse_lora(fp16_copy(peft32))
    variants["merged_dense"] = copy.deepcopy(merged)
    report_c = accelerate_24(merged)
    check(report_c.ok, f"(c) merged model accelerated: {len(report_c.accelerated)} layers")
    variants["merged_24"] = merged
    del peft32
    gc.collect()
    torch.cuda.empty_cache()

    errors: dict[str, dict[str, float]] = {}
    outs: dict[str, dict[str, torch.Tensor]] = {}
    for name, model in variants.items():
        outs[name] = {label: logits(model, x) for label, x in ids.items()}
        errors[name] = {label: rel(outs[name][label], refs[label]) for label in ids}
        for label, err in errors[name].items():
            check(err < TOL, f"{name:13} {label:17} rel. error vs fp32 reference {err:.2e} (< {TOL})")
    for label in ids:
        err = rel(outs["unmerged_24"][label], outs["peft_dense"][label])
        check(err < TOL, f"unmerged_24 vs peft_dense {label:17} {err:.2e} (< {TOL})")

    before = outs["unmerged_24"]["decode-like 16x1"]
    try:
        unmerged.merge_and_unload()
        check(False, "merge_and_unload() of (b) was refused")
    except MergeOnKernelsError as exc:
        check("merge_sparse_lora" in str(exc), f"merge_and_unload() of (b) refused: {str(exc)[:90]}...")
    after = rel(logits(unmerged, ids["decode-like 16x1"]), before)
    check(after < 1e-4, f"(b) computes as before after the refused merge ({after:.1e})")
    return {
        "variants": variants,
        "ids": ids,
        "errors": errors,
        "adapter_effect": effect,
        "report": str(report),
    }


def bench(variants, ids, warmup: int, reps: int, no_graph: bool = False) -> list[dict]:
    rows = []
    for name, model in variants.items():
        row = {"variant": name, "model_bytes": model_bytes(model)}
        for label, x in ids.items():
            row[f"{label} eager_us"] = time_eager(model, x, warmup, reps)
            row[f"{label} graph_us"] = None if no_graph else time_graph(model, x, reps)
        row["peak_extra_bytes_512"] = peak_extra_bytes(model, ids["prefill 1x512"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    def us(v):
        return f"{v:>10.1f}" if isinstance(v, float) else f"{'-':>10}"

    head = f"{'variant':13} {'MiB':>8} {'peak+MiB':>9}"
    for label in SHAPES:
        head += f" {label + ' eager':>24} {'graph':>10}"
    lines = [
        "us per forward (median); MiB of parameters and buffers; peak+: extra during the 512-token forward",
        head,
    ]
    for r in rows:
        line = f"{r['variant']:13} {r['model_bytes'] / 2**20:>8.1f} {r['peak_extra_bytes_512'] / 2**20:>9.1f}"
        for label in SHAPES:
            line += f" {us(r[f'{label} eager_us']):>24} {us(r[f'{label} graph_us'])}"
        lines.append(line)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--no-graph", action="store_true", help="eager timings only (no CUDA graph capture)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("FAIL  no CUDA GPU")
        return 1
    why = why_not_accelerated(DEV, torch.float16)
    if why:
        print(f"FAIL  the 2:4 kernels cannot run: {why}")
        return 1
    import peft

    t0 = time.time()
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "layers": args.layers,
        "rank": args.rank,
        "tolerance": TOL,
    }
    state = None
    try:
        state = run_checks(args)
        result["rel_error_vs_fp32_reference"] = state["errors"]
        result["adapter_effect"] = state["adapter_effect"]
        result["acceleration"] = state["report"]
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        check(False, "the checks raised")
    if state is not None and not args.skip_bench:
        try:
            rows = bench(state["variants"], state["ids"], args.warmup, args.reps, args.no_graph)
            result["timings"] = rows
            print(table(rows))
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            check(False, "the benchmark raised")
    result["failures"] = FAILURES
    result["checks"] = CHECKS
    result["seconds"] = round(time.time() - t0, 1)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    print(f"{len(FAILURES)} failures; {result['seconds']} s")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
