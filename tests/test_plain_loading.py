"""Plain transformers `from_pretrained` on our checkpoints and on legacy compressed-tensors ones (issue 20)."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_semisparse import AutoSparseModel, SparsityConfig, prune_24, save_sparse_pretrained, select_targets
from hf_semisparse.cli import inspect_checkpoint, main
from hf_semisparse.digests import DIGEST_KEY, digest_metadata
from hf_semisparse.serialization import SparseCheckpointError
from tests.conftest import make_model

FIXTURES = os.path.join(os.path.dirname(__file__), "data", "legacy_ct")
AUTO = {
    "bert": transformers.AutoModelForSequenceClassification,
    "gpt2": transformers.AutoModelForCausalLM,
    "llama": transformers.AutoModelForCausalLM,
    "t5": transformers.AutoModelForSeq2SeqLM,
}


def logits(model, arch):
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    kwargs = {"decoder_input_ids": ids} if arch == "t5" else {}
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def assert_same_weights(expected: dict, loaded: dict):
    assert expected.keys() == loaded.keys()
    for key, value in expected.items():
        assert value.dtype == loaded[key].dtype and torch.equal(value, loaded[key]), key


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "t5"])
def test_plain_from_pretrained_is_exact_and_save_pretrained_round_trips(arch, tmp_path):
    model = make_model(arch, **({"tie_word_embeddings": True} if arch == "llama" else {})).eval().half()
    if arch == "llama":
        assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    prune_24(model)
    summary = save_sparse_pretrained(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "hf_semisparse" and config["targets"] == summary["targets"]
    loaded = AUTO[arch].from_pretrained(tmp_path / "ckpt", dtype=torch.float16)
    assert type(loaded) is type(model) and loaded.config.sparsity_config["targets"] == summary["targets"]
    # as transformers' own load of the dense checkpoint: same weights and dtypes (T5 keeps `wo` in float32), same
    # logits (buffers such as Llama's rotary inv_freq are rebuilt at load, unlike in the .half()-cast original)
    model.save_pretrained(tmp_path / "dense")
    reference = AUTO[arch].from_pretrained(tmp_path / "dense", dtype=torch.float16)
    assert_same_weights(reference.state_dict(), loaded.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key].to(value.dtype)), key
    assert torch.equal(logits(reference, arch), logits(loaded, arch))
    loaded.save_pretrained(tmp_path / "again")  # transformers' own save: compressed again by our reverse op
    stored = load_file(tmp_path / "again" / "model.safetensors")
    assert {f"{t}.weight_bitmask" for t in summary["targets"]} <= stored.keys()
    again = AUTO[arch].from_pretrained(tmp_path / "again", dtype=torch.float16)
    assert_same_weights(reference.state_dict(), again.state_dict())
    ours = load_file(tmp_path / "ckpt" / "model.safetensors")
    for key, value in ours.items():  # the same tensors as save_sparse_pretrained wrote (T5's wo: float32 now)
        assert torch.equal(value, stored[key].to(value.dtype)), key


def test_weights_the_loader_did_not_decompress_are_an_error_not_random(tmp_path, monkeypatch):
    """A transformers version whose weight loading bypasses our decompression (transformers 5.17 did, for the
    bitmask, before the bitmask's pattern came first) must stop the load, never leave random weights."""
    from hf_semisparse import quantizer_ops
    from hf_semisparse.quantizer import SemiSparseHfQuantizer

    model = make_model("llama").eval()
    prune_24(model)
    save_sparse_pretrained(model, tmp_path / "ckpt")
    # the op runs but its weights are not recorded as decompressed: our check alone must stop it, on any version
    monkeypatch.setattr(quantizer_ops.Sparse24Expand, "_record", lambda self, name: None)
    with pytest.raises(SparseCheckpointError, match=r"not decompressed .* random weights"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    monkeypatch.undo()
    # no conversion at all: transformers 5.24 stops at the size mismatch itself, 5.17 loaded on and our check stops
    monkeypatch.setattr(SemiSparseHfQuantizer, "get_weight_conversions", lambda self: [])
    with pytest.raises((SparseCheckpointError, RuntimeError), match=r"not decompressed|mismatched_sizes"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")


def test_without_the_import_transformers_stops(tmp_path):
    model = make_model("llama").eval()
    prune_24(model)
    save_sparse_pretrained(model, tmp_path / "ckpt")
    code = (
        "import sys, transformers\n"
        f"transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r})\n"
        "assert 'hf_semisparse' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, "a 2:4 checkpoint loaded without hf_semisparse"
    assert "Unknown quantization type, got hf_semisparse" in result.stderr
    assert "ignore_mismatched_sizes" in result.stderr  # the hard stop: m.weight holds half the columns


def test_sharded_and_offloaded_to_disk(tmp_path):
    model = make_model("llama").eval()
    prune_24(model)
    save_sparse_pretrained(model, tmp_path / "ckpt", max_shard_size="40KB")
    assert len([f for f in os.listdir(tmp_path / "ckpt") if f.endswith(".safetensors")]) > 2
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk"}
    device_map.update({"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"})
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt", device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    assert loaded.hf_device_map["model.layers.1"] == "disk"
    assert torch.equal(logits(model, "llama"), logits(loaded, "llama"))


def digest(tensor):
    tensor = tensor.detach()
    if tensor.is_floating_point():
        tensor = torch.where(tensor == 0, torch.zeros_like(tensor), tensor)
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("name", ["bert_bitmask", "llama_bitmask", "llama_dense"])
def test_legacy_compressed_tensors_fixtures_load_exactly(name, tmp_path):
    path = os.path.join(FIXTURES, name)
    auto = AUTO["bert" if name.startswith("bert") else "llama"]
    loaded = auto.from_pretrained(path)
    with open(os.path.join(path, "expected.json"), encoding="utf-8") as f:
        expected = json.load(f)
    state = loaded.state_dict()
    assert {k: digest(state[k]) for k in expected} == expected
    targets = loaded.config.sparsity_config["targets"]
    if name.startswith("llama"):  # "re:" regexes and the class name "Linear" resolved to the 14 projections
        assert len(targets) == 14 and "lm_head" not in targets
    else:  # "Linear" minus the classifier and the "re:.*pooler.*" regex
        assert len(targets) == 12 and not any("pooler" in t or "classifier" in t for t in targets)
    loaded.save_pretrained(tmp_path / "resaved")  # transformers' save writes our format, whatever was read
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
    assert resaved["quant_method"] == "hf_semisparse" and resaved["targets"] == targets
    again = auto.from_pretrained(tmp_path / "resaved")
    assert {k: digest(again.state_dict()[k]) for k in expected} == expected
    assert main(["convert", path, str(tmp_path / "ours")]) == 0
    converted = auto.from_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]["version"] == 2
    assert {k: digest(v) for k, v in converted.state_dict().items() if k in expected} == expected


def test_legacy_layout_is_still_written_on_request(tmp_path):
    model = make_model("bert").eval().half()
    prune_24(model)
    save_sparse_pretrained(model, tmp_path / "ct", format="compressed-tensors")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["sparsity_config"]["format"] == "sparse-24-bitmask"
    ours = load_file(tmp_path / "ct" / "model.safetensors")
    theirs = load_file(os.path.join(FIXTURES, "bert_bitmask", "model.safetensors"))
    key = "bert.encoder.layer.0.attention.self.query"
    for suffix in ("shape", "compressed", "bitmask"):  # the layout compressed-tensors 0.14 wrote
        assert ours[f"{key}.{suffix}"].dtype == theirs[f"{key}.{suffix}"].dtype
        assert ours[f"{key}.{suffix}"].shape == theirs[f"{key}.{suffix}"].shape
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ct")
    assert_same_weights(model.state_dict(), loaded.state_dict())


def corrupt(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_tensors:
        with safe_open(dst / "model.safetensors", framework="pt") as f:
            had_digests = DIGEST_KEY in (f.metadata() or {})
        tensors = load_file(dst / "model.safetensors")
        edit_tensors(tensors)
        metadata = {"format": "pt"}
        if (
            had_digests
        ):  # a consistent record of the bad layout: the layout checks must find it, not the CRC32s
            metadata[DIGEST_KEY] = digest_metadata(tensors)
        save_file(tensors, dst / "model.safetensors", metadata=metadata)
    if edit_config:
        data = json.loads((dst / "config.json").read_text())
        edit_config(data["quantization_config"])
        (dst / "config.json").write_text(json.dumps(data))
    return dst


def test_inspect_agrees_with_the_loader_on_corrupted_checkpoints(tmp_path, capsys, caplog):
    model = make_model("gpt2").eval()
    prune_24(model)
    save_sparse_pretrained(model, tmp_path / "good")
    good = tmp_path / "good"
    attn = "transformer.h.0.attn.c_attn"

    def four_of_four(t):
        t[f"{attn}.weight_bitmask"][3, 0] = 0xFF

    def no_bitmask(t):
        del t[f"{attn}.weight_bitmask"]

    def short_bitmask(t):
        t[f"{attn}.weight_bitmask"] = t[f"{attn}.weight_bitmask"][:, :-1].contiguous()

    cases = {
        "four_of_four": corrupt(good, tmp_path / "a", edit_tensors=four_of_four),
        "no_bitmask": corrupt(good, tmp_path / "b", edit_tensors=no_bitmask),
        "short_bitmask": corrupt(good, tmp_path / "c", edit_tensors=short_bitmask),
        "orientation": corrupt(good, tmp_path / "d", edit_config=lambda q: q.update(transposed=["nope"])),
        "version": corrupt(good, tmp_path / "e", edit_config=lambda q: q.update(version=5)),
        "legacy_four_of_four": corrupt(
            tmp_path / "../" / tmp_path.name / "good", tmp_path / "f", edit_tensors=four_of_four
        ),
    }
    legacy = corrupt(FIXTURES + "/llama_bitmask", tmp_path / "g")
    tensors = load_file(legacy / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.bitmask"][0, 0] = 0x0F | 0x10  # 3 of 4 in the first group
    save_file(tensors, legacy / "model.safetensors", metadata={"format": "pt"})
    cases["legacy_three_of_four"] = legacy
    assert main(["inspect", str(good)]) == 0
    for name, path in cases.items():
        report = inspect_checkpoint(str(path))
        assert report["problems"], name
        assert main(["inspect", str(path)]) == 1, name
        auto = transformers.AutoModelForCausalLM
        with pytest.raises((SparseCheckpointError, RuntimeError)):
            auto.from_pretrained(path)
    caplog.clear()
    with pytest.raises(RuntimeError):  # transformers' generic error; ours is logged where users see it
        transformers.AutoModelForCausalLM.from_pretrained(cases["four_of_four"])
    assert re.search(r"cannot load transformer.h.0.attn.c_attn.weight: .*marks 4 of 4", caplog.text)
    # a recorded orientation that contradicts the module class (Linear listed as Conv1D) needs the model: only the
    # loader sees it (test_serialization.py::test_config_that_disagrees_with_tensors)
    capsys.readouterr()


def test_tied_lm_head_is_refused_and_nothing_compressed_is_said(tmp_path):
    model = make_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match=r"lm_head: weight tied to \['model.embed_tokens.weight'\]"):
        select_targets(model, SparsityConfig(target_modules=["lm_head"], exclude_modules=[]))
    before = model.model.embed_tokens.weight.clone()
    with pytest.raises(ValueError, match="tied"):
        prune_24(model, SparsityConfig(target_modules=["lm_head"], exclude_modules=[]))
    assert torch.equal(model.model.embed_tokens.weight, before)  # nothing pruned
    targets, _ = select_targets(model, SparsityConfig(exclude_modules=[]))  # default selection skips it
    assert "lm_head" not in [t.name for t in targets]
    with pytest.raises(SparseCheckpointError, match="prune the model first"):
        save_sparse_pretrained(model, tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_autosparsemodel_is_the_same_loader(tmp_path):
    model = make_model("bert").eval()
    prune_24(model)
    save_sparse_pretrained(model, tmp_path / "ckpt")
    loaded = AutoSparseModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.hf_quantizer.quantization_config.quant_method == "hf_semisparse"
    assert not loaded.sparsity_acceleration.ok and "cpu" in loaded.sparsity_acceleration.reason
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt")
    assert not hasattr(plain, "sparsity_acceleration")  # on the CPU the plain call does not try kernels
    assert_same_weights(plain.state_dict(), loaded.state_dict())


def test_load_state_dict_expands_our_format_and_refuses_fp8(tmp_path):
    """A model loaded from our format takes a state dict in that format (a Trainer checkpoint of it), expanded
    bit for bit; an FP8 (version 4) one is refused rather than read as garbage."""
    from transformers import AutoModelForCausalLM

    from hf_semisparse import prune_24, save_sparse_pretrained
    from hf_semisparse.checkpoint_format import compress_values
    from hf_semisparse.errors import SparseCheckpointError

    model = make_model("llama")
    prune_24(model, show_progress=False)
    save_sparse_pretrained(model, tmp_path / "ckpt", show_progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    key = "model.layers.0.mlp.down_proj.weight"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    values, bitmask = compress_values(state[key])
    with torch.no_grad():
        loaded.model.layers[0].mlp.down_proj.weight.zero_()
    loaded.load_state_dict({**state, key: values, key + "_bitmask": bitmask})
    assert torch.equal(
        loaded.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight
    )
    fp8 = {**state, key: values.to(torch.float8_e4m3fn), key + "_bitmask": bitmask}
    fp8[key + "_scale"] = torch.ones(values.shape[0], 1)
    with pytest.raises(SparseCheckpointError, match="FP8 2:4 state dict"):
        loaded.load_state_dict(fp8, strict=False)
