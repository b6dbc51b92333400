"""Read and validate safetensors headers without trusting them, and check tensor data.

The safetensors format is ``u64 little-endian N`` + ``N bytes of JSON`` + a data buffer.
Every size in the header is checked against the file before anything is read: the header
length is bounded, offsets must tile the data buffer exactly (no gaps, no overlap, nothing
out of range), and every tensor's byte length must match its dtype and shape. Problems are
collected and raised together in one `InvalidTensorFile`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from composer.errors import InvalidTensorFile

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES",
    "DTYPE_SIZES",
    "FLOAT_DTYPES",
    "SafetensorsHeader",
    "TensorInfo",
    "find_nonfinite",
    "read_header",
    "sniff_format",
]

DEFAULT_MAX_HEADER_BYTES = 16 * 1024 * 1024
_MAX_PROBLEMS = 20

DTYPE_SIZES: Mapping[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})

# For a finiteness check a float is non-finite exactly when all its exponent bits are set.
_EXPONENT_MASKS: Mapping[str, tuple[str, int]] = {
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
    "F32": ("<u4", 0x7F800000),
    "F64": ("<u8", 0x7FF0000000000000),
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry; ``start``/``end`` are offsets into the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Byte length of the tensor's data."""
        return self.end - self.start

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensors in data order, metadata, and where the data starts."""

    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str] = field(default_factory=dict)
    data_offset: int = 8
    file_size: int = 8

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def __len__(self) -> int:
        return len(self.tensors)


def sniff_format(prefix: bytes) -> str | None:
    """Name a well-known non-safetensors format from a file's first bytes, else None."""
    if prefix[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        return "a Python pickle (PyTorch .bin/.pt checkpoint)"
    if prefix[:4] == b"PK\x03\x04":
        return "a zip archive (PyTorch .bin/.pt checkpoint)"
    if prefix[:4] == b"\x89HDF":
        return "an HDF5 file (Keras .h5 checkpoint)"
    if prefix[:4] == b"GGUF":
        return "a GGUF file"
    return None


_CONVERT_HINT = (
    "Brickyard accepts only safetensors weights; convert with "
    "`safetensors.torch.save_file(torch.load(path, weights_only=True), 'adapter_model.safetensors')`"
    " or save the adapter with `save_pretrained(..., safe_serialization=True)`"
)


def read_header(source: Path | BinaryIO, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file; tensor data is not read.

    Args:
        source: a path, or a binary file object opened for reading and seekable.
        max_header_bytes: the largest header accepted (the header length is read from the
            file and is never trusted beyond this bound or the file size).

    Returns:
        The validated `SafetensorsHeader`.

    Raises:
        InvalidTensorFile: listing every problem found.
    """
    if isinstance(source, (str, Path)):
        from composer.files import open_regular

        with os.fdopen(open_regular(source), "rb") as opened:
            return read_header(opened, max_header_bytes=max_header_bytes)
    handle = source
    handle.seek(0, os.SEEK_END)
    file_size = handle.tell()
    handle.seek(0)
    prefix = handle.read(8)
    if file_size == 0:
        raise InvalidTensorFile("not a safetensors file", ["the file is empty"])
    other = sniff_format(prefix)
    if other is not None:
        raise InvalidTensorFile("not a safetensors file", [f"the file is {other}. {_CONVERT_HINT}"])
    if len(prefix) < 8:
        raise InvalidTensorFile(
            "not a safetensors file", [f"the file has {file_size} bytes, fewer than the 8-byte header length"]
        )
    header_len = int.from_bytes(prefix, "little")
    if header_len > max_header_bytes:
        raise InvalidTensorFile(
            "not a safetensors file",
            [f"the header claims {header_len} bytes, more than the limit of {max_header_bytes} bytes"],
        )
    if 8 + header_len > file_size:
        raise InvalidTensorFile(
            "not a safetensors file",
            [f"the header claims {header_len} bytes but the file has only {file_size - 8} after the length"],
        )
    raw = handle.read(header_len)
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidTensorFile("not a safetensors file", [f"the header is not valid JSON ({_short(exc)})"]) from None
    if not isinstance(document, dict):
        raise InvalidTensorFile("not a safetensors file", ["the header is not a JSON object"])
    return _validate(document, data_offset=8 + header_len, file_size=file_size)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _validate(document: dict[str, Any], *, data_offset: int, file_size: int) -> SafetensorsHeader:
    problems: list[str] = []
    metadata: dict[str, str] = {}
    raw_meta = document.pop("__metadata__", None)
    if raw_meta is not None:
        if isinstance(raw_meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in raw_meta.items()):
            metadata = dict(raw_meta)
        else:
            problems.append("__metadata__ must map strings to strings")
    entries: list[TensorInfo] = []
    for name, entry in document.items():
        info = _entry(name, entry, problems)
        if info is not None:
            entries.append(info)
        if len(problems) >= _MAX_PROBLEMS:
            break
    entries.sort(key=lambda t: (t.start, t.end))
    buffer_size = file_size - data_offset
    cursor = 0
    for info in entries:
        if len(problems) >= _MAX_PROBLEMS:
            break
        if info.start != cursor:
            kind = "overlaps the previous tensor" if info.start < cursor else "leaves a gap before it"
            problems.append(f"tensor {info.name!r}: data offset {info.start} {kind} (expected {cursor})")
        if info.end > buffer_size:
            problems.append(f"tensor {info.name!r}: data ends at {info.end}, beyond the {buffer_size}-byte buffer")
        cursor = max(cursor, info.end)
    if not problems and cursor != buffer_size:
        problems.append(f"the data buffer has {buffer_size} bytes but the tensors cover {cursor}")
    if problems:
        raise InvalidTensorFile("invalid safetensors header", problems[:_MAX_PROBLEMS])
    return SafetensorsHeader(
        tensors={t.name: t for t in entries}, metadata=metadata, data_offset=data_offset, file_size=file_size
    )


def _entry(name: str, entry: Any, problems: list[str]) -> TensorInfo | None:
    label = f"tensor {name[:200]!r}"
    if not isinstance(entry, dict):
        problems.append(f"{label}: entry is not an object")
        return None
    dtype: Any = entry.get("dtype")
    shape: Any = entry.get("shape")
    offsets: Any = entry.get("data_offsets")
    ok = True
    if dtype not in DTYPE_SIZES:
        problems.append(f"{label}: unknown dtype {str(dtype)[:20]!r}")
        ok = False
    if not (isinstance(shape, list) and len(shape) <= 8 and all(_is_count(d) for d in shape)):
        problems.append(f"{label}: shape must be a list of at most 8 non-negative integers")
        ok = False
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        problems.append(f"{label}: data_offsets must be two non-negative integers")
        ok = False
    elif offsets[0] > offsets[1]:
        problems.append(f"{label}: data_offsets begin after they end")
        ok = False
    if not ok:
        return None
    info = TensorInfo(name=name, dtype=dtype, shape=tuple(shape), start=offsets[0], end=offsets[1])
    expected = info.numel * DTYPE_SIZES[dtype]
    if expected != info.nbytes:
        problems.append(f"{label}: {dtype} {list(shape)} needs {expected} bytes but its offsets span {info.nbytes}")
        return None
    return info


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def find_nonfinite(path: Path, header: SafetensorsHeader, *, chunk_bytes: int = 16 * 1024 * 1024) -> list[str]:
    """Names of the floating-point tensors in ``path`` that hold a NaN or an Inf.

    Reads the data in bounded chunks through numpy (no torch), testing exponent bits, so
    it works for bfloat16 as well.

    Args:
        path: the safetensors file ``header`` was read from.
        header: its validated header.
        chunk_bytes: read size; bounds memory use.

    Returns:
        Tensor names, in data order.
    """
    import numpy as np

    bad: list[str] = []
    with open(path, "rb") as handle:
        for info in header:
            if info.dtype not in _EXPONENT_MASKS or info.nbytes == 0:
                continue
            np_dtype, mask = _EXPONENT_MASKS[info.dtype]
            itemsize = DTYPE_SIZES[info.dtype]
            step = max(itemsize, chunk_bytes - chunk_bytes % itemsize)
            handle.seek(header.data_offset + info.start)
            remaining = info.nbytes
            while remaining > 0:
                block = handle.read(min(step, remaining))
                remaining -= len(block)
                bits = np.frombuffer(block, dtype=np_dtype)
                if np.any((bits & mask) == mask):
                    bad.append(info.name)
                    break
    return bad
