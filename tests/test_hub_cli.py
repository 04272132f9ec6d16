import json
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi

from hf_semisparse import AutoSparseModel, prune_24, save_sparse_pretrained
from hf_semisparse.cli import inspect_checkpoint, main
from hf_semisparse.hub import push_to_hub, render_model_card
from tests.conftest import make_model


@pytest.fixture
def sparse_ckpt(tmp_path):
    model = make_model("bert").eval()
    prune_24(model)
    save_sparse_pretrained(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_model_card(sparse_ckpt):
    model, path = sparse_ckpt
    card = render_model_card(
        checkpoint_dir=path,
        repo_id="me/bert-24",
        base_model="bert-base-cased",
        license="apache-2.0",
        datasets=["squad"],
        results=[{"name": "dense", "F1": 86.9}, {"name": "2:4", "F1": 86.5}],
        results_command="python examples/x.py",
        recovered=True,
    )
    head, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "license: apache-2.0" in head and "base_model: bert-base-cased" in head and "- squad" in head
    assert 'AutoSparseModel.from_pretrained("me/bert-24"' in body
    assert "| dense | 86.9 |" in body and "| 2:4 | 86.5 |" in body and "python examples/x.py" in body
    for name in model.config.sparsity_config["targets"]:
        assert f"`{name}`" in body
    assert "0.531x" in body  # fp32 weights: half the values plus 1 bit in 32
    # no license unless given: a pruned model keeps its base model's, which only the caller knows
    assert "license" not in render_model_card(checkpoint_dir=path, repo_id="me/x").split("---\n")[1]
    with pytest.raises(ValueError, match="no 2:4 targets"):
        render_model_card(make_model("bert"))


def test_the_cards_load_snippet_names_the_saved_half_precision_dtype(tmp_path):
    for dtype, named in [
        (torch.bfloat16, "bfloat16"),
        (torch.float16, "float16"),
        (torch.float32, "float16"),
    ]:
        model = make_model("llama").eval().to(dtype)
        prune_24(model)
        save_sparse_pretrained(model, tmp_path / named / str(dtype))
        card = render_model_card(checkpoint_dir=tmp_path / named / str(dtype), repo_id="me/x")
        assert f'from_pretrained("me/x", dtype=torch.{named}, device_map="cuda")' in card
    # from a model in memory: the dtype of its weights, not the one its config was built with
    model = make_model("llama").eval().to(torch.bfloat16)
    prune_24(model)
    assert model.config.dtype != torch.bfloat16
    assert "dtype=torch.bfloat16" in render_model_card(model, repo_id="me/x")


def test_push_to_hub_uploads_checkpoint_and_card(monkeypatch):
    model = make_model("gpt2")
    prune_24(model)
    uploaded = {}

    def fake_create_repo(self, repo_id, **kwargs):
        uploaded["created"] = (repo_id, kwargs.get("private"))

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded["files"] = sorted(os.listdir(folder_path))
        with open(os.path.join(folder_path, "README.md")) as f:
            uploaded["card"] = f.read()
        uploaded["loaded"] = AutoSparseModel.from_pretrained(folder_path)
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    assert push_to_hub(model, "me/gpt2-24", private=True, base_model="gpt2") == "commit-info"
    assert uploaded["created"] == ("me/gpt2-24", True)
    assert uploaded["files"] == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    assert "me/gpt2-24" in uploaded["card"] and "base_model: gpt2" in uploaded["card"]
    for key, value in model.state_dict().items():
        assert torch.equal(uploaded["loaded"].state_dict()[key], value), key


def test_cli_convert_and_inspect(tmp_path, capsys):
    model = make_model("gpt2").eval()
    prune_24(model)
    model.save_pretrained(tmp_path / "dense")  # dense with zeros; config records the targets
    dense_report = inspect_checkpoint(str(tmp_path / "dense"))
    assert dense_report["format"] == "dense" and all(layer["is_24"] for layer in dense_report["layers"])
    assert main(["convert", str(tmp_path / "dense"), str(tmp_path / "sparse")]) == 0
    assert "2:4 layers" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "sparse"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "hf_semisparse sparse-24-bitmask" and report["problems"] == []
    assert sorted(layer["module"] for layer in report["layers"]) == sorted(
        model.config.sparsity_config["targets"]
    )
    loaded = AutoSparseModel.from_pretrained(tmp_path / "sparse")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert main(["inspect", str(tmp_path / "sparse")]) == 0
    summary = capsys.readouterr().out.splitlines()[-1]
    assert report["ignored"] and all(name in summary for name in report["ignored"][:5]), summary


def test_cli_convert_keeps_the_tokenizer(tmp_path, capsys):
    from transformers import AutoTokenizer

    from tests.test_save_destination import word_tokenizer

    model = make_model("gpt2").eval()
    prune_24(model)
    model.save_pretrained(tmp_path / "dense")
    word_tokenizer().save_pretrained(tmp_path / "dense")
    assert main(["convert", str(tmp_path / "dense"), str(tmp_path / "sparse")]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "sparse")("hello world")["input_ids"] == [1, 2]


def test_cli_convert_copies_tokenizer_files_without_running_their_code(tmp_path, capsys):
    model = make_model("gpt2").eval()
    prune_24(model)
    model.save_pretrained(tmp_path / "dense")
    marker = tmp_path / "ran"
    (tmp_path / "dense" / "tok.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = {"auto_map": {"AutoTokenizer": ["tok.Tok", None]}, "tokenizer_class": "Tok"}
    (tmp_path / "dense" / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "dense" / "notes.txt").write_text("not a tokenizer file")
    assert main(["convert", str(tmp_path / "dense"), str(tmp_path / "sparse")]) == 0
    assert not marker.exists()
    assert json.loads((tmp_path / "sparse" / "tokenizer_config.json").read_text()) == config
    assert not (tmp_path / "sparse" / "notes.txt").exists() and not (tmp_path / "sparse" / "tok.py").exists()


def test_cli_inspect_says_when_a_checkpoint_records_no_sparsity(tmp_path, capsys):
    make_model("gpt2").save_pretrained(tmp_path / "dense")
    assert main(["inspect", str(tmp_path / "dense")]) == 1
    assert "config.json has no sparsity record" in capsys.readouterr().out.splitlines()[-1]


def test_cli_inspect_flags_a_layer_that_is_not_24(tmp_path, capsys):
    model = make_model("bert")
    prune_24(model)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight.fill_(0.5)
    model.save_pretrained(tmp_path / "dense")
    assert main(["inspect", str(tmp_path / "dense")]) == 1
    assert "layer.0.output.dense" in capsys.readouterr().out.split("NOT 2:4")[0].splitlines()[-1]


def test_cli_errors_and_push(tmp_path, sparse_ckpt, monkeypatch, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err
    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("repo", repo_id))
    monkeypatch.setattr(
        HfApi,
        "upload_folder",
        lambda self, **kw: calls.setdefault("files", sorted(os.listdir(kw["folder_path"]))),
    )
    _, path = sparse_ckpt
    assert main(["push", str(path), "me/bert-24"]) == 0
    assert calls["repo"] == "me/bert-24" and calls["files"] == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]


def _commit_recorder(monkeypatch) -> dict:
    """Stand-ins for the Hub: `create_commit` records what one commit would upload (path in repo -> bytes)."""
    uploaded: dict = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: None)

    def create_commit(self, repo_id, operations, commit_message, **kw):
        uploaded["repo"], uploaded["commits"] = repo_id, uploaded.get("commits", 0) + 1
        for op in operations:
            content = op.path_or_fileobj
            uploaded[op.path_in_repo] = content if isinstance(content, bytes) else Path(content).read_bytes()
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: pytest.fail("two commits: use one"))
    monkeypatch.setattr(HfApi, "upload_file", lambda self, **kw: pytest.fail("two commits: use one"))
    return uploaded


@pytest.mark.parametrize("written_from", ["here", "the folder's parent"])
def test_cli_push_points_a_local_cards_snippet_at_the_repo_and_leaves_the_folder_alone(
    sparse_ckpt, monkeypatch, written_from
):
    """A card written for the local folder (as the examples write it, with the path from where they ran) loads
    that folder; the uploaded card loads the repo, in the same commit as the weights, a base model the card cites
    keeps its name, and the local card's bytes stay as they were. A failed upload leaves the folder as it was."""
    _, path = sparse_ckpt
    # written from two folders up, the example's card holds a path relative to there, and push runs elsewhere
    here = written_from == "here"
    snippet_path = Path(path).as_posix() if here else "/".join(path.parts[-3:])  # as outputs/run/sparse
    local = render_model_card(checkpoint_dir=path, repo_id=snippet_path, model_name="my run")
    local += '\nThe dense model: `AutoSparseModel.from_pretrained("org/dense-base")`.\r\n'
    (path / "README.md").write_bytes(local.encode())
    before = {name: (path / name).read_bytes() for name in os.listdir(path)}
    uploaded = _commit_recorder(monkeypatch)
    assert main(["push", str(path), "me/bert-24"]) == 0
    card = uploaded["README.md"].decode()
    assert 'AutoSparseModel.from_pretrained("me/bert-24"' in card and "# my run" in card
    assert 'from_pretrained("org/dense-base")' in card and snippet_path not in card
    assert uploaded["commits"] == 1 and uploaded["repo"] == "me/bert-24"
    assert {k: v for k, v in uploaded.items() if k not in ("README.md", "repo", "commits")} == {
        name: data for name, data in before.items() if name != "README.md"
    }  # every other file, as it is on disk
    assert {name: (path / name).read_bytes() for name in os.listdir(path)} == before

    def fail(self, **kw):
        raise OSError("network down")

    monkeypatch.setattr(HfApi, "create_commit", fail)
    assert main(["push", str(path), "me/bert-24"]) == 2
    assert {name: (path / name).read_bytes() for name in os.listdir(path)} == before


def test_cli_push_refuses_a_card_that_is_not_utf8_before_anything_is_sent(sparse_ckpt, monkeypatch, capsys):
    _, path = sparse_ckpt
    (path / "README.md").write_bytes(b"# caf\xe9 (latin-1)\n")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: pytest.fail("nothing may be sent"))
    assert main(["push", str(path), "me/bert-24"]) == 2
    assert "README.md is not UTF-8" in capsys.readouterr().err
    assert (path / "README.md").read_bytes() == b"# caf\xe9 (latin-1)\n"


@pytest.mark.parametrize(
    "card",
    [
        "# a card without metadata\n\nweights from `org/dense`\n",
        "---\n# a comment\nlicense: mit\nversion: 1.10\nmodel-index:\n- name: x\n---\n\n# card\n",
    ],
)
def test_cli_push_sends_a_card_it_need_not_change_as_it_is(sparse_ckpt, monkeypatch, card):
    """A card whose snippet does not load the folder goes up byte for byte when no --base-model or --license is
    given (no metadata block added, comments and values kept), through `upload_folder`."""
    _, path = sparse_ckpt
    (path / "README.md").write_text(card, encoding="utf-8")
    sent = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(
        HfApi, "create_commit", lambda self, **kw: pytest.fail("nothing to point: upload as is")
    )
    monkeypatch.setattr(
        HfApi,
        "upload_folder",
        lambda self, **kw: sent.update(card=(Path(kw["folder_path"]) / "README.md").read_bytes()),
    )
    assert main(["push", str(path), "me/bert-24"]) == 0
    assert sent["card"] == card.encode("utf-8")


def test_cli_push_sets_metadata_keys_and_keeps_the_rest_of_the_card(sparse_ckpt, monkeypatch):
    _, path = sparse_ckpt
    card = "\ufeff---\n# a comment\nlicense: mit\nversion: 1.10\nbase_model:\n- a/b\n- c/d\n---\n\n# card\n"
    (path / "README.md").write_text(card, encoding="utf-8")
    uploaded = _commit_recorder(monkeypatch)
    assert main(["push", str(path), "me/bert-24", "--base-model", "org/base", "--license", "llama3.1"]) == 0
    assert uploaded["README.md"].decode() == (
        "---\n# a comment\nlicense: llama3.1\nversion: 1.10\nbase_model: org/base\n---\n\n# card\n"
    )  # only those two keys changed; the byte-order mark, which would hide the metadata, dropped
    assert main(["push", str(path), "me/bert-24", "--license", "not: a license"]) == 2


def test_push_uploads_what_upload_folder_would(tmp_path):
    """The one-commit path lists the folder's files as `upload_folder` does (its ignore patterns: `.git` and
    `.cache/huggingface` at any depth, a `.git` file, broken links left out), with README.md replaced."""
    from hf_semisparse.cli import _folder_operations

    (tmp_path / "sub" / ".cache" / "huggingface").mkdir(parents=True)
    (tmp_path / "sub" / ".cache" / "huggingface" / "x.lock").write_text("x")
    (tmp_path / ".git").write_text("gitdir: ../elsewhere\n")  # a worktree's .git is a file
    (tmp_path / "sub" / "deeper").mkdir()
    for name in ("README.md", "config.json", "sub/a.bin", "sub/deeper/b.safetensors"):
        (tmp_path / name).write_text(name)
    (tmp_path / "broken").symlink_to(tmp_path / "missing")
    (tmp_path / "linked.json").symlink_to(tmp_path / "config.json")
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS

    expected = HfApi()._prepare_upload_folder_additions(
        tmp_path, "", ignore_patterns=["README.md", *DEFAULT_IGNORE_PATTERNS]
    )  # what upload_folder(ignore_patterns=["README.md"]) would send
    ours = _folder_operations(str(tmp_path), {"README.md": b"pointed"})
    assert [op.path_in_repo for op in ours[:-1]] == [op.path_in_repo for op in expected]
    assert {op.path_in_repo for op in ours[:-1]} == {
        "config.json",
        "linked.json",
        "sub/a.bin",
        "sub/deeper/b.safetensors",
    }
    assert ours[-1].path_in_repo == "README.md" and ours[-1].path_or_fileobj == b"pointed"


def test_cli_inspect_says_how_the_model_was_pruned(tmp_path, capsys):
    from hf_semisparse import SparsityConfig
    from tests.test_sequential_pruning import llama, token_batches

    model = llama(2)
    prune_24(
        model,
        SparsityConfig(method="wanda"),
        token_batches(2),
        show_progress=False,
        reconstruct_epochs=2,
        reconstruct_lr=1e-3,
    )
    tuned = model.config.sparsity_config["block_reconstruction"]["blocks_tuned"]
    save_sparse_pretrained(model, tmp_path / "ckpt", show_progress=False)
    assert main(["inspect", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert f"pruned: wanda 2:4, block reconstruction 2 epochs at lr 0.001 ({tuned} of 2 blocks tuned)" in out
    assert main(["inspect", str(tmp_path / "ckpt"), "--json"]) == 0
    pruning = json.loads(capsys.readouterr().out)["pruning"]
    assert pruning["method"] == "wanda" and pruning["block_reconstruction"]["epochs"] == 2


def test_cli_version(capsys):
    from hf_semisparse import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"hf-semisparse {__version__}"


def test_cli_verify_says_when_files_hold_no_digests(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = make_model("llama")
    prune_24(model, show_progress=False)
    save_sparse_pretrained(model, tmp_path / "ours", show_progress=False)
    assert main(["inspect", str(tmp_path / "ours"), "--verify"]) == 0
    assert "every tensor matches its recorded CRC32" in capsys.readouterr().out
    # transformers' own save of the loaded model (what a Trainer checkpoint holds): our format, no digest record
    AutoModelForCausalLM.from_pretrained(tmp_path / "ours").save_pretrained(tmp_path / "plain")
    assert main(["inspect", str(tmp_path / "plain"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "CRC32" in out and "every tensor matches" not in out
    assert "1 weight file(s) hold no CRC32 record (model.safetensors" in out


def test_cli_push_base_model_and_license_go_into_the_uploaded_copy_of_an_existing_card(
    sparse_ckpt, monkeypatch, capsys
):
    """`--base-model` and `--license` set the metadata of the card that goes up, whether push wrote it or it
    existed; the local card keeps its bytes. A value that is not a Hub id stops push before anything is read or
    sent."""
    _, path = sparse_ckpt
    local = render_model_card(checkpoint_dir=path, repo_id=Path(path).as_posix(), license="mit")
    (path / "README.md").write_text(local)
    uploaded = _commit_recorder(monkeypatch)
    assert main(["push", str(path), "me/bert-24", "--base-model", "org/bert-base"]) == 0
    head, body = uploaded["README.md"].decode().split("---\n", 2)[1:]
    assert "base_model: org/bert-base" in head and "license: mit" in head  # the card's own license kept
    assert 'from_pretrained("me/bert-24"' in body and (path / "README.md").read_text() == local
    assert main(["push", str(path), "me/bert-24", "--license", "llama3.1"]) == 0
    assert "license: llama3.1" in uploaded["README.md"].decode().split("---\n")[1]
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["MyCustomBert"]  # a class transformers does not have: the card names none
    (path / "config.json").write_text(json.dumps(config))
    card = render_model_card(checkpoint_dir=path, repo_id="me/x")
    assert "MyCustomBert" not in card and "`from_pretrained` of its transformers class" in card
    assert main(["push", str(path), "me/bert-24", "--base-model", "no good!"]) == 2
    assert "--base-model 'no good!' is not a Hub repo id" in capsys.readouterr().err


def test_cli_push_drops_a_byte_order_mark_and_refuses_a_readme_that_is_not_a_file(
    sparse_ckpt, monkeypatch, capsys
):
    _, path = sparse_ckpt
    (path / "README.md").write_text("\ufeff---\nlicense: mit\n---\n# card\n", encoding="utf-8")
    uploaded = _commit_recorder(monkeypatch)
    assert main(["push", str(path), "me/bert-24"]) == 0
    assert uploaded["README.md"] == b"---\nlicense: mit\n---\n# card\n"  # the Hub reads metadata at the start
    (path / "README.md").unlink()
    (path / "README.md").mkdir()
    assert main(["push", str(path), "me/bert-24"]) == 2
    assert "README.md is not a file" in capsys.readouterr().err


def test_a_card_written_where_the_folder_was_before_it_moved_is_pointed(tmp_path):
    from hf_semisparse.hub import point_card_at

    folder = tmp_path / "outputs" / "run" / "sparse"
    folder.mkdir(parents=True)
    card = (
        'AutoSparseModel.from_pretrained("/workspace/outputs/run/sparse") '  # written in a container, say
        'AutoSparseModel.from_pretrained("/data/dense-base") '  # another local model: not this folder
        'AutoSparseModel.from_pretrained("outputs/run") '  # two parts: could be a Hub id
        'AutoSparseModel.from_pretrained("org/base")'
    )
    assert point_card_at(card, "me/repo", folder) == (
        'AutoSparseModel.from_pretrained("me/repo") AutoSparseModel.from_pretrained("/data/dense-base") '
        'AutoSparseModel.from_pretrained("outputs/run") AutoSparseModel.from_pretrained("org/base")'
    )


def test_set_card_metadata_replaces_a_keys_whole_value_and_refuses_what_yaml_would_misread():
    from hf_semisparse.hub import set_card_metadata

    card = "---\nbase_model:\n- a/b\n\n# the other one\n- c/d\ndescription: x\u2028license: y\nlicense_name: z\n---\nbody\n"
    assert set_card_metadata(card, base_model="org/base", license="mit") == (
        "---\nbase_model: org/base\ndescription: x\u2028license: y\nlicense_name: z\nlicense: mit\n---\nbody\n"
    )  # the list with its blank and comment lines replaced; a line break inside a value is not a line
    for value in ("null", "true", "no", "1.0"):
        with pytest.raises(ValueError, match="YAML would read it as"):
            set_card_metadata(card, license=value)
    with pytest.raises(ValueError, match="only a string"):
        set_card_metadata(card, base_model=["a/b", "c/d"])
