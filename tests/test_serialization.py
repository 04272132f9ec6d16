import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainingArguments

from hf_semisparse import SparsityConfig, SparsityTrainer, compute_nm_mask, prune_24
from hf_semisparse.modeling import AutoSparseModel
from hf_semisparse.serialization import (
    SparseCheckpointError,
    compress_24,
    decompress_24,
    save_sparse_pretrained,
)
from tests.conftest import ARCHS, ToyDataset, make_model


def pruned(arch, dtype=torch.float32):
    model = make_model(arch).eval().to(dtype)
    prune_24(model)
    return model


def forward(model, arch):
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    kwargs = {"decoder_input_ids": ids} if arch == "t5" else {}
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_is_bit_identical(arch, tmp_path):
    model = pruned(arch)
    summary = save_sparse_pretrained(model, tmp_path / "ckpt")
    loaded = AutoSparseModel.from_pretrained(tmp_path / "ckpt")
    assert type(loaded) is type(model)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    assert torch.equal(forward(model, arch), forward(loaded, arch))
    assert loaded.config.sparsity_config["targets"] == summary["targets"]
    assert not loaded.sparsity_acceleration.ok and "cpu" in loaded.sparsity_acceleration.reason


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_fp16_pruned_layers_take_at_most_057x(arch, tmp_path):
    model = pruned(arch, torch.float16)
    summary = save_sparse_pretrained(model, tmp_path / "sparse")
    assert summary["target_ratio"] <= 0.57
    model.save_pretrained(tmp_path / "dense")
    dense_bytes = os.path.getsize(tmp_path / "dense" / "model.safetensors")
    assert summary["file_bytes"] < dense_bytes  # whole file: embeddings stay dense, so the ratio is higher
    loaded = AutoSparseModel.from_pretrained(tmp_path / "sparse")
    assert next(loaded.parameters()).dtype == torch.float16
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # same logits as transformers' own loading of the dense checkpoint (non-persistent buffers such as
    # Llama's rotary inv_freq are rebuilt at load in both, unlike in the .half()-cast original)
    reference = type(model).from_pretrained(tmp_path / "dense", dtype=torch.float16).eval()
    assert torch.equal(forward(reference, arch), forward(loaded, arch))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_config_json_records_the_dtype_the_weights_are_saved_in(dtype, tmp_path):
    """A model built (config: float32) and cast before saving: config.json says what the file holds, as
    transformers' save_pretrained does, so that plain from_pretrained (dtype "auto") loads it in that dtype."""
    from transformers import AutoModelForCausalLM

    model = pruned("llama", dtype)
    save_sparse_pretrained(model, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["dtype"] == str(dtype)[6:]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").dtype == dtype


def test_compress_layout_and_errors():
    w = torch.randn(6, 16)
    w = w * compute_nm_mask(w)
    w[0, 0:4] = torch.tensor([0.0, 0.0, 0.0, 3.0])  # a group with one non-zero still stores two values
    parts = compress_24(w, "layer.weight")
    assert parts["shape"].tolist() == [[6], [16]] and parts["shape"].dtype == torch.int64
    assert parts["compressed"].shape == (6, 8) and parts["bitmask"].shape == (6, 2)
    assert torch.equal(decompress_24(**parts), w)
    w[2, 4:8] = 1.0
    with pytest.raises(SparseCheckpointError, match=r"layer.weight claims 2:4.*\(2, 4\)"):
        compress_24(w, "layer.weight")
    bad = dict(parts)
    bad["bitmask"] = parts["bitmask"].clone()
    bad["bitmask"][1, 0] = 0xFF  # 4 of 4 kept in row 1
    with pytest.raises(SparseCheckpointError, match="not 2:4"):
        decompress_24(**bad, name="layer.weight")
    with pytest.raises(SparseCheckpointError, match=r"shape says \[6, 16\] but weight.compressed \[6, 4\]"):
        decompress_24(parts["shape"], parts["compressed"][:, :4], parts["bitmask"])


def test_sharded_checkpoint_and_missing_shard(tmp_path):
    model = pruned("gpt2")
    save_sparse_pretrained(model, tmp_path / "ckpt", max_shard_size="40KB")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2
    for module in model.config.sparsity_config["targets"]:  # a weight's two tensors share one shard
        assert len({index["weight_map"][f"{module}.{s}"] for s in ("weight", "weight_bitmask")}) == 1
    loaded = AutoSparseModel.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(forward(model, "gpt2"), forward(loaded, "gpt2"))
    os.remove(tmp_path / "ckpt" / files[1])
    with pytest.raises(SparseCheckpointError, match="missing shard"):
        AutoSparseModel.from_pretrained(tmp_path / "ckpt")


def test_truncated_file(tmp_path):
    save_sparse_pretrained(pruned("bert"), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(SparseCheckpointError, match="truncated"):
        AutoSparseModel.from_pretrained(tmp_path / "ckpt")


def load_with_config(checkpoint, edit, error_match):
    """Edit the checkpoint's config.json in place with `edit(data)`, then expect loading to fail."""
    config_path = checkpoint / "config.json"
    data = json.loads(config_path.read_text())
    edit(data)
    config_path.write_text(json.dumps(data))
    with pytest.raises(SparseCheckpointError, match=error_match):
        AutoSparseModel.from_pretrained(checkpoint)


def test_config_that_disagrees_with_tensors(tmp_path):
    save_sparse_pretrained(pruned("bert"), tmp_path / "ckpt")
    targets = lambda d: d["quantization_config"]["targets"]  # noqa: E731
    load_with_config(
        tmp_path / "ckpt",
        lambda d: targets(d).append("bert.encoder.layer.9.output.dense"),
        r"layer.9.output.dense is listed in quantization_config.targets but the checkpoint lacks",
    )

    def fewer_layers(d):
        targets(d).pop()
        d["num_hidden_layers"] = 1  # the tensors hold two layers

    load_with_config(tmp_path / "ckpt", fewer_layers, "does not have")

    def conv1d_claimed(d):
        d["quantization_config"]["transposed"] = targets(d)[:1]

    save_sparse_pretrained(pruned("bert"), tmp_path / "ckpt2")
    load_with_config(tmp_path / "ckpt2", conv1d_claimed, "orientation mismatch")


def test_unknown_format_version(tmp_path):
    save_sparse_pretrained(pruned("bert"), tmp_path / "ckpt")
    quant = lambda d: d["quantization_config"]  # noqa: E731
    load_with_config(tmp_path / "ckpt", lambda d: quant(d).update(version=99), "version 99")

    def other_format(d):
        quant(d)["version"] = 2
        quant(d)["format"] = "sparse-bitmask"

    load_with_config(tmp_path / "ckpt", other_format, "not supported")


def test_pickle_only_checkpoint_is_refused(tmp_path):
    model = pruned("bert")
    model.save_pretrained(tmp_path / "ckpt")
    os.remove(tmp_path / "ckpt" / "model.safetensors")
    torch.save(model.state_dict(), tmp_path / "ckpt" / "pytorch_model.bin")
    with pytest.raises(SparseCheckpointError, match="pickle"):
        AutoSparseModel.from_pretrained(tmp_path / "ckpt")


def test_interrupted_save_leaves_old_checkpoint_whole(tmp_path, monkeypatch):
    import hf_semisparse.serialization as ser

    model = pruned("gpt2")
    target = tmp_path / "ckpt"
    save_sparse_pretrained(model, target)
    before = {f: (target / f).read_bytes() for f in os.listdir(target)}
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) % 2 == 0:  # the second shard of each save
            raise KeyboardInterrupt("power cut")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(ser, "save_file", failing_save)
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_sparse_pretrained(model, target, max_shard_size="40KB")
    assert {f: (target / f).read_bytes() for f in os.listdir(target)} == before
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".partial")]
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        save_sparse_pretrained(model, tmp_path / "fresh", max_shard_size="40KB")
    assert not (tmp_path / "fresh").exists()


def test_dense_checkpoint_with_recorded_targets(tmp_path):
    model = make_model("bert")
    trainer = SparsityTrainer(
        model=model,
        args=TrainingArguments(
            str(tmp_path / "run"), max_steps=2, report_to=[], use_cpu=True, save_strategy="no"
        ),
        train_dataset=ToyDataset("bert"),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "dense"))
    model.eval()
    loaded = AutoSparseModel.from_pretrained(tmp_path / "dense")
    assert torch.equal(forward(model, "bert"), forward(loaded, "bert"))
    tensors = load_file(tmp_path / "dense" / "model.safetensors")
    key = "bert.encoder.layer.0.attention.self.query.weight"
    tensors[key] = torch.ones_like(tensors[key])
    save_file(tensors, tmp_path / "dense" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SparseCheckpointError, match="query.weight is recorded as 2:4"):
        AutoSparseModel.from_pretrained(tmp_path / "dense")


def test_hub_ids_go_through_huggingface_hub_and_no_remote_code(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Exception) as info:
        AutoSparseModel.from_pretrained("someone/not-cached-anywhere", cache_dir=str(tmp_path))
    assert "huggingface_hub" in type(info.value).__module__ or "offline" in str(info.value).lower()
    with pytest.raises(ValueError, match="never runs code"):
        AutoSparseModel.from_pretrained(tmp_path, trust_remote_code=True)


def test_save_refuses_model_without_24_layers(tmp_path):
    with pytest.raises(SparseCheckpointError, match="prune the model first"):
        save_sparse_pretrained(make_model("bert"), tmp_path / "x")
    model = pruned("bert")
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight.fill_(1.0)
    with pytest.raises(SparseCheckpointError, match=r"layer\.1\.output\.dense\.weight claims 2:4"):
        save_sparse_pretrained(model, tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_accelerate_device_map_dict(tmp_path):
    model = pruned("llama")
    save_sparse_pretrained(model, tmp_path / "ckpt")
    device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    loaded = AutoSparseModel.from_pretrained(tmp_path / "ckpt", device_map=device_map)
    assert torch.equal(forward(model, "llama"), forward(loaded, "llama"))


def test_a_model_pruned_to_a_pattern_that_is_not_24_is_refused_saying_so(tmp_path):
    model = make_model("llama")
    prune_24(model, SparsityConfig(n=4, m=8), show_progress=False)
    with pytest.raises(SparseCheckpointError, match="pruned to 4:8.*not 2:4.*save_pretrained"):
        save_sparse_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    one_of_four = make_model("llama")  # 1:4 is also 2:4: it saves
    prune_24(one_of_four, SparsityConfig(n=1, m=4), show_progress=False)
    save_sparse_pretrained(one_of_four, tmp_path / "one_of_four", show_progress=False)
