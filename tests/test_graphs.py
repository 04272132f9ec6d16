"""CPU-side behaviour of CUDAGraphedModel; capture and replay are checked by tests/gpu/check_kernels_gpu.py."""

import pytest
import torch

from hf_semisparse.kernels import CUDAGraphedModel
from hf_semisparse.kernels.graphs import input_signature, without_unpadded_attention_mask
from tests.conftest import make_model


def test_signature_tells_apart_what_a_graph_depends_on():
    ids = torch.zeros(2, 8, dtype=torch.long)
    same = input_signature((), {"input_ids": torch.ones(2, 8, dtype=torch.long)})
    assert input_signature((), {"input_ids": ids}) == same  # values of tensors do not matter
    others = [
        input_signature((), {"input_ids": torch.zeros(4, 8, dtype=torch.long)}),  # shape
        input_signature((), {"input_ids": ids.int()}),  # dtype
        input_signature((), {"input_ids": torch.zeros(8, 2, dtype=torch.long).t()}),  # strides
        input_signature((ids,), {}),  # positional instead of keyword
        input_signature((), {"input_ids": ids, "attention_mask": ids}),  # another argument
        input_signature((), {"input_ids": ids, "output_hidden_states": True}),  # a constant
    ]
    assert len({same, *others}) == len(others) + 1
    assert input_signature((), {"input_ids": ids, "labels": [1, 2]}) is not None  # lists are flattened
    assert input_signature((), {"input_ids": ids, "extra": {1, 2}}) is None  # a set is neither


def test_a_cpu_model_runs_eagerly_and_says_so_once(caplog):
    model = make_model("bert").eval()
    wrapped = CUDAGraphedModel(model)
    ids = torch.randint(1, 100, (2, 8))
    with caplog.at_level("WARNING", logger="hf_semisparse"):
        out = wrapped(input_ids=ids)
        wrapped(input_ids=ids)
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
    assert torch.equal(out.logits, expected)
    assert caplog.text.count("runs eagerly") == 1 and "CUDA" in caplog.text
    assert wrapped.captures == 0
    assert wrapped.config is model.config  # the wrapped model's attributes stay reachable


def test_bad_settings():
    with pytest.raises(ValueError, match="max_graphs"):
        CUDAGraphedModel(make_model("bert"), max_graphs=0)


def test_only_an_unpadded_2d_attention_mask_is_dropped():
    ids = torch.ones(2, 8, dtype=torch.long)
    padded = torch.ones(2, 8, dtype=torch.long)
    padded[1, 6:] = 0
    kept = {"input_ids": ids, "attention_mask": padded}
    assert without_unpadded_attention_mask(kept) is kept
    four_d = {"input_ids": ids, "attention_mask": torch.ones(2, 1, 8, 8, dtype=torch.bool)}
    assert without_unpadded_attention_mask(four_d) is four_d
    dropped = without_unpadded_attention_mask({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert list(dropped) == ["input_ids"]
    # what transformers computes either way: an all-ones padding mask is no mask
    model = make_model("bert").eval()
    with torch.inference_mode():
        with_mask = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert torch.equal(model(**dropped).logits, with_mask)
