"""Python clients: `RemoteClient` talks to a Brickyard server over HTTP, `LocalClient`
drives a local `Registry` in-process. Both speak the REST API's response models
(`registry.api.schemas`), so code written against one works with the other; the CLI
uses whichever the user configured.

Errors come back as the same `registry.errors` classes the server raised, rebuilt from
the problem details (``type`` names the class).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from registry import errors
from registry.api.schemas import (
    BaseModelDetail,
    BaseModelOut,
    BrickAliasOut,
    BrickFileOut,
    BrickOut,
    CompositionFileOut,
    CompositionOut,
    MergeMethodOut,
    Page,
    SearchHitOut,
    SearchOut,
    TokenCreated,
    TokenOut,
)

__all__ = ["BrickyardClient", "LocalClient", "RemoteClient", "error_from_problem", "iter_bricks"]

CONFIG_FILENAME = "adapter_config.json"
WEIGHTS_FILENAME = "adapter_model.safetensors"


class BrickyardClient(Protocol):
    """Operations shared by the local and the remote client."""

    def add_base_model(
        self, name: str, path: str, *, description: str = "", aliases: Sequence[str] = ()
    ) -> BaseModelDetail: ...
    def list_base_models(self) -> list[BaseModelOut]: ...
    def get_base_model(self, name: str) -> BaseModelDetail: ...
    def add_base_model_alias(self, name: str, alias: str) -> BaseModelDetail: ...
    def remove_base_model_alias(self, name: str, alias: str) -> BaseModelDetail: ...
    def delete_base_model(self, name: str) -> BaseModelOut: ...
    def register_brick(self, adapter_dir: Path, metadata: Mapping[str, Any]) -> BrickOut: ...
    def list_bricks(
        self,
        *,
        base_model: str | None = None,
        tag: str | None = None,
        all_versions: bool = False,
        cursor: str | None = None,
        limit: int = 50,
    ) -> Page[BrickOut]: ...
    def get_brick(self, name: str, version: int | str | None = None) -> BrickOut: ...
    def update_brick(self, name: str, version: int, **changes: Any) -> BrickOut: ...
    def delete_brick(self, name: str, version: int) -> BrickOut: ...
    def download_brick(self, name: str, version: int, out_dir: Path) -> list[Path]: ...
    def search(self, query: str, **options: Any) -> list[SearchHitOut]: ...
    def merge_methods(self) -> list[MergeMethodOut]: ...
    def compose(self, request: Mapping[str, Any]) -> CompositionOut: ...
    def discover_emergent(self, base_model: str, request: Mapping[str, Any]) -> CompositionOut: ...
    def get_composition(self, composition_id: str) -> CompositionOut: ...
    def wait_composition(
        self,
        composition_id: str,
        on_progress: Callable[[CompositionOut], None] | None = None,
        *,
        timeout: float | None = None,
    ) -> CompositionOut: ...
    def download_composition(
        self, composition_id: str, out_dir: Path, on_bytes: Callable[[int, int], None] | None = None
    ) -> list[Path]: ...
    def list_compositions(
        self, *, cursor: str | None = None, limit: int = 50, **filters: Any
    ) -> Page[CompositionOut]: ...
    def describe_composition(self, ref: str) -> CompositionOut: ...
    def cancel_composition(self, ref: str) -> CompositionOut: ...
    def delete_composition(self, ref: str) -> CompositionOut: ...
    def name_composition(self, name: str, ref: str) -> CompositionOut: ...
    def unname_composition(self, name: str) -> CompositionOut: ...
    def brick_aliases(self, name: str) -> list[BrickAliasOut]: ...
    def set_brick_alias(self, name: str, version: int | str, alias: str) -> BrickAliasOut: ...
    def remove_brick_alias(self, name: str, alias: str) -> BrickAliasOut: ...
    def create_token(self, name: str, scope: str) -> TokenCreated: ...
    def list_tokens(self) -> list[TokenOut]: ...
    def revoke_token(self, name: str) -> TokenOut: ...
    def close(self) -> None: ...


def _adapter_files(adapter_dir: Path) -> tuple[Path, Path]:
    config, weights = adapter_dir / CONFIG_FILENAME, adapter_dir / WEIGHTS_FILENAME
    missing = [p.name for p in (config, weights) if not p.is_file()]
    if missing:
        hint = ""
        if "adapter_model.safetensors" in missing and (adapter_dir / "adapter_model.bin").exists():
            hint = " (found adapter_model.bin: convert it to safetensors)"
        raise errors.InvalidInput(
            f"{adapter_dir} is not a PEFT adapter directory", errors=[f"missing {', '.join(missing)}{hint}"]
        )
    return config, weights


# -- remote -----------------------------------------------------------------------------

_ERRORS_BY_CODE: dict[str, type[errors.BrickyardError]] = {
    cls.code: cls
    for cls in (getattr(errors, name) for name in errors.__all__)
    if isinstance(cls, type) and issubclass(cls, errors.BrickyardError)
}


def error_from_problem(status: int, body: Any) -> errors.BrickyardError:
    """Rebuild the `BrickyardError` a server answered with (problem details)."""
    if not isinstance(body, dict):
        return errors.BrickyardError(f"server answered {status}: {str(body)[:200]}")
    code = str(body.get("type", "")).rsplit("/", 1)[-1]
    cls = _ERRORS_BY_CODE.get(code)
    if cls is None:
        cls = next((c for c in _ERRORS_BY_CODE.values() if c.status == status), errors.BrickyardError)
    known = {"type", "title", "status", "detail", "instance", "errors"}
    extra = {k: v for k, v in body.items() if k not in known}
    return cls(str(body.get("detail", f"HTTP {status}")), errors=body.get("errors") or [], extra=extra)


class RemoteClient:
    """A client for a Brickyard server.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        token: API token sent as ``Authorization: Bearer``.
        timeout: seconds per request (uploads and downloads stream).
        http: an ``httpx.Client`` to use instead of a new one (tests pass an in-process one).
    """

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 300.0, http: Any | None = None) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = http if http is not None else httpx.Client(base_url=self.url, timeout=timeout)
        self._http.headers.update(headers)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> RemoteClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise errors.ServiceUnavailable(f"cannot reach Brickyard at {self.url}: {exc}") from None
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = response.text
            raise error_from_problem(response.status_code, body)
        return response.json()

    def add_base_model(
        self, name: str, path: str, *, description: str = "", aliases: Sequence[str] = ()
    ) -> BaseModelDetail:
        """Register a base model (``path`` is read by the server, on its file system)."""
        body = {"name": name, "path": path, "description": description, "aliases": list(aliases)}
        return BaseModelDetail.model_validate(self._request("POST", "/v1/base-models", json=body))

    def list_base_models(self) -> list[BaseModelOut]:
        """Every base model."""
        return [BaseModelOut.model_validate(b) for b in self._request("GET", "/v1/base-models")]

    def get_base_model(self, name: str) -> BaseModelDetail:
        """One base model."""
        return BaseModelDetail.model_validate(self._request("GET", f"/v1/base-models/{name}"))

    def add_base_model_alias(self, name: str, alias: str) -> BaseModelDetail:
        """Add an alias to a base model."""
        body = {"alias": alias}
        return BaseModelDetail.model_validate(self._request("POST", f"/v1/base-models/{name}/aliases", json=body))

    def remove_base_model_alias(self, name: str, alias: str) -> BaseModelDetail:
        """Remove an alias of a base model."""
        from urllib.parse import quote

        path = f"/v1/base-models/{name}/aliases/{quote(alias, safe='/')}"
        return BaseModelDetail.model_validate(self._request("DELETE", path))

    def delete_base_model(self, name: str) -> BaseModelOut:
        """Remove a base model's registration."""
        return BaseModelOut.model_validate(self._request("DELETE", f"/v1/base-models/{name}"))

    def register_brick(self, adapter_dir: Path, metadata: Mapping[str, Any]) -> BrickOut:
        """Upload a PEFT adapter directory as a brick (the weights are streamed)."""
        config, weights = _adapter_files(adapter_dir)
        with open(config, "rb") as config_file, open(weights, "rb") as weights_file:
            files = {
                "adapter_config": (CONFIG_FILENAME, config_file, "application/json"),
                "adapter_weights": (WEIGHTS_FILENAME, weights_file, "application/octet-stream"),
            }
            data = {"metadata": json.dumps(dict(metadata))}
            return BrickOut.model_validate(self._request("POST", "/v1/bricks", data=data, files=files))

    def list_bricks(
        self,
        *,
        base_model: str | None = None,
        tag: str | None = None,
        all_versions: bool = False,
        cursor: str | None = None,
        limit: int = 50,
    ) -> Page[BrickOut]:
        """A page of bricks."""
        params: dict[str, Any] = {"all_versions": all_versions, "limit": limit}
        for key, value in (("base_model", base_model), ("tag", tag), ("cursor", cursor)):
            if value is not None:
                params[key] = value
        return Page[BrickOut].model_validate(self._request("GET", "/v1/bricks", params=params))

    def get_brick(self, name: str, version: int | str | None = None) -> BrickOut:
        """A brick version (latest when ``version`` is None; a string may be an alias)."""
        path = f"/v1/bricks/{name}" if version is None else f"/v1/bricks/{name}/versions/{version}"
        return BrickOut.model_validate(self._request("GET", path))

    def update_brick(self, name: str, version: int, **changes: Any) -> BrickOut:
        """Patch description, examples or tags."""
        return BrickOut.model_validate(self._request("PATCH", f"/v1/bricks/{name}/versions/{version}", json=changes))

    def delete_brick(self, name: str, version: int) -> BrickOut:
        """Delete a brick version."""
        return BrickOut.model_validate(self._request("DELETE", f"/v1/bricks/{name}/versions/{version}"))

    def search(self, query: str, **options: Any) -> list[SearchHitOut]:
        """Bricks ranked for ``query`` (options: base_model, tags, k, offset, min_score, ...)."""
        body = {"query": query, **{k: v for k, v in options.items() if v is not None}}
        return SearchOut.model_validate(self._request("POST", "/v1/search", json=body)).hits

    def download_brick(self, name: str, version: int, out_dir: Path) -> list[Path]:
        """Download a brick version's files into ``out_dir`` (a PEFT adapter directory)."""
        listing = self._request("GET", f"/v1/bricks/{name}/versions/{version}/files")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for entry in (BrickFileOut.model_validate(f) for f in listing):
            target = out_dir / entry.filename
            path = f"/v1/bricks/{name}/versions/{version}/files/{entry.filename}"
            self.download_file(path, target, sha256=entry.sha256, size=entry.size_bytes)
            written.append(target)
        return written

    def merge_methods(self) -> list[MergeMethodOut]:
        """Every merge method with its parameters."""
        return [MergeMethodOut.model_validate(m) for m in self._request("GET", "/v1/merge-methods")]

    def compose(self, request: Mapping[str, Any]) -> CompositionOut:
        """Request a composition (see `registry.inputs.ComposeRequest`); returns at once."""
        return CompositionOut.model_validate(self._request("POST", "/v1/compositions", json=dict(request)))

    def discover_emergent(self, base_model: str, request: Mapping[str, Any]) -> CompositionOut:
        """Queue a discovery of emergent bricks (see `registry.emergent.DiscoveryRequest`); returns at once."""
        return CompositionOut.model_validate(
            self._request("POST", f"/v1/base-models/{base_model}/emergent", json=dict(request))
        )

    def get_composition(self, composition_id: str) -> CompositionOut:
        """Status and progress of a composition."""
        return CompositionOut.model_validate(self._request("GET", f"/v1/compositions/{composition_id}"))

    def wait_composition(
        self,
        composition_id: str,
        on_progress: Callable[[CompositionOut], None] | None = None,
        *,
        poll_s: float = 0.5,
        timeout: float | None = None,
    ) -> CompositionOut:
        """Poll until the composition is ready, failed or cancelled.

        Raises:
            TimeoutError: still building after ``timeout`` seconds (the build goes on;
                `cancel_composition` stops it).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            composition = self.get_composition(composition_id)
            if on_progress is not None:
                on_progress(composition)
            if composition.status in _DONE:
                return composition
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"composition {composition_id} is still {composition.status} after {timeout:g} s")
            time.sleep(poll_s)

    def download_composition(
        self, composition_id: str, out_dir: Path, on_bytes: Callable[[int, int], None] | None = None
    ) -> list[Path]:
        """Download a ready composition into ``out_dir`` (created; must not hold files);
        ``on_bytes(done, total)`` reports progress as chunks arrive."""
        _empty_target(out_dir)
        listing = [
            CompositionFileOut.model_validate(f)
            for f in self._request("GET", f"/v1/compositions/{composition_id}/files")
        ]
        total = sum(entry.size_bytes for entry in listing)
        done = 0

        def count(n: int) -> None:
            nonlocal done
            done += n
            if on_bytes is not None:
                on_bytes(done, total)

        written = []
        for entry in listing:
            target = out_dir / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            self.download_file(f"/v1/compositions/{composition_id}/files/{entry.path}", target, on_chunk=count)
            written.append(target)
        return written

    def download_file(
        self,
        path: str,
        target: Path,
        *,
        sha256: str | None = None,
        size: int | None = None,
        on_chunk: Callable[[int], None] | None = None,
    ) -> None:
        """Stream one file to ``target`` (written to a temporary name, then renamed);
        ``on_chunk(n)`` is called with the size of each chunk written.

        With ``sha256``/``size``, the bytes are checked before the rename: a mismatch
        removes them and raises `StorageCorrupt`.
        """
        import hashlib

        partial = target.with_name(target.name + ".partial")
        digest = hashlib.sha256()
        written = 0
        # A server with presigned downloads answers 307 to the object store (httpx drops the
        # Authorization header when it leaves the server's origin).
        with self._http.stream("GET", path, follow_redirects=True) as response:
            if response.status_code >= 400:
                response.read()
                raise error_from_problem(response.status_code, response.json())
            with open(partial, "wb") as out:
                for chunk in response.iter_bytes(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    if on_chunk is not None:
                        on_chunk(len(chunk))
        if (sha256 is not None and digest.hexdigest() != sha256) or (size is not None and written != size):
            partial.unlink(missing_ok=True)
            raise errors.StorageCorrupt(
                f"the downloaded {target.name} is not the registered file",
                errors=[
                    f"{target.name}: got {written} bytes with sha256 {digest.hexdigest()}, expected {size} / {sha256}"
                ],
            )
        partial.replace(target)

    # -- managed compositions, aliases, tokens (issue #21) ---------------------------------

    def list_compositions(self, *, cursor: str | None = None, limit: int = 50, **filters: Any) -> Page[CompositionOut]:
        """A page of compositions, newest first (filters: base_model, brick, status, name)."""
        params: dict[str, Any] = {"limit": limit, **{k: v for k, v in filters.items() if v is not None}}
        if cursor is not None:
            params["cursor"] = cursor
        return Page[CompositionOut].model_validate(self._request("GET", "/v1/compositions", params=params))

    def describe_composition(self, ref: str) -> CompositionOut:
        """A composition by id or name, with its names."""
        return self.get_composition(ref)

    def cancel_composition(self, ref: str) -> CompositionOut:
        """Cancel a queued or running build (by id or name)."""
        return CompositionOut.model_validate(self._request("POST", f"/v1/compositions/{ref}/cancel"))

    def delete_composition(self, ref: str) -> CompositionOut:
        """Delete a composition (by id or name), its names and files."""
        return CompositionOut.model_validate(self._request("DELETE", f"/v1/compositions/{ref}"))

    def name_composition(self, name: str, ref: str) -> CompositionOut:
        """Point ``name`` at a composition (by id or another name)."""
        body = {"composition": ref}
        return CompositionOut.model_validate(self._request("PUT", f"/v1/composition-names/{name}", json=body))

    def unname_composition(self, name: str) -> CompositionOut:
        """Remove a composition name; answers the composition it pointed at."""
        return CompositionOut.model_validate(self._request("DELETE", f"/v1/composition-names/{name}"))

    def brick_aliases(self, name: str) -> list[BrickAliasOut]:
        """The aliases of a brick."""
        return [BrickAliasOut.model_validate(a) for a in self._request("GET", f"/v1/bricks/{name}/aliases")]

    def set_brick_alias(self, name: str, version: int | str, alias: str) -> BrickAliasOut:
        """Point ``name@alias`` at a version (a number or another alias)."""
        body = {"version": version}
        return BrickAliasOut.model_validate(self._request("PUT", f"/v1/bricks/{name}/aliases/{alias}", json=body))

    def remove_brick_alias(self, name: str, alias: str) -> BrickAliasOut:
        """Remove ``name@alias``."""
        return BrickAliasOut.model_validate(self._request("DELETE", f"/v1/bricks/{name}/aliases/{alias}"))

    def create_token(self, name: str, scope: str) -> TokenCreated:
        """Create an API token on the server (needs an admin token)."""
        body = {"name": name, "scope": scope}
        return TokenCreated.model_validate(self._request("POST", "/v1/tokens", json=body))

    def list_tokens(self) -> list[TokenOut]:
        """The server's API tokens (needs an admin token)."""
        return [TokenOut.model_validate(t) for t in self._request("GET", "/v1/tokens")]

    def revoke_token(self, name: str) -> TokenOut:
        """Revoke an API token on the server (needs an admin token)."""
        return TokenOut.model_validate(self._request("DELETE", f"/v1/tokens/{name}"))


# -- local ------------------------------------------------------------------------------


def local_actor() -> str:
    """``local:<user>``: who acts through the local registry (recorded in the audit log)."""
    import getpass

    try:
        return f"local:{getpass.getuser()}"[:100]
    except (KeyError, OSError):
        return "local"


class LocalClient:
    """The client interface over an in-process `Registry` (no server needed). Whoever can
    open the database is trusted; changes are recorded as ``local:<user>``."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry
        self.actor = local_actor()

    @classmethod
    def open(cls, settings: Any = None) -> LocalClient:
        """Open the registry configured by ``settings`` (default: the environment)."""
        from registry.service import Registry

        return cls(Registry.open(settings))

    def close(self) -> None:
        """Release the database."""
        self.registry.close()

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_base_model(
        self, name: str, path: str, *, description: str = "", aliases: Sequence[str] = ()
    ) -> BaseModelDetail:
        """Register a base model from a local directory."""
        request = {"name": name, "path": path, "description": description, "aliases": list(aliases)}
        return BaseModelDetail.of(self.registry.add_base_model(request, actor=self.actor))

    def list_base_models(self) -> list[BaseModelOut]:
        """Every base model."""
        return [BaseModelOut.of(b) for b in self.registry.list_base_models()]

    def get_base_model(self, name: str) -> BaseModelDetail:
        """One base model."""
        return BaseModelDetail.of(self.registry.get_base_model(name))

    def add_base_model_alias(self, name: str, alias: str) -> BaseModelDetail:
        """Add an alias to a base model."""
        return BaseModelDetail.of(self.registry.add_base_model_alias(name, alias, actor=self.actor))

    def remove_base_model_alias(self, name: str, alias: str) -> BaseModelDetail:
        """Remove an alias of a base model."""
        return BaseModelDetail.of(self.registry.remove_base_model_alias(name, alias, actor=self.actor))

    def delete_base_model(self, name: str) -> BaseModelOut:
        """Remove a base model's registration."""
        return BaseModelOut.of(self.registry.delete_base_model(name, actor=self.actor))

    def register_brick(self, adapter_dir: Path, metadata: Mapping[str, Any]) -> BrickOut:
        """Register a PEFT adapter directory as a brick."""
        config, weights = _adapter_files(adapter_dir)
        with open(weights, "rb") as weights_file:
            return BrickOut.of(
                self.registry.register_brick(dict(metadata), config.read_bytes(), weights_file, actor=self.actor)
            )

    def list_bricks(
        self,
        *,
        base_model: str | None = None,
        tag: str | None = None,
        all_versions: bool = False,
        cursor: str | None = None,
        limit: int = 50,
    ) -> Page[BrickOut]:
        """A page of bricks."""
        page = self.registry.list_bricks(
            base_model=base_model, tag=tag, all_versions=all_versions, cursor=cursor, limit=limit
        )
        return Page[BrickOut](items=[BrickOut.of(b) for b in page.items], next_cursor=page.next_cursor)

    def get_brick(self, name: str, version: int | str | None = None) -> BrickOut:
        """A brick version (latest when ``version`` is None; a string may be an alias)."""
        return BrickOut.of(self.registry.get_brick(name, self.registry.resolve_brick_ref(name, version)))

    def update_brick(self, name: str, version: int, **changes: Any) -> BrickOut:
        """Patch description, examples or tags."""
        return BrickOut.of(self.registry.update_brick(name, version, changes, actor=self.actor))

    def delete_brick(self, name: str, version: int) -> BrickOut:
        """Delete a brick version."""
        return BrickOut.of(self.registry.delete_brick(name, version, actor=self.actor))

    def search(self, query: str, **options: Any) -> list[SearchHitOut]:
        """Bricks ranked for ``query`` (options: base_model, tags, k, offset, min_score, ...)."""
        body = {"query": query, **{k: v for k, v in options.items() if v is not None}}
        return [
            SearchHitOut(
                brick=BrickOut.of(h.brick), score=h.score, matched=h.matched, text=h.text, similarity=h.similarity
            )
            for h in self.registry.search(body).hits
        ]

    def merge_methods(self) -> list[MergeMethodOut]:
        """Every merge method with its parameters."""
        from composer import list_methods

        return [MergeMethodOut(name=m.name, description=m.description, params=m.params_schema) for m in list_methods()]

    def compose(self, request: Mapping[str, Any]) -> CompositionOut:
        """Request a composition; `wait_composition` builds it in this process."""
        composition, _ = self.registry.compositions.request(dict(request), actor=self.actor)
        return CompositionOut.of(composition)

    def discover_emergent(self, base_model: str, request: Mapping[str, Any]) -> CompositionOut:
        """Queue a discovery of emergent bricks; `wait_composition` runs it in this process."""
        job, _ = self.registry.emergent.request_discovery(base_model, dict(request), actor=self.actor)
        return CompositionOut.of(job)

    def get_composition(self, composition_id: str) -> CompositionOut:
        """Status and progress of a composition."""
        return CompositionOut.of(self.registry.compositions.get(composition_id))

    def wait_composition(
        self,
        composition_id: str,
        on_progress: Callable[[CompositionOut], None] | None = None,
        *,
        poll_s: float = 0.2,
        timeout: float | None = None,
    ) -> CompositionOut:
        """Build the composition here if it is queued (another process may be building it),
        reporting progress, until it is ready, failed or cancelled.

        Raises:
            TimeoutError: not done after ``timeout`` seconds; a build started here is
                cancelled (it stops within a second and leaves no files).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        import threading

        from registry.builds.compositions import worker_name

        compositions = self.registry.compositions
        worker = worker_name(0) + ":local"
        claimed = compositions.store.claim(composition_id, worker)
        builder = None
        if claimed is not None:
            builder = threading.Thread(target=compositions.build_claimed, args=(claimed, worker), daemon=True)
            builder.start()
        while True:
            composition = self.get_composition(composition_id)
            if on_progress is not None:
                on_progress(composition)
            if composition.status in _DONE and (builder is None or not builder.is_alive()):
                return composition
            if deadline is not None and time.monotonic() >= deadline:
                if builder is not None:  # nobody else will finish what this process started
                    compositions.store.cancel(composition_id, self.actor)
                    builder.join()
                raise TimeoutError(f"composition {composition_id} is still {composition.status} after {timeout:g} s")
            time.sleep(poll_s)

    def download_composition(
        self, composition_id: str, out_dir: Path, on_bytes: Callable[[int, int], None] | None = None
    ) -> list[Path]:
        """Copy a ready composition into ``out_dir`` (created; must not hold files);
        ``on_bytes(done, total)`` reports progress after each file."""
        import shutil

        _empty_target(out_dir)
        files = self.registry.compositions.files(composition_id)
        total, done = sum(size for _, size in files), 0
        written = []
        for relative, size in files:
            target = out_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.registry.compositions.open_file(composition_id, relative) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            written.append(target)
            done += size
            if on_bytes is not None:
                on_bytes(done, total)
        return written

    def download_brick(self, name: str, version: int, out_dir: Path) -> list[Path]:
        """Copy a brick version's files into ``out_dir``."""
        import shutil

        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for entry in self.registry.brick_files(name, version):
            self.registry.brick_file(name, version, entry.filename)  # StorageCorrupt unless the bytes check out
            target = out_dir / entry.filename
            with self.registry.blobs.open(entry.sha256) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            written.append(target)
        return written

    # -- managed compositions, aliases, tokens (issue #21) ---------------------------------

    def list_compositions(self, *, cursor: str | None = None, limit: int = 50, **filters: Any) -> Page[CompositionOut]:
        """A page of compositions, newest first (filters: base_model, brick, status, name)."""
        base = filters.pop("base_model", None)
        base_id = self.registry.store.base_model_id(base) if base is not None else None
        page = self.registry.compositions.list_page(base_model_id=base_id, cursor=cursor, limit=limit, **filters)
        return Page[CompositionOut](items=[CompositionOut.of(c) for c in page.items], next_cursor=page.next_cursor)

    def describe_composition(self, ref: str) -> CompositionOut:
        """A composition by id or name, with its names."""
        return CompositionOut.of(self.registry.compositions.describe(ref))

    def cancel_composition(self, ref: str) -> CompositionOut:
        """Cancel a queued or running build (by id or name)."""
        return CompositionOut.of(self.registry.compositions.cancel(ref, actor=self.actor))

    def delete_composition(self, ref: str) -> CompositionOut:
        """Delete a composition (by id or name), its names and files."""
        return CompositionOut.of(self.registry.compositions.delete(ref, actor=self.actor))

    def name_composition(self, name: str, ref: str) -> CompositionOut:
        """Point ``name`` at a composition (by id or another name)."""
        return CompositionOut.of(self.registry.compositions.set_name(name, ref, actor=self.actor))

    def unname_composition(self, name: str) -> CompositionOut:
        """Remove a composition name; answers the composition it pointed at."""
        return CompositionOut.of(self.registry.compositions.describe(self.registry.compositions.remove_name(name)))

    def brick_aliases(self, name: str) -> list[BrickAliasOut]:
        """The aliases of a brick."""
        return [BrickAliasOut.of(a) for a in self.registry.brick_aliases(name)]

    def set_brick_alias(self, name: str, version: int | str, alias: str) -> BrickAliasOut:
        """Point ``name@alias`` at a version (a number or another alias)."""
        return BrickAliasOut.of(self.registry.set_brick_alias(name, version, alias, actor=self.actor))

    def remove_brick_alias(self, name: str, alias: str) -> BrickAliasOut:
        """Remove ``name@alias``."""
        return BrickAliasOut.of(self.registry.remove_brick_alias(name, alias))

    def create_token(self, name: str, scope: str) -> TokenCreated:
        """Create an API token in the local registry."""
        token, info = self.registry.tokens.create(name, scope, actor=self.actor)
        return TokenCreated(token=token, **TokenOut.of(info).model_dump())

    def list_tokens(self) -> list[TokenOut]:
        """The local registry's API tokens."""
        return [TokenOut.of(t) for t in self.registry.tokens.list()]

    def revoke_token(self, name: str) -> TokenOut:
        """Revoke an API token in the local registry."""
        return TokenOut.of(self.registry.tokens.revoke(name, actor=self.actor))


_DONE = ("ready", "failed", "cancelled", "deleted")


def _empty_target(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise errors.InvalidInput(f"{out_dir} is not empty", errors=["choose a new or empty output directory"])
    out_dir.mkdir(parents=True, exist_ok=True)


def iter_bricks(client: BrickyardClient, **filters: Any) -> Iterator[BrickOut]:
    """Every brick matching ``filters``, following the pages."""
    cursor = None
    while True:
        page = client.list_bricks(cursor=cursor, **filters)
        yield from page.items
        if page.next_cursor is None:
            return
        cursor = page.next_cursor
