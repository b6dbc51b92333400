"""Where base models may be read from: the configured model roots, minus Brickyard's own data.

Registering a base model makes the server read (and, for full outputs and the Hub
endpoints, serve) files from a directory it is told about, so a write token could
otherwise read any file the server can: its admin token, its database, ``/etc/shadow``.
`ModelRoots` confines every such read:

- the directory and every file read from it are resolved (symlinks followed) and must lie
  under one of ``settings.model_roots``;
- nothing under the Brickyard home (tokens, database, blobs, compositions, caches) is model
  data, except its ``models/`` directory; nor are the blob, composition and cache
  directories or the database file wherever they are configured;
- only regular files pass (FIFOs, devices and sockets are refused before anything opens
  them); configs and tokenizer files have a size bound;
- errors say the same thing for a path that does not exist and one that is not allowed, and
  name only what the caller gave;
- a build reads the files it checked, not what the paths point at later: `pinned_model`
  opens every checked file once, confirms where each open descriptor really is (the
  kernel's own path of the open file, ``/proc/self/fd``) and that it is a regular file, and
  hands the composer a private directory whose entries lead to those descriptors. Swapping
  a symlink (or a directory on the way) after the check cannot redirect the build.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from composer import HF_MODEL_FILES, read_bounded
from registry.errors import InvalidBaseModel
from registry.settings import Settings

__all__ = ["ModelRoots"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Configs are KiB; the largest tokenizer.json files are tens of MiB.
MAX_SMALL_FILE_BYTES = 64 * 1024 * 1024


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class ModelRoots:
    """The confinement policy of one server (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.roots = tuple(_resolved(p) for p in settings.resolved_model_roots)
        home = _resolved(settings.home)
        self.home = home
        self.home_models = _resolved(settings.home / "models")
        forbidden = [
            settings.blob_root,
            settings.compositions_dir,
            settings.blob_cache_dir,
            settings.embedding_cache_dir,
        ]
        if settings.sqlalchemy_url.startswith("sqlite:///"):
            forbidden.append(Path(settings.sqlalchemy_url[len("sqlite:///") :]))
        self.forbidden = tuple(_resolved(p) for p in forbidden)

    def allows(self, path: Path) -> bool:
        """Whether a resolved path is model data: under a root, not Brickyard's own data."""
        if not any(_within(path, root) for root in self.roots):
            return False
        if _within(path, self.home) and not _within(path, self.home_models):
            return False
        return not any(_within(path, bad) for bad in self.forbidden)

    def directory(self, given: str | Path) -> Path:
        """The resolved model directory for a path a caller gave.

        Raises:
            InvalidBaseModel: it does not exist, is not a directory, or is outside the
                roots (one message for all three, naming only ``given``).
        """
        shown = str(given)[:200]
        try:
            resolved = Path(given).expanduser().resolve(strict=True)
            ok = resolved.is_dir() and self.allows(resolved)
        except (OSError, ValueError, RuntimeError):  # missing, a NUL byte, a symlink loop
            ok = False
        if not ok:
            raise InvalidBaseModel(
                f"cannot read base model at {shown!r}",
                errors=[
                    "path: not a model directory inside the model roots of this server "
                    "(setting model_roots, BRICKYARD_MODEL_ROOTS)"
                ],
            )
        return resolved

    def check_model(self, directory: Path, shards: Iterable[str] = ()) -> None:
        """Check every file the composer and the Hub endpoints read from a model directory:
        config, index, weights and the copied files of `HF_MODEL_FILES`.

        Raises:
            InvalidBaseModel: listing each file that is outside the roots, not a regular
                file, or (for non-weights) larger than the bound.
        """
        directory = self.directory(directory)
        problems = []
        names = {"config.json", INDEX_FILE, SINGLE_FILE, *HF_MODEL_FILES, *shards, *self._indexed_shards(directory)}
        for name in sorted(names):
            problem = self._file_problem(directory, name, weights=name.endswith(".safetensors"))
            if problem:
                problems.append(f"{name}: {problem}")
        if problems:
            raise InvalidBaseModel(f"cannot read base model at {str(directory)[:200]!r}", errors=problems)

    @contextmanager
    def pinned_model(self, directory: Path) -> Iterator[Path]:
        """Check a model directory (`check_model`) and yield a private directory holding its
        checked files as they were when opened: each entry leads to a descriptor opened here,
        so nothing that changes the original paths later reaches the reader. Closed (and
        removed) on exit.

        Raises:
            InvalidBaseModel: what `check_model` raises, or a file that, once opened, is
                outside the roots or not a regular file (swapped after the check).
        """
        self.check_model(directory)
        resolved = self.directory(directory)
        names = {"config.json", INDEX_FILE, SINGLE_FILE, *HF_MODEL_FILES, *self._indexed_shards(resolved)}
        descriptors: list[int] = []
        try:
            with tempfile.TemporaryDirectory(prefix="brickyard-base-") as view:
                for name in sorted(names):
                    path = resolved / name
                    if not os.path.lexists(path):
                        continue
                    try:
                        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                    except OSError:
                        self._changed(resolved, name)
                    descriptors.append(fd)
                    really = Path(os.readlink(f"/proc/self/fd/{fd}"))
                    if not stat.S_ISREG(os.fstat(fd).st_mode) or not self.allows(really):
                        self._changed(resolved, name)
                    os.symlink(f"/proc/{os.getpid()}/fd/{fd}", Path(view) / name)
                yield Path(view)
        finally:
            for fd in descriptors:
                os.close(fd)

    @staticmethod
    def _changed(directory: Path, name: str) -> NoReturn:
        raise InvalidBaseModel(
            f"cannot read base model at {str(directory)[:200]!r}",
            errors=[f"{name}: changed while it was being opened (outside the model roots or not a regular file now)"],
        )

    def _indexed_shards(self, directory: Path) -> set[str]:
        if self._file_problem(directory, INDEX_FILE, weights=False) is not None:
            return set()
        try:
            index = json.loads(read_bounded(directory / INDEX_FILE, MAX_SMALL_FILE_BYTES))
        except (OSError, ValueError, RecursionError):
            return set()  # read_base_model reports it
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            return set()
        return {v for v in weight_map.values() if isinstance(v, str) and "/" not in v and not v.startswith(".")}

    def check_file(self, directory: Path, name: str) -> bool:
        """Whether one file of an allowed directory may be read (see `check_model`)."""
        return self._file_problem(directory, name, weights=name.endswith(".safetensors")) is None

    def _file_problem(self, directory: Path, name: str, *, weights: bool) -> str | None:
        path = directory / name
        if not os.path.lexists(path):
            return None
        try:
            resolved = path.resolve(strict=True)
            mode = os.stat(resolved)
        except (OSError, RuntimeError):
            return "cannot be read (a dangling or looping link)"
        if not self.allows(resolved):
            return "links outside the model roots"
        if not stat.S_ISREG(mode.st_mode):
            return "not a regular file"
        if not weights and mode.st_size > MAX_SMALL_FILE_BYTES:
            return f"larger than {MAX_SMALL_FILE_BYTES} bytes"
        return None


def _resolved(path: Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()
