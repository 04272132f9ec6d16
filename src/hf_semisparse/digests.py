"""Per-tensor CRC32 digests in our safetensors files: a damaged byte is an error, never a wrong weight.

safetensors checks that a file's header is consistent (offsets, sizes) but nothing checks the tensor bytes: a
flipped bit in a weight loads silently. Every file `save_sparse_pretrained` writes therefore records, in its
safetensors metadata under `hf_semisparse_digests`, each tensor's dtype, shape and the CRC32 of its bytes:

    {"algorithm": "crc32", "tensors": {"bert.pooler.dense.weight": ["F32", [64, 64], "9a3c01f2"], ...}}

`open_verified(path)` is `safe_open` that checks names, dtypes and shapes against that record when the file is
opened (no tensor data read) and the CRC32 of every tensor it hands out. CRC32 catches every burst of up to 32
flipped bits and any other accidental damage with probability 1 - 2**-32; it is not a signature (whoever can
write the file can rewrite the digest). zlib's CRC32 runs at about 6 GB/s on one core of the 2-core AMD EPYC CI
machine (2026-12-01), so checking a 16 GB checkpoint adds about 3 s to reading it; set
`HF_SEMISPARSE_VERIFY_DIGESTS=0` to skip the data check (names, dtypes and shapes are still checked).
"""

from __future__ import annotations

import json
import os
import zlib

import torch
from safetensors import SafetensorError, safe_open

from .errors import CorruptCheckpointError

DIGEST_KEY = "hf_semisparse_digests"
ALGORITHM = "crc32"
VERIFY_ENV = "HF_SEMISPARSE_VERIFY_DIGESTS"

_DTYPE_NAMES = {
    getattr(torch, name): code
    for name, code in [
        ("float64", "F64"),
        ("float32", "F32"),
        ("float16", "F16"),
        ("bfloat16", "BF16"),
        ("int64", "I64"),
        ("int32", "I32"),
        ("int16", "I16"),
        ("int8", "I8"),
        ("uint8", "U8"),
        ("bool", "BOOL"),
        ("float8_e4m3fn", "F8_E4M3"),
        ("float8_e5m2", "F8_E5M2"),
        ("uint16", "U16"),
        ("uint32", "U32"),
        ("uint64", "U64"),
    ]
    if hasattr(torch, name)
}


def data_checks_enabled() -> bool:
    """Whether tensor bytes are checked (`HF_SEMISPARSE_VERIFY_DIGESTS`, default on)."""
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def tensor_crc32(tensor: torch.Tensor) -> str:
    """CRC32 of a CPU tensor's bytes in row-major order, as 8 hex digits."""
    flat = tensor.detach().contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy() if flat.numel() else b""
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def digest_metadata(tensors: dict[str, torch.Tensor]) -> str:
    """The `hf_semisparse_digests` metadata value for a file holding `tensors` (CPU tensors)."""
    record = {}
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors by hf_semisparse")
        record[name] = [_DTYPE_NAMES[tensor.dtype], list(tensor.shape), tensor_crc32(tensor)]
    return json.dumps({"algorithm": ALGORITHM, "tensors": record}, separators=(",", ":"))


class VerifiedFile:
    """What `safe_open(path, framework="pt")` gives, checked against the file's recorded digests."""

    def __init__(self, handle, path: str, record: dict | None, check_data: bool) -> None:
        self._handle, self.path, self.record, self.check_data = handle, path, record, check_data

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def metadata(self) -> dict[str, str]:
        return self._handle.metadata() or {}

    def get_slice(self, key: str):
        return self._handle.get_slice(key)

    def get_tensor(self, key: str) -> torch.Tensor:
        tensor = self._handle.get_tensor(key)
        if self.record is not None and self.check_data:
            expected = self.record[key][2]
            if tensor_crc32(tensor) != expected:
                raise CorruptCheckpointError(
                    f"{self.path}: the bytes of tensor {key} do not match the CRC32 recorded when the file was "
                    f"written ({expected}): the file is damaged; download or copy it again"
                )
        return tensor


class open_verified:  # noqa: N801 - used like safe_open, a context manager
    """`safe_open(path, framework="pt")` whose header and tensors are checked against the recorded digests.

    Args:
        path: a .safetensors file.
        require: the file must carry digests (our config.json says every file was written with them).
        check_data: check each tensor's CRC32 as it is read; default `HF_SEMISPARSE_VERIFY_DIGESTS` (on).

    Raises:
        CorruptCheckpointError: the file is not readable safetensors, its digest record is damaged or missing
            (when required), or a tensor's name, dtype, shape or bytes differ from the record.
    """

    def __init__(
        self, path: str | os.PathLike, require: bool = False, check_data: bool | None = None
    ) -> None:
        self.path = os.fspath(path)
        self.require = require
        self.check_data = data_checks_enabled() if check_data is None else check_data
        self._cm = None

    def __enter__(self) -> VerifiedFile:
        try:
            self._cm = safe_open(self.path, framework="pt")
            handle = self._cm.__enter__()
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
            header = {
                k: (handle.get_slice(k).get_dtype(), list(handle.get_slice(k).get_shape())) for k in keys
            }
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            self._close()
            raise CorruptCheckpointError(
                f"{self.path} is truncated or not a safetensors file: {exc}"
            ) from exc
        try:
            record = self._check_header(metadata, header)
        except BaseException:
            self._close()
            raise
        return VerifiedFile(handle, self.path, record, self.check_data)

    def _check_header(self, metadata: dict, header: dict) -> dict | None:
        raw = metadata.get(DIGEST_KEY)
        if raw is None:
            if self.require:
                raise CorruptCheckpointError(
                    f"{self.path} has no {DIGEST_KEY} record although the checkpoint's config.json says every "
                    "file was written with one: the file is damaged or was replaced"
                )
            return None
        try:
            parsed = json.loads(raw)
            if parsed["algorithm"] != ALGORITHM:
                raise ValueError(f"unknown algorithm {parsed['algorithm']!r}")
            record = {
                name: (str(dtype), [int(d) for d in shape], str(crc))
                for name, (dtype, shape, crc) in parsed["tensors"].items()
            }
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptCheckpointError(f"{self.path}: the {DIGEST_KEY} record is damaged ({exc})") from exc
        extra, missing = sorted(set(header) - set(record)), sorted(set(record) - set(header))
        if extra or missing:
            raise CorruptCheckpointError(
                f"{self.path}: tensor names differ from those recorded when the file was written "
                f"(unrecorded: {extra[:3]}, absent: {missing[:3]}): the file is damaged"
            )
        for name, (dtype, shape) in header.items():
            if (dtype, shape) != record[name][:2]:
                raise CorruptCheckpointError(
                    f"{self.path}: tensor {name} is {dtype} {shape} but was written as "
                    f"{record[name][0]} {record[name][1]}: the file is damaged"
                )
        return record

    def _close(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None

    def __exit__(self, *exc) -> None:
        self._close()
