"""GPU check of loading compressed checkpoints: bert-base-shaped with `AutoSparseModel`, Llama-shaped with plain
transformers `from_pretrained` after `import hf_semisparse` (CUDA only).

    PYTHONPATH=src python -m pytest -q -s tests/gpu/check_load_gpu.py

The model is bert-base-shaped (12 layers, hidden 768, intermediate 3072) with random weights, pruned 2:4 by
magnitude and saved twice: compressed (`save_sparse_pretrained`) and dense with the zeros (`save_pretrained`).
Checks, each against a float64 reference of the masked model:
- logits of the loaded sparse model (fp16, keep_dense=False) are as close to the reference as the dense fp16
  model's: relative error under 5e-3 and under 2x the dense fp16 model's own error;
- the GPU bytes of the sparsified weights are at most 0.6x their dense fp16 bytes;
and reports load times next to transformers' `from_pretrained` of the dense checkpoint. Writes the numbers to
$OUT/load_gpu.json when OUT is set.

`test_plain_from_pretrained_llama`: a Llama-shaped checkpoint (4 layers of TinyLlama-1.1B's shapes: hidden 2048,
intermediate 5632, 32 heads, 4 KV heads), sharded, loaded with `AutoModelForCausalLM.from_pretrained(path,
dtype=torch.float16, device_map="cuda")`: every target must run on 2:4 kernels (`SemiSparseLinear`, or a
`ProjectionSlice` of a joined one) and the logits must be as close to a float64 reference as the dense fp16
model's, as above. Numbers to $OUT/load_llama_plain.json.
"""

from __future__ import annotations

import gc
import json
import os
import time

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForQuestionAnswering,
    LlamaConfig,
    LlamaForCausalLM,
)

from hf_semisparse import AutoSparseModel, prune_24, save_sparse_pretrained
from hf_semisparse.kernels import ProjectionSlice, semi_sparse_layers
from hf_semisparse.kernels.linear import SemiSparseLinear

if not torch.cuda.is_available():
    pytest.fail("these checks need a CUDA GPU", pytrace=False)

DEV = torch.device("cuda")


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig()).eval()  # bert-base shapes
    prune_24(model)
    root = tmp_path_factory.mktemp("bert-base-24")
    sparse_dir, dense_dir = root / "sparse", root / "dense"
    summary = save_sparse_pretrained(model.half(), sparse_dir)
    model.save_pretrained(dense_dir)
    return model.double(), sparse_dir, dense_dir, summary


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def test_load_compressed_on_gpu(checkpoints):
    reference_model, sparse_dir, dense_dir, summary = checkpoints
    g = torch.Generator().manual_seed(1)
    inputs = {
        "input_ids": torch.randint(0, 30522, (4, 384), generator=g),
        "attention_mask": torch.ones(4, 384, dtype=torch.long),
    }
    with torch.no_grad():
        ref = reference_model(**inputs)
    ref = torch.cat([ref.start_logits, ref.end_logits], dim=-1)
    gpu_inputs = {k: v.to(DEV) for k, v in inputs.items()}

    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    dense, dense_s = timed(
        lambda: BertForQuestionAnswering.from_pretrained(dense_dir, dtype=torch.float16).to(DEV).eval()
    )
    dense_bytes = torch.cuda.memory_allocated() - base
    with torch.inference_mode():
        out = dense(**gpu_inputs)
    dense_err = rel_err(torch.cat([out.start_logits, out.end_logits], dim=-1).cpu(), ref)
    target_names = set(reference_model.config.sparsity_config["targets"])
    target_dense_bytes = sum(
        m.weight.numel() * m.weight.element_size() for n, m in dense.named_modules() if n in target_names
    )
    del dense, out
    gc.collect()
    torch.cuda.empty_cache()

    base = torch.cuda.memory_allocated()
    sparse, sparse_s = timed(
        lambda: AutoSparseModel.from_pretrained(
            sparse_dir, torch_dtype=torch.float16, device_map="cuda", keep_dense=False
        )
    )
    gc.collect()
    torch.cuda.empty_cache()
    sparse_bytes = torch.cuda.memory_allocated() - base
    # query/key/value run as one joined SemiSparseLinear per layer, reached through their ProjectionSlices
    layers = {n: m for n, m in sparse.named_modules() if isinstance(m, (SemiSparseLinear, ProjectionSlice))}
    assert set(layers) == target_names, sparse.sparsity_acceleration
    target_sparse_bytes = sum(
        m.compressed.numel() * m.compressed.element_size() for m in semi_sparse_layers(sparse)
    )
    assert all(m.weight is None for m in layers.values())  # keep_dense=False holds no dense copy

    with torch.inference_mode():
        out, first_s = timed(lambda: sparse(**gpu_inputs))  # includes the per-shape algorithm search
        out = sparse(**gpu_inputs)
    sparse_err = rel_err(torch.cat([out.start_logits, out.end_logits], dim=-1).cpu(), ref)

    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "checkpoint_target_bytes_ratio": summary["target_ratio"],
        "load_s": {"dense from_pretrained": dense_s, "AutoSparseModel keep_dense=False": sparse_s},
        "first_forward_s": first_s,
        "gpu_bytes": {
            "dense model": dense_bytes,
            "sparse model": sparse_bytes,
            "dense target weights": target_dense_bytes,
            "compressed target weights": target_sparse_bytes,
        },
        "target_weight_ratio": target_sparse_bytes / target_dense_bytes,
        "whole_model_ratio": sparse_bytes / dense_bytes,
        "logits_rel_err_vs_float64": {"dense fp16": dense_err, "sparse fp16": sparse_err},
    }
    print(json.dumps(result, indent=1))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "load_gpu.json"), "w") as f:
            json.dump(result, f, indent=1)
    assert sparse_err < 5e-3 and sparse_err < 2 * dense_err + 1e-4, result
    assert result["target_weight_ratio"] <= 0.6, result


def test_load_keep_dense_matches(checkpoints):
    """keep_dense=True (the default) gives the same answers through whichever path each shape chose."""
    reference_model, sparse_dir, _, _ = checkpoints
    model = AutoSparseModel.from_pretrained(sparse_dir, torch_dtype=torch.float16, device_map="cuda")
    ids = torch.randint(0, 30522, (2, 128), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = reference_model(input_ids=ids).start_logits
        out = model(input_ids=ids.to(DEV)).start_logits.cpu()
    assert rel_err(out, ref) < 5e-3


def test_plain_from_pretrained_llama(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=4,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    prune_24(model)
    save_sparse_pretrained(model.half(), tmp_path / "sparse", max_shard_size="200MB")
    model.save_pretrained(tmp_path / "dense")
    ids = torch.randint(0, 32000, (2, 256), generator=torch.Generator().manual_seed(3))
    reference = LlamaForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float64).eval()
    with torch.no_grad():
        ref = reference(input_ids=ids).logits
    target_names = set(model.config.sparsity_config["targets"])
    del model, reference
    gc.collect()

    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float16, device_map="cuda")
    with torch.inference_mode():
        dense_err = rel_err(dense(input_ids=ids.to(DEV)).logits.cpu(), ref)
    del dense
    gc.collect()
    torch.cuda.empty_cache()

    sparse, load_s = timed(
        lambda: AutoModelForCausalLM.from_pretrained(
            tmp_path / "sparse", dtype=torch.float16, device_map="cuda"
        )
    )
    assert sparse.hf_quantizer.quantization_config.quant_method == "hf_semisparse"
    layers = {n: m for n, m in sparse.named_modules() if isinstance(m, (SemiSparseLinear, ProjectionSlice))}
    assert set(layers) == target_names, sparse.sparsity_acceleration
    with torch.inference_mode():
        sparse_err = rel_err(sparse(input_ids=ids.to(DEV)).logits.cpu(), ref)
    result = {
        "gpu": torch.cuda.get_device_name(),
        "layers_on_24_kernels": len(layers),
        "load_s": load_s,
        "acceleration": str(sparse.sparsity_acceleration),
        "logits_rel_err_vs_float64": {"dense fp16": dense_err, "sparse fp16": sparse_err},
    }
    print(json.dumps(result, indent=1))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "load_llama_plain.json"), "w") as f:
            json.dump(result, f, indent=1)
    assert sparse_err < 5e-3 and sparse_err < 2 * dense_err + 1e-4, result
