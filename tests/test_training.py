import json
import logging
import os

import pytest
import torch
from safetensors import safe_open
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_semisparse import (
    NoTargetsError,
    Sparsifier,
    SparsityCallback,
    SparsityConfig,
    SparsityTrainer,
    SparsityTrainingArguments,
    is_nm_sparse,
    select_targets,
)
from hf_semisparse.pruning import MASKS_NAME
from hf_semisparse.quantizer_ops import ExpandOnLoadStateDict, end_checkpoint_load, held_halves
from tests.conftest import ARCHS, ToyDataset, assert_targets_24, make_model, training_args


def target_names(model, config=None):
    return [t.name for t in select_targets(model, config or SparsityConfig())[0]]


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_and_recover_every_architecture(arch, tmp_path):
    model = make_model(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    targets = target_names(model)
    trainer = SparsityTrainer(
        model=model, args=TrainingArguments(**training_args(tmp_path)), train_dataset=ToyDataset(arch)
    )
    trainer.train()

    assert_targets_24(model)
    history = losses(trainer)
    assert sum(history[-4:]) / 4 < sum(history[:4]) / 4, history
    logged = [h for h in trainer.state.log_history if "sparsity_zero_fraction" in h]
    assert logged and logged[-1]["sparsity_zero_fraction"] == pytest.approx(0.5)
    assert model.config.sparsity_config["targets"] == targets
    # non-target weights were trained but not masked: no 2:4 structure forced on them
    target_weights = {f"{n}.weight" for n in targets}
    for name, p in model.named_parameters():
        if name not in target_weights and p.dim() == 2 and p.shape[-1] % 4 == 0 and name in before:
            assert (p == 0).float().mean() < 0.25, name
    # no hooks left behind
    for t in select_targets(model, SparsityConfig())[0]:
        assert not t.weight._backward_hooks


def test_masking_touches_only_targets(tmp_path):
    model = make_model("bert")
    trainer = SparsityTrainer(
        model=model,
        args=TrainingArguments(**training_args(tmp_path, max_steps=1)),
        train_dataset=ToyDataset("bert"),
    )
    trainer.train()
    cb = trainer.sparsity_callback
    targets = {f"{n}.weight" for n in target_names(model)}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # every element non-zero again
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb.on_optimizer_step(trainer.args, trainer.state, trainer.control)
    for name, p in model.named_parameters():
        if name in targets:
            assert is_nm_sparse(p) and not torch.equal(p, snapshot[name])
        else:
            assert torch.equal(p, snapshot[name]), name


def test_gradients_of_pruned_weights_are_zero(tmp_path):
    model = make_model("bert")
    cb = SparsityCallback(SparsityConfig())  # in a plain Trainer: per-weight hooks
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**training_args(tmp_path, max_steps=1)),
        train_dataset=ToyDataset("bert"),
        callbacks=[cb],
    )
    cb.on_train_begin(trainer.args, trainer.state, trainer.control, model=model)
    batch = torch.utils.data.default_collate([ToyDataset("bert")[i] for i in range(4)])
    model(**batch).loss.backward()
    for t in cb.sparsifier.targets:
        assert (t.weight.grad[~cb.sparsifier.masks[t.name]] == 0).all()
        assert (t.weight.grad[cb.sparsifier.masks[t.name]] != 0).any()
    cb.on_train_end(trainer.args, trainer.state, trainer.control)


def test_drop_in_callback_in_plain_trainer(tmp_path):
    """An existing Trainer script, unchanged but for one callback."""
    model = make_model("gpt2")
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**training_args(tmp_path)),
        train_dataset=ToyDataset("gpt2"),
        callbacks=[SparsityCallback()],
    )
    trainer.train()
    assert_targets_24(model)
    assert losses(trainer)[-1] < losses(trainer)[0]
    assert any("sparsity_level" in h for h in trainer.state.log_history)


def test_training_arguments_subclass_carries_config(tmp_path):
    model = make_model("bert")
    cfg = SparsityConfig(target_modules=["query", "key"])
    args = SparsityTrainingArguments(**training_args(tmp_path, max_steps=4), sparsity_config=cfg.to_dict())
    trainer = SparsityTrainer(model=model, args=args, train_dataset=ToyDataset("bert"))
    trainer.train()
    assert trainer.sparsity_config == cfg
    assert_targets_24(model, cfg)
    value = model.bert.encoder.layer[0].attention.self.value.weight
    assert (value == 0).float().mean() < 0.1


def test_a_trainer_config_that_differs_from_the_arguments_one_is_said_to_win(tmp_path, caplog):
    args = SparsityTrainingArguments(
        **training_args(tmp_path, max_steps=1), sparsity_config=SparsityConfig(method="wanda").to_dict()
    )
    with caplog.at_level(logging.WARNING):
        trainer = SparsityTrainer(
            model=make_model("bert"),
            args=args,
            train_dataset=ToyDataset("bert"),
            sparsity_config=SparsityConfig(),
        )
    assert trainer.sparsity_config.method == "magnitude"
    assert any("they differ: the trainer's argument is used" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the same config twice: nothing to say
        SparsityTrainer(
            model=make_model("bert"),
            args=args,
            train_dataset=ToyDataset("bert"),
            sparsity_config=SparsityConfig(method="wanda"),
        )
    assert not any("they differ" in r.getMessage() for r in caplog.records)


def test_save_model_records_sparsity(tmp_path):
    model = make_model("bert")
    trainer = SparsityTrainer(
        model=model,
        args=TrainingArguments(**training_args(tmp_path, max_steps=3)),
        train_dataset=ToyDataset("bert"),
    )
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["sparsity_config"]["pattern"] == "2:4"
    assert config["sparsity_config"]["targets"] == target_names(model)
    assert SparsityConfig.from_pretrained(out) == trainer.sparsity_config
    reloaded = type(model).from_pretrained(out)
    assert_targets_24(reloaded)


class StopAt(TrainerCallback):
    """Simulates an interrupted run: stops after `step` optimizer steps."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _train_resumable(tmp_path, stop_at=None, resume=None, config=None, arch="bert"):
    model = make_model(arch)
    args = TrainingArguments(
        **training_args(tmp_path / "run", max_steps=9, save_strategy="steps", save_steps=3)
    )
    trainer = SparsityTrainer(
        model=model,
        args=args,
        train_dataset=ToyDataset(arch),
        sparsity_config=config,
        callbacks=[StopAt(stop_at)] if stop_at else None,
    )
    trainer.train(resume_from_checkpoint=resume)
    return model


@pytest.mark.parametrize(
    "config",
    [
        None,
        SparsityConfig(schedule="gradual", start_step=1, end_step=7, prune_every=2),
        SparsityConfig(mask_update_every=2, freeze_step=7),
    ],
    ids=["oneshot", "gradual", "reselect"],
)
def test_resume_is_bit_exact(tmp_path, config):
    straight = _train_resumable(tmp_path / "a", config=config)
    _train_resumable(tmp_path / "b", stop_at=3, config=config)
    # the interrupted run stopped after step 3; a fresh process resumes from its checkpoint
    ckpt = tmp_path / "b" / "run" / "checkpoint-3"
    assert (ckpt / MASKS_NAME).is_file()
    resumed = _train_resumable(tmp_path / "b", resume=str(ckpt), config=config)
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_resume_with_missing_or_corrupt_masks_fails_cleanly(tmp_path):
    _train_resumable(tmp_path, stop_at=3)
    ckpt = tmp_path / "run" / "checkpoint-3"
    masks = ckpt / MASKS_NAME
    good = masks.read_bytes()

    masks.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupted or unreadable"):
        _train_resumable(tmp_path, resume=str(ckpt))

    masks.unlink()
    with pytest.raises(FileNotFoundError, match=MASKS_NAME):
        _train_resumable(tmp_path, resume=str(ckpt))
    assert not (tmp_path / "run" / "checkpoint-6").exists()  # nothing trained after the error


def test_resume_with_masks_that_do_not_match_weights(tmp_path):
    _train_resumable(tmp_path, stop_at=3)
    ckpt = tmp_path / "run" / "checkpoint-3"
    # masks from another model: same shapes, other positions
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = ckpt / MASKS_NAME
    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    key = next(iter(tensors))
    tensors[key] = torch.bitwise_not(tensors[key]) & 0b00110011  # keep other 2 of 4: still 2:4, wrong places
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(ValueError, match="does not match the checkpoint's weights"):
        _train_resumable(tmp_path, resume=str(ckpt))


def test_config_selecting_nothing_fails_before_training(tmp_path):
    model = make_model("bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NoTargetsError, match="selects no module"):
        SparsityTrainer(
            model=model,
            args=TrainingArguments(**training_args(tmp_path)),
            train_dataset=ToyDataset("bert"),
            sparsity_config=SparsityConfig(target_modules="nope"),
        )
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_gradual_schedule_raises_sparsity(tmp_path):
    model = make_model("llama")
    cfg = SparsityConfig(schedule="gradual", start_step=2, end_step=12, prune_every=2)
    trainer = SparsityTrainer(
        model=model,
        args=TrainingArguments(**training_args(tmp_path, max_steps=16)),
        train_dataset=ToyDataset("llama"),
        sparsity_config=cfg,
    )
    trainer.train()
    zero = [h["sparsity_zero_fraction"] for h in trainer.state.log_history if "sparsity_zero_fraction" in h]
    assert zero == sorted(zero)
    assert 0.0 < min(z for z in zero if z > 0) < 0.5 and zero[-1] == pytest.approx(0.5)
    assert_targets_24(model)


def test_gradual_schedule_cut_short_warns(tmp_path, caplog):
    model = make_model("bert")
    cfg = SparsityConfig(schedule="gradual", start_step=0, end_step=50)
    trainer = SparsityTrainer(
        model=model,
        args=TrainingArguments(**training_args(tmp_path, max_steps=5)),
        train_dataset=ToyDataset("bert"),
        sparsity_config=cfg,
    )
    with caplog.at_level("WARNING", logger="hf_semisparse"):
        trainer.train()
    assert "NOT fully 2:4 sparse" in caplog.text


def test_mask_reselection_changes_masks_then_freezes(tmp_path):
    model = make_model("bert")
    cfg = SparsityConfig(mask_update_every=2, freeze_step=10)
    trainer = SparsityTrainer(
        model=model,
        args=TrainingArguments(**training_args(tmp_path, max_steps=16, learning_rate=2e-2)),
        train_dataset=ToyDataset("bert"),
        sparsity_config=cfg,
    )
    cb = trainer.sparsity_callback
    seen = {}

    class Spy(SparsityCallback.__mro__[1]):  # a plain TrainerCallback recording masks after each step
        def on_step_end(self, args, state, control, **kwargs):
            seen[state.global_step] = {k: v.clone() for k, v in cb.sparsifier.masks.items()}

    trainer.add_callback(Spy())
    trainer.train()
    changed_early = any(not torch.equal(seen[1][k], seen[9][k]) for k in seen[1])
    assert changed_early, "re-selection from the dense shadow never changed a mask"
    # the last selection happens as optimizer step 10 begins; seen[s] is recorded once s steps are done
    for step in range(12, 17):
        for k in seen[11]:
            assert torch.equal(seen[11][k], seen[step][k])
    assert_targets_24(model)


def test_bf16_gradient_accumulation(tmp_path):
    model = make_model("roberta")
    args = TrainingArguments(
        **training_args(tmp_path, bf16=True, gradient_accumulation_steps=2, max_steps=10)
    )
    trainer = SparsityTrainer(model=model, args=args, train_dataset=ToyDataset("roberta"))
    trainer.train()
    assert_targets_24(model)
    assert losses(trainer)[-1] < losses(trainer)[0]


def test_torch_compile_training(tmp_path):
    model = make_model("bert")
    args = TrainingArguments(
        **training_args(tmp_path, max_steps=6, torch_compile=True, torch_compile_backend="aot_eager")
    )
    trainer = SparsityTrainer(model=model, args=args, train_dataset=ToyDataset("bert"))
    trainer.train()
    assert_targets_24(model)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


@pytest.mark.parametrize("accumulation", [1, 2])
def test_every_gradient_masking_path_gives_the_same_training(tmp_path, monkeypatch, accumulation):
    """Per-weight masking hooks (what DDP/FSDP get), the callback's queued fused mask (a plain Trainer in one
    process) and SparsityTrainer's fused mask before clipping: bit-identical weights and clipped grad norms."""
    runs = {}
    for name in ("per-weight hooks", "queued fused mask", "SparsityTrainer"):
        model = make_model("bert")
        args = TrainingArguments(
            **training_args(
                tmp_path / name, max_steps=6, max_grad_norm=0.05, gradient_accumulation_steps=accumulation
            )
        )
        with monkeypatch.context() as patch:
            if name == "per-weight hooks":  # as in a multi-process run
                patch.setattr("hf_semisparse.pruning.sparsifier._multi_process", lambda: True)
            if name == "SparsityTrainer":
                trainer = SparsityTrainer(model=model, args=args, train_dataset=ToyDataset("bert"))
                assert trainer.sparsity_callback.hook_free_gradients
            else:
                trainer = Trainer(
                    model=model, args=args, train_dataset=ToyDataset("bert"), callbacks=[SparsityCallback()]
                )
            seen = GradientSpy()
            trainer.add_callback(seen)
            trainer.train()
        assert seen.pruned_grad_max == 0.0 and seen.calls == 6, name  # what the optimizer saw
        runs[name] = (
            model.state_dict(),
            [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
        )
    reference, reference_norms = runs.pop("per-weight hooks")
    assert max(reference_norms) > 0.05  # clipping was active
    for name, (weights, norms) in runs.items():
        assert norms == reference_norms, name  # clipping saw the same (masked) gradients
        for key in reference:
            assert torch.equal(reference[key], weights[key]), (name, key)


@pytest.mark.parametrize("multi_process", [False, True])
def test_callback_hooks_are_per_weight_only_when_distributed(monkeypatch, multi_process):
    monkeypatch.setattr("hf_semisparse.pruning.sparsifier._multi_process", lambda: multi_process)
    model = make_model("bert")
    sp = Sparsifier(model, SparsityConfig())
    sp.update_masks(1.0)
    sp.register_grad_hooks()
    calls = []
    monkeypatch.setattr(sp, "mask_gradients", lambda: calls.append(1))
    batch = torch.utils.data.default_collate([ToyDataset("bert")[i] for i in range(4)])
    model(**batch).loss.backward()
    # fused: one queued mask for the whole backward; per-weight: each hook masked its own gradient
    assert calls == ([] if multi_process else [1])
    pruned_grads_zero = all((t.weight.grad[~sp.masks[t.name]] == 0).all() for t in sp.targets)
    assert pruned_grads_zero == multi_process
    sp.remove_grad_hooks()


class GradientSpy(TrainerCallback):
    """Largest |grad| of a pruned weight at each optimizer step (after every other callback's pre-step work)."""

    def __init__(self) -> None:
        self.pruned_grad_max, self.calls, self.sparsity = 0.0, 0, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model

    def on_optimizer_step(self, args, state, control, **kwargs):
        for target in select_targets(self.model, SparsityConfig())[0]:
            pruned = target.weight.detach() == 0
            grad = target.weight.grad
            if grad is not None and pruned.any():
                self.pruned_grad_max = max(self.pruned_grad_max, grad[pruned].abs().max().item())
        self.calls += 1


@pytest.mark.parametrize(
    "should_save,sharded,calls", [(True, False, [True]), (False, False, []), (False, True, [False])]
)
def test_on_save_gathers_sharded_masks_on_every_rank_and_writes_on_the_main_one(
    tmp_path, monkeypatch, should_save, sharded, calls
):
    """Non-main ranks must join the gather of FSDP2-sharded masks (a collective) but never write."""
    model = make_model("bert")
    cb = SparsityCallback()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**training_args(tmp_path, max_steps=1)),
        train_dataset=ToyDataset("bert"),
        callbacks=[cb],
    )
    trainer.train()
    writes = []
    monkeypatch.setattr(type(cb.sparsifier), "sharded", property(lambda self: sharded))
    monkeypatch.setattr(cb.sparsifier, "save_masks", lambda directory, step, write=True: writes.append(write))
    monkeypatch.setattr(type(trainer.args), "should_save", property(lambda self: should_save))
    (tmp_path / f"checkpoint-{trainer.state.global_step}").mkdir()
    cb.on_save(trainer.args, trainer.state, trainer.control)
    assert writes == calls


@pytest.mark.parametrize("entry", ["trainer", "callback"])
def test_a_model_loaded_from_a_compressed_checkpoint_fine_tunes_and_stays_24(entry, tmp_path):
    """Plain `from_pretrained` of our 2:4 format marks the model quantized; transformers' Trainer refuses to train
    "purely quantized" models unless the format says it can (`is_qat_trainable`)."""
    from transformers import AutoModelForCausalLM

    from hf_semisparse import prune_24, save_sparse_pretrained

    model = make_model("llama")
    prune_24(model, show_progress=False)
    save_sparse_pretrained(model, tmp_path / "ckpt", show_progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.is_quantized  # the case transformers guards
    before = {n: p.detach().clone() for n, p in loaded.named_parameters()}
    args = TrainingArguments(**training_args(tmp_path / "run"))
    if entry == "trainer":
        trainer = SparsityTrainer(model=loaded, args=args, train_dataset=ToyDataset("llama"))
    else:
        trainer = Trainer(
            model=loaded, args=args, train_dataset=ToyDataset("llama"), callbacks=[SparsityCallback()]
        )
    trainer.train()
    assert_targets_24(loaded)
    assert any(not torch.equal(p, before[n]) for n, p in loaded.named_parameters())


def _train_loaded(tmp_path, ckpt, arch, entry, stop_at=None, resume=None, **overrides):
    """Train a model loaded from the compressed checkpoint `ckpt` (its Trainer checkpoints are in our format)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt)
    args = TrainingArguments(
        **training_args(tmp_path / "run", max_steps=6, save_strategy="steps", save_steps=3, **overrides)
    )
    callbacks = [StopAt(stop_at)] if stop_at else []
    if entry == "trainer":
        trainer = SparsityTrainer(model=model, args=args, train_dataset=ToyDataset(arch), callbacks=callbacks)
    else:
        callbacks.append(SparsityCallback(resume_from_checkpoint=resume))
        trainer = Trainer(model=model, args=args, train_dataset=ToyDataset(arch), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return model


@pytest.mark.parametrize("entry", ["trainer", "callback"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D weights, stored transposed
def test_resume_of_a_model_loaded_from_a_compressed_checkpoint_is_bit_exact(arch, entry, tmp_path):
    from hf_semisparse import prune_24, save_sparse_pretrained

    model = make_model(arch)
    prune_24(model, show_progress=False)
    save_sparse_pretrained(model, tmp_path / "ckpt", show_progress=False)
    straight = _train_loaded(tmp_path / "a", tmp_path / "ckpt", arch, entry)
    _train_loaded(tmp_path / "b", tmp_path / "ckpt", arch, entry, stop_at=3)
    checkpoint = tmp_path / "b" / "run" / "checkpoint-3"
    with open(checkpoint / "config.json", encoding="utf-8") as f:
        assert "quantization_config" in json.load(f)  # the Trainer wrote our compressed format
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        assert any(key.endswith("_bitmask") for key in f.keys())  # noqa: SIM118 - not a dict
    resumed = _train_loaded(tmp_path / "b", tmp_path / "ckpt", arch, entry, resume=str(checkpoint))
    assert_targets_24(resumed)
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(p, q), name


# shard sizes at which transformers puts some value tensor and its bitmask in different shards
SPLITTING_SHARD_SIZE = {"llama": "9KB", "gpt2": "9KB"}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_resume_from_a_sharded_checkpoint_joins_values_and_bitmasks_across_shards(
    arch, tmp_path, monkeypatch
):
    """transformers loads a sharded checkpoint one shard per load_state_dict call; a 2:4 weight's values and its
    bitmask may sit in different shards (a 70B model passes the default 50GB shard size)."""
    from functools import partialmethod

    from transformers import PreTrainedModel

    from hf_semisparse import prune_24, save_sparse_pretrained

    model = make_model(arch)
    prune_24(model, show_progress=False)
    save_sparse_pretrained(model, tmp_path / "ckpt", show_progress=False)
    straight = _train_loaded(tmp_path / "a", tmp_path / "ckpt", arch, "trainer")
    monkeypatch.setattr(
        PreTrainedModel,
        "save_pretrained",
        partialmethod(PreTrainedModel.save_pretrained, max_shard_size=SPLITTING_SHARD_SIZE[arch]),
    )
    _train_loaded(tmp_path / "b", tmp_path / "ckpt", arch, "trainer", stop_at=3)
    checkpoint = tmp_path / "b" / "run" / "checkpoint-3"
    with open(checkpoint / "model.safetensors.index.json", encoding="utf-8") as f:
        shard_of = json.load(f)["weight_map"]
    assert any(k.endswith("_bitmask") and shard_of[k] != shard_of[k[: -len("_bitmask")]] for k in shard_of)
    import transformers.trainer

    warned = []
    monkeypatch.setattr(transformers.trainer.logger, "warning", lambda msg, *a, **k: warned.append(str(msg)))
    resumed = _train_loaded(tmp_path / "b", tmp_path / "ckpt", arch, "trainer", resume=str(checkpoint))
    assert_targets_24(resumed)
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert not [m for m in warned if "_bitmask" in m]  # read and expanded: not "unexpected keys"
    hooks = [getattr(h, "hook", h) for h in resumed._load_state_dict_pre_hooks.values()]  # torch wraps them
    (hook,) = [h for h in hooks if isinstance(h, ExpandOnLoadStateDict)]
    assert hook.pending == {}  # every held half found its partner


def _sharded_loaded_llama(tmp_path):
    """A Llama loaded from our format and saved by transformers in shards that split some pairs; the shard map
    and one weight whose values and bitmask are in different shards."""
    from transformers import AutoModelForCausalLM

    from hf_semisparse import prune_24, save_sparse_pretrained

    model = make_model("llama")
    prune_24(model, show_progress=False)
    save_sparse_pretrained(model, tmp_path / "ckpt", show_progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    loaded.save_pretrained(tmp_path / "sharded", max_shard_size=SPLITTING_SHARD_SIZE["llama"])
    with open(tmp_path / "sharded" / "model.safetensors.index.json", encoding="utf-8") as f:
        shard_of = json.load(f)["weight_map"]
    key = next(k[:-8] for k in shard_of if k.endswith("_bitmask") and shard_of[k] != shard_of[k[:-8]])
    return loaded, shard_of, key


def _load_shard_holding(model, tmp_path, shard_of, key: str):
    """Load into `model`, not strictly, the one shard of `_sharded_loaded_llama`'s copy that holds `key`."""
    from safetensors.torch import load_file

    return model.load_state_dict(load_file(tmp_path / "sharded" / shard_of[key]), strict=False)


def test_a_held_half_is_dropped_when_a_dense_weight_is_loaded(tmp_path):
    """A lone bitmask held from an incomplete load must not break a later ordinary load of dense weights."""
    from transformers import AutoModelForCausalLM

    loaded, shard_of, key = _sharded_loaded_llama(tmp_path)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    _load_shard_holding(fresh, tmp_path, shard_of, key + "_bitmask")
    dense = {k: v.clone() for k, v in loaded.state_dict().items()}
    fresh.load_state_dict(dense)  # strict, dense tensors of the same model: loads as is
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, dense[k]), k
    assert held_halves(fresh) == []  # the stale bitmask was dropped, not kept to pair with a later load


def test_a_held_half_is_dropped_when_a_complete_pair_is_loaded(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _, shard_of, key = _sharded_loaded_llama(tmp_path)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    _load_shard_holding(fresh, tmp_path, shard_of, key)  # values only
    assert key in held_halves(fresh)
    fresh.load_state_dict(load_file(tmp_path / "ckpt" / "model.safetensors"))  # every pair complete
    assert held_halves(fresh) == []


def test_a_partial_load_cannot_shift_the_pairs_of_a_trainer_resume(tmp_path):
    """After a lone bitmask shard, SparsityTrainer's resume clears the held halves first, loads exactly, and a
    half that never finds its partner is an error naming it."""
    from transformers import AutoModelForCausalLM

    from hf_semisparse.errors import SparseCheckpointError

    loaded, shard_of, key = _sharded_loaded_llama(tmp_path)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    _load_shard_holding(fresh, tmp_path, shard_of, key + "_bitmask")
    assert held_halves(fresh)
    trainer = SparsityTrainer(
        model=fresh,
        args=TrainingArguments(**training_args(tmp_path / "run")),
        train_dataset=ToyDataset("llama"),
    )
    trainer._load_from_checkpoint(str(tmp_path / "sharded"))
    assert held_halves(fresh) == []
    for (name, p), (_, q) in zip(fresh.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    _load_shard_holding(fresh, tmp_path, shard_of, key)  # a lone half
    with pytest.raises(SparseCheckpointError, match="were not loaded"):
        end_checkpoint_load(fresh)
    assert held_halves(fresh) == []


def test_sparsity_callback_warns_about_halves_a_load_left_and_forgets_them(tmp_path, caplog):
    """A plain Trainer with SparsityCallback cannot check its own checkpoint loads: the callback says at the
    start of training that some 2:4 weights were not loaded, and drops the lone halves."""
    from transformers import AutoModelForCausalLM

    _, shard_of, key = _sharded_loaded_llama(tmp_path)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    _load_shard_holding(fresh, tmp_path, shard_of, key + "_bitmask")
    assert held_halves(fresh)
    trainer = Trainer(
        model=fresh,
        args=TrainingArguments(**training_args(tmp_path / "run", max_steps=1)),
        train_dataset=ToyDataset("llama"),
        callbacks=[SparsityCallback()],
    )
    with caplog.at_level("WARNING", logger="hf_semisparse.training.callback"):
        trainer.train()
    assert "arrived without their values or bitmask" in caplog.text and key in caplog.text
    assert held_halves(fresh) == []
    caplog.clear()
    (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, SparsityCallback)]
    # as after `load_best_model_at_end`, which loads a checkpoint just before the Trainer's on_train_end
    _load_shard_holding(fresh, tmp_path, shard_of, key)
    with caplog.at_level("WARNING", logger="hf_semisparse.training.callback"):
        callback.on_train_end(trainer.args, trainer.state, trainer.control)
    assert "were not loaded" in caplog.text and held_halves(fresh) == []


def test_a_half_size_tensor_of_a_weight_that_is_not_compressed_is_still_a_size_mismatch(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_semisparse import prune_24, save_sparse_pretrained

    model = make_model("llama")
    prune_24(model, show_progress=False)
    save_sparse_pretrained(model, tmp_path / "ckpt", show_progress=False)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    embed = fresh.model.embed_tokens.weight
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(
            {"model.embed_tokens.weight": embed[:, : embed.shape[1] // 2].clone()}, strict=False
        )


def test_a_lone_shard_without_its_bitmask_reports_the_weight_missing(tmp_path):
    """Loading only the shard with a weight's values: that weight is reported missing (and left as it was),
    not a size-mismatch error."""
    from transformers import AutoModelForCausalLM

    _, shard_of, key = _sharded_loaded_llama(tmp_path)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    before = fresh.state_dict()[key].clone()
    result = _load_shard_holding(fresh, tmp_path, shard_of, key)
    assert key in result.missing_keys
    assert torch.equal(fresh.state_dict()[key], before)


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_load_best_model_at_end_restores_the_best_checkpoint_of_a_loaded_model(
    tmp_path, sharded, monkeypatch
):
    """With `greater_is_better=True` on the loss the "best" checkpoint is the worst one, an earlier step than the
    last: what the model ends with must be that checkpoint, exactly, and still 2:4 (also from checkpoints whose
    shards split a weight's values from its bitmask)."""
    from functools import partialmethod

    from transformers import AutoModelForCausalLM, PreTrainedModel

    from hf_semisparse import prune_24, save_sparse_pretrained

    model = make_model("llama")
    prune_24(model, show_progress=False)
    save_sparse_pretrained(model, tmp_path / "ckpt", show_progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    if sharded:
        monkeypatch.setattr(
            PreTrainedModel,
            "save_pretrained",
            partialmethod(PreTrainedModel.save_pretrained, max_shard_size=SPLITTING_SHARD_SIZE["llama"]),
        )
    args = TrainingArguments(
        **training_args(
            tmp_path / "run", max_steps=6, save_strategy="steps", save_steps=3, eval_strategy="steps",
            eval_steps=3, load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,
        )
    )  # fmt: skip
    trainer = SparsityTrainer(
        model=loaded, args=args, train_dataset=ToyDataset("llama"), eval_dataset=ToyDataset("llama", n=16)
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-3")
    if sharded:
        index = tmp_path / "run" / "checkpoint-3" / "model.safetensors.index.json"
        shard_of = json.loads(index.read_text())["weight_map"]
        assert any(k.endswith("_bitmask") and shard_of[k] != shard_of[k[:-8]] for k in shard_of)
    assert held_halves(trainer.model) == []
    best = AutoModelForCausalLM.from_pretrained(trainer.state.best_model_checkpoint)
    assert_targets_24(trainer.model)
    for (name, p), (_, q) in zip(trainer.model.named_parameters(), best.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-6")
    changed = any(not torch.equal(p, q) for p, q in zip(final.parameters(), best.parameters(), strict=True))
    assert changed  # the last checkpoint differs: the best one was really loaded back


def test_training_a_model_on_inference_kernels_is_refused_with_the_way_out(backend, tmp_path):
    from hf_semisparse import prune_24
    from hf_semisparse.kernels.linear import SemiSparseLinear

    model = make_model("llama")
    prune_24(model, show_progress=False)
    layer = model.model.layers[0].mlp
    layer.down_proj = SemiSparseLinear(layer.down_proj)  # as accelerate_24 leaves it
    args = TrainingArguments(**training_args(tmp_path / "run", max_steps=1))
    with pytest.raises(ValueError, match=r"down_proj .* inference kernels.*accelerate=False"):
        SparsityTrainer(model=model, args=args, train_dataset=ToyDataset("llama"))
    trainer = Trainer(
        model=model, args=args, train_dataset=ToyDataset("llama"), callbacks=[SparsityCallback()]
    )
    with pytest.raises(ValueError, match="inference kernels"):
        trainer.train()


def test_saving_a_loaded_model_that_lost_its_24_zeros_names_the_way_out(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_semisparse import prune_24, save_sparse_pretrained
    from hf_semisparse.errors import SparseCheckpointError

    model = make_model("llama")
    prune_24(model, show_progress=False)
    save_sparse_pretrained(model, tmp_path / "ckpt", show_progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():  # what a plain Trainer without SparsityCallback does to the zeros
        loaded.model.layers[0].mlp.down_proj.weight.add_(1.0)
    with pytest.raises(SparseCheckpointError, match="group at .*SparsityTrainer or SparsityCallback"):
        loaded.save_pretrained(tmp_path / "out")
