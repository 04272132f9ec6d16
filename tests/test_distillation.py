import contextlib
import copy

import pytest
import torch
from transformers import TrainingArguments

from hf_semisparse import SparsityTrainer, is_nm_sparse, select_targets
from hf_semisparse.config import SparsityConfig
from tests.conftest import ToyDataset, make_model, training_args


def trainer_for(tmp_path, model, teacher, **kwargs):
    args = TrainingArguments(**training_args(tmp_path, max_steps=10))
    return SparsityTrainer(
        model=model, args=args, train_dataset=ToyDataset("bert"), teacher_model=teacher, **kwargs
    )


def batch():
    data = ToyDataset("bert")
    return torch.utils.data.default_collate([data[i] for i in range(8)])


def test_distillation_loss_mixes_task_and_kl(tmp_path):
    student = make_model("bert").eval()
    teacher = copy.deepcopy(student)
    inputs = batch()
    task = student(**inputs).loss
    only_kd = trainer_for(tmp_path, student, teacher, distillation_weight=1.0)
    assert only_kd.compute_loss(student, inputs).item() == pytest.approx(0.0, abs=1e-6)  # identical logits
    only_task = trainer_for(tmp_path, student, teacher, distillation_weight=0.0)
    assert only_task.compute_loss(student, inputs).item() == pytest.approx(task.item(), rel=1e-6)
    with torch.no_grad():
        teacher.classifier.bias[0] += 2.0  # one class favoured: a different distribution, a positive KL
    assert only_kd.compute_loss(student, inputs).item() > 1e-4


def test_recovery_with_a_bf16_teacher(tmp_path):
    teacher = make_model("bert").to(torch.bfloat16)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = make_model("bert")
    trainer = trainer_for(tmp_path, student, teacher, distillation_temperature=3.0)
    trainer.train()
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key  # the teacher never trains
    assert all(p.requires_grad for p in teacher.parameters())  # and the user's flags are left alone
    for t in select_targets(student, SparsityConfig())[0]:
        assert is_nm_sparse(t.linear_view()), t.name
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


def test_bad_distillation_settings(tmp_path):
    with pytest.raises(ValueError, match="distillation_weight"):
        trainer_for(tmp_path, make_model("bert"), make_model("bert"), distillation_weight=1.5)


def test_a_teacher_that_is_not_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(TypeError, match="teacher_model must be a loaded model"):
        trainer_for(tmp_path, make_model("bert"), "path/to/dense-model")


def test_distillation_settings_without_a_teacher_are_warned_about(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="hf_semisparse.training.trainer"):
        trainer_for(tmp_path, make_model("bert"), None, distillation_weight=0.9)
    assert "no teacher_model" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_semisparse.training.trainer"):
        trainer_for(tmp_path, make_model("bert"), None)  # the defaults: nothing to say
    assert "no teacher_model" not in caplog.text


def test_teacher_must_not_be_the_student(tmp_path):
    model = make_model("bert")
    with pytest.raises(ValueError, match="pass a copy"):
        trainer_for(tmp_path, model, model)
    assert all(p.requires_grad for p in model.parameters())


def test_hidden_state_distillation_adds_mse_of_every_layer(tmp_path):
    student = make_model("bert").eval()
    teacher = copy.deepcopy(student)
    inputs = batch()
    trainer = trainer_for(tmp_path, student, teacher, distillation_weight=1.0, distillation_hidden_weight=2.0)
    assert trainer.compute_loss(student, inputs).item() == pytest.approx(0.0, abs=1e-6)  # same model
    with torch.no_grad():
        teacher.bert.encoder.layer[-1].output.dense.bias[:8] += 2.0  # only the last hidden state moves
    out_s = student(**inputs, output_hidden_states=True)
    out_t = teacher(**inputs, output_hidden_states=True)
    layers = len(out_s.hidden_states)
    last = torch.nn.functional.mse_loss(out_s.hidden_states[-1], out_t.hidden_states[-1])
    kd_only = trainer_for(tmp_path, student, teacher, distillation_weight=1.0).compute_loss(student, inputs)
    total = trainer.compute_loss(student, inputs)
    # the earlier layers agree exactly, so the hidden term is 2.0 * (last layer's MSE) / number of layers
    assert (total - kd_only).item() == pytest.approx(2.0 * last.item() / layers, rel=1e-4)
    assert last.item() > 1e-3


def test_hidden_state_distillation_needs_matching_layers(tmp_path):
    student = make_model("bert")
    teacher = make_model("bert")
    teacher.bert.encoder.layer = teacher.bert.encoder.layer[:1]  # one layer fewer than the student
    trainer = trainer_for(tmp_path, student, teacher, distillation_hidden_weight=1.0)
    with pytest.raises(ValueError, match="layers and hidden size"):
        trainer.compute_loss(student, batch())
    with pytest.raises(ValueError, match="distillation_hidden_weight"):
        trainer_for(tmp_path, make_model("bert"), make_model("bert"), distillation_hidden_weight=-1.0)


def test_recovery_with_hidden_state_distillation_trains(tmp_path):
    teacher = make_model("bert")
    student = copy.deepcopy(teacher)
    trainer = trainer_for(tmp_path, student, teacher, distillation_hidden_weight=1.0)
    trainer.train()
    for t in select_targets(student, SparsityConfig())[0]:
        assert is_nm_sparse(t.linear_view()), t.name
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


def test_causal_lm_distillation_is_a_per_token_mean_over_real_tokens():
    """A causal LM's KL is averaged over its tokens (the scale of the per-token task loss), padding left out;
    a [batch, classes] output is averaged over the batch as before."""
    from hf_semisparse.training.trainer import logits_distillation_loss

    g = torch.Generator().manual_seed(0)
    student = {"logits": torch.randn(2, 5, 11, generator=g)}
    teacher = {"logits": torch.randn(2, 5, 11, generator=g)}
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    per_token = [
        torch.nn.functional.kl_div(
            torch.log_softmax(student["logits"][b, i] / 2.0, -1),
            torch.log_softmax(teacher["logits"][b, i] / 2.0, -1),
            log_target=True,
            reduction="sum",
        )
        * 4.0
        for b in range(2)
        for i in range(5)
        if mask[b, i]
    ]
    expected = torch.stack(per_token).mean()
    assert logits_distillation_loss(student, teacher, 2.0, mask) == pytest.approx(expected.item(), rel=1e-5)
    unmasked = logits_distillation_loss(student, teacher, 2.0)
    assert unmasked != pytest.approx(expected.item(), rel=1e-3)  # the padded tokens count without the mask
    qa_s, qa_t = {"start_logits": student["logits"][:, 0]}, {"start_logits": teacher["logits"][:, 0]}
    batchmean = torch.nn.functional.kl_div(
        torch.log_softmax(qa_s["start_logits"] / 2.0, -1),
        torch.log_softmax(qa_t["start_logits"] / 2.0, -1),
        log_target=True,
        reduction="batchmean",
    )
    assert logits_distillation_loss(qa_s, qa_t, 2.0, mask) == pytest.approx(4.0 * batchmean.item(), rel=1e-5)


def test_distillation_is_averaged_over_accumulated_micro_batches_as_the_task_loss(tmp_path):
    """With a model that normalises its loss by the accumulated token count, transformers does not divide the loss
    by the accumulation steps: the distillation term must be divided, or accumulation would weigh it more."""
    student = make_model("llama").eval()
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(1.5)  # a different distribution: a positive KL
    args = TrainingArguments(**training_args(tmp_path, max_steps=1))
    trainer = SparsityTrainer(
        model=student,
        args=args,
        train_dataset=ToyDataset("llama"),
        teacher_model=teacher,
        distillation_weight=1.0,
    )
    assert trainer.model_accepts_loss_kwargs
    inputs = torch.utils.data.default_collate([ToyDataset("llama")[i] for i in range(4)])
    per_micro_batch = trainer.compute_loss(student, inputs).item()  # no num_items_in_batch: evaluation
    assert per_micro_batch > 1e-4
    trainer.current_gradient_accumulation_steps = 2
    accumulated = trainer.compute_loss(student, inputs, num_items_in_batch=torch.tensor(4 * 15))
    assert accumulated.item() == pytest.approx(per_micro_batch / 2, rel=1e-5)


def test_a_teacher_with_another_vocabulary_is_a_clear_error():
    from hf_semisparse.training.trainer import logits_distillation_loss

    with pytest.raises(
        ValueError, match=r"teacher's logits has shape \(2, 3, 7\), the student's \(2, 3, 5\)"
    ):
        logits_distillation_loss({"logits": torch.zeros(2, 3, 5)}, {"logits": torch.zeros(2, 3, 7)}, 2.0)


def test_an_encoder_decoder_is_never_masked_with_the_encoder_mask(tmp_path, monkeypatch):
    """T5's logits are the decoder's: the encoder's attention mask (same shape when source and target lengths
    agree) must not pick its positions; the decoder's mask does."""
    import hf_semisparse.training.trainer as trainer_mod

    seen = []
    real = trainer_mod.logits_distillation_loss
    monkeypatch.setattr(
        trainer_mod,
        "logits_distillation_loss",
        lambda s, t, temp, mask=None: seen.append(mask) or real(s, t, temp, mask),
    )
    student = make_model("t5").eval()
    args = TrainingArguments(**training_args(tmp_path, max_steps=1))
    trainer = SparsityTrainer(
        model=student, args=args, train_dataset=ToyDataset("t5"), teacher_model=copy.deepcopy(student)
    )
    ids = torch.randint(3, 100, (2, 6))
    encoder_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    trainer.compute_loss(student, {"input_ids": ids, "attention_mask": encoder_mask, "labels": ids})
    assert seen[-1] is None
    decoder_mask = torch.ones(2, 6, dtype=torch.long)
    trainer.compute_loss(
        student,
        {
            "input_ids": ids,
            "attention_mask": encoder_mask,
            "labels": ids,
            "decoder_attention_mask": decoder_mask,
        },
    )
    assert seen[-1] is decoder_mask
    # the teacher decodes from the same decoder inputs (shifted labels) as the student: an identical teacher, KL 0
    trainer.distillation_weight = 1.0
    loss = trainer.compute_loss(student, {"input_ids": ids, "attention_mask": encoder_mask, "labels": ids})
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


class AutocastProbe(torch.nn.Module):
    """Wraps a model and records whether CPU autocast was on during each forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.autocast = []
        self.cache = []

    def forward(self, **inputs):
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        self.cache.append(torch.is_autocast_cache_enabled())
        return self.model(**inputs)


@pytest.mark.parametrize(
    ("bf16", "teacher_dtype", "option", "autocast"),
    [
        (True, torch.float32, None, True),
        (False, torch.float32, None, False),
        (True, torch.bfloat16, None, False),
        (True, torch.float16, None, False),
        (True, torch.float32, False, False),
        (True, torch.bfloat16, True, True),
    ],
    ids=[
        "fp32-teacher-bf16-training", "fp32-teacher-fp32-training", "bf16-teacher-as-it-is",
        "fp16-teacher-as-it-is", "autocast-off", "autocast-forced",
    ],
)  # fmt: skip
def test_an_fp32_teacher_runs_under_the_students_mixed_precision(
    tmp_path, bf16, teacher_dtype, option, autocast
):
    # an fp32 teacher beside a bf16 mixed-precision student must not run full-precision GEMMs; a teacher the
    # user cast to half precision keeps its dtype (autocast would recast an fp16 one to bf16)
    teacher = AutocastProbe(make_model("bert").to(teacher_dtype))
    args = TrainingArguments(**training_args(tmp_path, max_steps=2), bf16=bf16)
    trainer = SparsityTrainer(
        model=make_model("bert"),
        args=args,
        train_dataset=ToyDataset("bert"),
        teacher_model=teacher,
        teacher_autocast=option,
    )
    trainer.train()
    assert teacher.autocast == [autocast, autocast]
    if autocast:  # no cache of cast weights: it would hold a low-precision copy of the whole teacher
        assert teacher.cache == [False, False]


def test_the_teachers_dtype_is_the_one_holding_most_of_its_weights(tmp_path):
    teacher = make_model("bert").to(torch.bfloat16)
    teacher.classifier.float()  # a small head kept in fp32: still a bf16 teacher
    trainer = trainer_for(tmp_path, make_model("bert"), teacher)
    assert isinstance(trainer._teacher_autocast(), contextlib.nullcontext)
    with pytest.raises(TypeError, match="teacher_autocast must be None, True or False"):
        trainer_for(tmp_path, make_model("bert"), make_model("bert"), teacher_autocast="yes")
    with pytest.raises(TypeError, match="teacher_autocast must be None, True or False"):
        trainer_for(tmp_path, make_model("bert"), make_model("bert"), teacher_autocast=1)
