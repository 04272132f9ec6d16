"""Every `hf-semisparse` command is a trustworthy gate: 0 success, 1 a finding, 2 a usage or input error in one
line without a traceback; convert never deletes its source; push writes nothing on failure."""

import os
import subprocess
import sys

import pytest
import torch
from huggingface_hub import HfApi

import hf_semisparse
from hf_semisparse import prune_24, save_sparse_pretrained
from hf_semisparse.cli import main
from tests.conftest import make_model

SRC = os.path.dirname(os.path.dirname(hf_semisparse.__file__))  # the package these tests import


def run(args, capsys):
    """Exit code and stderr of `hf-semisparse args`; an error must be one line and no traceback."""
    capsys.readouterr()  # drop what setting up printed (transformers' progress bars)
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code in (2, 3):
        assert len(err.strip().splitlines()) == 1, err
    return code, err


def snapshot(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


@pytest.fixture
def dense_24(tmp_path):
    """A dense checkpoint whose recorded targets are 2:4 zeros, inside a project folder with other files."""
    model = make_model("gpt2").eval()
    prune_24(model)
    model.save_pretrained(tmp_path / "proj" / "ckpt")
    (tmp_path / "proj" / "train.py").write_text("print('train')")
    (tmp_path / "proj" / "ckpt" / "tokenizer.json").write_text("{}")
    return tmp_path / "proj" / "ckpt"


@pytest.fixture
def sparse_ckpt(tmp_path):
    model = make_model("bert").eval()
    prune_24(model)
    save_sparse_pretrained(model, tmp_path / "sparse")
    return tmp_path / "sparse"


def test_convert_never_deletes_its_source(dense_24, capsys):
    proj = dense_24.parent
    before = snapshot(proj)
    code, err = run(["convert", dense_24, proj], capsys)
    assert code == 2 and "holds the source checkpoint" in err
    code, err = run(["convert", dense_24, dense_24, "--overwrite"], capsys)
    assert code == 2 and "never replaces its source" in err
    assert snapshot(proj) == before
    assert run(["convert", dense_24, proj / "sparse"], capsys)[0] == 0
    assert {k: v for k, v in snapshot(proj).items() if not k.startswith("sparse")} == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["convert", "{tmp}/missing/ckpt", "{tmp}/out"], "no such folder, and not a Hub repo id"),
        (["convert", "{ckpt}/config.json", "{tmp}/out"], "is a file"),
        (["convert", "{ckpt}", "{tmp}/out", "--dtype", "float17"], "'float17' is not a dtype"),
        (["convert", "{ckpt}", "{tmp}/out", "--max-shard-size", "5 parsecs"], "is not a size"),
        (["convert", "{ckpt}", "{tmp}/out", "--max-shard-size", "0"], "positive"),
        (["inspect", "{tmp}/missing"], "no such folder"),
        (["inspect", "{ckpt}/model.safetensors"], "is a file"),
        (["inspect", "{tmp}"], "holds no config.json"),
        (["push", "{tmp}/missing", "me/x"], "no such folder"),
        (["push", "{ckpt}", "not a repo id"], "not a Hub repo id"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_and_input_errors_exit_2_in_one_line(dense_24, tmp_path, args, message, capsys):
    args = [a.format(tmp=tmp_path, ckpt=dense_24) for a in args]
    code, err = run(args, capsys)
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists()


def test_a_valid_hub_id_that_cannot_be_downloaded_is_an_input_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    code, err = run(["convert", "someone/not-cached-anywhere", tmp_path / "out"], capsys)
    assert code == 2 and "cannot be downloaded from the Hub" in err
    assert not (tmp_path / "out").exists()


def test_inspect_damaged_files_exit_2(sparse_ckpt, capsys):
    weights = sparse_ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:5000])
    code, err = run(["inspect", sparse_ckpt], capsys)
    assert code == 2 and "truncated or not a safetensors file" in err
    weights.write_bytes(b"\x00" * 64)
    assert run(["inspect", sparse_ckpt], capsys)[0] == 2
    weights.write_bytes(data)
    assert run(["inspect", sparse_ckpt], capsys)[0] == 0
    (sparse_ckpt / "config.json").write_text("{not json")
    code, err = run(["inspect", sparse_ckpt], capsys)
    assert code == 2 and "config.json is not valid JSON" in err


def test_inspect_a_checkpoint_without_24_layers_is_a_finding(tmp_path, capsys):
    make_model("bert").save_pretrained(tmp_path / "dense")
    code, _ = run(["inspect", tmp_path / "dense"], capsys)
    assert code == 1


def test_unexpected_errors_exit_3_not_1(sparse_ckpt, monkeypatch, capsys):
    def broken(path, verify_data=False):
        raise RuntimeError("boom")

    monkeypatch.setattr("hf_semisparse.cli.inspect_checkpoint", broken)
    code, err = run(["inspect", sparse_ckpt], capsys)
    assert code == 3 and "unexpected RuntimeError: boom" in err and "HF_SEMISPARSE_DEBUG" in err


def test_push_offline_fails_cleanly_and_writes_nothing(sparse_ckpt, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    before = snapshot(sparse_ckpt)
    code, err = run(["push", sparse_ckpt, "me/bert-24"], capsys)
    assert code == 2 and "upload to me/bert-24 failed" in err
    assert snapshot(sparse_ckpt) == before  # no README.md left behind


def test_push_checks_sparsity_every_time(tmp_path, monkeypatch, capsys):
    uploads = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: uploads.append(kw["folder_path"]))
    model = make_model("bert")
    prune_24(model)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight.fill_(0.5)  # recorded as 2:4, but it is not
    model.save_pretrained(tmp_path / "bad")
    (tmp_path / "bad" / "README.md").write_text("a card from an earlier push")
    before = snapshot(tmp_path / "bad")
    code, err = run(["push", tmp_path / "bad", "me/x"], capsys)
    assert code == 1 and "layer.0.output.dense" in err and uploads == []
    make_model("bert").save_pretrained(tmp_path / "plain")  # records no target at all
    code, err = run(["push", tmp_path / "plain", "me/x"], capsys)
    assert code == 1 and "records no 2:4 layer" in err and uploads == []
    assert not (tmp_path / "plain" / "README.md").exists()
    assert snapshot(tmp_path / "bad") == before


def _timed(args):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC))
    code = "import sys, runpy; sys.argv = ['hf-semisparse', *sys.argv[1:]]; " + (
        "runpy.run_module('hf_semisparse.cli', run_name='__main__')"
    )
    probe = (
        "import sys, atexit; atexit.register(lambda: print(sorted(m for m in ('torch', 'transformers', "
        + ("'transformers.trainer') if m in sys.modules), file=sys.stderr)); ")
    )
    return subprocess.run(
        [sys.executable, "-c", probe + code, *args], capture_output=True, text=True, env=env
    )


def test_help_and_inspect_do_not_import_transformers(sparse_ckpt):
    result = _timed(["--help"])
    assert result.returncode == 0 and "convert" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == "[]"  # neither torch nor transformers for --help
    result = _timed(["inspect", str(sparse_ckpt)])
    assert result.returncode == 0, result.stderr
    assert (
        result.stderr.strip().splitlines()[-1] == "['torch']"
    )  # safetensors needs torch; nothing else heavy
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, hf_semisparse; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.path.abspath(SRC)),
    )
    assert imported.stdout.strip() == "False"


def test_python_dash_m_runs_the_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "hf_semisparse", "--help"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.path.abspath(SRC)),
    )
    assert result.returncode == 0 and "convert" in result.stdout and "inspect" in result.stdout


@pytest.mark.parametrize("unbuffered", [False, True])
def test_a_closed_pipe_stops_the_output_quietly(sparse_ckpt, unbuffered):
    """`hf-semisparse inspect ... | head -1`: the reader closes the pipe before the command prints; stdout
    block-buffered (a normal shell: the error shows when the output is flushed) or not (`PYTHONUNBUFFERED=1`)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update(PYTHONPATH=os.path.abspath(SRC), **({"PYTHONUNBUFFERED": "1"} if unbuffered else {}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "hf_semisparse", "inspect", str(sparse_ckpt), "--verify"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    proc.stdout.close()  # long before the command (it imports torch first) writes a line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == "", err  # no traceback, no "Exception ignored", no error line


def test_a_trainer_output_folder_names_its_checkpoints(tmp_path, capsys):
    for step in (3, 12, 6):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir(parents=True)
    code, err = run(["inspect", tmp_path / "run"], capsys)
    assert code == 2 and "holds checkpoint-3, checkpoint-6, checkpoint-12: give one of them" in err
    for step in (9, 15):  # past three: the newest three, and how many more
        (tmp_path / "run" / f"checkpoint-{step}").mkdir()
    (tmp_path / "run" / "checkpoint-final").mkdir()  # not a step folder: not counted
    code, err = run(["inspect", tmp_path / "run"], capsys)
    assert (
        code == 2 and "holds checkpoint-9, checkpoint-12, checkpoint-15 and 2 more: give one of them" in err
    )


def test_a_broken_pipe_on_stdout_that_is_not_a_pipe_is_an_error_line(sparse_ckpt):
    """A socket as stdout whose reader went away: not the quiet `| head` case, a one-line error (exit 2)."""
    import socket

    ours, theirs = socket.socketpair()
    theirs.close()
    proc = subprocess.run(
        [sys.executable, "-m", "hf_semisparse", "inspect", str(sparse_ckpt)],
        stdout=ours.fileno(),
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.path.abspath(SRC)},
        timeout=120,
    )
    ours.close()
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Broken pipe" in err and len(err.strip().splitlines()) == 1, err


def test_a_closed_stdout_is_not_a_crash(sparse_ckpt):
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, os; os.close(1); sys.stdout = None; from hf_semisparse.cli import main; "
         f"sys.exit(main(['inspect', {str(sparse_ckpt)!r}]))"],
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.path.abspath(SRC)},
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0 and "unexpected" not in proc.stderr.decode(), proc.stderr.decode()
