"""Block-wise reconstruction after Wanda/SparseGPT (`reconstruct_epochs`): it lowers each block's error against the
dense model without touching the masks, keeps the one-shot weights where it does not, and refuses what it cannot
do before any change."""

import copy
import json
import logging

import numpy as np
import pytest
import torch

from hf_semisparse import SparsityConfig, is_nm_sparse, prune_24, select_targets
from hf_semisparse.pruning import sequential
from hf_semisparse.pruning.calibrated import calibrated_prune_
from tests.conftest import VOCAB, load_disk_offloaded, make_model
from tests.test_moe import batches as moe_batches
from tests.test_moe import expert_params, make_moe
from tests.test_sequential_pruning import assert_refused_unchanged, llama, token_batches


def pruned(model, method="sparsegpt", batches=None, show_progress=False, **options):
    """A pruned copy of `model` and the pipeline's stats."""
    model = copy.deepcopy(model)
    targets, _ = select_targets(model, SparsityConfig(method=method))
    stats = calibrated_prune_(
        model,
        targets,
        method,
        batches or token_batches(4),
        show_progress=show_progress,
        device="cpu",
        **options,
    )
    return model, stats


def reconstruction_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "hf_semisparse.pruning.reconstruction" and r.levelno == logging.WARNING
    ]


def rel_error(model, dense, batches) -> float:
    with torch.no_grad():
        num = sum(float((model(**b).logits - dense(**b).logits).norm() ** 2) for b in batches)
        den = sum(float(dense(**b).logits.norm() ** 2) for b in batches)
    return (num / den) ** 0.5


def linear_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in model.named_modules() if n.endswith("_proj")}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_reconstruction_brings_the_pruned_model_closer_to_the_dense_one(method):
    dense = llama(3).eval()
    calibration, held_out = token_batches(4, seed=0), token_batches(4, seed=1)
    one_shot, _ = pruned(dense, method, calibration)
    tuned, stats = pruned(dense, method, calibration, reconstruct_epochs=8, reconstruct_lr=1e-3)

    assert [block["block"] for block in stats["reconstruction"]] == [f"model.layers.{i}" for i in range(3)]
    for block in stats["reconstruction"]:
        assert block["applied"] and block["error_after"] < 0.9 * block["error_before"], block
        assert block["diverged"] is False
    assert stats["blocks_tuned"] == 3
    assert rel_error(tuned, dense, calibration) < 0.8 * rel_error(one_shot, dense, calibration)
    assert rel_error(tuned, dense, held_out) < rel_error(one_shot, dense, held_out)
    # masks stay N:M; the first block's are the one-shot ones (chosen before any tuning, on the same inputs)
    for name, weight in linear_weights(tuned).items():
        assert is_nm_sparse(weight), name
        if name.startswith("model.layers.0."):
            assert torch.equal(weight != 0, linear_weights(one_shot)[name] != 0), name
            assert not torch.equal(weight, linear_weights(one_shot)[name]), name  # the kept weights moved
    # nothing but the targets changed
    for (name, a), b in zip(tuned.state_dict().items(), dense.state_dict().values(), strict=True):
        if not name.endswith("_proj.weight"):
            assert torch.equal(a, b), name


def test_a_block_whose_error_rises_keeps_its_one_shot_weights_with_one_warning_for_the_call(caplog):
    dense = llama(2).eval()
    one_shot, _ = pruned(dense)
    with caplog.at_level(logging.WARNING):
        # far too large: every step overshoots
        tuned, stats = pruned(dense, reconstruct_epochs=1, reconstruct_lr=1.0)
    assert [block["applied"] for block in stats["reconstruction"]] == [False, False]
    for block in stats["reconstruction"]:
        assert block["error_after"] == block["error_before"]
        assert block["diverged"] is False
    assert stats["blocks_tuned"] == 0
    for (name, a), b in zip(tuned.state_dict().items(), one_shot.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # one warning for the call, naming every block it did not improve
    (warning,) = reconstruction_warnings(caplog)
    assert "did not lower the error of 2 of 2 blocks (model.layers.0, model.layers.1)" in warning


def nan_while_tuning(module, args, output):
    """A forward hook: NaN outputs whenever autograd records (the reconstruction's Adam steps), else untouched."""
    if not torch.is_grad_enabled():
        return None
    if torch.is_tensor(output):
        return output * float("nan")
    return (output[0] * float("nan"), *output[1:])


def test_a_diverging_block_keeps_its_one_shot_weights_and_later_blocks_are_still_tuned(caplog):
    dense = llama(2).eval()
    dense.model.layers[0].register_forward_hook(
        nan_while_tuning
    )  # block 0's tuning diverges, not its pruning
    one_shot, _ = pruned(dense)
    with caplog.at_level(logging.WARNING):
        tuned, stats = pruned(dense, reconstruct_epochs=8, reconstruct_lr=1e-3)

    first, second = stats["reconstruction"]
    assert first["block"] == "model.layers.0" and first["diverged"] is True and first["applied"] is False
    assert first["error_after"] == first["error_before"]
    assert second["diverged"] is False and second["applied"] is True
    assert second["error_after"] < second["error_before"]
    assert stats["blocks_tuned"] == 1
    tuned_state, one_shot_state = tuned.state_dict(), one_shot.state_dict()
    for name, value in tuned_state.items():
        if name.startswith("model.layers.0."):
            assert torch.equal(value, one_shot_state[name]), name  # bit for bit
    for name, weight in linear_weights(tuned).items():
        if name.startswith("model.layers.1."):
            assert is_nm_sparse(weight), name
            assert not torch.equal(weight, linear_weights(one_shot)[name]), name  # tuned
    (warning,) = reconstruction_warnings(caplog)  # the diverged block is not also "not improved"
    assert "model.layers.0: block reconstruction diverged" in warning and "Lower reconstruct_lr" in warning


def test_tuned_weights_whose_error_is_nan_are_put_back_bit_for_bit(monkeypatch, caplog):
    # the Adam steps' losses stay finite; the error of the tuned weights (the second measurement) is NaN
    from hf_semisparse.pruning import reconstruction

    measure = reconstruction._relative_error
    calls = []

    def nan_after_tuning(*args):
        calls.append(1)
        return float("nan") if len(calls) % 2 == 0 else measure(*args)

    dense = llama(2).eval()
    one_shot, _ = pruned(dense)
    monkeypatch.setattr(reconstruction, "_relative_error", nan_after_tuning)
    with caplog.at_level(logging.WARNING):
        tuned, stats = pruned(dense, reconstruct_epochs=2, reconstruct_lr=1e-3)
    assert len(calls) == 4  # before and after, for each of the 2 blocks
    for block in stats["reconstruction"]:
        assert block["diverged"] is True and block["applied"] is False and block["skipped"] is False
    assert stats["blocks_tuned"] == 0
    for (name, a), b in zip(tuned.state_dict().items(), one_shot.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    warnings = reconstruction_warnings(caplog)
    assert len(warnings) == 2 and all("block reconstruction diverged" in w for w in warnings)


def test_a_block_whose_one_shot_error_is_not_finite_is_not_tuned(monkeypatch, caplog):
    from hf_semisparse.pruning import reconstruction

    monkeypatch.setattr(reconstruction, "_relative_error", lambda *args: float("inf"))

    def no_tuning(*args):
        raise AssertionError("tuned a block whose error cannot fall")

    monkeypatch.setattr(reconstruction, "_tuned_masters", no_tuning)
    dense = llama(1).eval()
    one_shot, _ = pruned(dense)
    with caplog.at_level(logging.WARNING):
        tuned, stats = pruned(dense, reconstruct_epochs=2)
    (block,) = stats["reconstruction"]
    assert block["applied"] is False and block["diverged"] is False and block["skipped"] is True
    for (name, a), b in zip(tuned.state_dict().items(), one_shot.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    (warning,) = reconstruction_warnings(
        caplog
    )  # not also "did not lower the error ... smaller reconstruct_lr"
    assert "is not finite" in warning and "not tuned" in warning


def test_no_gradient_or_requires_grad_flag_is_left_behind():
    model = llama(2)
    model.lm_head.weight.requires_grad_(False)  # a user's frozen parameter stays frozen
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    prune_24(
        model,
        SparsityConfig(method="sparsegpt"),
        token_batches(2),
        show_progress=False,
        device="cpu",
        reconstruct_epochs=2,
    )
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_prune_24_records_the_reconstruction_in_the_config_and_the_report():
    model = llama(1)
    report = prune_24(
        model,
        SparsityConfig(method="wanda"),
        token_batches(2),
        show_progress=False,
        device="cpu",
        reconstruct_epochs=3,
    )
    record = model.config.sparsity_config["block_reconstruction"]
    assert record == {"epochs": 3, "lr": 3e-4, "blocks_tuned": 1, "blocks": 1}
    assert {type(v) for v in record.values()} == {int, float}
    (block,) = report.calibration["reconstruction"]
    assert block["block"] == "model.layers.0" and block["applied"] and report.calibration["blocks_tuned"] == 1
    plain = llama(1)
    report = prune_24(
        plain, SparsityConfig(method="wanda"), token_batches(2), show_progress=False, device="cpu"
    )
    assert "block_reconstruction" not in plain.config.sparsity_config
    assert report.calibration["pipeline"] == "sequential" and "reconstruction" not in report.calibration
    assert prune_24(llama(1), show_progress=False).calibration is None  # magnitude: no calibration


def test_a_bf16_model_is_tuned_in_float32_and_stays_bf16():
    dense = llama(2).to(torch.bfloat16).eval()
    one_shot, _ = pruned(dense)
    tuned, stats = pruned(dense, reconstruct_epochs=8, reconstruct_lr=1e-3)
    assert all(block["applied"] for block in stats["reconstruction"])
    for name, weight in linear_weights(tuned).items():
        assert weight.dtype == torch.bfloat16 and is_nm_sparse(weight), name
    calibration = token_batches(4)
    assert rel_error(tuned, dense, calibration) < rel_error(one_shot, dense, calibration)


def test_mixture_of_experts_weights_keep_their_masks_per_expert():
    dense = make_moe("mixtral").eval()
    calibration = moe_batches(4)
    one_shot, _ = pruned(dense, "sparsegpt", calibration)
    tuned, stats = pruned(dense, "sparsegpt", calibration, reconstruct_epochs=8, reconstruct_lr=1e-3)
    assert any(block["applied"] for block in stats["reconstruction"])
    before, after = expert_params(one_shot), expert_params(tuned)
    layer0 = [name for name in after if ".layers.0." in name]
    assert layer0
    for name in layer0:
        assert torch.equal(after[name] != 0, before[name] != 0), name  # zeros kept, expert by expert
        assert not torch.equal(after[name], before[name]), name
    assert rel_error(tuned, dense, calibration) < rel_error(one_shot, dense, calibration)


@pytest.mark.parametrize(
    "option, error, match",
    [
        ({"reconstruct_epochs": -1}, ValueError, "reconstruct_epochs must be >= 0"),
        ({"reconstruct_epochs": np.int64(-1)}, ValueError, "reconstruct_epochs must be >= 0"),
        ({"reconstruct_epochs": 2.0}, TypeError, "reconstruct_epochs must be an int"),
        ({"reconstruct_epochs": np.float64(2.0)}, TypeError, "reconstruct_epochs must be an int"),
        ({"reconstruct_epochs": True}, TypeError, "reconstruct_epochs must be an int"),
        ({"reconstruct_epochs": "2"}, TypeError, "reconstruct_epochs must be an int"),
        (
            {"reconstruct_epochs": 2, "reconstruct_lr": 0},
            ValueError,
            "reconstruct_lr must be a finite number > 0",
        ),
        ({"reconstruct_epochs": 2, "reconstruct_lr": -1e-3}, ValueError, "must be a finite number > 0"),
        ({"reconstruct_lr": float("nan")}, ValueError, "reconstruct_lr must be a finite number > 0"),
        ({"reconstruct_lr": float("inf")}, ValueError, "reconstruct_lr must be a finite number > 0"),
        ({"reconstruct_lr": np.float32("inf")}, ValueError, "reconstruct_lr must be a finite number > 0"),
        ({"reconstruct_lr": 10**400}, ValueError, "reconstruct_lr must be a finite number > 0"),
        ({"reconstruct_epochs": 2, "reconstruct_lr": 1e38}, ValueError, "reconstruct_lr must be at most 1"),
        ({"reconstruct_lr": 1.5}, ValueError, "reconstruct_lr must be at most 1"),
        ({"reconstruct_lr": "1e-3"}, TypeError, "reconstruct_lr must be a real number"),
        (
            {"reconstruct_epochs": 2, "reconstruct_lr": True},
            TypeError,
            "reconstruct_lr must be a real number",
        ),
        ({"reconstruct_lr": torch.tensor(1e-3)}, TypeError, "reconstruct_lr must be a real number"),
        ({"reconstruct_epochs": 2, "pipeline": "per_block"}, ValueError, "needs pipeline='sequential'"),
        ({"reconstruct_epochs": 2, "fp8_rounding": True}, ValueError, "cannot be combined"),
    ],
)
def test_bad_reconstruction_options_are_refused_before_any_change(option, error, match):
    config = SparsityConfig(method="sparsegpt")
    assert_refused_unchanged(llama(1), error, match, config, token_batches(1), **option)


def test_a_learning_rate_without_epochs_is_said_to_have_no_effect(caplog):
    with caplog.at_level(logging.WARNING):
        prune_24(
            llama(1),
            SparsityConfig(method="wanda"),
            token_batches(1),
            show_progress=False,
            reconstruct_lr=1e-3,
        )
    assert any("reconstruct_lr=0.001 has no effect" in r.getMessage() for r in caplog.records)


def test_reconstruction_options_are_refused_for_magnitude():
    assert_refused_unchanged(
        llama(1), TypeError, "only apply to wanda/sparsegpt", SparsityConfig(), None, reconstruct_epochs=2
    )


def test_reconstruction_under_inference_mode_is_refused_before_any_change():
    with torch.inference_mode():
        assert_refused_unchanged(
            llama(1),
            RuntimeError,
            "cannot run under torch.inference_mode",
            SparsityConfig(method="wanda"),
            token_batches(1),
            reconstruct_epochs=1,
        )


def test_a_model_that_cannot_run_block_by_block_is_refused_before_any_change():
    t5 = make_model("t5")
    batch = {"input_ids": torch.randint(3, 50, (2, 8)), "decoder_input_ids": torch.randint(3, 50, (2, 8))}
    assert_refused_unchanged(
        t5,
        ValueError,
        "cannot be run so: it is an encoder-decoder",
        SparsityConfig(method="wanda"),
        [batch],
        reconstruct_epochs=1,
    )


def test_a_model_with_mixed_attention_types_is_refused_with_that_reason():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=8,
        layer_types=["full_attention", "sliding_attention"],
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    assert_refused_unchanged(
        model,
        ValueError,
        r"different attention types \(config.layer_types: full_attention, sliding_attention\)",
        SparsityConfig(method="wanda"),
        token_batches(1),
        reconstruct_epochs=1,
    )


def test_blocks_offloaded_by_accelerate_are_refused_before_any_change(tmp_path):
    from hf_semisparse.pruning.offload import read_weight

    llama(2).save_pretrained(tmp_path / "dense")
    offloaded = load_disk_offloaded(tmp_path / "dense", 2, tmp_path / "offload")
    modules = dict(offloaded.named_modules())
    names = ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")
    before = {n: read_weight(modules[n], torch.device("cpu")).clone() for n in names}
    with pytest.raises(ValueError, match="not offloaded by accelerate"):
        prune_24(
            offloaded,
            SparsityConfig(method="sparsegpt"),
            token_batches(1),
            show_progress=False,
            reconstruct_epochs=1,
        )
    for n in names:
        assert torch.equal(read_weight(modules[n], torch.device("cpu")), before[n]), n


def test_a_block_without_targets_is_carried_through_not_tuned():
    dense = llama(2).eval()
    config = SparsityConfig(method="wanda", exclude_modules=r"lm_head|model\.layers\.1\..*")
    model = copy.deepcopy(dense)
    prune_24(model, config, token_batches(2), show_progress=False, device="cpu", reconstruct_epochs=2)
    for name, weight in linear_weights(model).items():
        if name.startswith("model.layers.1."):
            assert torch.equal(weight, linear_weights(dense)[name]), name
        else:
            assert is_nm_sparse(weight), name
    assert model.config.sparsity_config["block_reconstruction"]["epochs"] == 2


@pytest.mark.parametrize(
    "epochs, lr", [(np.int64(2), np.float32(1e-3)), (np.int32(2), 1), (2, np.float64(1e-3))]
)
def test_numpy_integers_and_reals_are_accepted_and_recorded_as_plain_numbers(epochs, lr):
    model = llama(1)
    prune_24(
        model,
        SparsityConfig(method="wanda"),
        token_batches(2),
        show_progress=False,
        device="cpu",
        reconstruct_epochs=epochs,
        reconstruct_lr=lr,
    )
    record = model.config.sparsity_config["block_reconstruction"]
    assert (record["epochs"], record["lr"]) == (2, float(lr))
    assert type(record["epochs"]) is int and type(record["lr"]) is float
    json.loads(model.config.to_json_string())  # config.json can hold it
    _, stats = pruned(llama(1), "wanda", reconstruct_epochs=epochs, reconstruct_lr=lr)
    assert type(stats["reconstruct_epochs"]) is int and type(stats["reconstruct_lr"]) is float
    assert (stats["reconstruct_epochs"], stats["reconstruct_lr"]) == (2, float(lr))


def lora(model, **options):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **options))


@pytest.mark.parametrize("epochs", [0, 2])
def test_a_peft_wrapped_model_is_pruned_block_by_block_as_its_base_model(epochs):
    dense = llama(2).eval()
    plain, plain_stats = pruned(dense, reconstruct_epochs=epochs, reconstruct_lr=1e-3)
    wrapped = lora(copy.deepcopy(dense)).eval()
    adapters = {n: p.detach().clone() for n, p in wrapped.named_parameters() if "lora_" in n}
    targets, _ = select_targets(wrapped, SparsityConfig(method="sparsegpt"))
    stats = calibrated_prune_(
        wrapped,
        targets,
        "sparsegpt",
        token_batches(4),
        show_progress=False,
        device="cpu",
        reconstruct_epochs=epochs,
        reconstruct_lr=1e-3,
    )
    assert stats["pipeline"] == "sequential" and stats["blocks"] == 2 and stats["fallback_targets"] == []
    if epochs:
        assert [r["block"] for r in stats["reconstruction"]] == ["model.layers.0", "model.layers.1"]
        assert stats["blocks_tuned"] == plain_stats["blocks_tuned"] == 2
    # the LoRA adapters start at B = 0: the wrapped model computes, and is pruned and tuned, as the plain one
    base = linear_weights(wrapped.get_base_model())
    for name, weight in linear_weights(plain).items():
        assert torch.equal(base[name], weight), name
    for name, value in wrapped.named_parameters():
        if "lora_" in name:
            assert torch.equal(value, adapters[name]), name  # adapters are never targets


def block_outputs(model, block, batches) -> list[torch.Tensor]:
    """`block`'s output hidden states on each batch, running the whole `model`."""
    outputs = []
    hook = block.register_forward_hook(
        lambda mod, args, out: outputs.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    hook.remove()
    return outputs


def spy_on_teachers(monkeypatch) -> list[list[torch.Tensor]]:
    """The dense block outputs (`wanted`) each reconstruction is given, block by block, as the pipeline runs."""
    teachers = []
    reconstruct_block_ = sequential.reconstruct_block_

    def spy(block, targets, run, wanted, *rest):
        teachers.append([w.clone() for w in wanted])
        return reconstruct_block_(block, targets, run, wanted, *rest)

    monkeypatch.setattr(sequential, "reconstruct_block_", spy)
    return teachers


def test_a_peft_models_adapters_run_in_the_reconstruction_teacher(monkeypatch):
    dense = lora(llama(2), init_lora_weights=False).eval()  # random B: the adapters change every output
    batches = token_batches(2)
    block0 = dense.get_base_model().model.layers[0]
    wrapped_outputs = block_outputs(dense, block0, batches)
    with dense.disable_adapter():
        base_outputs = block_outputs(dense, block0, batches)
    teachers = spy_on_teachers(monkeypatch)
    _, stats = pruned(dense, "wanda", batches, reconstruct_epochs=1)
    assert stats["pipeline"] == "sequential"
    for got, wanted, base in zip(teachers[0], wrapped_outputs, base_outputs, strict=True):
        torch.testing.assert_close(got, wanted)  # block 0 with its adapters, on the dense model's inputs
        assert not torch.allclose(got, base)  # not the base model's block without them


def test_a_peft_prompt_learning_model_is_pruned_whole_model_and_refused_for_reconstruction():
    peft = pytest.importorskip("peft")
    config = peft.PrefixTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=4)
    wrapped = peft.get_peft_model(llama(2), config)
    model, stats = pruned(wrapped, "wanda", token_batches(2))
    assert stats["pipeline"] == "per_block"  # its prefix reaches the blocks as a KV cache
    assert all(is_nm_sparse(w) for w in linear_weights(model.get_base_model()).values())
    assert_refused_unchanged(
        peft.get_peft_model(llama(2), config),
        ValueError,
        "prompt-learning adapter",
        SparsityConfig(method="wanda"),
        token_batches(2),
        reconstruct_epochs=1,
    )


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_a_target_in_peft_modules_to_save_is_refused_before_any_change(method):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["gate_proj"])
    wrapped = peft.get_peft_model(llama(1), config)
    assert_refused_unchanged(
        wrapped,
        ValueError,
        "gate_proj.*modules_to_save",
        SparsityConfig(method=method),
        None if method == "magnitude" else token_batches(2),
    )


def opt_with_projections(layers=2):
    """A tiny OPT whose embeddings are narrower than its blocks: `project_in` runs before the decoder layers,
    `project_out` after them (though it is registered before them)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        word_embed_proj_dim=32,
        ffn_dim=128,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return OPTForCausalLM(cfg).eval()


def test_the_first_blocks_teacher_is_the_dense_model_when_a_target_runs_before_the_blocks(monkeypatch):
    dense = opt_with_projections()
    batches = token_batches(2)
    dense_outputs = block_outputs(dense, dense.model.decoder.layers[0], batches)
    teachers = spy_on_teachers(monkeypatch)
    model, stats = pruned(dense, "wanda", batches, reconstruct_epochs=1)

    assert len(teachers) == 2
    for got, wanted in zip(teachers[0], dense_outputs, strict=True):
        torch.testing.assert_close(got, wanted)  # the dense block 0 on the dense model's inputs
    # project_in was pruned before the blocks (so the student's inputs are pruned), project_out after them
    project_in = model.model.decoder.project_in.weight
    assert is_nm_sparse(project_in) and not torch.equal(project_in, dense.model.decoder.project_in.weight)
    assert sorted(stats["fallback_targets"]) == ["model.decoder.project_in", "model.decoder.project_out"]
    assert is_nm_sparse(model.model.decoder.project_out.weight)


@pytest.mark.parametrize("epochs", [0, 2])
def test_the_progress_bar_names_the_reconstruction_and_shows_each_blocks_errors(epochs, capsys):
    _, stats = pruned(llama(2), "wanda", show_progress=True, reconstruct_epochs=epochs, reconstruct_lr=1e-3)
    shown = capsys.readouterr().err
    assert "wanda 2:4 pruning" in shown
    if not epochs:
        assert "reconstruction" not in shown and "recon " not in shown
        return
    assert "wanda 2:4 pruning + reconstruction" in shown
    for block in stats["reconstruction"]:
        assert f"recon {block['error_before']:.3g}->{block['error_after']:.3g}" in shown, shown
