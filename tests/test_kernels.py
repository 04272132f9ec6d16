"""CPU-side behaviour of the inference backend; the GPU paths are checked by tests/gpu/check_kernels_gpu.py."""

import json

import torch

from hf_semisparse import prune_24
from hf_semisparse.kernels import accelerate_24, why_not_accelerated
from hf_semisparse.kernels.cusparselt import AlgConfig
from hf_semisparse.kernels.tuning import Decision, ShapeKey, TuningCache, choose
from tests.conftest import make_model


def test_cpu_model_is_left_unchanged_and_told_why(caplog, monkeypatch):
    import hf_semisparse.kernels as kernels

    monkeypatch.setattr(kernels, "_SAID", set())  # other tests may have said it already in this process
    model = make_model("bert")
    prune_24(model)
    before = {n: type(m) for n, m in model.named_modules()}
    with caplog.at_level("WARNING", logger="hf_semisparse"):
        report = accelerate_24(model)
        accelerate_24(model)
    assert not report.ok and "CUDA GPU" in report.reason
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert caplog.text.count("not accelerated") == 1  # said once, not per call
    assert "not accelerated" in str(report)


def test_why_not_accelerated_on_cpu():
    assert "cpu" in why_not_accelerated(torch.device("cpu"), torch.float16)


def test_dispatch_rule():
    assert choose(80.0, 100.0, margin=0.03)[0]
    assert not choose(99.0, 100.0, margin=0.03)[0]  # within noise: keep dense
    assert not choose(120.0, 100.0, margin=0.0)[0]
    assert choose(500.0, None, margin=0.03)[0]  # no dense weight kept: always sparse


def test_tuning_cache_round_trip(tmp_path):
    path = tmp_path / "cache" / "t.json"
    key = ShapeKey("NVIDIA H100 80GB HBM3", 800, 3072, 768, 24576, "float16", True, False)
    decision = Decision(True, AlgConfig(3, 2, 1, 1), 150.0, 200.0, "sparse faster")
    cache = TuningCache(str(path))
    cache.put(key, decision)
    reloaded = TuningCache(str(path))
    assert reloaded.get(key) == decision
    assert reloaded.get(ShapeKey("other", 800, 3072, 768, 24576, "float16", True, False)) is None
    # the epilogue-add decision of the same shape is a decision of its own
    assert (
        reloaded.get(ShapeKey("NVIDIA H100 80GB HBM3", 800, 3072, 768, 24576, "float16", True, False, True))
        is None
    )
    assert json.loads(path.read_text())["version"] == 1


def test_corrupt_tuning_cache_is_ignored(tmp_path, caplog):
    path = tmp_path / "t.json"
    path.write_text("{truncated")
    with caplog.at_level("WARNING", logger="hf_semisparse"):
        cache = TuningCache(str(path))
    assert len(cache) == 0 and "unreadable tuning cache" in caplog.text


def test_custom_op_has_a_fake_implementation_for_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    import hf_semisparse.kernels.linear  # noqa: F401 - registers the op

    with FakeTensorMode():
        x = torch.empty(3, 7, 64, dtype=torch.float16)
        y = torch.ops.hf_semisparse.linear_24(x, torch.empty(10, dtype=torch.uint8), None, None, 0, 128)
    assert y.shape == (3, 7, 128) and y.dtype == torch.float16
