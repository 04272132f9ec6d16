"""`SemiSparseLinear`'s host-side behaviour and the fused residual add of BERT-style blocks, on the CPU.

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
from hf_semisparse.kernels import FusedResidualOutput, fuse_residual_adds
from hf_semisparse.kernels.linear import SemiSparseLinear
from hf_semisparse.kernels.residual import is_bert_style_output


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
