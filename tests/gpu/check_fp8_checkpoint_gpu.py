"""FP8 (e4m3) 2:4 checkpoints (format version 4) on a Hopper GPU: saved, loaded, and run on the FP8 kernels from the
stored codes, in one run:

    HF_SEMISPARSE_KERNEL_DIR=$PWD/build/kernels PYTHONPATH=src python tests/gpu/check_fp8_checkpoint_gpu.py --json out.json

(the libraries built elsewhere by `hf-semisparse build-kernels --fp8 --directory build/kernels`).

For fp16 and bf16, a random 2-layer Llama-shaped model (hidden 512, intermediate 1536: every in_features a multiple
of 256, every out_features of 64), pruned 2:4, is saved with `save_sparse_pretrained(..., weights="fp8")` from the
GPU. Checks (exit status 1 on any failure, every failure listed):
  * plain `from_pretrained(path, device_map="cuda")` puts all 14 projections on the FP8 kernels and logs no
    "FP8-rounded" warning;
  * each loaded layer holds exactly the codes and scales of the file (its CUTLASS-compressed buffer equals that of
    an `Fp8SemiSparseLinear` built from the file's codes) and the ones `accelerate_24(weights="fp8")` computes on
    the fly from the same 2:4 model (loaded from a native checkpoint of it, so that every other tensor and buffer
    is loaded the same way);
  * the logits of the loaded model equal those of the on-the-fly model bit for bit (same codes, same kernels, same
    tile configurations: the process shares them per shape);
  * `AutoSparseModel.from_pretrained(path, accelerate=False, device_map="cuda")` then `accelerate_24(model,
    weights="fp8")` gives the same logits bit for bit (the stored codes kept beside the dequantised layers);
  * the logits against the FP8 math in torch (`cutlass_fp8.fp8_linear_reference` with the stored codes) stay under
    FP8's own effect on them (the emulation against the 2:4 model; see check_fp8_gpu.py's `check_model` for why not
    the per-GEMM bound);
  * a float32 model saved as FP8 and loaded with dtype=bfloat16 runs the file's scales, not the scales of its
    dequantised bf16 weight (which differ: the reason the codes are kept).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
import traceback

import torch
from check_fp8_gpu import tiny_llama  # tests/gpu, beside this script
from safetensors.torch import load_file
from script_checks import CHECKS, FAILURES, check, run_record

from hf_semisparse import AutoSparseModel, save_sparse_pretrained
from hf_semisparse.fp8_serialization import decompress_fp8_24
from hf_semisparse.kernels import accelerate_24, cutlass_fp8
from hf_semisparse.kernels.fp8_linear import Fp8SemiSparseLinear

DEV = torch.device("cuda")
LAYERS = 14  # 2 blocks x (q, k, v, o, gate, up, down)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def fp8_layers(model) -> dict[str, Fp8SemiSparseLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Fp8SemiSparseLinear)}


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record) -> None:
        self.messages.append(record.getMessage())


class EmulatedFp8Linear(torch.nn.Module):
    """The FP8 math in torch with given codes and scales."""

    def __init__(self, weight_fp8, scale, bias) -> None:
        super().__init__()
        self.weight_fp8, self.scale_w, self.bias = weight_fp8, scale, bias

    def forward(self, x):
        return cutlass_fp8.fp8_linear_reference(x, self.weight_fp8, self.scale_w, self.bias)


def stored_codes(path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (weight_fp8 [out, in], scale [out]) from the checkpoint file, on the GPU."""
    tensors = load_file(f"{path}/model.safetensors")
    out = {}
    for key in tensors:
        if key.endswith(".weight_scale"):
            name = key.removesuffix(".weight_scale")
            q, s = decompress_fp8_24(
                tensors[f"{name}.weight"], tensors[f"{name}.weight_bitmask"], tensors[key], name
            )
            out[name] = (q.to(DEV), s.to(DEV))
    return out


def check_dtype(dtype, result: dict) -> None:
    from transformers import AutoModelForCausalLM

    tag = str(dtype).removeprefix("torch.")
    model = tiny_llama(dtype, device="cpu")
    ids = torch.randint(0, 1000, (4, 64), device=DEV)
    with tempfile.TemporaryDirectory() as tmp:
        save_sparse_pretrained(model.to(DEV), f"{tmp}/fp8", weights="fp8")  # from the GPU
        save_sparse_pretrained(model, f"{tmp}/native")
        codes = stored_codes(f"{tmp}/fp8")
        check(len(codes) == LAYERS, f"{tag}: {len(codes)} FP8 weights in the checkpoint (expected {LAYERS})")

        handler = _Warnings()
        logging.getLogger("hf_semisparse").addHandler(handler)
        try:
            loaded = AutoModelForCausalLM.from_pretrained(f"{tmp}/fp8", device_map="cuda")
        finally:
            logging.getLogger("hf_semisparse").removeHandler(handler)
        layers = fp8_layers(loaded)
        report = getattr(loaded, "sparsity_acceleration", None)
        check(
            len(layers) == LAYERS and loaded.dtype == dtype,
            f"{tag}: from_pretrained(device_map='cuda'): {len(layers)} layers on FP8 kernels of {LAYERS}, dtype "
            f"{loaded.dtype} ({report})",
        )
        rounded = [m for m in handler.messages if "FP8-rounded" in m]
        check(not rounded, f"{tag}: no 'FP8-rounded' warning on the GPU ({rounded[:1]})")

        # the on-the-fly reference: the same 2:4 model from a native checkpoint, quantised by accelerate_24
        fly = AutoSparseModel.from_pretrained(f"{tmp}/native", accelerate=False, device_map="cuda")
        dense_fly = copy.deepcopy(fly)
        accelerate_24(fly, weights="fp8")
        fly_layers = fp8_layers(fly)
        same_codes, same_file = [], []
        for name, layer in layers.items():
            other = fly_layers.get(name)
            same_codes.append(
                other is not None
                and torch.equal(layer.compressed, other.compressed)
                and torch.equal(layer.weight_scale, other.weight_scale)
            )
            q, s = codes[name]
            from_file = Fp8SemiSparseLinear(weight_fp8=q, weight_scale=s, bias=None, dtype=dtype)
            same_file.append(
                torch.equal(layer.compressed, from_file.compressed) and torch.equal(layer.weight_scale, s)
            )
        check(
            bool(same_file) and all(same_file), f"{tag}: every loaded layer holds the file's codes and scales"
        )
        check(
            bool(same_codes) and all(same_codes),
            f"{tag}: every loaded layer's codes and scales equal accelerate_24(weights='fp8') on the fly "
            f"({sum(same_codes)} of {len(same_codes)})",
        )

        with torch.inference_mode():
            logits = loaded(ids).logits
            fly_logits = fly(ids).logits
            err = rel_err(logits, fly_logits)
            check(
                torch.equal(logits, fly_logits),
                f"{tag}: logits of the loaded model vs on-the-fly accelerate_24(weights='fp8'): bit for bit "
                f"{torch.equal(logits, fly_logits)} (rel err {err:.2e})",
            )
            result[f"{tag}_loaded_vs_on_the_fly"] = err

            later = AutoSparseModel.from_pretrained(f"{tmp}/fp8", accelerate=False, device_map="cuda")
            later_report = accelerate_24(later, weights="fp8")
            later_logits = later(ids).logits
            check(
                len(fp8_layers(later)) == LAYERS and torch.equal(later_logits, logits),
                f"{tag}: AutoSparseModel(accelerate=False) then accelerate_24(weights='fp8'): "
                f"{len(fp8_layers(later))} FP8 layers, logits bit for bit {torch.equal(later_logits, logits)} "
                f"({later_report})",
            )

            emulated = copy.deepcopy(dense_fly)
            modules = dict(emulated.named_modules())
            for name, (q, s) in codes.items():
                parent, _, child = name.rpartition(".")
                setattr(modules[parent], child, EmulatedFp8Linear(q, s, modules[name].bias))
            ref = dense_fly(ids).logits
            emu = emulated(ids).logits
            fp8_effect = rel_err(emu, ref)
            err = rel_err(logits, emu)
            check(
                err < fp8_effect,
                f"{tag}: loaded FP8 logits vs the FP8 math with the stored codes: {err:.2e} (under FP8's own "
                f"effect, {fp8_effect:.2e})",
            )
            result[f"{tag}_vs_fp8_math"] = err
            result[f"{tag}_fp8_effect"] = fp8_effect


def check_float32_saved() -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_llama(torch.float32, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        save_sparse_pretrained(model, f"{tmp}/fp8", weights="fp8")
        codes = stored_codes(f"{tmp}/fp8")
        loaded = AutoModelForCausalLM.from_pretrained(f"{tmp}/fp8", dtype=torch.bfloat16, device_map="cuda")
        layers = fp8_layers(loaded)
        same = [torch.equal(layer.weight_scale, codes[name][1]) for name, layer in layers.items()]
        differ = 0
        plain = AutoSparseModel.from_pretrained(f"{tmp}/fp8", dtype=torch.bfloat16, accelerate=False)
        for name in layers:
            requantised = cutlass_fp8.quantize_weight(plain.get_submodule(name).weight)[1].to(DEV)
            differ += int((requantised != codes[name][1]).sum())
        check(
            len(layers) == LAYERS and all(same),
            f"float32 checkpoint loaded as bf16: {len(layers)} FP8 layers run the file's scales "
            f"({sum(same)} of {len(same)}); re-quantising the bf16 weights would change {differ} row scales",
        )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("FAIL  no CUDA GPU")
        return 1
    why = cutlass_fp8.why_unavailable(DEV, torch.bfloat16, 64, 256)
    if why:
        print(f"FAIL  the FP8 kernels cannot run: {why}")
        return 1
    t0 = time.time()
    result = run_record()  # date, command, GPU, driver, torch, CUDA, transformers
    steps = [
        (check_dtype, (torch.float16, result)),
        (check_dtype, (torch.bfloat16, result)),
        (check_float32_saved, ()),
    ]
    for step, step_args in steps:
        try:
            step(*step_args)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            check(False, f"{step.__name__}{step_args[:1]} raised")
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
