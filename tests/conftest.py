"""Tiny models built from configs, and toy datasets they can learn, for CPU tests."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.utils import logging as hf_logging

from hf_semisparse import SparsityConfig, is_nm_sparse, select_targets

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
hf_logging.set_verbosity_error()

VOCAB = 128
HIDDEN = 64
SEQ = 16

ARCHS = ["bert", "distilbert", "roberta", "gpt2", "llama", "t5"]
# the offline data and models beside the checkout (CI clones next to it); override with HF_SEMISPARSE_SHARED
SHARED = os.environ.get(
    "HF_SEMISPARSE_SHARED", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
)


def make_model(arch: str, seed: int = 0, **config_overrides) -> torch.nn.Module:
    """A tiny `arch` model, seeded; `config_overrides` go to its config (e.g. dropout off)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, pad_token_id=0, **config_overrides)
    if arch == "bert":
        cfg = BertConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=64,
            num_labels=2,
            **common,
        )
        return BertForSequenceClassification(cfg)
    if arch == "distilbert":
        cfg = DistilBertConfig(
            dim=HIDDEN,
            n_layers=2,
            n_heads=2,
            hidden_dim=128,
            max_position_embeddings=64,
            num_labels=2,
            **common,
        )
        return DistilBertForSequenceClassification(cfg)
    if arch == "roberta":
        cfg = RobertaConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=64,
            num_labels=2,
            **common,
        )
        return RobertaForSequenceClassification(cfg)
    if arch == "gpt2":
        cfg = GPT2Config(
            n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2, **common
        )
        return GPT2LMHeadModel(cfg)
    if arch == "llama":
        cfg = LlamaConfig(
            hidden_size=HIDDEN,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
            **common,
        )
        return LlamaForCausalLM(cfg)
    if arch == "t5":
        cfg = T5Config(
            d_model=HIDDEN,
            d_ff=128,
            d_kv=32,
            num_layers=2,
            num_heads=2,
            decoder_start_token_id=0,
            eos_token_id=1,
            **common,
        )
        return T5ForConditionalGeneration(cfg)
    raise ValueError(arch)


class ToyDataset(torch.utils.data.Dataset):
    """Learnable toy tasks: classify by the first token, or copy a repeating sequence."""

    def __init__(self, arch: str, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            period = torch.randint(3, VOCAB, (4,), generator=g)
            ids = period.repeat(SEQ // 4)
            item = {"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long)}
            if arch in ("bert", "distilbert", "roberta"):
                item["labels"] = torch.tensor(int(ids[0] < VOCAB // 2))
            else:
                item["labels"] = ids.clone()
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def training_args(out, **overrides) -> dict:
    """TrainingArguments keywords for short, deterministic CPU runs (override any of them)."""
    args = dict(
        output_dir=str(out),
        per_device_train_batch_size=8,
        learning_rate=2e-3,
        max_steps=24,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        data_seed=0,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    args.update(overrides)
    return args


def assert_targets_24(model, config=None):
    """Every target weight of `model` is exactly N:M and at least half zeros."""
    targets, _ = select_targets(model, config or SparsityConfig())
    for t in targets:
        w = t.linear_view().detach()
        assert is_nm_sparse(w), t.name
        assert (w == 0).float().mean() >= 0.5, t.name


@pytest.fixture
def tiny_bert():
    return make_model("bert")


class _FakeHandle:
    def __init__(self, log):
        self.log = log

    def compress(self, weight):
        self.log.append(weight.clone())
        return weight.clone()


class _FakeBackend:
    """Stands in for cuSPARSELt where a `SemiSparseLinear` is built on the CPU: "compressing" copies the weight
    (and logs it), and every call takes the dense path that a CPU tensor takes."""

    def __init__(self):
        self.compressed = []

    def handle(self, device):
        return _FakeHandle(self.compressed)

    def cutlass_handle(self, device, dtype):
        return _FakeHandle(self.compressed)


@pytest.fixture
def backend(monkeypatch):
    from hf_semisparse.kernels import linear as linear_mod

    fake = _FakeBackend()
    monkeypatch.setattr(linear_mod, "_BACKEND", fake)
    return fake


def assert_same_pruning(a, b, values: bool = True):
    """Models `a` and `b` hold the same 2:4 masks, tensor by tensor, and (`values`) the same weights within float32
    rounding (rtol 1e-4, atol 1e-5)."""
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x != 0, y != 0), name
        if values:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


def load_disk_offloaded(folder, layers: int, offload_folder):
    """The decoder saved in `folder` loaded by accelerate with its first block on the CPU and the other `layers - 1`
    blocks offloaded to disk (float32)."""
    from transformers import AutoModelForCausalLM

    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        **{f"model.layers.{i}": "disk" for i in range(1, layers)},
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    return AutoModelForCausalLM.from_pretrained(
        folder, device_map=device_map, offload_folder=str(offload_folder), dtype=torch.float32
    )


MINILM = os.path.join(SHARED, "models", "all-MiniLM-L6-v2")
LLM_TEXT = (
    "The quality of mercy is not strained; it droppeth as the gentle rain from heaven upon the place beneath. "
    "It is twice blest; it blesseth him that gives and him that takes. "
)


@pytest.fixture
def tiny_llm(tmp_path):
    """A tiny Llama with a real tokenizer (MiniLM's WordPiece) in `model/`, a calibration text in `calib/` and an
    evaluation text `eval.txt` (needs the shared MiniLM folder)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "plays.txt").write_text(LLM_TEXT * 40, encoding="utf-8")
    (tmp_path / "eval.txt").write_text(LLM_TEXT[::-1] * 10, encoding="utf-8")
    return tmp_path
