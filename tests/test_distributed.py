"""DDP on CPU (gloo, 2 processes): the callback keeps the ranks identical and matches a single-process run, and
checkpoints resume on the other number of processes (2 -> 1 and 1 -> 2)."""

import os
import socket
import subprocess
import sys

import torch

from hf_semisparse import is_nm_sparse

WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, out, *extra):
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(
        cmd + [str(out), *extra], capture_output=True, text=True, timeout=600, env=env, check=False
    )
    flaky = "Timeout (0:" in proc.stderr or "terminate called without an active exception" in proc.stderr
    if proc.returncode != 0 and flaky and "torch.distributed.run" in cmd:
        # once in CI (2026-12-01, 2 busy cores) one rank of a two-rank launch waited forever for its peer, which
        # had exited; the workers' faulthandler ends such a hang with a traceback. Once a rank aborted at exit in
        # gloo's teardown ("terminate called without an active exception"; the workers now skip that teardown).
        # These two failures, and only these, are relaunched once on a fresh port; a second one fails the test
        # with both outputs.
        first = proc.stderr[-3000:]
        cmd = [f"--master_port={free_port()}" if c.startswith("--master_port=") else c for c in cmd]
        proc = subprocess.run(
            cmd + [str(out), *extra], capture_output=True, text=True, timeout=600, env=env, check=False
        )
        assert proc.returncode == 0, first + "\n--- relaunch ---\n" + proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]


def run_two_ranks(out, *extra, worker=WORKER):
    run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            worker,
        ],
        out,
        *extra,
    )


def load(path):
    return torch.load(path, weights_only=True)


def test_ddp_two_ranks_match_each_other_and_one_process(tmp_path):
    run_two_ranks(tmp_path)
    run([sys.executable, WORKER], tmp_path)
    rank0, rank1 = load(tmp_path / "world2-rank0.pt"), load(tmp_path / "world2-rank1.pt")
    single = load(tmp_path / "world1-rank0.pt")
    assert rank0["masks"].keys() == rank1["masks"].keys() == single["masks"].keys() and rank0["masks"]
    for name in rank0["masks"]:
        assert torch.equal(rank0["masks"][name], rank1["masks"][name]), name
        assert torch.equal(rank0["masks"][name], single["masks"][name]), name
        for state in (rank0, rank1):
            assert is_nm_sparse(state["weights"][name]), name
    for key in rank0["all"]:
        assert torch.equal(rank0["all"][key], rank1["all"][key]), key  # replicas never drift apart
        # same averaged gradient as one process over the same 8 examples; only summation order differs
        torch.testing.assert_close(rank0["all"][key], single["all"][key], rtol=0, atol=1e-5)


def test_two_rank_checkpoint_resumes_in_one_process(tmp_path):
    run_two_ranks(tmp_path)
    checkpoint = tmp_path / "run-2" / "checkpoint-3"
    assert (checkpoint / "sparsity_masks.safetensors").is_file()  # written once, by rank 0
    run([sys.executable, WORKER], tmp_path, str(checkpoint))
    two_ranks, resumed = load(tmp_path / "world2-rank0.pt"), load(tmp_path / "world1-resumed-rank0.pt")
    for name in two_ranks["masks"]:
        assert torch.equal(two_ranks["masks"][name], resumed["masks"][name]), name
        assert is_nm_sparse(resumed["weights"][name]), name
    for key in two_ranks["all"]:
        torch.testing.assert_close(resumed["all"][key], two_ranks["all"][key], rtol=0, atol=1e-5)


def test_one_process_checkpoint_resumes_on_two_ranks(tmp_path):
    run([sys.executable, WORKER], tmp_path)
    checkpoint = tmp_path / "run-1" / "checkpoint-3"
    assert (checkpoint / "sparsity_masks.safetensors").is_file()
    run_two_ranks(tmp_path, str(checkpoint))
    single = load(tmp_path / "world1-rank0.pt")
    rank0, rank1 = load(tmp_path / "world2-resumed-rank0.pt"), load(tmp_path / "world2-resumed-rank1.pt")
    for name in single["masks"]:
        assert torch.equal(rank0["masks"][name], single["masks"][name]), name
        assert torch.equal(rank1["masks"][name], single["masks"][name]), name
        assert is_nm_sparse(rank0["weights"][name]) and is_nm_sparse(rank1["weights"][name]), name
    for key in single["all"]:
        assert torch.equal(rank0["all"][key], rank1["all"][key]), key
        torch.testing.assert_close(rank0["all"][key], single["all"][key], rtol=0, atol=1e-5)


FSDP_WORKER = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")


def test_fsdp2_sharded_masks_match_one_process_and_resume_in_one(tmp_path):
    run_two_ranks(tmp_path, worker=FSDP_WORKER)
    run([sys.executable, FSDP_WORKER], tmp_path)
    checkpoint = tmp_path / "fsdp-checkpoint-world2"
    run([sys.executable, FSDP_WORKER], tmp_path, str(checkpoint))
    rank0, rank1 = load(tmp_path / "fsdp-world2-rank0.pt"), load(tmp_path / "fsdp-world2-rank1.pt")
    single, resumed = load(tmp_path / "fsdp-world1-rank0.pt"), load(tmp_path / "fsdp-resumed-world1-rank0.pt")
    assert rank0["sharded"] and rank1["sharded"] and not single["sharded"]  # masks were DTensor shards
    assert resumed["step"] == 3 and single["masks"]
    for name, mask in single["masks"].items():
        for state in (rank0, rank1, resumed):
            assert torch.equal(state["masks"][name], mask), name
        assert is_nm_sparse(rank0["all"][f"{name}.weight"]), name
        assert is_nm_sparse(resumed["all"][f"{name}.weight"]), name
    for key in single["all"]:
        assert torch.equal(rank0["all"][key], rank1["all"][key]), key
        torch.testing.assert_close(rank0["all"][key], single["all"][key], rtol=0, atol=1e-5)


def test_fsdp2_one_process_checkpoint_resumes_sharded_on_two_ranks(tmp_path):
    run([sys.executable, FSDP_WORKER], tmp_path)
    checkpoint = tmp_path / "fsdp-checkpoint-world1"
    assert (checkpoint / "sparsity_masks.safetensors").is_file()
    run_two_ranks(tmp_path, str(checkpoint), worker=FSDP_WORKER)
    saved = load(checkpoint / "weights.pt")
    ranks = [load(tmp_path / f"fsdp-resumed-world2-rank{r}.pt") for r in (0, 1)]
    masks = load(tmp_path / "fsdp-world1-rank0.pt")["masks"]  # one-shot: the same at step 3 and at the end
    assert masks
    for state in ranks:
        assert state["sharded"] and state["step"] == 3  # the masks were loaded as DTensor shards
        for name, mask in masks.items():
            assert torch.equal(state["masks"][name], mask), name
        for key, value in saved.items():
            assert torch.equal(state["all"][key], value), key  # the weights came back whole
