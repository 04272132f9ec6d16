"""The block-by-block calibration pipeline: work per block, agreement with the per-block-forward pipeline,
validation before any write, accelerate offload, encoder-decoder calibration inputs."""

import copy

import pytest
import torch

from hf_semisparse import SparsityConfig, is_nm_sparse, prune_24, select_targets
from hf_semisparse.pruning.calibrated import calibrated_prune_
from hf_semisparse.pruning.sequential import find_block_list
from tests.conftest import VOCAB, assert_same_pruning, load_disk_offloaded, make_model


def llama(layers, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg)


def assert_refused_unchanged(model, error, match, config, data, **options):
    """`prune_24` raises `error` (message matching `match`) and leaves every tensor of `model` as it was, where it
    was (on the CPU)."""
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        prune_24(model, config, data, show_progress=False, **options)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.device.type == "cpu" for p in model.parameters())


def token_batches(n_batches=3, batch=2, seq=16, seed=0, attention_mask=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
        b = {"input_ids": ids}
        if attention_mask:
            b["attention_mask"] = torch.ones_like(ids)
        out.append(b)
    return out


def blocks_of(model):
    targets, _ = select_targets(model, SparsityConfig())
    return find_block_list(model, targets)[1]


def count_block_calls(model):
    calls = [0] * len(blocks_of(model))
    for i, block in enumerate(blocks_of(model)):
        block.register_forward_hook(lambda mod, args, out, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("layers", [2, 4])
def test_each_block_runs_twice_per_batch_whatever_the_depth(method, layers):
    model = llama(layers)
    calls = count_block_calls(model)
    batches = token_batches()
    prune_24(
        model, SparsityConfig(method=method), calibration_data=batches, show_progress=False, device="cpu"
    )
    # one pass to collect statistics and one pass of the pruned block to make the next block's inputs
    assert calls == [2 * len(batches)] * layers


def test_true_sequential_adds_one_pass_per_sub_layer_stage():
    model = llama(3)
    calls = count_block_calls(model)
    batches = token_batches()
    prune_24(
        model,
        SparsityConfig(method="sparsegpt"),
        calibration_data=batches,
        show_progress=False,
        true_sequential=True,
    )
    assert calls == [3 * len(batches)] * 3  # attention, then MLP, then the pruned outputs


def test_per_block_pipeline_runs_the_whole_model_per_block():
    """The old pipeline (kept for comparison) costs L model forwards: the reason for the new one."""
    model = llama(3)
    calls = count_block_calls(model)
    batches = token_batches()
    prune_24(
        model,
        SparsityConfig(method="wanda"),
        calibration_data=batches,
        show_progress=False,
        pipeline="per_block",
    )
    assert calls == [3 * len(batches)] * 3


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sequential_equals_per_block_forward(arch, method):
    base = make_model(arch)
    batches = token_batches(attention_mask=arch != "gpt2")
    results = {}
    for pipeline in ("per_block", "sequential"):
        model = copy.deepcopy(base)
        prune_24(
            model,
            SparsityConfig(method=method),
            calibration_data=batches,
            show_progress=False,
            pipeline=pipeline,
        )
        results[pipeline] = model
    targets = select_targets(base, SparsityConfig())[0]
    per_block = dict(results["per_block"].named_parameters())
    sequential = dict(results["sequential"].named_parameters())
    assert targets
    for t in targets:
        a, b = per_block[f"{t.name}.weight"], sequential[f"{t.name}.weight"]
        assert torch.equal(a != 0, b != 0), t.name  # same masks
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert is_nm_sparse(b if arch != "gpt2" else b.t())


def test_targets_outside_the_block_list_are_pruned_too():
    model = make_model("bert")
    config = SparsityConfig(method="wanda", exclude_modules=["classifier"])
    report = prune_24(model, config, calibration_data=token_batches(), show_progress=False)
    assert "bert.pooler.dense" in report.targets
    assert is_nm_sparse(model.bert.pooler.dense.weight)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pipeline", ["sequential", "per_block"])
def test_nan_weight_is_refused_before_any_write_and_named(method, pipeline):
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight holds 1 NaN"):
        prune_24(
            model,
            SparsityConfig(method=method),
            calibration_data=token_batches(),
            show_progress=False,
            pipeline=pipeline,
        )
    for key, value in model.state_dict().items():
        assert torch.equal(value.nan_to_num(), before[key].nan_to_num()), key
    assert int(torch.isnan(model.model.layers[1].mlp.up_proj.weight).sum()) == 1


def test_magnitude_names_the_layer_with_a_nan_or_inf_weight():
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight holds 1 NaN or infinite"
    ):
        prune_24(model, SparsityConfig())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_overflowing_activations_name_the_layer_and_restore_the_block():
    model = make_model("llama")
    with torch.no_grad():  # layer 0's MLP overflows to inf, as an fp16 model can
        model.model.layers[0].mlp.up_proj.weight.mul_(1e36)
        model.model.layers[0].mlp.gate_proj.weight.mul_(1e36)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj: .*NaN or infinite.*bfloat16"):
        prune_24(
            model, SparsityConfig(method="sparsegpt"), calibration_data=token_batches(), show_progress=False
        )
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_an_error_in_a_later_stage_restores_the_whole_block():
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1e36)
        model.model.layers[0].mlp.gate_proj.weight.mul_(1e36)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj"):
        prune_24(
            model,
            SparsityConfig(method="sparsegpt"),
            calibration_data=token_batches(),
            show_progress=False,
            true_sequential=True,  # the attention stage is written before the MLP stage fails
        )
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_activations_kept_on_cpu_give_the_same_result():
    base = make_model("llama")
    out = []
    for offload in (False, True):
        model = copy.deepcopy(base)
        prune_24(
            model,
            SparsityConfig(method="sparsegpt"),
            calibration_data=token_batches(),
            show_progress=False,
            offload_activations=offload,
        )
        out.append(model.state_dict())
    for key in out[0]:
        assert torch.equal(out[0][key], out[1][key]), key


def test_model_offloaded_to_disk_by_accelerate(tmp_path):

    base = llama(3)
    base.save_pretrained(tmp_path / "dense")
    batches = token_batches()
    reference = copy.deepcopy(base)
    prune_24(reference, SparsityConfig(method="sparsegpt"), calibration_data=batches, show_progress=False)

    offloaded = load_disk_offloaded(tmp_path / "dense", 3, tmp_path / "offload")
    assert offloaded.model.layers[2].mlp.down_proj.weight.device.type == "meta"
    files_before = {p.name: p.read_bytes() for p in (tmp_path / "dense").iterdir() if p.is_file()}
    prune_24(offloaded, SparsityConfig(method="sparsegpt"), calibration_data=batches, show_progress=False)

    from hf_semisparse.pruning.offload import read_weight

    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers"):
            got = read_weight(dict(offloaded.named_modules())[name], torch.device("cpu"))
            torch.testing.assert_close(got, module.weight, rtol=1e-4, atol=1e-5, msg=name)
            assert is_nm_sparse(got), name
    with torch.no_grad():  # and the offloaded model runs with its pruned weights
        ids = batches[0]["input_ids"]
        torch.testing.assert_close(offloaded(ids).logits, reference(ids).logits, rtol=1e-3, atol=1e-4)
    # the user's checkpoint is never written
    assert files_before == {p.name: p.read_bytes() for p in (tmp_path / "dense").iterdir() if p.is_file()}


def test_encoder_decoder_falls_back_to_the_per_block_pipeline():
    model = make_model("t5")
    targets, _ = select_targets(model, SparsityConfig())
    assert find_block_list(model, targets) is None
    batches = [dict(b, decoder_input_ids=b["input_ids"]) for b in token_batches()]
    stats = calibrated_prune_(model, targets, "wanda", batches, show_progress=False)
    assert stats["pipeline"] == "per_block"
    assert all(is_nm_sparse(t.linear_view()) for t in targets)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sparsity_trainer_calibrates_an_encoder_decoder(tmp_path, method):
    """T5 needs decoder inputs; they are built from the batch's labels the way the model builds them."""
    from transformers import TrainingArguments

    from hf_semisparse import SparsityTrainer
    from tests.conftest import ToyDataset, training_args

    model = make_model("t5")
    trainer = SparsityTrainer(
        model=model,
        args=TrainingArguments(**training_args(tmp_path, max_steps=2)),
        train_dataset=ToyDataset("t5", n=16),
        sparsity_config=SparsityConfig(method=method, calibration_batches=2),
    )
    trainer.train()
    for t in select_targets(model, trainer.sparsity_config)[0]:
        assert is_nm_sparse(t.linear_view()), t.name


def test_calibration_inputs_keep_what_models_need():
    from hf_semisparse.training.callback import calibration_inputs

    t5 = make_model("t5")
    labels = torch.tensor([[5, 6, 7, -100]])
    batch = {"input_ids": torch.tensor([[4, 5, 6, 7]]), "labels": labels}
    out = calibration_inputs(batch, t5)
    assert "labels" not in out
    assert torch.equal(out["decoder_input_ids"], t5.prepare_decoder_input_ids_from_labels(labels=labels))
    assert "labels" not in calibration_inputs(batch, make_model("llama"))  # decoders need no labels


def test_prune_24_passes_its_named_calibration_options_and_refuses_them_for_magnitude(monkeypatch):
    from hf_semisparse.pruning import sparsifier

    seen = {}

    def fake_calibrated_prune_(model, targets, method, batches, n, m, show_progress=True, **options):
        seen.update(options)
        return {}

    import inspect

    named = (
        "device",
        "true_sequential",
        "offload_activations",
        "pipeline",
        "blocksize",
        "damp",
        "fp8_rounding",
        "reconstruct_epochs",
        "reconstruct_lr",
    )
    parameters = inspect.signature(prune_24).parameters
    assert all(parameters[name].kind is inspect.Parameter.KEYWORD_ONLY for name in named)
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())  # no hidden **kwargs
    monkeypatch.setattr("hf_semisparse.pruning.calibrated.calibrated_prune_", fake_calibrated_prune_)
    model = llama(1)
    prune_24(
        model,
        SparsityConfig(method="sparsegpt"),
        token_batches(1),
        show_progress=False,
        device="cpu",
        damp=0.05,
        blocksize=64,
        true_sequential=True,
    )
    assert seen == {"device": "cpu", "damp": 0.05, "blocksize": 64, "true_sequential": True}

    fresh = llama(1)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(TypeError, match=r"\['damp'\] only apply to wanda/sparsegpt"):
        sparsifier.prune_24(fresh, damp=0.05)
    with pytest.raises(TypeError, match="nsamples"):  # a misspelt option is refused, not passed on
        sparsifier.prune_24(fresh, SparsityConfig(method="wanda"), token_batches(1), nsamples=1)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize(
    "option, error, match",
    [
        ({"pipeline": "fast"}, ValueError, "pipeline must be"),
        ({"blocksize": 0}, ValueError, "blocksize must be a positive multiple of m=4"),
        ({"blocksize": 130}, ValueError, "blocksize must be a positive multiple of m=4"),
        ({"damp": -0.1}, ValueError, "damp must be a finite number >= 0"),
        ({"damp": float("nan")}, ValueError, "damp must be a finite number >= 0"),
        ({"device": "meta"}, ValueError, "holds no data"),
        ({"device": "tpu9"}, ValueError, "is not a torch device"),
        ({"true_sequential": "no"}, TypeError, "true_sequential must be True or False"),
        ({"offload_activations": 1}, TypeError, "offload_activations must be"),
    ],
)
def test_bad_calibration_options_are_refused_before_any_change(option, error, match):
    config = SparsityConfig(method="sparsegpt")
    assert_refused_unchanged(llama(1), error, match, config, token_batches(1), **option)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no CUDA GPU exists")
def test_a_cuda_device_without_a_gpu_is_refused_before_any_change():
    config, data = SparsityConfig(method="wanda"), token_batches(1)
    assert_refused_unchanged(llama(1), ValueError, "no CUDA GPU is available", config, data, device="cuda")


@pytest.mark.parametrize(
    "data, error, match",
    [
        ([torch.ones(2, 8, dtype=torch.long)], TypeError, "calibration batch 0 is a Tensor"),
        ({"input_ids": torch.ones(2, 8, dtype=torch.long)}, TypeError, "got one dict"),
        ([{"input_ids": torch.ones(8, dtype=torch.long)}], ValueError, r"expected \[batch, seq\]"),
    ],
)
def test_calibration_data_in_the_wrong_form_is_refused_clearly(data, error, match):
    assert_refused_unchanged(llama(1), error, match, SparsityConfig(method="wanda"), data)


def pad_right(ids: torch.Tensor, pad: int) -> dict:
    """`ids` `[..., seq]` with `pad` padding tokens after each sequence, and the attention mask saying so."""
    zeros = torch.zeros(*ids.shape[:-1], pad, dtype=ids.dtype)
    return {
        "input_ids": torch.cat([ids, zeros], dim=-1),
        "attention_mask": torch.cat([torch.ones_like(ids), zeros], dim=-1),
    }


def eager_pair(make):
    """Two models from `make()` on eager attention: the same kernel with and without a padding mask."""
    pair = make(), make()
    for model in pair:
        model.config._attn_implementation = "eager"
    return pair


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pipeline", ["sequential", "per_block"])
def test_padding_tokens_do_not_count_in_the_calibration_statistics(method, pipeline):
    """A calibration batch padded with `attention_mask` 0 gives the masks and weights of the same batch unpadded:
    padding positions are left out of Wanda's norms and SparseGPT's Hessians."""
    plain, padded = eager_pair(lambda: llama(2))
    ids = token_batches(1, batch=2, seq=12)[0]["input_ids"]
    config, options = (
        SparsityConfig(method=method),
        dict(show_progress=False, pipeline=pipeline, device="cpu"),
    )
    prune_24(plain, config, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], **options)
    prune_24(padded, config, [pad_right(ids, 20)], **options)
    assert_same_pruning(plain, padded)


def test_a_tokenizer_output_is_a_calibration_batch():
    """Tokenizers return a BatchEncoding (a mapping, not a dict): accepted, and its attention mask is read (the
    padded batch prunes as the unpadded one)."""
    from transformers import BatchEncoding

    ids = token_batches(1, seq=12)[0]["input_ids"]
    a, b = eager_pair(lambda: llama(1))
    prune_24(a, SparsityConfig(method="wanda"), [BatchEncoding(pad_right(ids, 20))], show_progress=False)
    prune_24(b, SparsityConfig(method="wanda"), [{"input_ids": ids}], show_progress=False)
    assert_same_pruning(a, b, values=False)


def test_left_padding_prunes_as_the_unpadded_batch():
    ids = token_batches(1, seq=12)[0]["input_ids"]
    pad = torch.zeros(2, 20, dtype=ids.dtype)
    mask = torch.cat([torch.zeros_like(pad), torch.ones_like(ids)], dim=1)
    left = {
        "input_ids": torch.cat([pad, ids], dim=1),
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),  # the real tokens at positions 0..11, as unpadded
    }
    a, b = eager_pair(lambda: llama(2))
    prune_24(a, SparsityConfig(method="sparsegpt"), [left], show_progress=False)
    prune_24(b, SparsityConfig(method="sparsegpt"), [{"input_ids": ids}], show_progress=False)
    assert_same_pruning(a, b)


def test_multiple_choice_batches_calibrate_with_their_mask():
    """`[batch, choices, seq]` inputs (multiple choice): accepted, and their padding left out as well."""
    from transformers import BertConfig, BertForMultipleChoice

    config = BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128
    )

    def make():
        torch.manual_seed(0)
        return BertForMultipleChoice(config).eval()

    ids = torch.randint(3, VOCAB, (2, 3, 10), generator=torch.Generator().manual_seed(1))
    a, b = eager_pair(make)
    prune_24(a, SparsityConfig(method="wanda"), [pad_right(ids, 6)], show_progress=False)
    prune_24(b, SparsityConfig(method="wanda"), [{"input_ids": ids}], show_progress=False)
    assert_same_pruning(a, b, values=False)
