"""Saving never loses a user's files: what is refused, what is replaced, what is kept, and folder modes."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hf_semisparse import (
    AutoSparseModel,
    CorruptCheckpointError,
    SaveDestinationError,
    SparsityConfig,
    prune_24,
    save_sparse_pretrained,
)
from tests.conftest import make_model


@pytest.fixture(scope="module")
def model():
    model = make_model("gpt2").eval()
    prune_24(model)
    return model


def snapshot(folder):
    """Every file under `folder` (relative path -> bytes)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def user_files(folder):
    (folder / "runs" / "exp1").mkdir(parents=True)
    (folder / "runs" / "exp1" / "events.out").write_text("tensorboard")
    (folder / "NOTES.txt").write_text("my notes")
    (folder / "tokenizer.json").write_text('{"model": {}}')
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "README.md").write_text("my own card")


def assert_loads_as(folder, model):
    loaded = AutoSparseModel.from_pretrained(folder)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_existing_checkpoint_folder_keeps_user_files_and_drops_stale_shards(model, tmp_path):
    folder = tmp_path / "out"
    save_sparse_pretrained(model, folder, max_shard_size="40KB")  # an older, sharded save
    shards = sorted(f for f in os.listdir(folder) if f.startswith("model-"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").exists()
    user_files(folder)
    kept = {k: v for k, v in snapshot(folder).items() if not k.startswith(("model", "config", "generation"))}
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)
    try:
        save_sparse_pretrained(model, folder)  # one file now: the index and shards must go
        after = snapshot(folder)
        assert {k: after[k] for k in kept} == kept  # tokenizer, notes, runs/, README.md untouched
        assert sorted(set(after) - set(kept)) == [
            "config.json",
            "generation_config.json",
            "model.safetensors",
        ]
        assert not [f for f in os.listdir(folder) if f.endswith(".partial")]
        assert_loads_as(folder, model)
    finally:
        with torch.no_grad():
            model.transformer.wte.weight.sub_(1.0)


def test_tokenizer_first_then_model(model, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text("{}")  # tokenizer.save_pretrained(out) came first
    save_sparse_pretrained(model, folder, extra_files={"README.md": "card"})
    assert (folder / "tokenizer_config.json").read_text() == "{}"
    assert (folder / "README.md").read_text() == "card"


def word_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_tokenizer_saved_with_the_model_in_one_step(model, tmp_path):
    from transformers import AutoTokenizer

    save_sparse_pretrained(model, tmp_path / "out", tokenizer=word_tokenizer())
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("hello world")["input_ids"] == [1, 2]
    loaded = AutoSparseModel.from_pretrained(tmp_path / "out")
    assert torch.equal(
        loaded.state_dict()["transformer.h.0.attn.c_attn.weight"],
        model.state_dict()["transformer.h.0.attn.c_attn.weight"],
    )
    for wrong in ("gpt2", model, model.config):  # a name, a model, a config: not a tokenizer
        with pytest.raises(TypeError, match="tokenizer must be a tokenizer or processor"):
            save_sparse_pretrained(model, tmp_path / "other", tokenizer=wrong)
    assert not (tmp_path / "other").exists()


def test_a_tokenizer_that_fails_half_way_leaves_the_checkpoint_as_it_was(model, tmp_path):
    save_sparse_pretrained(model, tmp_path / "out", tokenizer=word_tokenizer())
    before = snapshot(tmp_path / "out")

    class Failing:
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("half written")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_sparse_pretrained(model, tmp_path / "out", tokenizer=Failing())
    assert snapshot(tmp_path / "out") == before


def test_current_directory_is_refused_unless_asked(model, tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "train.py").write_text("print('train')")
    (project / "config.json").write_text('{"lr": 1}')  # a checkpoint-looking name does not make it safe
    monkeypatch.chdir(project)
    before = snapshot(project)
    for where in (".", str(project), str(tmp_path), "/"):
        with pytest.raises(SaveDestinationError, match="current directory"):
            save_sparse_pretrained(model, where)
    assert snapshot(project) == before and os.getcwd() == str(project)
    save_sparse_pretrained(model, ".", overwrite=True)  # asked explicitly: checkpoint files only
    assert (project / "src" / "train.py").read_text() == "print('train')"
    assert_loads_as(project, model)


def test_folder_above_the_source_is_refused(model, tmp_path):
    proj = tmp_path / "proj"
    save_sparse_pretrained(model, proj / "ckpt")
    (proj / "data.csv").write_text("a,b")
    loaded = AutoSparseModel.from_pretrained(proj / "ckpt")
    before = snapshot(proj)
    with pytest.raises(SaveDestinationError, match="holds the source checkpoint"):
        save_sparse_pretrained(loaded, proj)
    assert snapshot(proj) == before
    save_sparse_pretrained(loaded, proj / "ckpt")  # saving back into the source folder itself is fine
    assert_loads_as(proj / "ckpt", model)


def test_the_dense_checkpoint_the_model_came_from_is_not_replaced_unless_asked(tmp_path):
    from transformers import AutoModelForCausalLM

    make_model("gpt2").save_pretrained(tmp_path / "dense")
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    prune_24(pruned, show_progress=False)
    before = snapshot(tmp_path / "dense")
    with pytest.raises(SaveDestinationError, match="dense checkpoint the model was loaded from"):
        save_sparse_pretrained(pruned, tmp_path / "dense")
    assert snapshot(tmp_path / "dense") == before
    save_sparse_pretrained(pruned, tmp_path / "dense", overwrite=True)  # asked for: replaced
    assert_loads_as(tmp_path / "dense", pruned)


def test_saving_back_into_a_sparse_source_is_allowed_whatever_its_layout(model, tmp_path):
    save_sparse_pretrained(model, tmp_path / "sharded", max_shard_size="20KB")
    save_sparse_pretrained(model, tmp_path / "legacy", format="compressed-tensors")
    for folder in ("sharded", "legacy"):
        loaded = AutoSparseModel.from_pretrained(tmp_path / folder)
        save_sparse_pretrained(loaded, tmp_path / folder)  # our 2:4 layout: saved back in place
        assert_loads_as(tmp_path / folder, model)
    from hf_semisparse.save_destination import check_save_destination

    save_sparse_pretrained(model, tmp_path / "quantized", format="compressed-tensors")
    config = json.loads((tmp_path / "quantized" / "config.json").read_text())
    check_save_destination(
        tmp_path / "quantized", source=tmp_path / "quantized"
    )  # compressed-tensors 2:4: ours
    config["quantization_config"]["config_groups"] = {"group_0": {"weights": {"num_bits": 8}}}
    (tmp_path / "quantized" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SaveDestinationError, match="dense checkpoint"):  # 2:4 and quantized: not our layout
        check_save_destination(tmp_path / "quantized", source=tmp_path / "quantized")
    config = json.loads((tmp_path / "legacy" / "config.json").read_text())
    config["quantization_config"] = ["not", "an", "object"]  # unreadable: treated as another format
    (tmp_path / "legacy" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SaveDestinationError, match="dense checkpoint"):
        check_save_destination(tmp_path / "legacy", source=tmp_path / "legacy")


def test_non_empty_folder_without_checkpoint_and_files(model, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "thesis.tex").write_text("...")
    with pytest.raises(SaveDestinationError, match=r"not empty \(thesis.tex\) and holds no checkpoint"):
        save_sparse_pretrained(model, folder)
    assert os.listdir(folder) == ["thesis.tex"]
    hidden = tmp_path / "clone"
    hidden.mkdir()
    (hidden / ".gitattributes").write_text("*.safetensors filter=lfs")  # a fresh Hub clone counts as empty
    save_sparse_pretrained(model, hidden)
    assert (hidden / ".gitattributes").exists() and (hidden / "model.safetensors").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SaveDestinationError, match="is a file"):
        save_sparse_pretrained(model, tmp_path / "file", overwrite=True)
    with pytest.raises(ValueError, match="max_shard_size='lots'"):
        save_sparse_pretrained(model, tmp_path / "new", max_shard_size="lots")
    with pytest.raises(ValueError, match="plain file name"):
        save_sparse_pretrained(model, tmp_path / "new", extra_files={"../escape.txt": "x"})
    assert not (tmp_path / "new").exists()


def test_modes_match_save_pretrained(model, tmp_path):
    old = os.umask(0o022)
    try:
        save_sparse_pretrained(model, tmp_path / "ours")
        model.save_pretrained(tmp_path / "theirs")
        recipe = SparsityConfig().save_pretrained(tmp_path / "ours")  # written through utils.atomic_write
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "ours") == mode(tmp_path / "theirs") == 0o755
    assert mode(tmp_path / "ours" / "config.json") == mode(tmp_path / "theirs" / "config.json") == 0o644
    # files follow the umask (transformers 5.24 writes its model.safetensors 0600 through a temporary file)
    assert mode(tmp_path / "ours" / "model.safetensors") == mode(recipe) == 0o644


def test_interrupted_save_into_existing_folder_leaves_it_whole(model, tmp_path, monkeypatch):
    import hf_semisparse.serialization as ser

    folder = tmp_path / "out"
    save_sparse_pretrained(model, folder)
    user_files(folder)
    before = snapshot(folder)

    def failing_save(tensors, path, metadata=None):
        raise OSError("disk full")

    monkeypatch.setattr(ser, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_sparse_pretrained(model, folder)
    assert snapshot(folder) == before
    assert sorted(os.listdir(folder)) == sorted(
        {p.split(os.sep)[0] for p in before}
    )  # no staging folder left


def test_digest_record_matches_tensors(model, tmp_path):
    from safetensors import safe_open

    save_sparse_pretrained(model, tmp_path / "ckpt")
    with safe_open(tmp_path / "ckpt" / "model.safetensors", framework="pt") as f:
        record = json.loads(f.metadata()["hf_semisparse_digests"])
        assert record["algorithm"] == "crc32" and sorted(record["tensors"]) == sorted(f.keys())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1  # rewrite the file with one changed value but the old digest record
    save_file(
        tensors,
        tmp_path / "ckpt" / "model.safetensors",
        metadata={"hf_semisparse_digests": json.dumps(record)},
    )
    with pytest.raises(CorruptCheckpointError, match=f"tensor {key} do not match the CRC32"):
        AutoSparseModel.from_pretrained(tmp_path / "ckpt")


def test_a_processor_that_writes_a_folder_keeps_it_traversable(model, tmp_path):
    from hf_semisparse.save_destination import default_dir_mode

    class WithFolder:
        def save_pretrained(self, folder):
            (Path(folder) / "templates").mkdir()
            (Path(folder) / "templates" / "chat.jinja").write_text("{{ messages }}")

    save_sparse_pretrained(model, tmp_path / "out", tokenizer=WithFolder())
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "templates").st_mode) == default_dir_mode()
    assert (tmp_path / "out" / "templates" / "chat.jinja").read_text() == "{{ messages }}"
    save_sparse_pretrained(model, tmp_path / "out", tokenizer=WithFolder.__new__(WithFolder))


def test_an_entry_of_another_kind_in_the_way_is_refused_before_anything_moves(model, tmp_path):
    class WithFolder:
        def save_pretrained(self, folder):
            (Path(folder) / "templates").mkdir()
            (Path(folder) / "templates" / "chat.jinja").write_text("new")

    save_sparse_pretrained(model, tmp_path / "out")
    (tmp_path / "out" / "templates").write_text("a file where the save writes a folder")
    before = snapshot(tmp_path / "out")
    with pytest.raises(SaveDestinationError, match="a file of that name is in the way"):
        save_sparse_pretrained(model, tmp_path / "out", tokenizer=WithFolder())
    assert snapshot(tmp_path / "out") == before


def test_a_save_that_fails_half_way_puts_back_what_it_replaced(model, tmp_path, monkeypatch):
    from hf_semisparse import save_destination

    save_sparse_pretrained(model, tmp_path / "out", tokenizer=word_tokenizer())
    before = snapshot(tmp_path / "out")
    replace = os.replace
    calls = []

    def failing_replace(src, dst):  # the third move into the checkpoint fails (disk full, say)
        if os.path.dirname(os.fspath(dst)) == os.fspath(tmp_path / "out") and ".partial" in os.fspath(src):
            calls.append(dst)
            if len(calls) == 3:
                raise OSError("disk full")
        return replace(src, dst)

    monkeypatch.setattr(save_destination.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_sparse_pretrained(model, tmp_path / "out", tokenizer=word_tokenizer())
    monkeypatch.setattr(save_destination.os, "replace", replace)
    assert snapshot(tmp_path / "out") == before
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".")]  # no backup or staging left
