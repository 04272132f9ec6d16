"""Where a loaded 2:4 Mixtral (or Llama) drifts from its float32 reference on a GPU, block by block.

`tests/gpu/check_moe_gpu.py` found the loaded Mixtral-shaped model 5x further from the float32 logits than the
pruned model run dense in bf16 (0.086 against 0.016, H200, 2026-12-02), with every token routed as in the float32
run. This probe prunes a random model (magnitude 2:4), records each block's attention and block outputs in
float32, dense bf16, the checkpoint loaded without kernels (`load_options(accelerate=False)`) and loaded with
them, all with the float32 run's routing, and prints each one's relative error per block; each model twice:
cast with `model.to()`, which also rounds the rotary frequencies (`inv_freq`, a non-persistent buffer that
`from_pretrained` builds in float32), and cast with them recomputed in float32 (`check_moe_gpu._cast`):

    PYTHONPATH=src python benchmarks/probes/probe_moe_load_error.py --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "gpu"))
from check_moe_gpu import _cast, _forced_routing, _recorded_routing  # noqa: E402

from hf_semisparse import SparsityConfig, prune_24, save_sparse_pretrained  # noqa: E402
from hf_semisparse.registration import load_options  # noqa: E402

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def recorded_blocks(model):
    """{"attn.i": output, "block.i": output} of every decoder block, in float32."""
    out: dict[str, torch.Tensor] = {}

    def keep(key):
        def hook(module, inputs, output):
            t = output[0] if isinstance(output, tuple) else output
            out[key] = t.detach().float()

        return hook

    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.self_attn.register_forward_hook(keep(f"attn.{i}")))
        hooks.append(layer.register_forward_hook(keep(f"block.{i}")))
    try:
        yield out
    finally:
        for h in hooks:
            h.remove()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def run(kind: str, seq: int, shape: dict, exact_rotary: bool) -> dict:
    torch.manual_seed(0)
    if kind == "mixtral":
        model = MixtralForCausalLM(
            MixtralConfig(
                num_hidden_layers=2, vocab_size=32000, num_local_experts=2, num_experts_per_tok=2, **shape
            )
        )
    else:
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, vocab_size=32000, **shape))
    cast = _cast if exact_rotary else (lambda m, dtype: m.to(dtype))
    model = cast(model, torch.bfloat16).eval()
    prune_24(model, SparsityConfig(method="magnitude"))
    ids = torch.randint(0, 32000, (1, seq), device=DEVICE)
    cast(model, torch.float32).to(DEVICE)
    with torch.no_grad(), _recorded_routing(model) as routing, recorded_blocks(model) as ref:
        ref["logits"] = model(ids).logits.float()
    force = (
        (lambda m: _forced_routing(m, routing)) if kind == "mixtral" else (lambda m: contextlib.nullcontext())
    )
    runs = {}
    cast(model, torch.bfloat16)
    with torch.no_grad(), force(model), recorded_blocks(model) as got:
        got["logits"] = model(ids).logits.float()
    runs["dense_bf16"] = got
    model.cpu()
    with tempfile.TemporaryDirectory() as tmp:
        save_sparse_pretrained(model, tmp)
        for label, accelerate in (("loaded_no_kernels", False), ("loaded_kernels", "auto")):
            with load_options(accelerate=accelerate):
                loaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16, device_map=DEVICE)
            report = getattr(loaded, "sparsity_acceleration", None)
            said = report if report is not None else f"no 2:4 kernels (accelerate={accelerate!r}, {DEVICE})"
            print(f"[{kind}] {label}: {said}".replace("\n", ";"), flush=True)
            with torch.no_grad(), force(loaded), recorded_blocks(loaded) as got:
                got["logits"] = loaded(ids).logits.float()
            runs[label] = got
            del loaded
            torch.cuda.empty_cache()
    table = {label: {key: rel(t, ref[key]) for key, t in got.items()} for label, got in runs.items()}
    for label, errors in table.items():
        print(
            f"[{kind}{' exact rotary' if exact_rotary else ''}] {label:18} "
            + "  ".join(f"{k} {v:.2e}" for k, v in errors.items()),
            flush=True,
        )
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--kinds", nargs="+", default=["mixtral", "llama"])
    p.add_argument("--json", default=None)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke test)")
    args = p.parse_args()
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    result = {"gpu": gpu, "torch": torch.__version__, "seq": args.seq}
    for kind in args.kinds:
        for exact in (False, True):
            result[f"{kind}{'_exact_rotary' if exact else ''}"] = run(
                kind, args.seq, TINY if args.tiny else SHAPE, exact
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
