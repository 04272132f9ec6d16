"""Block-wise reconstruction after Wanda/SparseGPT (`reconstruct_epochs`): it lowers each block's error against the
dense model without touching the masks, keeps the one-shot weights where it does not, and refuses what it cannot
do before any change."""

import copy

import pytest
import torch

from hf_semisparse import SparsityConfig, is_nm_sparse, prune_24, select_targets
from hf_semisparse.pruning.calibrated import calibrated_prune_
from tests.conftest import load_disk_offloaded, make_model
from tests.test_moe import batches as moe_batches
from tests.test_moe import expert_params, make_moe
from tests.test_sequential_pruning import assert_refused_unchanged, llama, token_batches


def pruned(model, method="sparsegpt", batches=None, **options):
    """A pruned copy of `model` and the pipeline's stats."""
    model = copy.deepcopy(model)
    targets, _ = select_targets(model, SparsityConfig(method=method))
    stats = calibrated_prune_(
        model, targets, method, batches or token_batches(4), show_progress=False, device="cpu", **options
    )
    return model, stats


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

    assert len(stats["reconstruction"]) == 3
    for block in stats["reconstruction"]:
        assert block["applied"] and block["error_after"] < 0.9 * block["error_before"], block
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


def test_a_block_whose_error_rises_keeps_its_one_shot_weights():
    dense = llama(2).eval()
    one_shot, _ = pruned(dense)
    tuned, stats = pruned(
        dense, reconstruct_epochs=1, reconstruct_lr=1.0
    )  # far too large: every step overshoots
    assert [block["applied"] for block in stats["reconstruction"]] == [False, False]
    for block in stats["reconstruction"]:
        assert block["error_after"] == block["error_before"]
    for (name, a), b in zip(tuned.state_dict().items(), one_shot.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_diverging_reconstruction_restores_the_block_and_says_what_to_do():
    model = llama(2)
    config = SparsityConfig(method="sparsegpt")
    assert_refused_unchanged(
        model,
        ValueError,
        "model.layers.0: block reconstruction diverged.*lower reconstruct_lr",
        config,
        token_batches(2),
        reconstruct_epochs=2,
        reconstruct_lr=1e30,
        device="cpu",
    )


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


def test_prune_24_records_the_reconstruction_in_the_config():
    model = llama(1)
    prune_24(
        model,
        SparsityConfig(method="wanda"),
        token_batches(2),
        show_progress=False,
        device="cpu",
        reconstruct_epochs=3,
    )
    assert model.config.sparsity_config["block_reconstruction"] == {"epochs": 3, "lr": 3e-4}
    plain = llama(1)
    prune_24(plain, SparsityConfig(method="wanda"), token_batches(2), show_progress=False, device="cpu")
    assert "block_reconstruction" not in plain.config.sparsity_config


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
        ({"reconstruct_epochs": 2.0}, TypeError, "reconstruct_epochs must be an int"),
        ({"reconstruct_epochs": True}, TypeError, "reconstruct_epochs must be an int"),
        (
            {"reconstruct_epochs": 2, "reconstruct_lr": 0},
            ValueError,
            "reconstruct_lr must be a finite number > 0",
        ),
        ({"reconstruct_lr": float("nan")}, ValueError, "reconstruct_lr must be a finite number > 0"),
        ({"reconstruct_lr": "1e-3"}, ValueError, "reconstruct_lr must be a finite number > 0"),
        ({"reconstruct_epochs": 2, "pipeline": "per_block"}, ValueError, "needs pipeline='sequential'"),
        ({"reconstruct_epochs": 2, "fp8_rounding": True}, ValueError, "cannot be combined"),
    ],
)
def test_bad_reconstruction_options_are_refused_before_any_change(option, error, match):
    config = SparsityConfig(method="sparsegpt")
    assert_refused_unchanged(llama(1), error, match, config, token_batches(1), **option)


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
        t5, ValueError, "cannot be run so", SparsityConfig(method="wanda"), [batch], reconstruct_epochs=1
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
