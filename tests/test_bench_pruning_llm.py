"""The real-LLM pruning benchmark runs end to end on a tiny Llama on the CPU, including a recovery in two stages
(`--save-recovered`, then `--start-from`), as the GPU runs use it."""

import importlib.util
import json
import os

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tests.conftest import SHARED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINILM = os.path.join(SHARED, "models", "all-MiniLM-L6-v2")
pytestmark = pytest.mark.skipif(not os.path.isdir(MINILM), reason=f"needs {MINILM} (HF_SEMISPARSE_SHARED)")
TEXT = (
    "The quality of mercy is not strained; it droppeth as the gentle rain from heaven upon the place beneath. "
    "It is twice blest; it blesseth him that gives and him that takes. "
)


def load_bench():
    spec = importlib.util.spec_from_file_location(
        "bench_pruning_llm", os.path.join(ROOT, "benchmarks", "bench_pruning_llm.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.fixture
def tiny_llm(tmp_path):
    """A tiny Llama with a real tokenizer (MiniLM's WordPiece), calibration and evaluation texts."""
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
    (tmp_path / "calib" / "plays.txt").write_text(TEXT * 40, encoding="utf-8")
    (tmp_path / "eval.txt").write_text(TEXT[::-1] * 10, encoding="utf-8")
    return tmp_path


def test_a_recovery_in_two_stages_goes_on_from_the_saved_model(tiny_llm):
    bench = load_bench()
    common = [
        "--calib-dir", str(tiny_llm / "calib"), "--eval-file", str(tiny_llm / "eval.txt"),
        "--samples", "4", "--seq", "32", "--batch-size", "2", "--eval-tokens", "256", "--window", "64",
        "--device", "cpu", "--recover-steps", "2", "--recover-batch", "2", "--recover-lr", "1e-3",
    ]  # fmt: skip
    first, second = tiny_llm / "first.json", tiny_llm / "second.json"
    bench.main(
        [
            "--model", str(tiny_llm / "model"), "--methods", "dense", "sparsegpt", *common,
            "--save-recovered", str(tiny_llm / "stage1"), "--out", str(first),
        ]
    )  # fmt: skip
    bench.main(
        [
            "--model", str(tiny_llm / "model"), "--methods", "sparsegpt", *common, "--recover-seed", "7",
            "--start-from", str(tiny_llm / "stage1"), "--out", str(second),
        ]
    )  # fmt: skip
    dense, pruned, recovered = json.loads(first.read_text())["runs"]
    assert [dense["method"], pruned["method"], recovered["method"]] == [
        "dense",
        "sparsegpt",
        "sparsegpt+distill",
    ]
    resumed, recovered_again = json.loads(second.read_text())["runs"]
    assert resumed["start_from"] == str(tiny_llm / "stage1") and resumed["prune_seconds"] == 0.0
    # the saved stage-1 model is what stage 2 starts from (compressed save and load are exact in float32)
    assert resumed["perplexity"] == pytest.approx(recovered["perplexity"], rel=1e-5)
    assert recovered_again["perplexity"] != recovered["perplexity"]  # it trained on


def test_staged_recovery_options_without_their_run_are_refused(tiny_llm, capsys):
    bench = load_bench()
    model = ["--model", str(tiny_llm / "model"), "--device", "cpu"]
    with pytest.raises(SystemExit):
        bench.main([*model, "--methods", "dense", "--start-from", str(tiny_llm / "model")])
    assert "put sparsegpt in --methods" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main([*model, "--methods", "sparsegpt", "--save-recovered", str(tiny_llm / "out")])
    assert "give --recover-steps" in capsys.readouterr().err
