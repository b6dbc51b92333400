"""Streaming shard I/O: direct and page-cache writes give the same bytes, whatever the sizes."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from composer import io
from composer.header import TensorInfo, read_header


def _shard(path: Path, sizes: dict[str, tuple[int, ...]], *, seed: int) -> Path:
    """A safetensors file whose tensors have the given shapes (odd sizes: nothing aligned)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sizes.items():
        dtype = torch.bfloat16 if len(shape) == 2 else torch.float32
        tensors[name] = torch.randn(shape, generator=generator).to(dtype)
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x" * 7})
    return path


def _double(info: TensorInfo, tensor: torch.Tensor, payload: object) -> None:
    assert payload == info.name
    tensor.mul_(2)


def _stream(sources: list[Path], out: Path, updates: set[str], **kwargs: object) -> list[Path]:
    out.mkdir()
    jobs = []
    for source in sources:
        header = read_header(source)
        names = frozenset(n for n in updates if n in header.tensors)
        jobs.append(io.ShardJob(source, out / source.name, header, names))
    io.stream_shards(jobs, _double, load=lambda info: info.name, **kwargs)  # type: ignore[arg-type]
    return [out / source.name for source in sources]


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    src = tmp_path / "src"
    src.mkdir()
    return [
        _shard(src / "a.safetensors", {"embed": (333, 77), "w1": (129, 211), "norm": (211,), "w2": (5, 3)}, seed=1),
        _shard(src / "b.safetensors", {"w3": (1001, 13), "bias": (17,)}, seed=2),
        _shard(src / "c.safetensors", {"untouched": (3, 5)}, seed=3),
    ]


@pytest.mark.parametrize("chunk", [4096, 3 * 4096, io._DIRECT_CHUNK])
def test_direct_and_buffered_writes_give_the_same_files(
    shards: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    # Small staging buffers make tensors and copied ranges straddle many flushes.
    monkeypatch.setattr(io, "_DIRECT_CHUNK", chunk)
    updates = {"w1", "w2", "w3"}
    direct = _stream(shards, tmp_path / "direct", updates)
    buffered = _stream(shards, tmp_path / "buffered", updates, direct=False)
    for source, one, other in zip(shards, direct, buffered, strict=True):
        assert one.read_bytes() == other.read_bytes()
        assert one.stat().st_size == source.stat().st_size
        before, after = load_file(str(source)), load_file(str(one))
        assert after.keys() == before.keys()
        for name, tensor in before.items():
            expected = tensor * 2 if name in updates else tensor
            assert torch.equal(after[name], expected), name
        # Unchanged bytes (the header with its metadata, untouched tensors) are copied verbatim.
        header = read_header(source)
        assert one.read_bytes()[: header.data_offset] == source.read_bytes()[: header.data_offset]


def _opened_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def test_direct_writes_bypass_the_page_cache_where_the_filesystem_takes_them(
    shards: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    real_write, real_pwrite = os.write, os.pwrite

    def spy_write(fd: int, data: bytes | memoryview) -> int:
        seen.append(_opened_direct(fd))
        return real_write(fd, data)

    def spy_pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
        seen.append(_opened_direct(fd))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "write", spy_write)
    monkeypatch.setattr(os, "pwrite", spy_pwrite)
    probe = tmp_path / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError as exc:
        pytest.fail(f"the test directory's filesystem takes no O_DIRECT ({exc}); run the suite on one that does")
    _stream(shards, tmp_path / "out", {"w1", "w3"})
    assert seen and all(seen)


def test_a_filesystem_without_o_direct_gets_buffered_writes(
    shards: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on filesystems that refuse O_DIRECT at open (EINVAL).
    real_open = os.open

    def refuse(path: str | Path, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse)
    expected = _stream(shards, tmp_path / "buffered", {"w1"}, direct=False)
    got = _stream(shards, tmp_path / "fallback", {"w1"})
    assert [p.read_bytes() for p in got] == [p.read_bytes() for p in expected]


def test_a_refused_direct_write_falls_back_before_anything_is_written(
    shards: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on filesystems that open O_DIRECT but need another alignment (EINVAL on write).
    real_write, real_pwrite = os.write, os.pwrite
    refused: list[int] = []

    def refuse_direct(fd: int) -> None:
        if _opened_direct(fd):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")

    def picky_write(fd: int, data: bytes | memoryview) -> int:
        refuse_direct(fd)
        return real_write(fd, data)

    def picky_pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
        refuse_direct(fd)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "write", picky_write)
    monkeypatch.setattr(os, "pwrite", picky_pwrite)
    expected = _stream(shards, tmp_path / "buffered", {"w1", "w3"}, direct=False)
    got = _stream(shards, tmp_path / "fallback", {"w1", "w3"})
    assert refused, "no direct write was attempted"
    assert [p.read_bytes() for p in got] == [p.read_bytes() for p in expected]


def test_other_write_errors_fail_the_stream(
    shards: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: bytes | memoryview, *offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError) as caught:
        _stream(shards, tmp_path / "out", {"w1"})
    assert caught.value.errno == errno.ENOSPC


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 5])
@pytest.mark.parametrize("direct", [True, False])
def test_copy_file(tmp_path: Path, size: int, direct: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io, "_DIRECT_CHUNK", 2 * 4096)
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(size))
    io.copy_file(source, tmp_path / "copy.bin", direct=direct)
    assert (tmp_path / "copy.bin").read_bytes() == source.read_bytes()
    with pytest.raises(FileExistsError):
        io.copy_file(source, tmp_path / "copy.bin", direct=direct)
