"""All file I/O of the composer: reading tensors, streaming merged shards, writing outputs.

Full merges stream (`stream_shards`). An output shard has exactly the tensor names, dtypes
and shapes of its input shard, so its header bytes are copied verbatim and the data is
produced in file order: tensors that receive no delta are copied as raw byte ranges in the
kernel (``copy_file_range``), and each targeted tensor is read with ``pread`` into a
reusable buffer, updated in place by the caller's function, and written out. Threads
overlap the work: a reader, merge workers (the math; torch releases the GIL) and a writer;
another fsyncs finished shards while the next ones are produced, and the calling thread
reports progress. Memory is bounded
by a few buffers of the largest targeted tensor, whatever the model size: nothing is
memory-mapped, so the page cache never counts toward the process's resident memory, and
outputs are new files (never in-place writes to mapped weights).
"""

from __future__ import annotations

import errno
import json
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
_POLL_S = 0.05


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            raise OSError(errno.EIO, f"unexpected end of file at offset {offset + done}")
        done += count


def _write_all(fd: int, view: memoryview) -> None:
    # Modest chunks: on the VMs measured, large single writes were slower and more variable.
    done = 0
    while done < len(view):
        done += os.write(fd, view[done : done + _WRITE_CHUNK])


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    """Append ``length`` bytes of ``src`` from ``offset`` to ``dst`` at its file position."""
    remaining = length
    while remaining > 0:
        chunk = min(remaining, _COPY_CHUNK)
        try:
            count = os.copy_file_range(src, dst, chunk, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            count = _copy_by_read(src, dst, offset, chunk)
        if count == 0:
            raise OSError(errno.EIO, f"unexpected end of file at offset {offset}")
        offset += count
        remaining -= count


def _copy_by_read(src: int, dst: int, offset: int, length: int) -> int:
    data = os.pread(src, length, offset)
    _write_all(dst, memoryview(data))
    return len(data)


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous CPU tensor's bytes."""
    return tensor.view(torch.uint8).reshape(-1).numpy().data.cast("B")


class TensorFile:
    """A safetensors file opened for random reads of single tensors (``pread``, no mmap)."""

    def __init__(self, path: Path, header: SafetensorsHeader) -> None:
        self.path = path
        self.header = header
        self._fd = os.open(path, os.O_RDONLY)

    def read(self, info: TensorInfo) -> torch.Tensor:
        """A new tensor holding ``info``'s data, in its stored dtype and shape."""
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        return self.read_into(info, buffer)

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
class _Tensor:
    job: int
    info: TensorInfo
    buffer: torch.Tensor
    merged: Future[None]


_DONE = object()

Prefetch = Callable[[TensorInfo], Any]
Update = Callable[[TensorInfo, torch.Tensor, Any], None]
Progress = Callable[[int, str], None]


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


class _Pipeline:
    """reader thread -> merge workers -> writer thread, in file order, with a fixed pool of
    buffers (``workers + 2``: one being read, ``workers`` being merged, one being written)."""

    def __init__(self, jobs: Sequence[ShardJob], prefetch: Prefetch | None, update: Update, workers: int) -> None:
        self.jobs = jobs
        self.prefetch = prefetch
        self.update = update
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        depth = workers + 2
        # Items in file order: raw copies and tensors (each with the future of its merge).
        self.ordered: queue.Queue[Any] = queue.Queue(maxsize=4 * depth)
        self.pool: queue.Queue[torch.Tensor] = queue.Queue()
        self.merge = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="composer-merge")
        self.bytes_written = 0
        self.current = ""
        largest = max((job.header.tensors[name].nbytes for job in jobs for name in job.updates), default=0)
        for _ in range(depth if largest else 0):
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
                with TensorFile(job.source, job.header) as source:
                    for run in _plan_runs(index, job):
                        if isinstance(run, _Copy):
                            self._put(self.ordered, run)
                            continue
                        buffer = self._get(self.pool)
                        view = source.read_into(run, buffer)
                        payload = self.prefetch(run) if self.prefetch is not None else None
                        merged = self.merge.submit(self.update, run, view, payload)
                        self._put(self.ordered, _Tensor(index, run, buffer, merged))
            self._put(self.ordered, _DONE)
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            self._fail(exc)

    def write(self) -> None:
        sync = ThreadPoolExecutor(max_workers=1, thread_name_prefix="composer-fsync")
        pending: list[Future[None]] = []
        job_index = -1
        src = dst = -1
        try:
            while True:
                item = self._get(self.ordered)
                if item is _DONE:
                    break
                if item.job != job_index:
                    if dst >= 0:
                        os.close(src)
                        # fsync finished shards in the background while the next ones stream.
                        pending.append(sync.submit(_fsync_close, dst))
                        src = dst = -1
                    job_index = item.job
                    job = self.jobs[job_index]
                    src = os.open(job.source, os.O_RDONLY)
                    dst = os.open(job.target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                if isinstance(item, _Copy):
                    _copy_range(src, dst, item.offset, item.length)
                    self.bytes_written += item.length
                else:
                    self._wait(item.merged)
                    _write_all(dst, _byte_view(item.buffer[: item.info.nbytes]))
                    self.bytes_written += item.info.nbytes
                    self.current = item.info.name
                    self.pool.put(item.buffer)
            if dst >= 0:
                os.close(src)
                pending.append(sync.submit(_fsync_close, dst))
                src = dst = -1
            for future in pending:
                future.result()
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            self._fail(exc)
        finally:
            for fd in (src, dst):
                if fd >= 0:
                    os.close(fd)
            sync.shutdown(wait=True)


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
    prefetch: Prefetch | None = None,
    progress: Progress | None = None,
    workers: int = 1,
) -> None:
    """Write every job's target shard, transforming the listed tensors on the way.

    ``prefetch(info)`` runs on the reader thread right after a targeted tensor is read (load
    what its update needs, e.g. LoRA factors); ``update(info, tensor, payload)`` runs on one
    of ``workers`` merge threads and must overwrite ``tensor`` (a typed view of the read
    buffer) in place; with several workers it must be thread-safe. Output is written in file
    order. Targets are created exclusively (an existing file is an error) and fsynced.

    Args:
        jobs: the shards to write, processed in order.
        update: the in-place transformation of one targeted tensor.
        prefetch: optional loader run ahead on the reader thread.
        progress: ``progress(bytes_written, last_tensor_written)``, called on the calling
            thread a few times a second.
        workers: merge threads.

    Raises:
        Whatever ``update`` or ``prefetch`` raise, and OSError for I/O failures; all threads
        are stopped first. Partially written targets are left for the caller to remove
        (compose builds in a temporary directory).
    """
    pipeline = _Pipeline(jobs, prefetch, update, max(1, workers))
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


def copy_file(source: Path, target: Path) -> None:
    """Copy a file's bytes (following symlinks) to a new file and fsync it."""
    with open(source, "rb") as src, open(target, "xb") as dst:
        shutil.copyfileobj(src, dst, length=1024 * 1024)
        dst.flush()
        os.fsync(dst.fileno())


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
