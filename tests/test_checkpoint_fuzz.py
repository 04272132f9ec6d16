"""Damaged checkpoints: load and `inspect` either give exactly what was saved or fail with our error, never a
crash, a hang or wrong tensors.

Random bytes of a saved checkpoint's safetensors files are flipped (XOR with a non-zero byte), in the header
(names, dtypes, shapes, offsets, our digest record) and in the tensor data, for fixed seeds. The claim tested:
- loading (`AutoSparseModel.from_pretrained`) and `inspect --verify` fail with `SparseCheckpointError` / exit 2
  whenever a data byte was changed (every tensor's CRC32 is recorded at save time), and otherwise either fail so
  or return tensors / a report identical to the intact checkpoint's;
- plain `inspect` (headers plus the few tensors it reads, all checked) gives the intact report or exits 2.
"""

import json
import random
import re
import shutil
import struct

import pytest
import torch
import transformers

from hf_semisparse import (
    AutoSparseModel,
    CorruptCheckpointError,
    SparseCheckpointError,
    prune_24,
    save_sparse_pretrained,
)
from hf_semisparse.cli import main
from tests.conftest import make_model

TRIALS = 40  # per region; about 0.03 s each on the 2-core CI machine


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    model = make_model("bert").eval()
    prune_24(model)
    path = tmp_path_factory.mktemp("fuzz") / "ckpt"
    save_sparse_pretrained(model, path, max_shard_size="60KB")  # several shards: the index is exercised too
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(files) > 1
    state = {k: v.clone() for k, v in AutoSparseModel.from_pretrained(path).state_dict().items()}
    return path, files, state


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if code == 2:
        assert len(err.strip().splitlines()) == 1, err
    return code, out


def corrupt(src, dst, files, rng, region):
    """Copy the checkpoint and flip 1-3 bytes of one safetensors file in `region`; return what was hit."""
    shutil.copytree(src, dst)
    name = rng.choice(files)
    data = bytearray((dst / name).read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    lo, hi = (0, 8 + header_len) if region == "header" else (8 + header_len, len(data))
    for _ in range(rng.randint(1, 3)):
        data[rng.randrange(lo, hi)] ^= rng.randint(1, 255)
    (dst / name).write_bytes(bytes(data))
    return name


@pytest.mark.parametrize("region", ["header", "data"])
def test_damaged_bytes_are_detected_or_harmless(intact, tmp_path, region, capsys):
    path, files, state = intact
    code, out = run_cli(["inspect", str(path), "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    rng = random.Random(f"hf_semisparse-{region}")
    outcomes = {"refused": 0, "identical": 0}
    for trial in range(TRIALS):
        damaged = tmp_path / f"t{trial}"
        name = corrupt(path, damaged, files, rng, region)
        try:
            loaded = AutoSparseModel.from_pretrained(damaged)
        except SparseCheckpointError:
            outcomes["refused"] += 1
        else:
            assert region == "header", f"trial {trial}: changed tensor data in {name} loaded without an error"
            restored = loaded.state_dict()
            assert restored.keys() == state.keys()
            for key, value in state.items():
                assert torch.equal(restored[key], value), (trial, name, key)
            outcomes["identical"] += 1

        code, out = run_cli(["inspect", str(damaged), "--json", "--verify"], capsys)
        if region == "data":
            assert code == 2, f"trial {trial}: inspect --verify missed changed data in {name}"
        else:
            assert code == 2 or (code == 0 and json.loads(out) | {"path": None} == report | {"path": None})

        code, out = run_cli(["inspect", str(damaged), "--json"], capsys)
        assert code == 2 or (code == 0 and json.loads(out) | {"path": None} == report | {"path": None}), trial
        shutil.rmtree(damaged)
    assert outcomes["refused"] > 0


def test_digest_check_can_be_skipped_for_data_only(intact, tmp_path, monkeypatch):
    path, files, _ = intact
    damaged = tmp_path / "d"
    shutil.copytree(path, damaged)
    data = bytearray((damaged / files[0]).read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    key = next(k for k in sorted(header) if k.endswith(".bias"))
    data[8 + header_len + header[key]["data_offsets"][0]] ^= (
        0x40  # a bias value changes: nothing else sees it
    )
    (damaged / files[0]).write_bytes(bytes(data))
    with pytest.raises(SparseCheckpointError, match="CRC32"):
        AutoSparseModel.from_pretrained(damaged)
    monkeypatch.setenv(
        "HF_SEMISPARSE_VERIFY_DIGESTS", "0"
    )  # documented opt-out: only the data check is skipped
    AutoSparseModel.from_pretrained(damaged)
    config = json.loads((damaged / "config.json").read_text())
    meta_damaged = bytearray((damaged / files[1]).read_bytes())
    assert config["quantization_config"]["tensor_digests"] == "hf_semisparse_digests"  # our format: top level
    meta_damaged[meta_damaged.index(b"hf_semisparse_digests") + 3] ^= (
        0x01  # the record can no longer be found
    )
    (damaged / files[1]).write_bytes(bytes(meta_damaged))
    with pytest.raises(SparseCheckpointError, match="no hf_semisparse_digests record"):
        AutoSparseModel.from_pretrained(damaged)


def test_plain_from_pretrained_checks_digests_too(intact, tmp_path):
    """Plain transformers `from_pretrained` (our quantizer) checks the recorded CRC32s before loading weights."""

    path, files, state = intact
    loaded = transformers.BertForSequenceClassification.from_pretrained(path)
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    damaged = tmp_path / "d"
    shutil.copytree(path, damaged)
    data = bytearray((damaged / files[0]).read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    key = next(k for k in sorted(header) if k.endswith(".bias"))
    data[8 + header_len + header[key]["data_offsets"][0]] ^= 0x40  # a bias value: no layout check sees it
    (damaged / files[0]).write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=f"{files[0]}: the bytes of tensor {re.escape(key)}"):
        transformers.BertForSequenceClassification.from_pretrained(damaged)
