"""All file I/O of the composer: reading tensors, streaming merged shards, writing outputs.

Full merges stream (`stream_shards`). An output shard has exactly the tensor names, dtypes
and shapes of its input shard, so its header bytes are copied verbatim and the data is
produced in file order: tensors that receive no delta are copied as raw byte ranges, and
each targeted tensor is read with ``pread`` into a reusable buffer, updated in place by the
caller's function, and written out. Threads overlap the work: a reader hands out buffers in
file order, merge workers read, load and update tensors (the math; torch releases the GIL),
a writer writes them in order; another fsyncs finished shards while the next ones are
produced, and the calling thread reports progress. Long raw ranges (an untouched
embedding, a shard with no targeted tensor) are left out of the ordered stream: the writer
copies them, at their place in any shard, whenever it would otherwise wait for a merge, so
that neither the device nor the merge workers idle at the start and end of a model.
Memory is bounded by a fixed pool of buffers of the largest targeted tensor, whatever the
model size: nothing is memory-mapped, so the page cache never counts toward the process's
resident memory, and outputs are new files (never in-place writes to mapped weights).

Shards are written with ``O_DIRECT`` where the filesystem takes it (`_ShardWriter`): bytes
are staged in aligned buffers and go from them to the device, bypassing the page cache. A
merged model is written once and not read back by this process, and filling fresh page-cache
pages was the largest single CPU cost of a merge (more than the matrix products, measured
with ``perf``); it also evicted the base model's cached pages. Where ``O_DIRECT`` is refused
the writer falls back to ordinary writes and ``copy_file_range``. A file copied whole (an
untouched shard, a tokenizer file) is first cloned (``FICLONE``): a reflink on filesystems
that have them, so no byte is written.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import json
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from composer.files import open_regular
from composer.header import SafetensorsHeader, TensorInfo

__all__ = [
    "TORCH_DTYPES",
    "ShardJob",
    "TensorFile",
    "copy_file",
    "fsync_dir",
    "publish_dir",
    "stream_shards",
    "write_json",
    "write_safetensors",
    "write_text",
]

TORCH_DTYPES: Mapping[str, torch.dtype] = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}

_COPY_CHUNK = 64 * 1024 * 1024
_WRITE_CHUNK = 1024 * 1024
# Direct I/O: file offsets, lengths and memory aligned to 4096 bytes (the largest logical
# block size of common devices, and the page size), written in chunks large enough for
# the device to stream: ~1.3 GB/s with 8 MB writes on the VMs measured; with 4 MB halves
# the 0.5B bench merge took 0.99-1.16 s instead of 0.89-1.00 s.
_DIRECT_ALIGN = 4096
_DIRECT_CHUNK = 8 * 1024 * 1024
_POLL_S = 0.05


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            raise OSError(errno.EIO, f"unexpected end of file at offset {offset + done}")
        done += count


def _will_need(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start reading a byte range of the file into the page cache
    (asynchronous; a no-op for pages already cached)."""
    if length > 0:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


def _aligned(length: int) -> int:
    """``length`` rounded up to a whole number of direct-I/O blocks."""
    return -(-length // _DIRECT_ALIGN) * _DIRECT_ALIGN


def _set_direct(fd: int, *, on: bool) -> bool:
    """Turn ``O_DIRECT`` on or off for ``fd``; False if the filesystem refuses it."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    return True


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        count = os.pwrite(fd, view[done:], offset + done)
        if count == 0:
            raise OSError(errno.EIO, f"write stopped at offset {offset + done}")
        # A short direct write ends on a logical block, so the rest can go direct too (and
        # a full disk then reports ENOSPC).
        done += count


def _write_all(fd: int, view: memoryview) -> None:
    # Modest chunks: on the VMs measured, large single writes were slower and more variable.
    done = 0
    while done < len(view):
        done += os.write(fd, view[done : done + _WRITE_CHUNK])


def _copy_range(src: int, dst: int, offset: int, length: int, *, same_offset: bool = False) -> None:
    """Copy ``length`` bytes of ``src`` from ``offset`` to ``dst``: appended at its file
    position, or with ``same_offset`` written at ``offset`` (the file position is kept)."""
    remaining = length
    while remaining > 0:
        chunk = min(remaining, _COPY_CHUNK)
        try:
            count = os.copy_file_range(src, dst, chunk, offset, offset if same_offset else None)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            count = _copy_by_read(src, dst, offset, chunk, same_offset=same_offset)
        if count == 0:
            raise OSError(errno.EIO, f"unexpected end of file at offset {offset}")
        offset += count
        remaining -= count


# ioctl(FICLONE): the new file shares the source's blocks (copy-on-write) on filesystems
# with reflinks (XFS, btrfs, bcachefs; NFS 4.2 and CIFS clone on the server): no bytes move.
_FICLONE = 0x40049409
_CLONE_UNSUPPORTED = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EBADF}
)


def _clone(src: int, dst: int) -> bool:
    """Make ``dst`` (empty) share all of ``src``'s blocks; False where the filesystem cannot."""
    if not hasattr(fcntl, "ioctl") or os.uname().sysname != "Linux":
        return False
    try:
        fcntl.ioctl(dst, _FICLONE, src)
    except OSError as exc:
        if exc.errno not in _CLONE_UNSUPPORTED:
            raise
        return False
    return True


def _copy_by_read(src: int, dst: int, offset: int, length: int, *, same_offset: bool) -> int:
    data = memoryview(os.pread(src, length, offset))
    if same_offset:
        _pwrite_all(dst, data, offset)
    else:
        _write_all(dst, data)
    return len(data)


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous CPU tensor's bytes."""
    return tensor.view(torch.uint8).reshape(-1).numpy().data.cast("B")


class TensorFile:
    """A safetensors file opened for random reads of single tensors (``pread``, no mmap)."""

    def __init__(self, path: Path, header: SafetensorsHeader) -> None:
        self.path = path
        self.header = header
        self._fd = open_regular(path)

    def read(self, info: TensorInfo) -> torch.Tensor:
        """A new tensor holding ``info``'s data, in its stored dtype and shape."""
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        return self.read_into(info, buffer)

    def will_need(self, offset: int, length: int) -> None:
        """Start reading a byte range of the file ahead (`_will_need`)."""
        _will_need(self._fd, offset, length)

    def read_into(self, info: TensorInfo, buffer: torch.Tensor) -> torch.Tensor:
        """Read ``info`` into the front of ``buffer`` (uint8) and return a typed view of it."""
        raw = buffer[: info.nbytes]
        if info.nbytes:
            _pread_into(self._fd, _byte_view(raw), self.header.data_offset + info.start)
        return raw.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)

    def close(self) -> None:
        """Close the file descriptor."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class ShardJob:
    """Write ``target`` as a copy of ``source`` in which the tensors ``updates`` are
    transformed (same names, dtypes, shapes, offsets)."""

    source: Path
    target: Path
    header: SafetensorsHeader
    updates: frozenset[str]


@dataclass(frozen=True)
class _Copy:
    job: int
    offset: int
    length: int


@dataclass(frozen=True)
class _Skip:
    """An aligned range of raw bytes left out of the in-order stream: the writer copies it
    whenever it would otherwise wait (`_deferred_copies`)."""

    job: int
    offset: int
    length: int


@dataclass(frozen=True)
class _Tensor:
    job: int
    info: TensorInfo
    buffer: torch.Tensor
    merged: Future[None]


_DONE = object()

Load = Callable[[TensorInfo], Any]
Update = Callable[[TensorInfo, torch.Tensor, Any], None]
Progress = Callable[[int, str], None]


# Raw ranges whose aligned interior is at least this long (an untouched embedding, an
# untouched shard) are copied out of order, while the writer waits for a merge (`_Skip`).
# In order, a model's first and last tensors (embeddings) were written while the merge
# workers had nothing to do, and the middle of the merge left the device idle.
_DEFER_MIN = 1024 * 1024


def _plan_items(job_index: int, job: ShardJob) -> Iterator[_Copy | _Skip | TensorInfo]:
    """`_plan_runs`, with the aligned interior of long raw ranges made a `_Skip`."""
    for run in _plan_runs(job_index, job):
        if not isinstance(run, _Copy):
            yield run
            continue
        end = run.offset + run.length
        begin, stop = _aligned(run.offset), end // _DIRECT_ALIGN * _DIRECT_ALIGN
        if stop - begin < _DEFER_MIN:
            yield run
            continue
        if begin > run.offset:
            yield _Copy(job_index, run.offset, begin - run.offset)
        yield _Skip(job_index, begin, stop - begin)
        if end > stop:
            yield _Copy(job_index, stop, end - stop)


def _deferred_copies(plans: Sequence[Sequence[_Copy | _Skip | TensorInfo]]) -> list[_Copy]:
    """Every `_Skip` range of the plans, in file order, in pieces of at most ``_DIRECT_CHUNK``."""
    pieces = []
    for plan in plans:
        for item in plan:
            if isinstance(item, _Skip):
                for offset in range(item.offset, item.offset + item.length, _DIRECT_CHUNK):
                    length = min(_DIRECT_CHUNK, item.offset + item.length - offset)
                    pieces.append(_Copy(item.job, offset, length))
    return pieces


def _plan_runs(job_index: int, job: ShardJob) -> Iterator[_Copy | TensorInfo]:
    """The shard as a sequence of raw byte ranges to copy and tensors to update, in file order."""
    start = 0  # the header is copied verbatim with the first run
    for info in job.header:
        if info.name in job.updates:
            begin = job.header.data_offset + info.start
            if begin > start:
                yield _Copy(job_index, start, begin - start)
            yield info
            start = job.header.data_offset + info.end
    if job.header.file_size > start:
        yield _Copy(job_index, start, job.header.file_size - start)


# Tensor buffers beyond the merge workers' own: always 2 (one being read, one being
# written), and up to 4 more while they fit in _SLACK_BYTES. The writer must take tensors
# in file order and a model mixes tensors of very different cost (an MLP projection is 4x
# an attention one in Llama), so slack lets the workers run ahead of a slow tensor. On the
# 0.5B bench (largest tensor 8 MB) the full merge took 1.21-1.26 s with 2 spare buffers,
# 0.96-1.02 s with 4, 0.84-0.98 s with 6 and no better with 8. The byte cap keeps models
# with huge targeted tensors (a LoRA on a 128k-token embedding: 1 GB) to the minimum.
_SPARE_BUFFERS = 2
_SLACK_BUFFERS = 4
_SLACK_BYTES = 256 * 1024 * 1024


def _pool_size(workers: int, largest: int) -> int:
    return workers + _SPARE_BUFFERS + min(_SLACK_BUFFERS, _SLACK_BYTES // max(1, largest))


class _Pipeline:
    """reader thread -> merge workers (read, load, update) -> writer thread, in file order,
    with a fixed pool (`_pool_size`) of buffers of the largest targeted tensor."""

    def __init__(self, jobs: Sequence[ShardJob], load: Load | None, update: Update, workers: int, direct: bool) -> None:
        self.jobs = jobs
        # What the reader streams in order, and the writer copies out of order: one plan.
        self.plans = [list(_plan_items(index, job)) for index, job in enumerate(jobs)]
        self.direct = direct
        self.load = load
        self.sources: dict[int, TensorFile] = {}
        self.update = update
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        largest = max((job.header.tensors[name].nbytes for job in jobs for name in job.updates), default=0)
        depth = _pool_size(workers, largest)
        # Items in file order: raw copies and tensors (each with the future of its merge).
        self.ordered: queue.Queue[Any] = queue.Queue(maxsize=4 * depth)
        self.pool: queue.Queue[torch.Tensor] = queue.Queue()
        self.merge = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="composer-merge")
        self.bytes_written = 0
        self.current = ""
        for _ in range(depth):
            self.pool.put(torch.empty(largest, dtype=torch.uint8))

    def _put(self, channel: queue.Queue[Any], item: Any) -> None:
        while not self.stop.is_set():
            try:
                channel.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue
        raise _Stopped

    def _get(self, channel: queue.Queue[Any]) -> Any:
        while not self.stop.is_set():
            try:
                return channel.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        raise _Stopped

    def _wait(self, future: Future[None]) -> None:
        while not self.stop.is_set():
            try:
                future.result(timeout=_POLL_S)
                return
            except FutureTimeout:
                continue
        raise _Stopped

    def _fail(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self.stop.set()

    def read(self) -> None:
        try:
            for index, job in enumerate(self.jobs):
                # Closed by the writer once the shard is written (its tensors are read by the
                # merge threads), or by stream_shards after a failure.
                source = self.sources[index] = TensorFile(job.source, job.header)
                for run in self.plans[index]:
                    # Start reading ahead now: the pool or the queue may keep this thread
                    # waiting, and the page cache may no longer hold all of the base.
                    if isinstance(run, _Copy):
                        source.will_need(run.offset, run.length)
                        self._put(self.ordered, run)
                        continue
                    if isinstance(run, _Skip):
                        self._put(self.ordered, run)
                        continue
                    source.will_need(job.header.data_offset + run.start, run.nbytes)
                    buffer = self._get(self.pool)
                    merged = self.merge.submit(self._merge_one, source, run, buffer)
                    self._put(self.ordered, _Tensor(index, run, buffer, merged))
            self._put(self.ordered, _DONE)
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            self._fail(exc)

    def _merge_one(self, source: TensorFile, info: TensorInfo, buffer: torch.Tensor) -> None:
        # Reading and loading run here, not on the reader, so that they spread over the
        # merge threads: on the reader they took 0.9-1.1 s of a 1.25 s merge (0.5B bench).
        view = source.read_into(info, buffer)
        payload = self.load(info) if self.load is not None else None
        self.update(info, view, payload)

    def _close_source(self, index: int) -> None:
        source = self.sources.pop(index, None)
        if source is not None:
            source.close()

    def close_sources(self) -> None:
        """Close the source files still open (after a failure; merges must have stopped)."""
        for index in list(self.sources):
            self._close_source(index)

    def write(self) -> None:
        writer: _Writer | None = None
        try:
            writer = _Writer(self)
            writer.run()
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            self._fail(exc)
        finally:
            if writer is not None:
                writer.close()


# Out-of-order copies go at most this many shards ahead of the ordered stream, which bounds
# the files open at once (2 per shard) well below the usual limit of 1024; they read this
# many pieces ahead. On the bench base with a 128k-token vocabulary (7 shards) the merge took
# 1.28 s with no bound, 1.35 s at 2 shards ahead and 1.41 s in file order (medians of 10).
_AHEAD_SHARDS = 16
_READ_AHEAD = 4


class _Writer:
    """The pipeline's writer thread: the ordered stream, shard by shard, and the pieces of
    the `_Skip` ranges, copied whenever the next tensor's merge is not done yet."""

    def __init__(self, pipeline: _Pipeline) -> None:
        self.pipeline = pipeline
        self.jobs = pipeline.jobs
        self.sync = ThreadPoolExecutor(max_workers=1, thread_name_prefix="composer-fsync")
        self.pending: list[Future[None]] = []
        # Freed with their last reference (an error's traceback may hold a view of them).
        self.staging = mmap.mmap(-1, 2 * _DIRECT_CHUNK) if pipeline.direct else None
        self.buffer = memoryview(mmap.mmap(-1, _DIRECT_CHUNK)) if pipeline.direct else None
        self.shards: dict[int, _ShardWriter] = {}  # created on first use, closed when done
        self.cloned: set[int] = set()
        self.streamed: set[int] = set()
        self.deferred = collections.deque(_deferred_copies(pipeline.plans))
        self.left = collections.Counter(piece.job for piece in self.deferred)
        self.job = -1  # the shard of the ordered stream

    def run(self) -> None:
        while True:
            item = self.pipeline._get(self.pipeline.ordered)
            if item is _DONE:
                break
            if item.job != self.job:
                if self.job >= 0:
                    self._end_stream(self.job)
                self.job = item.job
            shard = self._shard(self.job)
            if isinstance(item, _Tensor):
                while self._can_copy() and not item.merged.done():
                    self._copy_deferred()  # instead of waiting
                self.pipeline._wait(item.merged)
                shard.write(_byte_view(item.buffer[: item.info.nbytes]))
                self.pipeline.bytes_written += item.info.nbytes
                self.pipeline.current = item.info.name
                self.pipeline.pool.put(item.buffer)
            elif self.job in self.cloned:
                continue
            elif isinstance(item, _Skip):
                shard.skip(item.length)
            else:
                shard.copy(item.offset, item.length)
                self.pipeline.bytes_written += item.length
        if self.job >= 0:
            self._end_stream(self.job)
        while self.deferred:
            self._copy_deferred()
        for future in self.pending:
            future.result()

    def _shard(self, index: int) -> _ShardWriter:
        shard = self.shards.get(index)
        if shard is None:
            job = self.jobs[index]
            shard = self.shards[index] = _ShardWriter(job.source, job.target, self.staging)
            if not job.updates and shard.clone():
                self.cloned.add(index)
                self.pipeline.bytes_written += job.header.file_size
                self.deferred = collections.deque(p for p in self.deferred if p.job != index)
                self.left[index] = 0
        return shard

    def _can_copy(self) -> bool:
        return bool(self.deferred) and self.deferred[0].job <= self.job + _AHEAD_SHARDS

    def _copy_deferred(self) -> None:
        if self.pipeline.stop.is_set():
            raise _Stopped
        piece = self.deferred.popleft()
        shard = self._shard(piece.job)
        if piece.job in self.cloned:  # cloned when just opened: its pieces are gone
            return
        if len(self.deferred) >= _READ_AHEAD:
            ahead = self.deferred[_READ_AHEAD - 1]
            _will_need(self._shard(ahead.job).src, ahead.offset, ahead.length)
        shard.copy_at(piece.offset, piece.length, self.buffer)
        self.pipeline.bytes_written += piece.length
        self.left[piece.job] -= 1
        if not self.left[piece.job] and piece.job in self.streamed:
            self._done(piece.job)

    def _end_stream(self, index: int) -> None:
        self._shard(index).end_stream()
        self.pipeline._close_source(index)
        self.streamed.add(index)
        if not self.left[index]:
            self._done(index)

    def _done(self, index: int) -> None:
        # fsync finished shards in the background while the next ones stream.
        fd = self.shards[index].finish()
        del self.shards[index]
        self.pending.append(self.sync.submit(_fsync_close, fd))

    def close(self) -> None:
        """Close the shards still open (after a failure) and wait for the fsyncs."""
        for shard in self.shards.values():
            shard.close()
        self.shards.clear()
        self.sync.shutdown(wait=True)


class _ShardWriter:
    """Writes one new shard: front to back (raw ranges copied from its source and tensor
    bytes, `copy` and `write`), except for aligned ranges of the source left out of that
    stream (`skip`) and copied at their place whenever convenient (`copy_at`).

    Given ``staging`` (page-aligned, two halves of a multiple of ``_DIRECT_ALIGN`` each) and
    a filesystem that takes it, the file is opened ``O_DIRECT``: the stream's bytes are
    staged in one half while the other half is written to the device by a helper thread,
    so that filling and writing overlap; the last block is padded and the file truncated to
    its size. Otherwise writes go through the page cache and copies use
    ``copy_file_range``. If the first direct write is refused (alignment the filesystem
    does not take), the file switches to buffered writes; nothing was written yet, so the
    bytes stay the same. A refusal of a later direct write is an error like any other.
    """

    def __init__(self, source: Path, target: Path, staging: mmap.mmap | None) -> None:
        self.src = open_regular(source)
        self.fd = -1
        self.size = 0  # bytes of the stream so far (skipped ranges included)
        self.flushed = 0  # of which handed to the device (direct mode)
        self.proven = False  # a direct write went through
        self.halves: list[memoryview] | None = None
        self.filled = 0
        self.pending: Future[None] | None = None
        self.io: ThreadPoolExecutor | None = None
        try:
            self.fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except BaseException:
            os.close(self.src)
            raise
        # O_DIRECT is turned on after the exclusive create: open(O_DIRECT) on a filesystem
        # that refuses it (tmpfs before Linux 6.6, ramfs) creates the file, then fails.
        if staging is not None and _set_direct(self.fd, on=True):
            half = len(staging) // 2
            self.halves = [memoryview(staging)[:half], memoryview(staging)[half:]]

    def clone(self) -> bool:
        """Make the (still empty) file a reflink of the whole source, where the filesystem
        has them (see `_clone`); False, and nothing written, elsewhere."""
        size = os.fstat(self.src).st_size
        if size == 0 or not _clone(self.src, self.fd):
            return False
        os.lseek(self.fd, size, os.SEEK_SET)
        self.size = self.flushed = size
        return True

    def copy(self, offset: int, length: int) -> None:
        """Append ``length`` bytes of the source from ``offset``."""
        self.size += length
        while length > 0 and self.halves is not None:
            buffer = self.halves[0]
            count = min(length, len(buffer) - self.filled)
            _pread_into(self.src, buffer[self.filled : self.filled + count], offset)
            self._staged(count)
            offset += count
            length -= count
        if length > 0:
            _copy_range(self.src, self.fd, offset, length)

    def write(self, data: memoryview) -> None:
        """Append ``data``."""
        self.size += len(data)
        while len(data) > 0 and self.halves is not None:
            buffer = self.halves[0]
            count = min(len(data), len(buffer) - self.filled)
            buffer[self.filled : self.filled + count] = data[:count]
            self._staged(count)
            data = data[count:]
        if len(data) > 0:
            _write_all(self.fd, data)

    def skip(self, length: int) -> None:
        """Move the stream past ``length`` bytes (from an aligned offset, a whole number of
        blocks) that `copy_at` writes."""
        if self.halves is not None and self.filled:
            self._flush(self.filled)  # ends where the skip starts: aligned, no padding
        self.size += length
        if self.halves is not None:
            self.flushed += length
        else:
            os.lseek(self.fd, self.size, os.SEEK_SET)

    def copy_at(self, offset: int, length: int, buffer: memoryview | None) -> None:
        """Copy ``length`` bytes of the source from ``offset`` to the same place in the file
        (aligned; through ``buffer``, at least ``length`` long, in direct mode)."""
        if self.halves is not None and buffer is not None:
            data = buffer[:length]
            _pread_into(self.src, data, offset)
            if self._direct_write(data, offset):
                return
        _copy_range(self.src, self.fd, offset, length, same_offset=True)

    def _direct_write(self, data: memoryview, offset: int) -> bool:
        """Write ``data`` at ``offset`` with O_DIRECT; False if the very first direct write of
        the file is refused (the file then takes buffered writes; nothing was written)."""
        try:
            _pwrite_all(self.fd, data, offset)
        except OSError as exc:
            if self.proven or exc.errno != errno.EINVAL:
                raise
            self._to_buffered()
            return False
        self.proven = True
        return True

    def _to_buffered(self) -> None:
        # O_DIRECT taken but this alignment refused, before any direct write: write what is
        # staged through the page cache, and everything from here on.
        assert self.halves is not None and self.pending is None
        _set_direct(self.fd, on=False)
        if self.filled:
            _pwrite_all(self.fd, self.halves[0][: self.filled], self.flushed)
        # Where the stream is (a copy or write in progress has counted its whole length in size).
        os.lseek(self.fd, self.flushed + self.filled, os.SEEK_SET)
        self.halves = None
        self.filled = 0

    def _staged(self, count: int) -> None:
        assert self.halves is not None
        self.filled += count
        if self.filled == len(self.halves[0]):
            self._flush(self.filled)

    def _flush(self, length: int) -> None:
        """Hand the filled half to the device and stage into the other one."""
        assert self.halves is not None
        data = self.halves[0][:length]
        if not self.proven:
            # The first write runs here, so that a refusal can still change the mode.
            if not self._direct_write(data, self.flushed):
                return
        else:
            self._wait_pending()  # the other half is free again once its write is done
            if self.io is None:
                self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="composer-dio")
            self.pending = self.io.submit(_pwrite_all, self.fd, data, self.flushed)
        self.flushed += length
        self.halves.reverse()
        self.filled = 0

    def _wait_pending(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def end_stream(self) -> None:
        """Write what is staged (the last block padded) and wait for it: the staging area
        is free for another shard. `copy_at` may still follow."""
        if self.halves is not None:
            if self.filled:
                padded = _aligned(self.filled)
                self.halves[0][self.filled : padded] = bytes(padded - self.filled)
                self._flush(padded)
            self._wait_pending()

    def finish(self) -> int:
        """End the stream, cut the padding and return the open file descriptor (the caller
        fsyncs it)."""
        self.end_stream()
        if self.halves is not None and self.flushed != self.size:
            os.ftruncate(self.fd, self.size)
        self._stop_io()
        os.close(self.src)
        self.src = -1
        fd, self.fd = self.fd, -1
        return fd

    def close(self) -> None:
        """Close whatever is still open (after a failure)."""
        self._stop_io()
        for fd in (self.src, self.fd):
            if fd >= 0:
                os.close(fd)
        self.src = self.fd = -1

    def _stop_io(self) -> None:
        # A write in flight still reads its half and writes to the file: let it end first.
        if self.io is not None:
            self.io.shutdown(wait=True)
            self.io = None
        self.pending = None
        self.halves = None


class _Stopped(Exception):
    pass


def _fsync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stream_shards(
    jobs: Sequence[ShardJob],
    update: Update,
    *,
    load: Load | None = None,
    progress: Progress | None = None,
    workers: int = 1,
    direct: bool = True,
) -> None:
    """Write every job's target shard, transforming the listed tensors on the way.

    Each targeted tensor is read, then ``load(info)`` loads what its update needs (e.g. LoRA
    factors), then ``update(info, tensor, payload)`` must overwrite ``tensor`` (a typed view
    of the read buffer) in place; the three run on one of ``workers`` merge threads, so with
    several workers ``load`` and ``update`` must be thread-safe. Output is written in file
    order. Targets are created exclusively (an existing file is an error) and fsynced.

    Args:
        jobs: the shards to write, processed in order.
        update: the in-place transformation of one targeted tensor.
        load: optional loader of each update's payload (None passes None).
        progress: ``progress(bytes_written, last_tensor_written)``, called on the calling
            thread a few times a second.
        workers: merge threads.
        direct: write with ``O_DIRECT`` where the filesystem takes it (see the module
            docstring); False always writes through the page cache. The bytes are the same.

    Raises:
        Whatever ``update`` or ``load`` raise, and OSError for I/O failures; all threads
        are stopped first. Partially written targets are left for the caller to remove
        (compose builds in a temporary directory).
    """
    pipeline = _Pipeline(jobs, load, update, max(1, workers), direct)
    reader = threading.Thread(target=pipeline.read, name="composer-reader", daemon=True)
    writer = threading.Thread(target=pipeline.write, name="composer-writer", daemon=True)
    reader.start()
    writer.start()
    try:
        while writer.is_alive():
            writer.join(timeout=_POLL_S)
            if progress is not None and not pipeline.errors:
                progress(pipeline.bytes_written, pipeline.current)
    finally:
        pipeline.stop.set()  # no-op for the finished threads; stops them after a failure
        reader.join()
        writer.join()
        pipeline.merge.shutdown(wait=True, cancel_futures=True)
        pipeline.close_sources()
    if pipeline.errors:
        raise pipeline.errors[0]


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file and fsync it (for small outputs such as adapters)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=dict(metadata))
    _fsync_path(path)


def write_json(path: Path, document: Any) -> None:
    """Write pretty JSON and fsync it."""
    write_text(path, json.dumps(document, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 text to a new file and fsync it."""
    with open(path, "x", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def copy_file(source: Path, target: Path, *, direct: bool = True) -> None:
    """Copy a file's bytes (following symlinks) to a new file and fsync it; with ``direct``,
    through an aligned buffer with ``O_DIRECT`` where the filesystem takes it, like shards."""
    fd = open_regular(source)  # a FIFO or device behind the name is refused, not waited on
    try:
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    chunk = min(_DIRECT_CHUNK, max(_DIRECT_ALIGN, _aligned(size)))
    writer = _ShardWriter(source, target, mmap.mmap(-1, 2 * chunk) if direct else None)
    try:
        if not writer.clone():
            writer.copy(0, size)
        fd = writer.finish()
    except BaseException:
        writer.close()
        raise
    _fsync_close(fd)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory so that entries created or renamed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(staging: Path, target: Path) -> None:
    """Atomically rename a finished staging directory to ``target`` (which must not exist)."""
    fsync_dir(staging)
    if target.exists() or target.is_symlink():
        raise FileExistsError(errno.EEXIST, "output directory appeared while composing", str(target))
    os.rename(staging, target)
    fsync_dir(target.parent)
