"""Sequences sampled from a dense teacher as distillation data: shape, start token, seeding, sampling from the
model's own distribution, no early end, and bad input refused before anything runs."""

import pytest
import torch

from hf_semisparse.training.teacher_data import sample_teacher_sequences
from tests.conftest import VOCAB, make_model


@pytest.fixture
def llama():
    return make_model("llama").eval()


def favour_three_tokens(model) -> torch.Tensor:
    """Make the head give tokens 5, 6 and 7 all the probability, equally; returns them."""
    favoured = torch.tensor([5, 6, 7])

    def three_tokens(module, inputs, out):
        logits = torch.full_like(out, -30.0)
        logits[..., favoured] = 0.0
        return logits

    model.lm_head.register_forward_hook(three_tokens)
    return favoured


def test_sequences_have_the_asked_shape_and_start_with_bos(llama):
    ids = sample_teacher_sequences(llama, 5, 12, batch_size=2, show_progress=False)
    assert ids.shape == (5, 12) and ids.dtype == torch.int64 and ids.device.type == "cpu"
    assert (ids[:, 0] == llama.config.bos_token_id).all()
    assert ids.min() >= 0 and ids.max() < VOCAB
    assert len({tuple(r.tolist()) for r in ids}) == 5  # sampled, not greedy: the rows differ


def test_the_seed_decides_the_sequences_and_the_global_random_state_is_left_alone(llama):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = sample_teacher_sequences(llama, 4, 10, batch_size=4, seed=1, show_progress=False)
    assert torch.equal(torch.rand(3), expected_next)
    b = sample_teacher_sequences(llama, 4, 10, batch_size=4, seed=1, show_progress=False)
    c = sample_teacher_sequences(llama, 4, 10, batch_size=4, seed=2, show_progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_low_temperature_gives_the_greedy_continuation(llama):
    ids = sample_teacher_sequences(llama, 2, 10, temperature=1e-4, show_progress=False)
    prompt = torch.full((1, 1), llama.config.bos_token_id)
    greedy = llama.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=9,
                            min_new_tokens=9, pad_token_id=0)  # fmt: skip
    assert torch.equal(ids[0], greedy[0]) and torch.equal(ids[1], greedy[0])


def test_tokens_follow_the_model_distribution(llama):
    """A head that gives three tokens all the probability: every sampled token is one of them, and all three
    are drawn (sampling, not argmax)."""
    favoured = favour_three_tokens(llama)
    body = sample_teacher_sequences(llama, 8, 20, show_progress=False)[:, 1:]
    assert torch.isin(body, favoured).all()
    assert len(body.unique()) == 3


def test_the_end_token_never_ends_a_sequence_early(llama):
    eos = llama.config.eos_token_id
    llama.lm_head.register_forward_hook(lambda m, i, out: out.index_fill(-1, torch.tensor([eos]), 50.0))
    ids = sample_teacher_sequences(llama, 3, 15, show_progress=False)
    assert ids.shape == (3, 15) and not (ids[:, 1:] == eos).any()


def test_training_modes_are_restored_module_by_module(llama):
    llama.train()
    llama.model.layers[0].eval()
    sample_teacher_sequences(llama, 1, 4, show_progress=False)
    assert llama.training and llama.model.layers[1].training and not llama.model.layers[0].training


def test_sampling_settings_the_model_ships_are_not_applied(llama):
    """transformers fills every setting a generate call leaves unset from model.generation_config: a checkpoint's
    repetition penalty, n-gram blocking or suppressed tokens would bend the distribution."""
    favoured = favour_three_tokens(llama)
    shipped = llama.generation_config
    shipped.no_repeat_ngram_size = 1
    shipped.suppress_tokens = [5, 6]
    shipped.repetition_penalty = 5.0
    body = sample_teacher_sequences(llama, 4, 12, show_progress=False)[:, 1:]
    assert torch.isin(body, favoured).all() and len(body.unique()) == 3  # 5 and 6 drawn, tokens repeated
    assert llama.generation_config is shipped and shipped.suppress_tokens == [5, 6]  # put back as it was


def test_start_token_id_overrides_bos(llama):
    ids = sample_teacher_sequences(llama, 2, 5, start_token_id=9, show_progress=False)
    assert (ids[:, 0] == 9).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_sequences": 0}, "num_sequences"),
        ({"num_sequences": True}, "num_sequences"),
        ({"length": 1}, "length"),
        ({"length": 8.0}, "length"),
        ({"batch_size": 0}, "batch_size"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"start_token_id": VOCAB}, "outside the vocabulary"),
        ({"start_token_id": "1"}, "start_token_id"),
        ({"start_token_id": 1.5}, "start_token_id"),
        ({"start_token_id": True}, "start_token_id"),
        ({"seed": None}, "seed"),
        ({"temperature": "1"}, "temperature"),
        ({"length": 65}, "max_position_embeddings"),
    ],
)
def test_bad_arguments_are_refused(llama, kwargs, match):
    args = {"num_sequences": 2, "length": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        sample_teacher_sequences(
            llama, args.pop("num_sequences"), args.pop("length"), show_progress=False, **args
        )


def test_a_model_without_bos_needs_a_start_token():
    model = make_model("llama")
    model.config.bos_token_id = None
    model.generation_config.bos_token_id = None
    with pytest.raises(ValueError, match="start_token_id"):
        sample_teacher_sequences(model, 1, 4, show_progress=False)
    assert sample_teacher_sequences(model, 1, 4, start_token_id=3, show_progress=False)[0, 0] == 3


def test_a_model_without_generate_is_refused():
    with pytest.raises(TypeError, match="generate"):
        sample_teacher_sequences(torch.nn.Linear(2, 2), 1, 4, show_progress=False)


def test_every_batch_is_sampled_at_one_size(llama, monkeypatch):
    """A new batch size would make transformers compile the static-cache decode step again on a GPU."""
    sizes = []
    generate = llama.generate

    def counting(*args, **kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        return generate(*args, **kwargs)

    monkeypatch.setattr(llama, "generate", counting)
    assert sample_teacher_sequences(llama, 5, 6, batch_size=2, show_progress=False).shape == (5, 6)
    assert sizes == [2, 2, 2]
    sizes.clear()
    assert sample_teacher_sequences(llama, 3, 6, batch_size=64, show_progress=False).shape == (3, 6)
    assert sizes == [3]


def test_numpy_and_torch_integers_are_accepted(llama):
    import numpy as np

    ids = sample_teacher_sequences(
        llama, np.int64(3), torch.tensor(5), batch_size=np.int32(2), temperature=np.float32(1.0),
        seed=np.int64(4), start_token_id=np.int64(9), show_progress=False,
    )  # fmt: skip
    assert ids.shape == (3, 5) and (ids[:, 0] == 9).all()


def test_an_encoder_decoder_model_is_refused():
    with pytest.raises(ValueError, match="decoder-only causal LM"):
        sample_teacher_sequences(make_model("t5"), 1, 4, start_token_id=0, show_progress=False)


def test_a_peft_wrapped_teacher_samples_its_base_model_without_the_shipped_settings(llama):
    peft = pytest.importorskip("peft")
    favoured = favour_three_tokens(llama)
    llama.generation_config.suppress_tokens = [5, 6]
    wrapped = peft.get_peft_model(llama, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    body = sample_teacher_sequences(wrapped, 4, 12, show_progress=False)[:, 1:]
    assert torch.isin(body, favoured).all() and len(body.unique()) == 3
    assert "generation_config" not in vars(wrapped) and llama.generation_config.suppress_tokens == [5, 6]


def test_a_generation_config_of_none_is_put_back(llama):
    llama.generation_config = None
    sample_teacher_sequences(llama, 1, 4, show_progress=False)
    assert llama.generation_config is None
