"""Mixture-of-experts models (transformers 5 fused experts): 2:4 targets, per-expert calibration, masks in
training, compressed checkpoints that plain `from_pretrained` loads exactly."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    TrainingArguments,
)

from hf_semisparse import (
    SparsityConfig,
    SparsityTrainer,
    is_nm_sparse,
    prune_24,
    save_sparse_pretrained,
    select_targets,
)
from hf_semisparse.cli import inspect_checkpoint
from hf_semisparse.digests import DIGEST_KEY, digest_metadata
from hf_semisparse.masks import compute_nm_mask
from hf_semisparse.pruning import Sparsifier
from hf_semisparse.pruning.calibrated import StatsCollector
from hf_semisparse.serialization import SparseCheckpointError
from tests.conftest import VOCAB, ToyDataset, assert_same_pruning, load_disk_offloaded, training_args

EXPERTS = 4


def make_moe(arch: str, seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A tiny Mixtral, Qwen2-MoE (shared expert) or GPT-OSS (experts stored transposed, with biases)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_experts_per_tok=2,
        pad_token_id=0,
    )
    if arch == "mixtral":
        return MixtralForCausalLM(MixtralConfig(intermediate_size=128, num_local_experts=EXPERTS, **common))
    if arch == "qwen2_moe":
        cfg = Qwen2MoeConfig(
            intermediate_size=128,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=128,
            num_experts=EXPERTS,
            **common,
        )
        return Qwen2MoeForCausalLM(cfg)
    cfg = GptOssConfig(
        intermediate_size=32,
        head_dim=32,
        num_local_experts=EXPERTS,
        layer_types=["full_attention"] * layers,
        **common,
    )
    return GptOssForCausalLM(cfg)


def batches(n: int = 2, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, VOCAB, (2, 16), generator=g)} for _ in range(n)]


def expert_params(model) -> dict[str, torch.Tensor]:
    """Every fused expert weight in its linear view `[experts, out, in]` (the groups of 4 run along `in`)."""
    out = {}
    for name, module in model.named_modules():
        for param in ("gate_up_proj", "down_proj"):
            weight = getattr(module, param, None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 3:
                out[f"{name}.{param}"] = (
                    weight.detach().transpose(-2, -1) if module.is_transposed else weight.detach()
                )
    return out


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_report_selects_every_expert_and_says_why_the_rest_is_dense(arch):
    model = make_moe(arch)
    targets, report = select_targets(model, SparsityConfig())
    assert sorted(report.expert_targets) == sorted(expert_params(model))
    down = next(t for t in targets if t.name == "model.layers.0.mlp.experts.down_proj")
    assert down.is_expert and down.shape == tuple(expert_params(model)[down.name].shape)
    dense = {d.name: d.reason for d in report.skipped}
    assert "router" in dense["model.layers.0.mlp.gate.weight"]
    assert "embedding" in dense["model.embed_tokens.weight"]
    assert "lm_head" in dense
    if arch == "qwen2_moe":  # the shared expert is plain Linear layers; its 1-output gate is too small
        assert "model.layers.0.mlp.shared_expert.up_proj" in report.targets
        assert "too small" in dense["model.layers.0.mlp.shared_expert_gate"]
    # every weight of 2+ dimensions is listed once, and the share is over all of them
    listed = {d.name for d in report.decisions}
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            assert name in listed or name.removesuffix(".weight") in listed, name
    assert 0.8 < report.sparsified_share < 1.0
    assert "fused expert weights" in str(report) and "dense: mixture-of-experts router" in str(report)
    # a user exclusion of the experts is honoured and reported
    _, report = select_targets(model, SparsityConfig(exclude_modules=["lm_head", "layers.1.mlp.experts"]))
    assert {d.name: d.reason for d in report.skipped}[
        "model.layers.1.mlp.experts.down_proj"
    ] == "in exclude_modules"


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_every_method_makes_every_expert_24_along_its_input(arch, method):
    model = make_moe(arch).eval()
    dense = {k: v.clone() for k, v in expert_params(model).items()}
    data = None if method == "magnitude" else batches()
    report = prune_24(model, SparsityConfig(method=method), calibration_data=data, show_progress=False)
    assert sorted(report.expert_targets) == sorted(dense)
    for name, weight in expert_params(model).items():
        assert is_nm_sparse(weight), name  # groups of 4 along each expert's input dimension
        assert (weight == 0).float().mean() == 0.5, name
        if method != "sparsegpt":  # the kept weights are the dense ones (SparseGPT updates them)
            assert torch.equal(weight[weight != 0], dense[name][weight != 0]), name
    assert torch.isfinite(model(**batches(1)[0]).logits).all()
    assert sorted(model.config.sparsity_config["expert_targets"]) == sorted(dense)


def test_transposed_experts_contract_the_dimension_that_is_pruned():
    """GPT-OSS stores experts `[experts, in, out]` (`is_transposed`): the forward computes `x @ W[e]`, so the
    2:4 groups must run along dim -2 of the parameter."""
    model = make_moe("gpt_oss", layers=1).eval()
    prune_24(model, show_progress=False)
    experts = model.model.layers[0].mlp.experts
    assert experts.is_transposed and tuple(experts.down_proj.shape) == (EXPERTS, 32, 64)  # [experts, in, out]
    assert is_nm_sparse(experts.down_proj.detach().transpose(-2, -1))
    assert not is_nm_sparse(experts.down_proj.detach())  # not along the output dimension
    x = torch.randn(3, 64)
    index = torch.tensor([[1, 1], [1, 1], [1, 1]])
    out = experts(x, index, torch.tensor([[0.5, 0.5]] * 3))
    h = experts._apply_gate(x @ experts.gate_up_proj[1] + experts.gate_up_proj_bias[1])
    expected = h @ experts.down_proj[1] + experts.down_proj_bias[1]
    torch.testing.assert_close(out, expected)


def _routing(model, data):
    """Per layer-0 token: its hidden state entering the experts and the experts the router picked (dense model)."""
    seen = {}
    moe = model.model.layers[0].mlp

    def hook(module, args, output):
        seen.setdefault("x", []).append(args[0].reshape(-1, 64))
        seen.setdefault("index", []).append(output[2])

    handle = moe.gate.register_forward_hook(hook)
    with torch.no_grad():
        for batch in data:
            model(**batch)
    handle.remove()
    return torch.cat(seen["x"]), torch.cat(seen["index"])


def test_wanda_statistics_of_an_expert_are_those_of_its_routed_tokens():
    model = make_moe("mixtral").eval()
    data = batches()
    x, index = _routing(model, data)
    experts = model.model.layers[0].mlp.experts
    targets, _ = select_targets(model, SparsityConfig(method="wanda"))
    layer0 = [t for t in targets if t.name.startswith("model.layers.0.mlp.experts.")]
    collector = StatsCollector("wanda").attach(layer0)
    with torch.no_grad():
        for batch in data:
            model(**batch)
    collector.detach()
    counts = []
    for e in range(EXPERTS):
        routed = x[(index == e).any(dim=-1)]
        counts.append(len(routed))
        gate, up = torch.nn.functional.linear(routed, experts.gate_up_proj[e].detach()).chunk(2, dim=-1)
        hidden = torch.nn.functional.silu(gate) * up
        up_stats = collector.stats["model.layers.0.mlp.experts.gate_up_proj"].experts[e]
        down_stats = collector.stats["model.layers.0.mlp.experts.down_proj"].experts[e]
        assert up_stats.count == down_stats.count == len(routed)
        torch.testing.assert_close(up_stats.value, (routed * routed).sum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(down_stats.value, (hidden * hidden).sum(0), rtol=1e-5, atol=1e-5)
    assert sum(counts) == 2 * x.shape[0] and min(counts) > 0  # top-2 routing, every expert used

    # prune_24 (block by block) picks exactly the masks these per-expert norms give for the first block
    prune_24(model, SparsityConfig(method="wanda"), calibration_data=data, show_progress=False)
    for param in ("gate_up_proj", "down_proj"):
        stats = f"model.layers.0.mlp.experts.{param}"
        for e in range(EXPERTS):
            before = getattr(make_moe("mixtral").model.layers[0].mlp.experts, param)[e].detach()
            norms = collector.stats[stats].experts[e].value
            mask = compute_nm_mask(before, scores=before.abs() * norms.sqrt())
            assert torch.equal(getattr(experts, param)[e].detach(), before * mask), e


def test_an_expert_without_tokens_is_pruned_by_magnitude_with_a_warning(caplog):
    model = make_moe("mixtral", layers=1).eval()
    dense = expert_params(model)["model.layers.0.mlp.experts.gate_up_proj"].clone()

    def only_experts_0_and_1(module, args, output):
        logits, weights, index = output
        return logits, weights, torch.tensor([0, 1]).expand_as(index)

    model.model.layers[0].mlp.gate.register_forward_hook(only_experts_0_and_1)
    with caplog.at_level(logging.WARNING, logger="hf_semisparse"):
        prune_24(model, SparsityConfig(method="sparsegpt"), calibration_data=batches(), show_progress=False)
    assert (
        "model.layers.0.mlp.experts.gate_up_proj: expert(s) [2, 3] received no calibration token"
        in caplog.text
    )
    pruned = expert_params(model)["model.layers.0.mlp.experts.gate_up_proj"]
    for e in (2, 3):
        assert torch.equal(pruned[e], dense[e] * compute_nm_mask(dense[e]))
    assert not torch.equal(
        pruned[0], dense[0] * compute_nm_mask(dense[0])
    )  # SparseGPT updated the kept weights
    assert all(is_nm_sparse(w) for w in expert_params(model).values())


def test_calibration_error_changes_nothing_in_the_failing_block():
    model = make_moe("mixtral", layers=1).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[2, 5, 7] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.down_proj holds 1 NaN"):
        prune_24(model, SparsityConfig(method="wanda"), calibration_data=batches(), show_progress=False)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) or torch.isnan(v).any() for k, v in before.items())
    assert all(torch.equal(v.nan_to_num(), after[k].nan_to_num()) for k, v in before.items())


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_compressed_experts_load_bit_exactly_with_plain_from_pretrained(arch, tmp_path):
    model = make_moe(arch).eval()
    prune_24(model, show_progress=False)
    summary = save_sparse_pretrained(model, tmp_path / "ckpt")
    assert summary["expert_targets"] == sorted(expert_params(model))
    quant = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert quant["version"] == 3 and quant["expert_targets"] == summary["expert_targets"]
    assert bool(quant.get("expert_transposed")) == (arch == "gpt_oss")
    name = "model.layers.0.mlp.experts.down_proj"
    with safe_open(tmp_path / "ckpt" / "model.safetensors", framework="pt") as f:
        values = f.get_slice(name).get_shape()
        bitmask = f.get_slice(name + "_bitmask").get_shape()
    linear = list(expert_params(model)[name].shape)
    assert values == [*linear[:2], linear[2] // 2] and bitmask == [*linear[:2], linear[2] // 8]

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    expected, got = model.state_dict(), loaded.state_dict()
    assert set(expected) == set(got)
    for key, tensor in expected.items():
        assert torch.equal(tensor, got[key]), key
    ids = batches(1)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # save_pretrained of the loaded model compresses the experts again
    loaded.save_pretrained(tmp_path / "again")
    with safe_open(tmp_path / "again" / "model.safetensors", framework="pt") as f:
        assert f.get_slice(name).get_shape() == values and name + "_bitmask" in f.keys()  # noqa: SIM118
    report = inspect_checkpoint(str(tmp_path / "ckpt"))
    experts = [layer for layer in report["layers"] if layer["module"] in summary["expert_targets"]]
    assert len(experts) == len(summary["expert_targets"]) and all(layer["is_24"] for layer in experts)
    assert not report["problems"]


def test_a_corrupted_expert_bitmask_is_refused_by_inspect_and_by_the_loader(tmp_path):
    model = make_moe("mixtral", layers=1).eval()
    prune_24(model, show_progress=False)
    save_sparse_pretrained(model, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.mlp.experts.gate_up_proj_bitmask"][3, 0, 0] = 0xFF  # expert 3: 4 of 4 kept
    save_file(tensors, path, metadata={"format": "pt", DIGEST_KEY: digest_metadata(tensors)})
    report = inspect_checkpoint(str(tmp_path / "ckpt"))
    assert any("gate_up_proj_bitmask" in p and "marks 4 of 4" in p for p in report["problems"])
    with pytest.raises((SparseCheckpointError, RuntimeError)):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")


def test_checkpoint_for_another_expert_layout_is_refused_before_loading(tmp_path):
    model = make_moe("mixtral", layers=1).eval()
    prune_24(model, show_progress=False)
    save_sparse_pretrained(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["quantization_config"]["expert_transposed"] = ["model.layers.0.mlp.experts.down_proj"]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SparseCheckpointError, match="orientation mismatch"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")


def test_recovery_training_keeps_every_expert_24(tmp_path):
    model = make_moe("mixtral", layers=1)
    trainer = SparsityTrainer(
        model=model,
        args=TrainingArguments(**training_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)),
        train_dataset=ToyDataset("llama"),
    )
    before = {k: v.clone() for k, v in expert_params(model).items()}
    trainer.train()
    for name, weight in expert_params(model).items():
        assert is_nm_sparse(weight), name
        assert (weight == 0).float().mean() == 0.5, name
        assert not torch.equal(weight, before[name] * (weight != 0)), name  # trained, not only masked
    # the masks saved with the checkpoint cover the experts and restore exactly
    sparsifier = Sparsifier(model, SparsityConfig())
    assert sparsifier.load_masks(tmp_path / "checkpoint-4") == 4
    gate_up = model.model.layers[0].mlp.experts.gate_up_proj
    assert torch.equal(sparsifier.masks["model.layers.0.mlp.experts.gate_up_proj"], gate_up.detach() != 0)


def test_a_dense_checkpoint_of_a_pruned_moe_is_checked_on_load(tmp_path):
    from hf_semisparse import AutoSparseModel

    model = make_moe("mixtral", layers=1).eval()
    prune_24(model, show_progress=False)
    # transformers' own writer: dense tensors (Mixtral's experts under their per-expert legacy names w1/w2/w3),
    # sparsity_config recorded; the loader checks the fused weights once transformers has merged them
    model.save_pretrained(tmp_path / "dense")
    loaded = AutoSparseModel.from_pretrained(tmp_path / "dense", model_class=MixtralForCausalLM)
    assert torch.equal(
        loaded.model.layers[0].mlp.experts.down_proj, model.model.layers[0].mlp.experts.down_proj
    )

    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[1].fill_(0.5)  # expert 1 dense again
    model.save_pretrained(tmp_path / "broken")
    with pytest.raises(SparseCheckpointError, match=r"experts\.down_proj is recorded as 2:4"):
        AutoSparseModel.from_pretrained(tmp_path / "broken", model_class=MixtralForCausalLM)
    # inspect reads tensors without building the model: the per-expert tensors are not the recorded fused weight,
    # and it says it could not check them instead of passing them
    from hf_semisparse.cli import inspect_checkpoint

    problems = inspect_checkpoint(str(tmp_path / "broken"))["problems"]
    assert any("experts.down_proj" in p and "not checked by inspect" in p for p in problems), problems


def test_block_by_block_and_whole_model_pipelines_agree_on_experts():
    sequential, per_block = make_moe("mixtral").eval(), make_moe("mixtral").eval()
    config = SparsityConfig(method="wanda")
    prune_24(sequential, config, calibration_data=batches(), show_progress=False)
    prune_24(per_block, config, calibration_data=batches(), show_progress=False, pipeline="per_block")
    got, expected = expert_params(sequential), expert_params(per_block)
    for name, weight in expected.items():
        assert torch.equal(got[name], weight), name


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_experts_offloaded_to_disk_by_accelerate_get_the_same_statistics(method, tmp_path):
    """The experts' statistics hook runs before accelerate's hook puts offloaded weights in place: the down
    projection's inputs must be recomputed from the offloaded weights, not from the meta placeholders."""

    from hf_semisparse.pruning.offload import read_weight

    base = make_moe("mixtral", layers=2).eval()
    base.save_pretrained(tmp_path / "dense")
    data = batches()
    reference = copy.deepcopy(base)
    prune_24(reference, SparsityConfig(method=method), calibration_data=data, show_progress=False)
    offloaded = load_disk_offloaded(tmp_path / "dense", 2, tmp_path / "off")
    assert offloaded.model.layers[1].mlp.experts.down_proj.device.type == "meta"
    prune_24(offloaded, SparsityConfig(method=method), calibration_data=data, show_progress=False)
    modules = dict(offloaded.named_modules())
    for name, expected in expert_params(reference).items():
        module, param = name.rsplit(".", 1)
        got = read_weight(modules[module], torch.device("cpu"), param)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=name)


def test_format_version_follows_the_experts(tmp_path):
    """Version 3 exactly when expert weights are compressed; a config that lists experts under version 2 (edited,
    or written by another tool) is refused before anything loads."""
    model = make_moe("mixtral", layers=1).eval()
    prune_24(model, show_progress=False)
    save_sparse_pretrained(model, tmp_path / "experts")
    config_path = tmp_path / "experts" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["quantization_config"]["version"] == 3
    config["quantization_config"]["version"] = 2
    config_path.write_text(json.dumps(config))
    with pytest.raises(SparseCheckpointError, match="lists expert_targets but says format version 2"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "experts")

    dense_experts = make_moe("mixtral", layers=1).eval()
    prune_24(dense_experts, SparsityConfig(exclude_modules=["lm_head", "experts"]), show_progress=False)
    save_sparse_pretrained(dense_experts, tmp_path / "linear")
    quant = json.loads((tmp_path / "linear" / "config.json").read_text())["quantization_config"]
    assert quant["version"] == 2 and not quant.get("expert_targets")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_padding_tokens_routed_to_experts_do_not_count(method):
    """Experts' statistics come from the real tokens routed to them: a right-padded batch (attention_mask 0)
    prunes the experts as the same batch unpadded."""
    plain, padded = make_moe("mixtral"), make_moe("mixtral")
    for model in (plain, padded):
        model.config._attn_implementation = "eager"
    ids = batches(1)[0]["input_ids"]
    pad = torch.zeros(2, 12, dtype=ids.dtype)
    mask = torch.cat([torch.ones_like(ids), torch.zeros_like(pad)], dim=1)
    config = SparsityConfig(method=method)
    prune_24(plain, config, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], show_progress=False)
    prune_24(
        padded,
        config,
        [{"input_ids": torch.cat([ids, pad], dim=1), "attention_mask": mask}],
        show_progress=False,
    )
    assert [k for k in plain.state_dict() if "experts" in k]
    assert_same_pruning(plain, padded)


def test_inspect_of_an_experts_only_dense_save_is_not_called_unrecorded(tmp_path, capsys):
    from hf_semisparse.cli import main

    model = make_moe("mixtral")
    prune_24(model, SparsityConfig(target_modules=["gate_up_proj", "down_proj"]), show_progress=False)
    assert model.config.sparsity_config.get("expert_targets") and not model.config.sparsity_config["targets"]
    model.save_pretrained(tmp_path / "dense")
    main(["inspect", str(tmp_path / "dense")])
    assert "has no sparsity record" not in capsys.readouterr().out
