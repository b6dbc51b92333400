"""Download a brick or a composition from a Brickyard server into a local adapter cache.

Synchronous and free of vLLM, so it is tested against the registry's own app in-process.
`AdapterSource.fetch` answers a local PEFT directory, None when the server does not know the
reference, or raises `AdapterRefused` when it exists but must not be served here (another
base model, not an adapter, not built, a file that does not match its checksum).

Cache layout: ``<root>/<adapter key>/<files>``; a download goes to ``<root>/.tmp-*`` and is
renamed into place only when every file checked out, so a reader never sees half an adapter
and concurrent downloads of one adapter race harmlessly (the first rename wins).

Every request is retried (twice, after 0.5 s and 1 s) when the server cannot be reached or
answers 502/503/504: vLLM turns a resolver's None into "model does not exist", which a
Brickyard restart or a moment of "database busy" should not cause.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import httpx

from brickyard_vllm.refs import BrickRef, CompositionRef, Reference, adapter_key

__all__ = ["AdapterRefused", "AdapterSource", "FetchedAdapter", "local_fingerprint"]

_CHUNK = 1 << 20
_TRANSIENT_STATUS = frozenset({502, 503, 504})
_BACKOFF_S = (0.5, 1.0)  # pauses before the second and third attempt

# Under "vllm.": vLLM configures handlers for its own logger tree only.
log = logging.getLogger("vllm.brickyard.fetch")

_T = TypeVar("_T")


class AdapterRefused(Exception):
    """The reference exists on the server but cannot be served by this vLLM (reason in the message)."""


@dataclass(frozen=True)
class FetchedAdapter:
    """A verified adapter directory in the cache."""

    label: str  # what it is on the server: ``name@version`` or ``composition <id>``
    key: str  # `adapter_key` of its files: the cache directory's name
    path: Path


@dataclass(frozen=True)
class _RemoteFile:
    path: str  # relative, POSIX
    size: int
    sha256: str | None  # None where the server lists no digest (composition files)


@lru_cache(maxsize=16)
def local_fingerprint(base_dir: str) -> str:
    """composer's fingerprint of a local base model directory (config + tensor names, dtypes, shapes).

    Only the config and the safetensors headers are read. Remembered per path: vLLM serves one
    base for its whole life.
    """
    from composer.basemodel import read_base_model

    return read_base_model(Path(base_dir)).fingerprint()


class AdapterSource:
    """Brickyard's REST API as a source of verified adapter directories."""

    def __init__(
        self,
        http: httpx.Client,
        cache_dir: Path,
        fingerprint: Callable[[str], str] = local_fingerprint,
        *,
        backoff_s: Sequence[float] = _BACKOFF_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``http`` has the server's base URL and token; ``fingerprint`` maps vLLM's base to its
        fingerprint; a failed request is tried again after each pause of ``backoff_s``."""
        self.http = http
        self.cache_dir = cache_dir
        self.fingerprint = fingerprint
        self.backoff_s = tuple(backoff_s)
        self.sleep = sleep

    def fetch(self, base_model: str, ref: Reference) -> FetchedAdapter | None:
        """The local directory of ``ref`` for vLLM serving ``base_model`` (its ``--model`` path).

        Returns:
            the verified adapter, or None when the server has no such brick, version or composition.

        Raises:
            AdapterRefused: another base model (by fingerprint), a composition that is not a
                ready adapter, a file whose size or sha256 differs from the listing.
            httpx.HTTPError: the server could not be reached or answered an unexpected error
                (after the retries for unreachable and 502/503/504).
        """
        if isinstance(ref, BrickRef):
            return self._fetch_brick(base_model, ref)
        return self._fetch_composition(base_model, ref)

    # -- bricks ---------------------------------------------------------------------------

    def _fetch_brick(self, base_model: str, ref: BrickRef) -> FetchedAdapter | None:
        url = f"/v1/bricks/{ref.name}" if ref.version is None else f"/v1/bricks/{ref.name}/versions/{ref.version}"
        brick = self._get_json(url)
        if brick is None:
            return None
        label = f"{brick['name']}@{brick['version']}"
        base = self._get_json(f"/v1/base-models/{brick['base_model']}")
        if base is None:
            raise AdapterRefused(f"{label}: its base model {brick['base_model']!r} is not registered")
        self._check_base(base_model, base["fingerprint"], f"{label} (base model {brick['base_model']!r})")
        prefix = f"/v1/bricks/{brick['name']}/versions/{brick['version']}/files"
        listing = self._get_json(prefix)
        if listing is None:
            return None  # deleted between the two requests
        files = [_RemoteFile(f["filename"], int(f["size_bytes"]), f["sha256"]) for f in listing]
        key = adapter_key((f.path, f.sha256 or "") for f in files)
        return self._materialise(label, key, prefix, files)

    # -- compositions ---------------------------------------------------------------------

    def _fetch_composition(self, base_model: str, ref: CompositionRef) -> FetchedAdapter | None:
        composition = self._get_json(f"/v1/compositions/{ref.id}")
        if composition is None:
            return None
        label = f"composition {ref.id[:12]}"
        if composition["output"] != "adapter":
            raise AdapterRefused(f"{label} is a full model (output={composition['output']!r}), not an adapter")
        if composition["status"] != "ready":
            raise AdapterRefused(f"{label} is {composition['status']}, not ready")
        recipe_base = composition["recipe"]["base_model"]
        self._check_base(base_model, recipe_base["fingerprint"], f"{label} (base model {recipe_base['name']!r})")
        prefix = f"/v1/compositions/{ref.id}/files"
        listing = self._get_json(prefix)
        if listing is None:
            return None
        files = [_RemoteFile(f["path"], int(f["size_bytes"]), None) for f in listing]
        # The id already hashes the recipe; sizes tell a rebuilt output apart from a stale cache.
        key = adapter_key([("composition", ref.id), *((f.path, f"size={f.size}") for f in files)])
        return self._materialise(label, key, prefix, files)

    # -- shared ---------------------------------------------------------------------------

    def _check_base(self, base_model: str, expected: str, what: str) -> None:
        try:
            actual = self.fingerprint(base_model)
        except Exception as exc:  # composer's InvalidBaseModel, OSError: vLLM's base is unreadable here
            raise AdapterRefused(f"cannot fingerprint vLLM's base model {base_model!r}: {exc}") from exc
        if actual != expected:
            raise AdapterRefused(
                f"{what} has base fingerprint {expected[:12]}, "
                f"vLLM serves {base_model!r} with fingerprint {actual[:12]}"
            )

    def _get_json(self, url: str) -> Any:
        def get() -> httpx.Response:
            response = self.http.get(url)
            if response.status_code != 404:
                response.raise_for_status()
            return response

        response = self._retrying(url, get)
        return None if response.status_code == 404 else response.json()

    def _retrying(self, url: str, attempt: Callable[[], _T]) -> _T:
        """``attempt()``, tried again after each pause while the failure is transient."""
        for pause in (*self.backoff_s, None):
            try:
                return attempt()
            except httpx.HTTPStatusError as exc:
                if pause is None or exc.response.status_code not in _TRANSIENT_STATUS:
                    raise
                reason = f"HTTP {exc.response.status_code}"
            except httpx.TransportError as exc:
                if pause is None:
                    raise
                reason = f"{type(exc).__name__}: {exc}"
            log.warning("Brickyard %s failed (%s); trying again in %.1f s", url, reason, pause)
            self.sleep(pause)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _materialise(self, label: str, key: str, prefix: str, files: list[_RemoteFile]) -> FetchedAdapter:
        final = self.cache_dir / key
        if not final.is_dir():
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:12]}-", dir=self.cache_dir))
            try:
                for file in files:
                    url, target = f"{prefix}/{file.path}", staging / _safe_relative(file.path)
                    self._retrying(url, partial(self._download, label, url, target, file))
                try:
                    staging.rename(final)
                except OSError:
                    if not final.is_dir():  # not "another download won the race"
                        raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return FetchedAdapter(label=label, key=key, path=final)

    def _download(self, label: str, url: str, target: Path, file: _RemoteFile) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        with self.http.stream("GET", url) as response, target.open("wb") as out:
            if response.status_code >= 500:
                # The server checks a blob's sha256 and size before serving it and answers a
                # `storage-corrupt` problem rather than wrong bytes: that is a refusal too.
                response.read()
                code = _problem_code(response)
                if code == "storage-corrupt":
                    raise AdapterRefused(f"{label}: the server found {file.path} corrupt (sha256 check failed)")
            response.raise_for_status()
            for chunk in response.iter_bytes(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        if size != file.size:
            raise AdapterRefused(f"{label}: {file.path} has {size} bytes, the server lists {file.size}")
        if file.sha256 is not None and digest.hexdigest() != file.sha256:
            raise AdapterRefused(
                f"{label}: {file.path} has sha256 {digest.hexdigest()[:12]}, the server lists {file.sha256[:12]}"
            )


def _problem_code(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    kind = body.get("type") if isinstance(body, dict) else None  # RFC 9457: ".../problems/<code>"
    return kind.rsplit("/", 1)[-1] if isinstance(kind, str) else None


def _safe_relative(path: str) -> PurePosixPath:
    relative = PurePosixPath(path)
    if relative.is_absolute() or not relative.parts or any(p in ("", ".", "..") for p in relative.parts):
        raise AdapterRefused(f"the server listed a file outside the adapter: {path!r}")
    return relative
