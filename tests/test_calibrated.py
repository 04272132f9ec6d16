import json
import warnings

import pytest
import torch
from torch import nn
from transformers import TrainingArguments

from hf_semisparse import (
    SparsityConfig,
    SparsityTrainer,
    compute_nm_mask,
    is_nm_sparse,
    prune_24,
    select_targets,
)
from hf_semisparse.pruning.calibrated import _inverse_cholesky, calibrated_prune_, sparsegpt_nm
from hf_semisparse.targets import SparseTarget
from tests.conftest import ToyDataset, make_model, training_args


class OneLayer(nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.lin = nn.Linear(k, n, bias=False)

    def forward(self, x):
        return self.lin(x)


def reconstruction_errors(seed):
    g = torch.Generator().manual_seed(seed)
    k, n = 128, 64
    scales = torch.exp(torch.randn(k, generator=g))  # channels of very different size, as in real activations
    x = torch.randn(1024, k, generator=g) * scales
    base = OneLayer(k, n)
    with torch.no_grad():
        base.lin.weight.copy_(torch.randn(n, k, generator=g))
    reference = base(x).double()
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        layer = OneLayer(k, n)
        layer.load_state_dict(base.state_dict())
        if method == "magnitude":
            with torch.no_grad():
                layer.lin.weight.mul_(compute_nm_mask(layer.lin.weight))
        else:
            calibrated_prune_(
                layer,
                [SparseTarget("lin", layer.lin, False)],
                method,
                [{"x": x[:512]}, {"x": x[512:]}],
                show_progress=False,
            )
        assert is_nm_sparse(layer.lin.weight), method
        errors[method] = ((layer(x).double() - reference).norm() / reference.norm()).item()
    return errors


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_reconstruction_error_orders_sparsegpt_wanda_magnitude(seed):
    e = reconstruction_errors(seed)
    assert e["sparsegpt"] <= e["wanda"] <= e["magnitude"], e


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_one_shot_on_a_model_touches_only_targets(method):
    model = make_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = ToyDataset("bert", n=16)
    batches = [torch.utils.data.default_collate([data[i] for i in range(j, j + 8)]) for j in (0, 8)]
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    config = SparsityConfig(method=method)
    report = prune_24(model, config, calibration_data=batches, show_progress=False)
    targets = {f"{name}.weight" for name in report.targets}
    for t in select_targets(model, config)[0]:
        assert is_nm_sparse(t.linear_view()), t.name
    for key, value in model.state_dict().items():
        if key not in targets:
            assert torch.equal(value, before[key]), key
    assert model.training  # calibration ran in eval mode and put the mode back


def test_calibrated_methods_need_data_and_oneshot():
    with pytest.raises(ValueError, match="needs calibration_data"):
        prune_24(make_model("bert"), SparsityConfig(method="wanda"))
    with pytest.raises(ValueError, match="oneshot"):
        SparsityConfig(method="sparsegpt", schedule="gradual", end_step=10)


def test_sparsegpt_as_first_step_of_training(tmp_path):
    model = make_model("bert")
    args = TrainingArguments(**training_args(tmp_path, max_steps=12))
    trainer = SparsityTrainer(
        model=model,
        args=args,
        train_dataset=ToyDataset("bert"),
        sparsity_config=SparsityConfig(method="sparsegpt", calibration_batches=2),
    )
    trainer.train()
    for t in select_targets(model, trainer.sparsity_config)[0]:
        assert is_nm_sparse(t.linear_view()), t.name
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


def reference_inverse_cholesky(h, damp):
    """The reference's factor: Cholesky, explicit inverse, Cholesky of the inverse (float64)."""
    h64 = h.double() + damp * h.double().diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h64)), upper=True).float()


def reference_sparsegpt(weight, hessian, n=2, m=4, blocksize=128, damp=0.01):
    """The column loop of IST-DASLab/sparsegpt `fasterprune` (prunen=n, prunem=m), as first written here."""
    w = weight.clone().float()
    h = hessian.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h_inv = _inverse_cholesky(h, damp)
    for i1 in range(0, w.shape[1], blocksize):
        i2 = min(i1 + blocksize, w.shape[1])
        w1, q1, err1 = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2]), torch.zeros_like(w[:, i1:i2])
        hinv1 = h_inv[i1:i2, i1:i2]
        pruned = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if i % m == 0:
                cost = w1[:, i : i + m] ** 2 / torch.diag(hinv1)[i : i + m].reshape(1, -1) ** 2
                pruned[:, i : i + m].scatter_(1, torch.topk(cost, m - n, dim=1, largest=False).indices, True)
            col = w1[:, i]
            q = col.masked_fill(pruned[:, i], 0.0)
            q1[:, i] = q
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ h_inv[i1:i2, i2:]
    return w


@pytest.mark.parametrize("rows,cols,blocksize", [(48, 136, 32), (40, 256, 128), (24, 64, 64)])
def test_sparsegpt_solve_equals_the_reference_loop_bit_for_bit(rows, cols, blocksize):
    g = torch.Generator().manual_seed(rows + cols)
    x = torch.randn(4 * cols, cols, generator=g) * torch.exp(torch.randn(cols, generator=g))
    x[:, 5] = 0.0  # a dead input channel
    h = x.t() @ x / x.shape[0]
    weight = torch.randn(rows, cols, generator=g)
    weight[3, 8:12] = 0.5  # equal weights in one group
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # LAPACK/BLAS results may depend on the thread count; the solve runs on one
    try:
        expected = reference_sparsegpt(weight, h, blocksize=blocksize)
    finally:
        torch.set_num_threads(threads)
    got = sparsegpt_nm(weight, h, blocksize=blocksize)
    assert torch.equal(got, expected)
    assert is_nm_sparse(got)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("cols", [8, 96, 300])
def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse(cols):
    g = torch.Generator().manual_seed(cols)
    x = torch.randn(2 * cols, cols, generator=g) * torch.exp(torch.randn(cols, generator=g))
    h = x.t() @ x
    u = _inverse_cholesky(h, 0.01)
    assert torch.equal(u, u.triu())
    torch.testing.assert_close(
        u, reference_inverse_cholesky(h, 0.01), rtol=1e-6, atol=1e-7 * float(u.abs().max())
    )
    damped = h.double() + 0.01 * h.double().diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    identity = u.double().t() @ u.double() @ damped
    torch.testing.assert_close(identity, torch.eye(cols, dtype=torch.float64), rtol=0, atol=1e-4)


def test_sparsegpt_solves_on_one_cpu_thread_and_restores_the_count(monkeypatch):
    import hf_semisparse.pruning.calibrated as calibrated

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # so that one thread inside is a change this test can see
    seen = []
    real = calibrated._inverse_cholesky
    monkeypatch.setattr(
        calibrated,
        "_inverse_cholesky",
        lambda h, damp, tries=4: seen.append(torch.get_num_threads()) or real(h, damp),
    )
    try:
        w = torch.randn(8, 16)
        x = torch.randn(64, 16)
        calibrated.sparsegpt_nm(w, x.t() @ x / 64)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_sparsegpt_restores_the_thread_count_after_an_error():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # not already 1, or a restore that never happened would pass
    try:
        h = torch.eye(8)
        h[3, 3] = float("nan")
        with pytest.raises(torch.linalg.LinAlgError):
            sparsegpt_nm(torch.randn(4, 8), h)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_sparsegpt_raises_damping_for_an_indefinite_hessian(caplog):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g)  # fewer samples than columns: X^T X is singular
    h = x.t() @ x
    h -= 0.005 * h.diagonal().mean() * torch.eye(64)  # rounding noise made visible: now indefinite
    weight = torch.randn(32, 64, generator=g)
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(h + 0.001 * h.diagonal().mean() * torch.eye(64))
    with caplog.at_level("WARNING"):
        pruned = sparsegpt_nm(weight, h, damp=0.001)
    assert is_nm_sparse(pruned) and torch.isfinite(pruned).all()
    assert "needed damping" in caplog.text


def test_sparsegpt_unusable_hessian_is_a_clear_error():
    h = torch.eye(8)
    h[3, 3] = float("nan")
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite"):
        sparsegpt_nm(torch.randn(4, 8), h)


def test_recovery_after_a_calibrated_one_shot_records_where_the_masks_came_from(tmp_path):
    from hf_semisparse.hub import render_model_card

    model = make_model("bert")
    data = ToyDataset("bert")
    batches = [torch.utils.data.default_collate([data[i] for i in range(8)])]
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    prune_24(model, SparsityConfig(method="wanda"), calibration_data=batches, show_progress=False)
    zeros = {t.name: t.weight.detach() == 0 for t in select_targets(model, SparsityConfig())[0]}
    args = TrainingArguments(**training_args(tmp_path, max_steps=3))
    SparsityTrainer(model=model, args=args, train_dataset=data, sparsity_config=SparsityConfig()).train()
    record = model.config.sparsity_config
    assert record["method"] == "magnitude" and record["mask_source"] == "wanda"
    for t in select_targets(model, SparsityConfig())[0]:  # the recovery kept the one-shot zeros
        assert (t.weight.detach() == 0)[zeros[t.name]].all(), t.name
    assert "Method: wanda" in render_model_card(model, recovered=True)


def test_recovery_keeps_the_record_of_the_block_reconstruction_that_chose_the_masks(tmp_path):
    model = make_model("llama")
    data = ToyDataset("llama")
    batches = [{"input_ids": torch.stack([data[i]["input_ids"] for i in range(j, j + 4)])} for j in (0, 4, 8)]
    prune_24(
        model, SparsityConfig(method="sparsegpt"), calibration_data=batches, show_progress=False,
        reconstruct_epochs=1, reconstruct_lr=1e-4,
    )  # fmt: skip
    recorded = model.config.sparsity_config["block_reconstruction"]
    args = TrainingArguments(**training_args(tmp_path, max_steps=2))
    SparsityTrainer(model=model, args=args, train_dataset=data, sparsity_config=SparsityConfig()).train()
    record = model.config.sparsity_config
    assert record["mask_source"] == "sparsegpt" and record["block_reconstruction"] == recorded
    assert record["calibration_batches"] == 3  # the one-shot's, not the recovery config's 16
    dense = make_model("llama")  # magnitude pruning of a dense model inherits nothing
    dense.config.sparsity_config = {**record}
    SparsityTrainer(model=dense, args=args, train_dataset=data, sparsity_config=SparsityConfig()).train()
    assert "block_reconstruction" not in dense.config.sparsity_config


def test_magnitude_on_a_dense_model_records_no_mask_source():
    model = make_model("bert")
    model.config.sparsity_config = {"method": "wanda", "pattern": "2:4", "targets": []}  # stale, not 2:4
    prune_24(model)
    assert "mask_source" not in model.config.sparsity_config


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("outliers", [False, True])
def test_sparsegpt_fp8_rounding_puts_kept_weights_on_each_rows_e4m3_grid(seed, outliers):
    from hf_semisparse.kernels import cutlass_fp8

    g = torch.Generator().manual_seed(seed)
    scales = torch.ones(128)
    if outliers:  # a few input channels far larger than the rest, as LLM activations have
        scales[:8] = 20.0
    x = torch.randn(512, 128, generator=g) * scales
    w = torch.randn(32, 128, generator=g)
    hessian = x.t() @ x / 512
    out = sparsegpt_nm(w, hessian, fp8_rounding=True)
    assert is_nm_sparse(out)
    scale = cutlass_fp8.quantize_rows(sparsegpt_nm(w, hessian))[1]  # the grid of the unrounded result
    codes = out / scale[:, None]
    torch.testing.assert_close(codes, codes.to(torch.float8_e4m3fn).float(), rtol=1e-6, atol=0)
    # the grid fits the solved weights: about one weight per row at the top code, none pushed far past it (a
    # grid from the rows before pruning clipped thousands of weights of such layers)
    assert codes.abs().max() <= 448 * (1 + 1e-6)
    assert int((codes.abs() > 447).sum()) <= 2 * w.shape[0]
    # the FP8 kernels' quantiser re-derives each row's scale from the result: where the row's largest weight sits
    # at the top of the grid (most rows), it runs exactly the solved weights
    q, s = cutlass_fp8.quantize_weight(out)
    unchanged = torch.isclose(q.float() * s[:, None], out, rtol=1e-6, atol=0).all(dim=1).float().mean().item()
    assert unchanged > 0.5


def test_fp8_rounding_is_refused_outside_sparsegpt():
    layer = OneLayer(16, 8)
    target = [SparseTarget("lin", layer.lin, False)]
    batches = [{"x": torch.randn(8, 16)}]
    with pytest.raises(ValueError, match="fp8_rounding is part of SparseGPT"):
        calibrated_prune_(layer, target, "wanda", batches, fp8_rounding=True, show_progress=False)
    with pytest.raises(TypeError, match="fp8_rounding must be True or False"):
        calibrated_prune_(layer, target, "sparsegpt", batches, fp8_rounding=1, show_progress=False)
    with pytest.raises(TypeError, match="only apply to wanda/sparsegpt"):
        prune_24(make_model("bert"), SparsityConfig(), fp8_rounding=True)


@pytest.mark.parametrize("pipeline", ["sequential", "per_block"])
def test_prune_24_with_fp8_rounding_leaves_weights_on_the_fp8_grid(pipeline):
    model = make_model("bert")
    data = ToyDataset("bert", n=16)
    batches = [torch.utils.data.default_collate([data[i] for i in range(j, j + 8)]) for j in (0, 8)]
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    report = prune_24(
        model,
        SparsityConfig(method="sparsegpt"),
        calibration_data=batches,
        show_progress=False,
        fp8_rounding=True,
        pipeline=pipeline,
    )
    assert model.config.sparsity_config["fp8_rounding"] is True
    modules = dict(model.named_modules())
    for name in report.targets:
        w = modules[name].weight.detach().float()
        assert is_nm_sparse(w), name
        rows = w.abs().amax(dim=1) > 0
        scale = w[rows].abs().amax(dim=1, keepdim=True) / 448
        codes = w[rows] / scale  # on the grid of the final absmax where it sits at the top code (most rows)
        exact = torch.isclose(codes.to(torch.float8_e4m3fn).float(), codes, rtol=1e-6, atol=0)
        assert exact.all(dim=1).float().mean().item() > 0.5, name


def test_sparsegpt_warns_once_per_width_when_calibration_has_fewer_tokens_than_inputs():
    """bert's layers read 64 (attention, intermediate) or 128 (output) features: 2 x 16 tokens is below both,
    and a warning names each width; 6 x 16 tokens covers 64 but not 128; Wanda needs no such count."""
    data = ToyDataset("bert", n=8)
    batch = {
        k: v
        for k, v in torch.utils.data.default_collate([data[i] for i in range(8)]).items()
        if k != "labels"
    }
    few = {k: v[:2] for k, v in batch.items()}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")  # Python's own filter: each distinct message once per location
        prune_24(
            make_model("bert"),
            SparsityConfig(method="sparsegpt"),
            calibration_data=[few],
            show_progress=False,
        )
    shown = [str(w.message) for w in record if "rank-deficient" in str(w.message)]
    widths = sorted(m.split(" input features")[0].rsplit(" ", 1)[1] for m in shown)
    assert widths == ["128", "64"]  # one message per width, not one per layer
    six = {k: v[:6] for k, v in batch.items()}
    with pytest.warns(UserWarning, match="rank-deficient") as record:
        prune_24(
            make_model("bert"),
            SparsityConfig(method="sparsegpt"),
            calibration_data=[six],
            show_progress=False,
        )
    assert {str(w.message).split(" input features")[0].rsplit(" ", 1)[1] for w in record} == {"128"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune_24(
            make_model("bert"), SparsityConfig(method="wanda"), calibration_data=[few], show_progress=False
        )


@pytest.mark.parametrize("pipeline", ["sequential", "per_block"])
def test_prune_24_records_the_calibration_batches_it_used_not_the_configs(pipeline):
    model = make_model("llama")
    data = ToyDataset("llama")
    batches = (
        {"input_ids": torch.stack([data[i]["input_ids"] for i in range(j, j + 2)])} for j in range(0, 6, 2)
    )
    config = SparsityConfig(method="wanda", calibration_batches=16)
    report = prune_24(model, config, calibration_data=batches, show_progress=False, pipeline=pipeline)
    assert model.config.sparsity_config["calibration_batches"] == 3  # a generator of 3 batches, all used
    assert report.calibration["calibration_batches"] == 3


def test_the_trainer_path_records_the_calibration_batches_it_took(tmp_path):
    """SparsityTrainer calibrates on the first calibration_batches batches of its dataloader: 64 examples in
    batches of 8 give 8, however many the config asked for."""
    model = make_model("bert")
    args = TrainingArguments(**training_args(tmp_path, max_steps=1))
    config = SparsityConfig(method="wanda", calibration_batches=1000)
    SparsityTrainer(model=model, args=args, train_dataset=ToyDataset("bert"), sparsity_config=config).train()
    assert model.config.sparsity_config["calibration_batches"] == 8


def test_a_resumed_trainer_path_run_keeps_the_calibration_batches_its_checkpoint_records(tmp_path):
    """A resumed run does not calibrate again: its record is the checkpoint's (8 batches taken), not the config's."""
    config = SparsityConfig(method="wanda", calibration_batches=1000)

    def run(resume=None, max_steps=2):
        model = make_model("bert")
        args = TrainingArguments(
            **training_args(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=2)
        )
        trainer = SparsityTrainer(
            model=model, args=args, train_dataset=ToyDataset("bert"), sparsity_config=config
        )
        trainer.train(resume_from_checkpoint=resume)
        return model

    run()
    checkpoint = tmp_path / "checkpoint-2"
    assert json.loads((checkpoint / "config.json").read_text())["sparsity_config"]["calibration_batches"] == 8
    resumed = run(resume=str(checkpoint), max_steps=4)
    assert resumed.config.sparsity_config["calibration_batches"] == 8
    record = json.loads((checkpoint / "config.json").read_text())
    record["sparsity_config"].pop("calibration_batches")  # a checkpoint that says nothing: the config's count
    (checkpoint / "config.json").write_text(json.dumps(record))
    assert run(resume=str(checkpoint), max_steps=4).config.sparsity_config["calibration_batches"] == 1000
