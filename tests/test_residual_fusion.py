"""`SemiSparseLinear`'s host-side behaviour, the fused residual add of BERT-style blocks and their GELU handed to the
2:4 layer, on the CPU.

A `SemiSparseLinear` needs cuSPARSELt only to compress its weight; here a stand-in backend "compresses" by
copying, and every call takes the dense path that a CPU tensor takes. The 2:4 kernel with the residual in its
epilogue is checked against float64 on the GPU (tests/gpu/check_kernels_gpu.py, `fused_residual`).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

from hf_semisparse import compute_nm_mask, prune_24
from hf_semisparse.kernels import FusedGeluIntermediate, FusedResidualOutput, fuse_residual_adds
from hf_semisparse.kernels.linear import SemiSparseLinear
from hf_semisparse.kernels.residual import fuse_gelu, is_bert_style_output, is_exact_gelu


def _pruned_linear(n_in=16, n_out=8, bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(compute_nm_mask(lin.weight))
    return lin


def test_output_matches_nn_linear_with_and_without_residual(backend):
    lin = _pruned_linear()
    layer = SemiSparseLinear(lin)
    x, r = torch.randn(3, 5, 16), torch.randn(3, 5, 8)
    torch.testing.assert_close(layer(x), lin(x), rtol=0, atol=0)
    torch.testing.assert_close(layer(x, residual=r), lin(x) + r, rtol=0, atol=0)
    torch.testing.assert_close(layer.run(x, r), lin(x) + r, rtol=0, atol=0)


def test_new_weights_reach_the_call_path(backend):
    """The call path keeps plain references to weight and bias; replacing either must not leave it stale."""
    layer = SemiSparseLinear(_pruned_linear())
    x = torch.randn(4, 16)
    other = _pruned_linear(bias=True)
    with torch.no_grad():
        other.weight.mul_(3.0)
        other.bias.add_(1.0)
    layer._fast[(0, 4 * 16)] = None  # as if a token count had been decided on a GPU
    layer.weight = nn.Parameter(other.weight.detach().clone(), requires_grad=False)
    assert layer._fast  # a new weight keeps the plans (they hold no weight address)
    layer.bias = nn.Parameter(other.bias.detach().clone(), requires_grad=False)
    assert not layer._fast  # plans hold the fused bias's address: rebuilt for a new bias
    torch.testing.assert_close(layer(x), other(x))


def test_load_state_dict_refreshes_weights_and_compresses_them_again(backend):
    layer = SemiSparseLinear(_pruned_linear())
    other = _pruned_linear()
    with torch.no_grad():
        other.weight.mul_(-2.0)
    x = torch.randn(4, 16)
    for assign in (False, True):
        backend.compressed.clear()
        layer.load_state_dict(other.state_dict(), assign=assign)
        torch.testing.assert_close(layer(x), other(x))
        assert len(backend.compressed) == 1 and torch.equal(backend.compressed[0], other.weight)
        assert torch.equal(layer.compressed, other.weight)  # the stand-in's "compressed" copy


def test_overriding_the_epilogue_choice_needs_a_call_first(backend):
    layer = SemiSparseLinear(_pruned_linear())
    assert layer.adds_residual_in_epilogue(4) is None  # nothing decided yet
    with pytest.raises(KeyError, match="no call with a residual for 4 tokens"):
        layer.set_residual_epilogue(4, True)


def test_load_state_dict_refuses_a_weight_that_is_not_2_4(backend):
    layer = SemiSparseLinear(_pruned_linear())
    state = {"weight": torch.ones(8, 16), "bias": torch.zeros(8)}
    with pytest.raises(ValueError, match="not 2:4"):
        layer.load_state_dict(state)


def _tiny(cls=BertModel, config_cls=BertConfig):
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    model = cls(config)
    prune_24(model, show_progress=False)
    return model


def _swap_output_denses(model):
    for name, module in list(model.named_modules()):
        if name.endswith("output") and isinstance(getattr(module, "dense", None), nn.Linear):
            module.dense = SemiSparseLinear(module.dense)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_bert_style_blocks_are_fused_and_compute_the_same(backend, family):
    cls, config_cls = (BertModel, BertConfig) if family == "bert" else (RobertaModel, RobertaConfig)
    reference = _tiny(cls, config_cls).eval()
    model = _tiny(cls, config_cls).eval()
    _swap_output_denses(model)
    keys = set(model.state_dict())
    fused = fuse_residual_adds(model)
    # two blocks per layer: attention output and feed-forward output
    assert sorted(fused) == sorted(
        f"encoder.layer.{i}.{part}" for i in range(2) for part in ("attention.output", "output")
    )
    assert all(isinstance(model.get_submodule(name), FusedResidualOutput) for name in fused)
    assert set(model.state_dict()) == keys
    ids = torch.randint(0, 100, (2, 7))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).last_hidden_state, reference(ids).last_hidden_state)


def test_an_eval_model_hands_the_residual_to_the_gemm(backend, monkeypatch):
    """Fused after `.eval()` (the usual order: load, eval, accelerate), the blocks pass the residual to the
    dense layer, so the 2:4 kernel can add it; in training mode they do not."""
    model = _tiny().eval()
    _swap_output_denses(model)
    fuse_residual_adds(model)
    residuals = []
    forward = SemiSparseLinear.forward

    def spy(self, x, residual=None):
        residuals.append(residual is not None)
        return forward(self, x, residual)

    monkeypatch.setattr(SemiSparseLinear, "forward", spy)
    ids = torch.randint(0, 100, (2, 7))
    model(ids)
    assert residuals == [True] * 4
    residuals.clear()
    model.train()(ids)
    assert residuals == [False] * 4


def test_training_mode_keeps_dropout_before_the_add(backend):
    reference = _tiny().train()
    model = _tiny().train()
    _swap_output_denses(model)
    fuse_residual_adds(model)
    ids = torch.randint(0, 100, (2, 7))
    torch.manual_seed(1)
    expected = reference(ids).last_hidden_state
    torch.manual_seed(1)
    torch.testing.assert_close(model(ids).last_hidden_state, expected)


def test_blocks_that_are_not_bert_style_are_left_alone(backend):
    model = _tiny().eval()
    # a plain nn.Linear dense: nothing to fuse into
    assert fuse_residual_adds(model) == []

    _swap_output_denses(model)
    block = model.encoder.layer[0].output

    class Scaled(type(block)):
        def forward(self, hidden_states, input_tensor):  # not BERT's code: must not be fused
            return self.LayerNorm(self.dense(hidden_states) + 2 * input_tensor)

    block.__class__ = Scaled
    assert not is_bert_style_output(block)
    fused = fuse_residual_adds(model)
    assert "encoder.layer.0.output" not in fused and "encoder.layer.1.output" in fused
    assert isinstance(model.encoder.layer[0].output, Scaled)


def test_gelu_argument_applies_exact_gelu_after_the_gemm(backend):
    lin = _pruned_linear()
    layer = SemiSparseLinear(lin)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x, gelu=True), torch.nn.functional.gelu(lin(x)), rtol=0, atol=0)
    torch.testing.assert_close(layer.run(x, gelu=True), torch.nn.functional.gelu(lin(x)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not both"):
        layer.run(x, residual=torch.randn(3, 5, 8), gelu=True)
    layer._fast[(-1, 15 * 16)] = (
        None  # the dense-dispatched fast path must refuse it too, not drop the residual
    )
    with pytest.raises(ValueError, match="not both"):
        layer(x, residual=torch.randn(3, 5, 8), gelu=True)
    assert layer.applies_gelu_in_epilogue(15) is None  # nothing ran on a GPU


def _swap_intermediate_denses(model):
    for module in model.modules():
        if type(module).__name__ == "BertIntermediate":
            module.dense = SemiSparseLinear(module.dense)


def test_bert_intermediate_blocks_hand_their_gelu_to_the_layer(backend, monkeypatch):
    reference = _tiny().eval()
    model = _tiny().eval()
    assert fuse_gelu(model) == []  # plain nn.Linear: nothing to hand the GELU to
    _swap_intermediate_denses(model)
    keys = set(model.state_dict())
    fused = fuse_gelu(model)
    assert fused == [f"encoder.layer.{i}.intermediate" for i in range(2)]
    assert all(isinstance(model.get_submodule(name), FusedGeluIntermediate) for name in fused)
    assert set(model.state_dict()) == keys
    calls = []
    forward = SemiSparseLinear.forward

    def spy(self, x, residual=None, gelu=False):
        calls.append(gelu)
        return forward(self, x, residual, gelu)

    monkeypatch.setattr(SemiSparseLinear, "forward", spy)
    ids = torch.randint(0, 100, (2, 7))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).last_hidden_state, reference(ids).last_hidden_state)
    assert calls == [True, True]


@pytest.mark.parametrize("act", ["gelu_new", "relu", "python_gelu", "patched"])
def test_intermediates_without_exact_gelu_are_left_alone(backend, act):
    from transformers.activations import ACT2FN, GELUActivation

    model = _tiny().eval()
    _swap_intermediate_denses(model)
    block = model.encoder.layer[0].intermediate
    if act == "python_gelu":
        block.intermediate_act_fn = GELUActivation(use_gelu_python=True)  # same function, other code: kept
    elif act == "patched":
        block.intermediate_act_fn = GELUActivation()
        block.intermediate_act_fn.forward = lambda x: 2 * x
    else:
        block.intermediate_act_fn = ACT2FN[act]
    assert not is_exact_gelu(block.intermediate_act_fn)
    assert fuse_gelu(model) == ["encoder.layer.1.intermediate"]
    assert model.encoder.layer[0].intermediate is block


def test_a_shape_that_ties_alone_runs_sparse_when_its_epilogue_saves_the_add():
    from hf_semisparse.kernels.linear import fused_beats_dense_with_add
    from hf_semisparse.kernels.tuning import AlgConfig, Decision

    # the plain 2:4 GEMM loses by a hair (56 against 55 us); the add costs 29 us after it, 65 us in the epilogue
    plain = Decision(False, AlgConfig(), 56.0, 55.0, "dense")
    fused = Decision(True, AlgConfig(), 65.0, 85.0, "epilogue")
    assert fused_beats_dense_with_add(plain, fused, margin=0.03)  # 65 < (55 + 29) * 0.97
    slow_epilogue = Decision(True, AlgConfig(), 83.0, 85.0, "epilogue")
    assert not fused_beats_dense_with_add(plain, slow_epilogue, margin=0.03)  # 83 > 81.5
    assert not fused_beats_dense_with_add(plain, None, margin=0.03)
    assert not fused_beats_dense_with_add(plain, Decision(False, AlgConfig(), 90.0, 85.0, "add"), margin=0.03)
    no_dense = Decision(True, AlgConfig(), 56.0, None, "no dense weight")
    assert not fused_beats_dense_with_add(no_dense, fused, margin=0.03)


def test_fusion_targets_name_the_layers_an_epilogue_would_take():
    from hf_semisparse.kernels.residual import fusion_targets

    model = _tiny().eval()
    outputs = {f"encoder.layer.{i}.{part}.dense" for i in range(2) for part in ("attention.output", "output")}
    intermediates = {f"encoder.layer.{i}.intermediate.dense" for i in range(2)}
    assert fusion_targets(model) == outputs | intermediates
    assert fusion_targets(model, gelu=False) == outputs
    assert fusion_targets(model, residual=False) == intermediates
    from transformers.activations import ACT2FN

    model.encoder.layer[1].intermediate.intermediate_act_fn = ACT2FN["gelu_new"]  # tanh: no GELU epilogue
    assert fusion_targets(model, residual=False) == {"encoder.layer.0.intermediate.dense"}
