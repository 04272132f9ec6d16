"""FP8 (e4m3) 2:4 checkpoints, format version 4: writing, plain `from_pretrained`, the stored codes handed to the FP8
kernels, inspect, and every refusal (issue 23). The kernels themselves: tests/gpu/check_fp8_checkpoint_gpu.py."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

from hf_semisparse import AutoSparseModel, checkpoint_format, prune_24, save_sparse_pretrained
from hf_semisparse.cli import inspect_checkpoint, main
from hf_semisparse.fp8_serialization import (
    STORED_ATTR,
    compress_fp8_24,
    decompress_fp8_24,
    dequantize_fp8,
    stored_codes,
)
from hf_semisparse.kernels import _to_fp8, cutlass_fp8, fp8_linear
from hf_semisparse.masks import compute_nm_mask, find_nm_violation
from hf_semisparse.serialization import SparseCheckpointError
from tests.conftest import make_model
from tests.test_plain_loading import corrupt

AUTO = {"llama": transformers.AutoModelForCausalLM, "gpt2": transformers.AutoModelForCausalLM}
LAYER = "model.layers.0.mlp.up_proj"


def pruned(arch="llama", dtype=torch.float16):
    model = make_model(arch).eval().to(dtype)
    prune_24(model)
    return model


def linear_weights(model) -> dict[str, torch.Tensor]:
    """Every 2:4 target's weight `[out, in]` (GPT-2 Conv1D transposed), by module name."""
    out = {}
    for name in model.config.sparsity_config["targets"]:
        module = model.get_submodule(name)
        out[name] = (
            module.weight.detach() if isinstance(module, torch.nn.Linear) else module.weight.detach().t()
        )
    return out


def codes_of(weight: torch.Tensor) -> torch.Tensor:
    return cutlass_fp8.quantize_weight(weight)[0].view(torch.uint8)


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    """A tiny fp16 Llama, pruned 2:4, saved as FP8: (model, path)."""
    model = pruned()
    path = tmp_path_factory.mktemp("fp8") / "ckpt"
    save_sparse_pretrained(model, path, weights="fp8")
    return model, path


# ------------------------------------------------------------------------------------------ writing and loading
@pytest.mark.parametrize(
    ("arch", "dtype"), [("llama", torch.float16), ("llama", torch.bfloat16), ("gpt2", torch.float32)]
)
def test_codes_are_quantize_weight_and_loading_gives_the_dequantised_codes_exactly(arch, dtype, tmp_path):
    model = pruned(arch, dtype)
    summary = save_sparse_pretrained(model, tmp_path / "ckpt", weights="fp8")
    quant = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert quant["version"] == 4 and quant["format"] == "sparse-24-bitmask"
    assert quant["weights"] == {
        "format": "fp8-e4m3",
        "scales": "channel",
        "activations": "dynamic-token",
        "targets": summary["targets"],
    }
    stored = load_file(tmp_path / "ckpt" / "model.safetensors")
    weights = linear_weights(model)
    for name, weight in weights.items():
        values, scale = stored[f"{name}.weight"], stored[f"{name}.weight_scale"]
        assert values.dtype == torch.float8_e4m3fn and values.shape == (weight.shape[0], weight.shape[1] // 2)
        assert scale.dtype == torch.float32 and scale.shape == (weight.shape[0], 1)
        weight_fp8, row_scale = decompress_fp8_24(values, stored[f"{name}.weight_bitmask"], scale, name)
        ref_q, ref_s = cutlass_fp8.quantize_weight(weight)  # what accelerate_24(weights="fp8") computes
        assert torch.equal(weight_fp8.view(torch.uint8), ref_q.view(torch.uint8)), name
        assert torch.equal(row_scale, ref_s), name
    bias_keys = [k for k in stored if k.endswith(".bias")]
    assert all(stored[k].dtype == dtype for k in bias_keys)  # biases stay in the model's dtype

    loaded = AUTO[arch].from_pretrained(tmp_path / "ckpt")  # dtype "auto": the saved model's
    assert loaded.dtype == dtype
    for name, weight in linear_weights(loaded).items():
        ref_q, ref_s = cutlass_fp8.quantize_weight(weights[name])
        assert torch.equal(weight, dequantize_fp8(ref_q, ref_s, dtype)), name
        assert find_nm_violation(weight) is None, name
    reference = model.state_dict()
    for key, value in loaded.state_dict().items():  # every other tensor exactly as saved
        if key.removesuffix(".weight") not in weights:
            assert torch.equal(value, reference[key]), key


def test_a_float32_checkpoint_loads_in_any_dtype_and_scales_stay_float32(tmp_path):
    model = pruned("llama", torch.float32)
    save_sparse_pretrained(model, tmp_path / "ckpt", weights="fp8")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    q, s = cutlass_fp8.quantize_weight(model.get_submodule(LAYER).weight)
    assert torch.equal(loaded.get_submodule(LAYER).weight, dequantize_fp8(q, s, torch.bfloat16))


def test_modules_transformers_keeps_in_float32_stay_float32(tmp_path):
    """T5's `wo` stays float32 in an fp16 model, as transformers loads a dense or version 2 checkpoint."""
    model = make_model("t5").eval()
    prune_24(model)
    save_sparse_pretrained(model, tmp_path / "fp8", weights="fp8", show_progress=False)
    save_sparse_pretrained(model, tmp_path / "v2", show_progress=False)
    auto = transformers.AutoModelForSeq2SeqLM
    loaded = auto.from_pretrained(tmp_path / "fp8", dtype=torch.float16)
    native = auto.from_pretrained(tmp_path / "v2", dtype=torch.float16)
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == {
        k: v.dtype for k, v in native.state_dict().items()
    }
    assert loaded.get_submodule("encoder.block.0.layer.1.DenseReluDense.wo").weight.dtype == torch.float32
    for name in model.config.sparsity_config["targets"]:
        weight = loaded.get_submodule(name).weight
        q, s = cutlass_fp8.quantize_weight(model.get_submodule(name).weight)
        assert torch.equal(weight, dequantize_fp8(q, s, weight.dtype)), name


def test_autosparsemodel_loads_it_and_one_warning_says_why_no_fp8_kernels(fp8_ckpt, caplog):
    model, path = fp8_ckpt
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_semisparse"):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    said = [r.getMessage() for r in caplog.records if "FP8-rounded" in r.getMessage()]
    assert len(said) == 1 and "14 of its 14 layers" in said[0] and "CPU" in said[0]
    assert "accelerate_24(model, weights='fp8')" in said[0]
    auto = AutoSparseModel.from_pretrained(path)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, auto.state_dict()[key]), key
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(auto(input_ids=ids).logits.float()).all()


def test_resaving_a_loaded_model_writes_version_2_and_fp8_again_keeps_the_codes(fp8_ckpt, tmp_path):
    _, path = fp8_ckpt
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    loaded.save_pretrained(tmp_path / "plain")
    save_sparse_pretrained(loaded, tmp_path / "ours")
    for folder in ("plain", "ours"):
        quant = json.loads((tmp_path / folder / "config.json").read_text())["quantization_config"]
        assert quant["version"] == 2 and "weights" not in quant, folder
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / folder)
        for key, value in loaded.state_dict().items():  # the dequantised weights, exactly
            assert torch.equal(value, again.state_dict()[key]), (folder, key)
    save_sparse_pretrained(loaded, tmp_path / "fp8")
    save_sparse_pretrained(loaded, tmp_path / "fp8", weights="fp8", overwrite=True)
    first, second = load_file(path / "model.safetensors"), load_file(tmp_path / "fp8" / "model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key].view(torch.uint8), second[key].view(torch.uint8)), key


# ------------------------------------------------------------------------------------------ codes for the kernels
def test_requantising_the_dequantised_weight_changes_scales_across_dtypes():
    """Why the loader keeps the stored codes: a weight saved in one dtype and loaded in another does not quantise
    back to the stored scales (the row maximum 448 * scale is rounded to the new dtype); in the same dtype it did
    for this draw, which nothing relies on."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) / 20
    w = w * compute_nm_mask(w)
    q, s = cutlass_fp8.quantize_weight(w)
    q2, s2 = cutlass_fp8.quantize_weight(dequantize_fp8(q, s, torch.bfloat16))
    assert (s2 != s).sum() > 200
    q3, s3 = cutlass_fp8.quantize_weight(dequantize_fp8(q, s, torch.float32))
    assert torch.equal(q3.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s3, s)


class _RecordingFp8Layer(torch.nn.Module):
    """Stands in for `Fp8SemiSparseLinear` on the CPU: records how it was built."""

    def __init__(self, linear=None, *, weight_fp8=None, weight_scale=None, bias=None, dtype=None):
        super().__init__()
        self.linear, self.weight_fp8, self.weight_scale, self.bias_arg, self.dtype_arg = (
            linear,
            weight_fp8,
            weight_scale,
            bias,
            dtype,
        )


def test_accelerate_24_fp8_builds_layers_from_the_stored_codes(tmp_path, monkeypatch):
    model = pruned("llama", torch.float32)
    save_sparse_pretrained(model, tmp_path / "ckpt", weights="fp8")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    stored = load_file(tmp_path / "ckpt" / "model.safetensors")
    monkeypatch.setattr(cutlass_fp8, "why_unavailable", lambda *a: None)
    monkeypatch.setattr(fp8_linear, "Fp8SemiSparseLinear", _RecordingFp8Layer)
    modules = dict(loaded.named_modules())
    down = "model.layers.1.mlp.down_proj"
    with torch.no_grad():  # a layer trained after loading is quantised from its weight again
        loaded.get_submodule(down).weight.mul_(2)
    parents = {}

    def slot(name):
        parent, _, child = name.rpartition(".")
        parents[name] = modules[parent]
        return modules[parent], child

    targets = loaded.config.sparsity_config["targets"]
    assert _to_fp8(modules, targets, slot) == targets
    for name in targets:
        layer = getattr(parents[name], name.rpartition(".")[2])
        if name == down:
            assert layer.linear is modules[name] and layer.weight_fp8 is None
            continue
        values, bitmask = stored[f"{name}.weight"], stored[f"{name}.weight_bitmask"]
        ref_q, ref_s = decompress_fp8_24(values, bitmask, stored[f"{name}.weight_scale"], name)
        assert layer.linear is None and layer.dtype_arg == torch.bfloat16
        assert torch.equal(layer.weight_fp8.view(torch.uint8), ref_q.view(torch.uint8)), name
        assert torch.equal(layer.weight_scale, ref_s), name  # not the scales of the bf16 weight
        requantised = cutlass_fp8.quantize_weight(modules[name].weight)[1]
        assert not torch.equal(requantised, ref_s)


def test_stored_codes_are_not_state_and_need_the_unchanged_weight(fp8_ckpt):
    _, path = fp8_ckpt
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    layer = loaded.get_submodule(LAYER)
    assert hasattr(layer, STORED_ATTR) and not any("fp8" in k for k in loaded.state_dict())
    assert stored_codes(layer, layer.weight) is not None
    # fp16 values cast to float32 are not the codes dequantised in float32: quantised again, conservatively
    assert stored_codes(layer, layer.weight.float()) is None
    changed = layer.weight.detach().clone()
    changed[0, changed[0].nonzero()[0, 0]] *= 3
    assert stored_codes(layer, changed) is None
    assert stored_codes(loaded.lm_head, loaded.lm_head.weight) is None


# ------------------------------------------------------------------------------------------ refusals when saving
def test_save_refuses_bad_models_and_writes_nothing(tmp_path):
    with pytest.raises(SparseCheckpointError, match="prune the model first"):
        save_sparse_pretrained(make_model("llama"), tmp_path / "dense", weights="fp8")
    model = pruned("llama", torch.float16)
    with torch.no_grad():
        model.get_submodule(LAYER).weight[3, 4] = float("nan")
    model.config.sparsity_config = {"pattern": "2:4", "targets": [LAYER]}
    with pytest.raises(SparseCheckpointError, match=rf"{LAYER}.weight\[3, 4\] is nan"):
        save_sparse_pretrained(model, tmp_path / "nan", weights="fp8")
    model = pruned("llama", torch.float16)
    with torch.no_grad():
        model.get_submodule(LAYER).weight[0, :4] = 1.0  # 4 of 4
    model.config.sparsity_config = {"pattern": "2:4", "targets": [LAYER]}
    with pytest.raises(SparseCheckpointError, match=rf"{LAYER}.weight claims 2:4"):
        save_sparse_pretrained(model, tmp_path / "not24", weights="fp8")
    model = pruned("llama", torch.float32).double()
    with pytest.raises(SparseCheckpointError, match="fp16, bf16 or fp32 weights, got torch.float64"):
        save_sparse_pretrained(model, tmp_path / "f64", weights="fp8")
    with pytest.raises(ValueError, match="weights must be 'native' or 'fp8'"):
        save_sparse_pretrained(pruned(), tmp_path / "int4", weights="int4")
    with pytest.raises(ValueError, match="hf_semisparse format only"):
        save_sparse_pretrained(pruned(), tmp_path / "ct", weights="fp8", format="compressed-tensors")
    assert os.listdir(tmp_path) == []


def test_save_refuses_fused_experts(tmp_path):
    from tests.test_moe import make_moe

    model = make_moe("mixtral").eval()
    prune_24(model)
    with pytest.raises(SparseCheckpointError, match="fused expert weights .* save it with weights='native'"):
        save_sparse_pretrained(model, tmp_path / "moe", weights="fp8")
    assert not (tmp_path / "moe").exists()


# ------------------------------------------------------------------------------------------ refusals when loading
def _set(key, make):
    def edit(tensors):
        tensors[key] = make(tensors[key])

    return edit


def _nan_code(values):
    values = values.clone()
    values.view(torch.uint8)[2, 1] = 0x7F  # e4m3fn NaN
    return values


def _scale_at(value):
    def make(scale):
        scale = scale.clone()
        scale[5, 0] = value
        return scale

    return make


CORRUPTIONS = {
    "scale_zero": (_set(f"{LAYER}.weight_scale", _scale_at(0.0)), None, rf"{LAYER}.weight_scale\[5\] is 0.0"),
    "scale_negative": (_set(f"{LAYER}.weight_scale", _scale_at(-1.0)), None, r"weight_scale\[5\] is -1.0"),
    "scale_inf": (_set(f"{LAYER}.weight_scale", _scale_at(float("inf"))), None, r"weight_scale\[5\] is inf"),
    "scale_fp16": (
        _set(f"{LAYER}.weight_scale", lambda s: s.half()),
        None,
        r"weight_scale is F16 \[128, 1\]",
    ),
    "scale_flat": (_set(f"{LAYER}.weight_scale", lambda s: s.flatten()), None, r"expected F32 \[128, 1\]"),
    "scale_missing": (lambda t: t.pop(f"{LAYER}.weight_scale"), None, "lacks its scale"),
    "values_bf16": (
        _set(f"{LAYER}.weight", lambda v: v.to(torch.bfloat16)),
        None,
        r"weight: FP8 values are BF16",
    ),
    "values_short": (
        _set(f"{LAYER}.weight", lambda v: v[:, :-4].contiguous()),
        None,
        r"up_proj.weight: the bitmask is",
    ),
    "values_nan": (
        _set(f"{LAYER}.weight", _nan_code),
        None,
        r"up_proj.weight: the stored e4m3 value at \[2, 1\]",
    ),
    "dense_fp8": (
        _set("lm_head.weight", lambda w: w.to(torch.float8_e4m3fn)),
        None,
        r"\['lm_head.weight'\] are stored as FP8 but are not the values",
    ),
    "record_missing": (None, lambda q: q.pop("weights"), "quantization_config.weights is None"),
    "record_targets": (None, lambda q: q["weights"]["targets"].pop(), "weights.targets must list exactly"),
    "scale_in_v2": (None, lambda q: (q.update(version=2), q.pop("weights")), "FP8 weight scales"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_fp8_checkpoints_are_refused_by_inspect_and_the_loader(fp8_ckpt, tmp_path, case, caplog):
    edit_tensors, edit_config, message = CORRUPTIONS[case]
    bad = corrupt(fp8_ckpt[1], tmp_path / case, edit_tensors=edit_tensors, edit_config=edit_config)
    report = inspect_checkpoint(str(bad))
    assert any(re.search(message, p) for p in report["problems"]), report["problems"]
    assert main(["inspect", str(bad)]) == 1
    caplog.clear()
    with pytest.raises((SparseCheckpointError, RuntimeError)) as info:  # never loads random or wrong weights
        transformers.AutoModelForCausalLM.from_pretrained(bad)
    assert re.search(message, str(info.value) + caplog.text)


def test_an_older_reader_says_upgrade(fp8_ckpt, monkeypatch):
    monkeypatch.setattr(checkpoint_format, "READABLE_VERSIONS", (2, 3))  # hf_semisparse before version 4
    with pytest.raises(SparseCheckpointError, match="version 4 is not one this hf_semisparse reads.*upgrade"):
        transformers.AutoModelForCausalLM.from_pretrained(fp8_ckpt[1])
    assert any("upgrade" in p for p in inspect_checkpoint(str(fp8_ckpt[1]))["problems"])


# ------------------------------------------------------------------------------------------ the command
def test_convert_writes_fp8_and_inspect_shows_it(tmp_path, capsys):
    model = pruned("llama", torch.bfloat16)
    model.save_pretrained(tmp_path / "dense")
    assert main(["convert", str(tmp_path / "dense"), str(tmp_path / "fp8"), "--weights", "fp8"]) == 0
    assert "FP8 e4m3, per-channel scales" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "fp8")]) == 0
    out = capsys.readouterr().out
    assert "version 4: FP8 e4m3 weights, per-channel float32 scales" in out and "F8_E4M3" in out
    report = inspect_checkpoint(str(tmp_path / "fp8"))
    assert all(layer["dtype"] == "F8_E4M3" and layer["scales"] for layer in report["layers"])
    stored = load_file(tmp_path / "fp8" / "model.safetensors")
    weight = model.get_submodule(LAYER).weight
    values, bitmask, scale = compress_fp8_24(weight, LAYER)
    assert torch.equal(stored[f"{LAYER}.weight"].view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(stored[f"{LAYER}.weight_scale"], scale)
    code = main(
        [
            "convert",
            str(tmp_path / "dense"),
            str(tmp_path / "ct"),
            "--weights",
            "fp8",
            "--format",
            "compressed-tensors",
        ]
    )
    assert code == 2 and "hf_semisparse format only" in capsys.readouterr().err
    assert not (tmp_path / "ct").exists()


# ------------------------------------------------------------------------------------------ never loaded wrong
def test_without_the_import_transformers_stops(fp8_ckpt):
    code = (
        "import sys, transformers\n"
        f"transformers.AutoModelForCausalLM.from_pretrained({str(fp8_ckpt[1])!r})\n"
        "assert 'hf_semisparse' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, "an FP8 2:4 checkpoint loaded without hf_semisparse"
    assert "Unknown quantization type, got hf_semisparse" in result.stderr
    assert "ignore_mismatched_sizes" in result.stderr  # m.weight holds half the columns


def test_sharded_and_offloaded_to_disk(fp8_ckpt, tmp_path):
    model, path = fp8_ckpt
    save_sparse_pretrained(
        model, tmp_path / "ckpt", max_shard_size="20KB", weights="fp8", show_progress=False
    )
    files = load_file(path / "model.safetensors")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2
    for key in files:  # a weight's values, bitmask and scale stay in one shard
        if key.endswith(".weight_scale"):
            base = key.removesuffix("_scale")
            assert index[key] == index[base] == index[base + "_bitmask"], key
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk"}
    device_map.update({"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"})
    offloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt", device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    whole = transformers.AutoModelForCausalLM.from_pretrained(path)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(offloaded(input_ids=ids).logits, whole(input_ids=ids).logits)


# ------------------------------------------------------------------------------------------ the GPU check's flow
class _EmulatedFp8Layer(torch.nn.Module):
    """Stands in for `Fp8SemiSparseLinear` on the CPU: the FP8 math in torch, its codes as `compressed`."""

    def __init__(self, linear=None, *, weight_fp8=None, weight_scale=None, bias=None, dtype=None):
        super().__init__()
        if linear is not None:
            weight_fp8, weight_scale = cutlass_fp8.quantize_weight(linear.weight.detach())
            bias = linear.bias
        self.register_buffer("compressed", weight_fp8.view(torch.uint8).clone())
        self.register_buffer("weight_scale", weight_scale.reshape(-1).float().clone())
        self.bias = bias

    def forward(self, x):
        weight_fp8 = self.compressed.view(torch.float8_e4m3fn)
        return cutlass_fp8.fp8_linear_reference(x, weight_fp8, self.weight_scale, self.bias)


@pytest.mark.slow  # 70 s on a busy 2-core machine: the check's 512-wide model, FP8 math in torch
def test_the_gpu_check_runs_its_flow_on_the_cpu_with_emulated_kernels(monkeypatch):
    """tests/gpu/check_fp8_checkpoint_gpu.py with the kernels replaced by the FP8 math and CUDA by the CPU: every
    check passes, so on a GPU a failure is the kernels' or the loading path's, not the script's."""
    import hf_semisparse.kernels as kernels
    from hf_semisparse.modeling import AutoSparseModel as Auto
    from hf_semisparse.registration import load_options

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "gpu"))
    import check_fp8_checkpoint_gpu as script

    monkeypatch.setattr(script, "DEV", torch.device("cpu"))
    monkeypatch.setattr(script, "Fp8SemiSparseLinear", _EmulatedFp8Layer)
    monkeypatch.setattr(fp8_linear, "Fp8SemiSparseLinear", _EmulatedFp8Layer)
    monkeypatch.setattr(kernels, "why_not_accelerated", lambda device, dtype: None)
    monkeypatch.setattr(kernels, "KERNEL_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(cutlass_fp8, "why_unavailable", lambda *a: None)
    plain = transformers.AutoModelForCausalLM.from_pretrained.__func__
    auto = Auto.from_pretrained.__func__

    def plain_on_cpu(cls, path, *args, device_map=None, **kwargs):  # "cuda": the CPU, with the kernels' path
        if device_map == "cuda":
            with load_options(accelerate=True):
                return plain(cls, path, *args, **kwargs)
        return plain(cls, path, *args, device_map=device_map, **kwargs)

    def auto_on_cpu(cls, path, *args, device_map=None, **kwargs):
        return auto(cls, path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(plain_on_cpu))
    monkeypatch.setattr(Auto, "from_pretrained", classmethod(auto_on_cpu))
    before = len(script.FAILURES), len(script.CHECKS)
    result = {}
    script.check_dtype(torch.bfloat16, result)
    script.check_float32_saved()
    assert script.FAILURES[before[0] :] == [] and len(script.CHECKS) - before[1] == 9
    assert result["bfloat16_loaded_vs_on_the_fly"] == 0.0 and result["bfloat16_fp8_effect"] > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_values_cast_by_the_loader_are_the_same_codes_again(dtype):
    """transformers 5.17 casts stored e4m3 values to the load dtype before our op: every code survives exactly."""
    from hf_semisparse.fp8_serialization import e4m3_from_cast

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    codes = codes[~torch.isnan(codes.float())]  # 0x7F and 0xFF are NaN
    back = e4m3_from_cast("w", codes.to(dtype))
    assert back.dtype == torch.float8_e4m3fn and torch.equal(back.view(torch.uint8), codes.view(torch.uint8))
    with pytest.raises(
        SparseCheckpointError, match=r"w: the FP8 values reached the loader as .* \[1\] .*not an e4m3"
    ):
        e4m3_from_cast("w", torch.tensor([1.0, 1.0625], dtype=dtype))  # 1.0625 needs 4 mantissa bits


def test_the_quantizer_left_on_the_model_does_not_keep_the_codes_alive(fp8_ckpt):
    """`model.hf_quantizer` stays on the model: once a layer is replaced (the FP8 kernels), its codes must be freed."""
    import gc
    import weakref

    loaded = transformers.AutoModelForCausalLM.from_pretrained(fp8_ckpt[1])
    layer = loaded.get_submodule(LAYER)
    codes = weakref.ref(getattr(layer, STORED_ATTR))
    parent, child = LAYER.rsplit(".", 1)
    setattr(loaded.get_submodule(parent), child, torch.nn.Identity())  # as `_to_fp8` replaces the layer
    del layer
    gc.collect()
    assert codes() is None
