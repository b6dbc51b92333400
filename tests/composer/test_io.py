"""Streaming shard I/O: direct and page-cache writes give the same bytes, whatever the sizes."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from collections.abc import Callable
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


def _stream(
    sources: list[Path], out: Path, updates: set[str], *, update: io.Update = _double, **kwargs: object
) -> list[Path]:
    out.mkdir()
    jobs = []
    for source in sources:
        header = read_header(source)
        names = frozenset(n for n in updates if n in header.tensors)
        jobs.append(io.ShardJob(source, out / source.name, header, names))
    io.stream_shards(jobs, update, load=lambda info: info.name, **kwargs)  # type: ignore[arg-type]
    return [out / source.name for source in sources]


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    src = tmp_path / "src"
    src.mkdir()
    return [
        _shard(src / "a.safetensors", {"embed": (333, 77), "w1": (129, 211), "norm": (211,), "w2": (5, 3)}, seed=1),
        _shard(src / "b.safetensors", {"w3": (1001, 13), "bias": (17,)}, seed=2),
        _shard(src / "c.safetensors", {"untouched": (301, 53)}, seed=3),
    ]


def _defer_small_ranges(monkeypatch: pytest.MonkeyPatch, defer: bool) -> None:
    """Copy the raw ranges of the test shards (tens of KB) out of order, or none of them."""
    monkeypatch.setattr(io, "_DEFER_MIN", 4096 if defer else 1 << 62)


@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("chunk", [4096, 3 * 4096, io._DIRECT_CHUNK])
def test_direct_and_buffered_writes_give_the_same_files(
    shards: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int, defer: bool
) -> None:
    # Small staging buffers make tensors and copied ranges straddle many flushes.
    monkeypatch.setattr(io, "_DIRECT_CHUNK", chunk)
    _defer_small_ranges(monkeypatch, defer)
    # "norm" comes first: the deferred range after it starts part-way through a block.
    updates = {"norm", "w1", "w2", "w3"}
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


def _takes_o_direct(directory: Path) -> bool:
    probe = directory / "probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()
    return True


def _spy_writes(monkeypatch: pytest.MonkeyPatch, check: Callable[[int], object]) -> None:
    """Call ``check(fd)`` before every os.write and os.pwrite (it may raise)."""
    real_write, real_pwrite = os.write, os.pwrite

    def write(fd: int, data: bytes | memoryview) -> int:
        check(fd)
        return real_write(fd, data)

    def pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
        check(fd)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "pwrite", pwrite)


def test_direct_writes_bypass_the_page_cache_where_the_filesystem_takes_them(
    shards: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    _spy_writes(monkeypatch, lambda fd: seen.append(_opened_direct(fd)))
    _stream(shards, tmp_path / "out", {"w1", "w3"})
    # Every write is direct on a filesystem that takes O_DIRECT (ext4, xfs, btrfs, tmpfs
    # since Linux 6.6), and none elsewhere.
    assert seen and set(seen) == {_takes_o_direct(tmp_path)}


def test_a_filesystem_without_o_direct_gets_buffered_writes(
    shards: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on filesystems that refuse O_DIRECT (tmpfs before Linux 6.6, ramfs): EINVAL.
    real_fcntl = fcntl.fcntl
    refused: list[int] = []

    def refuse(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(fd, cmd, arg)

    expected = _stream(shards, tmp_path / "buffered", {"w1"}, direct=False)
    monkeypatch.setattr(fcntl, "fcntl", refuse)
    got = _stream(shards, tmp_path / "fallback", {"w1"})
    assert len(refused) == len(shards)
    assert [p.read_bytes() for p in got] == [p.read_bytes() for p in expected]


@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("chunk", [4096, 3 * 4096, io._DIRECT_CHUNK])
def test_a_refused_direct_write_falls_back_before_anything_is_written(
    shards: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int, defer: bool
) -> None:
    # As on filesystems that take O_DIRECT but need another alignment (EINVAL on write).
    # Small chunks make the fallback happen part-way through a shard, not at its end; with
    # deferred ranges, the refused first write may be an out-of-order copy.
    monkeypatch.setattr(io, "_DIRECT_CHUNK", chunk)
    _defer_small_ranges(monkeypatch, defer)
    refused: list[int] = []

    def refuse_direct(fd: int) -> None:
        if _opened_direct(fd):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")

    expected = _stream(shards, tmp_path / "buffered", {"norm", "w1", "w3"}, direct=False)
    _spy_writes(monkeypatch, refuse_direct)
    got = _stream(shards, tmp_path / "fallback", {"norm", "w1", "w3"})
    assert refused, "no direct write was attempted"
    assert [p.read_bytes() for p in got] == [p.read_bytes() for p in expected]


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _composer_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("composer")}


@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("failing_write", [1, 3, 12])
def test_write_errors_fail_the_stream_and_leak_nothing(
    shards: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_write: int, defer: bool
) -> None:
    # The first direct write of a shard runs on the writer thread, later ones on a helper
    # (or on the writer again, for a deferred range): an error on any must fail the stream
    # (not be dropped with the helper's future).
    monkeypatch.setattr(io, "_DIRECT_CHUNK", 4096)
    _defer_small_ranges(monkeypatch, defer)
    calls: list[int] = []

    def full(fd: int) -> None:
        calls.append(fd)
        if len(calls) == failing_write:
            raise OSError(errno.ENOSPC, "No space left on device")

    fds = _open_fds()
    _spy_writes(monkeypatch, full)
    with pytest.raises(OSError) as caught:
        _stream(shards, tmp_path / "out", {"w1", "w3"}, workers=2)
    assert caught.value.errno == errno.ENOSPC
    assert _open_fds() == fds
    assert _composer_threads() == set()


def test_an_update_error_stops_the_stream_and_leaks_nothing(shards: list[Path], tmp_path: Path) -> None:
    def update(info: TensorInfo, tensor: torch.Tensor, payload: object) -> None:
        if info.name == "w3":
            raise RuntimeError("boom")
        tensor.mul_(2)

    fds = _open_fds()
    with pytest.raises(RuntimeError, match="boom"):
        _stream(shards, tmp_path / "out", {"w1", "w3"}, update=update, workers=2)
    assert _open_fds() == fds
    assert _composer_threads() == set()


@pytest.mark.timeout(30)
def test_empty_targeted_tensors_stream(tmp_path: Path) -> None:
    source = tmp_path / "src" / "empty.safetensors"
    source.parent.mkdir()
    save_file({"empty": torch.zeros(0, 5), "w": torch.ones(2, 3)}, str(source))
    (out,) = _stream([source], tmp_path / "out", {"empty"})
    assert out.read_bytes() == source.read_bytes()


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


def test_clone_shares_the_whole_file_or_leaves_the_target_empty(tmp_path: Path) -> None:
    # The real ioctl on this filesystem: a reflink on XFS/btrfs, refused on ext4/tmpfs.
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(3 * 4096 + 5))
    src = os.open(source, os.O_RDONLY)
    dst = os.open(tmp_path / "clone.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        cloned = io._clone(src, dst)
    finally:
        os.close(src)
        os.close(dst)
    expected = source.read_bytes() if cloned else b""
    assert (tmp_path / "clone.bin").read_bytes() == expected


@pytest.mark.parametrize("direct", [True, False])
def test_whole_files_are_cloned_where_the_filesystem_can(
    shards: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    # As on XFS/btrfs: the untouched shard and copied files take a reflink, and the writer
    # writes none of their bytes; shards with a targeted tensor are written as before.
    cloned: list[str] = []

    def clone(src: int, dst: int) -> bool:
        cloned.append(os.readlink(f"/proc/self/fd/{src}"))
        with open(f"/proc/self/fd/{dst}", "r+b") as shared:  # another open file: no O_DIRECT
            shared.write(os.pread(src, os.fstat(src).st_size, 0))
        return True

    written: set[str] = set()
    _spy_writes(monkeypatch, lambda fd: written.add(os.readlink(f"/proc/self/fd/{fd}")))
    monkeypatch.setattr(io, "_clone", clone)
    got = _stream(shards, tmp_path / "out", {"w1"}, direct=direct)
    io.copy_file(shards[0], tmp_path / "copy.bin", direct=direct)

    assert cloned == [str(shards[1]), str(shards[2]), str(shards[0])]
    for source, target in [(shards[1], got[1]), (shards[2], got[2]), (shards[0], tmp_path / "copy.bin")]:
        assert target.read_bytes() == source.read_bytes()
        assert str(target) not in written
    if direct:  # buffered copies of raw ranges go through copy_file_range, not write
        assert str(got[0]) in written
    assert load_file(str(got[0]))["w1"].equal(load_file(str(shards[0]))["w1"] * 2)


@pytest.mark.parametrize("ahead", [1, 2])
@pytest.mark.parametrize("direct", [True, False])
def test_long_raw_ranges_are_copied_while_the_writer_waits_for_merges(
    shards: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool, ahead: int
) -> None:
    # The untouched embedding of a.safetensors and the whole of c.safetensors are copied
    # out of order while the first merge is still running, not when the stream reaches
    # them; but no further than `ahead` shards beyond the stream's (c is 2 ahead of a).
    monkeypatch.setattr(io, "_DIRECT_CHUNK", 4096)
    monkeypatch.setattr(io, "_AHEAD_SHARDS", ahead)
    _defer_small_ranges(monkeypatch, True)
    events: list[tuple[str, str]] = []
    real_copy_at, real_write = io._ShardWriter.copy_at, io._ShardWriter.write

    def copy_at(self: io._ShardWriter, offset: int, length: int, buffer: memoryview | None) -> None:
        events.append(("copy_at", Path(os.readlink(f"/proc/self/fd/{self.fd}")).name))
        real_copy_at(self, offset, length, buffer)

    def write(self: io._ShardWriter, data: memoryview) -> None:
        events.append(("write", Path(os.readlink(f"/proc/self/fd/{self.fd}")).name))
        real_write(self, data)

    def slow_double(info: TensorInfo, tensor: torch.Tensor, payload: object) -> None:
        time.sleep(0.5 if info.name == "w1" else 0)
        tensor.mul_(2)

    monkeypatch.setattr(io._ShardWriter, "copy_at", copy_at)
    monkeypatch.setattr(io._ShardWriter, "write", write)
    got = _stream(shards, tmp_path / "out", {"w1", "w3"}, update=slow_double, direct=direct)

    first_tensor = events.index(("write", "a.safetensors"))
    before = {target for _, target in events[:first_tensor]}
    assert {target for kind, target in events if kind == "copy_at"} == {"a.safetensors", "c.safetensors"}
    assert before == ({"a.safetensors", "c.safetensors"} if ahead == 2 else {"a.safetensors"})
    _defer_small_ranges(monkeypatch, False)
    expected = _stream(shards, tmp_path / "in-order", {"w1", "w3"}, direct=direct)
    assert [p.read_bytes() for p in got] == [p.read_bytes() for p in expected]


def test_a_stop_does_not_wait_for_the_deferred_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A failing progress callback (or Ctrl-C) stops the stream after the piece being
    # copied, not after the rest of the model.
    monkeypatch.setattr(io, "_DIRECT_CHUNK", 4096)
    _defer_small_ranges(monkeypatch, True)
    src = tmp_path / "src"
    src.mkdir()
    sources = [
        _shard(src / "a.safetensors", {"w1": (64, 64)}, seed=1),
        _shard(src / "b.safetensors", {"untouched": (1024, 1024)}, seed=2),  # 1024 pieces
    ]
    copies: list[int] = []
    copying = threading.Event()
    real_copy_at = io._ShardWriter.copy_at

    def slow_copy_at(self: io._ShardWriter, offset: int, length: int, buffer: memoryview | None) -> None:
        copies.append(offset)
        copying.set()
        time.sleep(0.002)  # ~2 s for all of them
        real_copy_at(self, offset, length, buffer)

    def progress(written: int, name: str) -> None:
        # Stop once the deferred copies are under way (on a loaded machine the first
        # progress call can come before the copying thread has started).
        copying.wait(timeout=60)
        raise KeyboardInterrupt

    monkeypatch.setattr(io._ShardWriter, "copy_at", slow_copy_at)
    fds = _open_fds()
    with pytest.raises(KeyboardInterrupt):
        _stream(sources, tmp_path / "out", {"w1"}, progress=progress)
    assert 0 < len(copies) < 256
    assert _open_fds() == fds
    assert _composer_threads() == set()


def test_a_failure_to_finish_a_shard_leaks_nothing(
    shards: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As when cutting the padding of the last direct block (ftruncate) fails: the shard's
    # files and its write thread must still be closed.
    def broken_finish(self: io._ShardWriter) -> int:
        self.end_stream()
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(io._ShardWriter, "finish", broken_finish)
    fds = _open_fds()
    with pytest.raises(OSError) as caught:
        _stream(shards, tmp_path / "out", {"w1", "w3"}, workers=2)
    assert caught.value.errno == errno.EIO
    assert _open_fds() == fds
    assert _composer_threads() == set()
