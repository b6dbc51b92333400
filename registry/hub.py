"""Brickyard as a Hugging Face Hub: repositories, revisions, files and model cards.

Clients that honour ``HF_ENDPOINT`` (``huggingface_hub``, ``transformers``, ``peft``)
read three kinds of repositories:

```
bricks/<name>          revision: a version number, "main" (the latest version), an alias
                       (when an alias resolver is given) or a commit id
                       files: adapter_config.json, adapter_model.safetensors, README.md
compositions/<id>      a ready composition; revision "main" or its commit id
                       files: the composition's directory (README.md and, for adapter
                       outputs, adapter_config.json rewritten as below)
base-models/<name>     a registered base model; revision "main" or its commit id
                       files: config, tokenizer and safetensors files of its directory
```

Every served ``adapter_config.json`` names its base as ``base-models/<name>``, so
``AutoPeftModelForCausalLM.from_pretrained("bricks/x")`` fetches the base through the same
endpoint; the stored blob is not changed (the native routes serve it byte-identical), the
rewritten bytes are what the Hub listing sizes and hashes. A commit id is the sha1 of the
repository id and every file's path and sha256, so it changes exactly when content does
and the client's cache is reused otherwise.

This module maps; `registry.api.routes.hub` speaks HTTP. It reads through the `Registry`'s
public methods only.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from composer import HF_MODEL_FILES
from registry import domain
from registry.errors import (
    BaseModelNotFound,
    BrickNotFound,
    CompositionNotFound,
    FileNotFound,
    InvalidInput,
    NotFound,
)
from registry.storage.model_roots import ModelRoots

if TYPE_CHECKING:
    from registry.service import Registry
    from registry.storage.composition_outputs import PublishedFile

__all__ = [
    "BASE_MODELS",
    "BRICKS",
    "COMPOSITIONS",
    "EntryNotFound",
    "Hub",
    "HubFile",
    "Listing",
    "RepoNotFound",
    "RevisionNotFound",
    "Snapshot",
    "adapter_config_for_hub",
    "commit_id",
    "model_card",
    "parse_repo_id",
]

BRICKS, COMPOSITIONS, BASE_MODELS = "bricks", "compositions", "base-models"
NAMESPACES = (BRICKS, COMPOSITIONS, BASE_MODELS)
MAIN = "main"
CARD_FILE = "README.md"
ADAPTER_CONFIG = "adapter_config.json"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
INDEX_FILE = "model.safetensors.index.json"
# Files the Hub stores with LFS: their listing carries lfs.sha256 and their ETag is the sha256.
_LFS_SUFFIXES = (".safetensors",)


class RepoNotFound(NotFound):
    """No repository of that id (or not readable yet, like a composition still building)."""

    code, title = "repo-not-found", "Repository not found"
    hub_code = "RepoNotFound"


class RevisionNotFound(NotFound):
    """The repository exists; the revision does not."""

    code, title = "revision-not-found", "Revision not found"
    hub_code = "RevisionNotFound"


class EntryNotFound(FileNotFound):
    """The repository and revision exist; the file does not."""

    code, title = "entry-not-found", "Entry not found"
    hub_code = "EntryNotFound"


@dataclass(frozen=True)
class HubFile:
    """A file of a repository revision: bytes on disk (``local``), made here (``content``),
    or the blob ``sha256`` of the blob store (``stored``)."""

    path: str
    size: int
    sha256: str
    local: Path | None = None
    content: bytes | None = None
    stored: bool = False
    git_sha1: str | None = None  # git's blob id of the content (None for LFS files: not needed)

    @property
    def lfs(self) -> bool:
        """Whether the Hub would store it with LFS (weights)."""
        return self.path.endswith(_LFS_SUFFIXES)

    @property
    def lfs_pointer(self) -> bytes:
        """The git-lfs pointer file the Hub's git repository would hold for this file."""
        return lfs_pointer(self.sha256, self.size)

    @property
    def blob_id(self) -> str:
        """The git blob id the Hub lists (``blobId``, tree ``oid``): of the LFS pointer for
        weights, of the content for every other file."""
        if self.lfs:
            return git_blob_id(self.lfs_pointer)
        if self.git_sha1 is None:
            raise ValueError(f"{self.path}: no git blob id computed")
        return self.git_sha1


@dataclass(frozen=True)
class Listing:
    """A repository as `list_models` shows it (no files, no commit: those cost hashing)."""

    repo_id: str
    library: str
    tags: tuple[str, ...]
    card: Mapping[str, Any]
    created_at: datetime
    last_modified: datetime
    description: str


@dataclass(frozen=True)
class Snapshot:
    """One revision of a repository: its commit id and every file."""

    listing: Listing
    commit: str
    files: tuple[HubFile, ...]
    config: Mapping[str, Any] | None = None

    @property
    def repo_id(self) -> str:
        """``namespace/name``."""
        return self.listing.repo_id

    def file(self, path: str) -> HubFile:
        """The file at ``path`` (`EntryNotFound` otherwise)."""
        for file in self.files:
            if file.path == path:
                return file
        raise EntryNotFound(
            f"{self.repo_id}@{self.commit[:12]} has no file {path[:200]!r}",
            extra={"repo_id": self.repo_id, "commit": self.commit},
        )


# -- pure mapping -----------------------------------------------------------------------


def parse_repo_id(repo_id: str) -> tuple[str, str]:
    """``(namespace, name)`` of a repository id (`RepoNotFound` for another namespace)."""
    namespace, _, name = repo_id.partition("/")
    if namespace not in NAMESPACES or not name or "/" in name:
        raise RepoNotFound(
            f"no repository {repo_id[:200]!r}; repositories are bricks/<name>, compositions/<id> and base-models/<name>"
        )
    return namespace, name


def lfs_pointer(sha256: str, size: int) -> bytes:
    """A git-lfs pointer file (https://github.com/git-lfs/git-lfs/blob/main/docs/spec.md)."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def git_blob_id(data: bytes) -> str:
    """git's object id of a blob: sha1 over ``blob <size>\\0`` and the bytes."""
    digest = hashlib.sha1(b"blob %d\0" % len(data), usedforsecurity=False)
    digest.update(data)
    return digest.hexdigest()


def commit_id(repo_id: str, files: Iterable[HubFile]) -> str:
    """The 40-hex commit id of a revision: sha1 over the repository id and each file's path
    and sha256 (sorted), so equal content gives an equal id and any change a new one."""
    digest = hashlib.sha1(f"brickyard-hub/1\n{repo_id}\n".encode(), usedforsecurity=False)
    for file in sorted(files, key=lambda f: f.path):
        digest.update(f"{file.path}\0{file.sha256}\n".encode())
    return digest.hexdigest()


def adapter_config_for_hub(stored: bytes, base_model: str) -> bytes:
    """The stored ``adapter_config.json`` with ``base_model_name_or_path`` naming the base
    repository of this endpoint (``base-models/<name>``); every other field as stored."""
    config = json.loads(stored)
    config["base_model_name_or_path"] = f"{BASE_MODELS}/{base_model}"
    return (json.dumps(config, indent=2) + "\n").encode()


def model_card(front_matter: Mapping[str, Any], body: str) -> bytes:
    """A README with YAML front matter. Every value is written as JSON, which is valid YAML
    (flow style), so no quoting rules of YAML can bite."""
    lines = ["---"]
    for key, value in front_matter.items():
        if value is not None:
            lines.append(f"{key}: {json.dumps(value, ensure_ascii=False)}")
    lines += ["---", "", body.strip(), ""]
    return "\n".join(lines).encode()


def _brick_listing(brick: domain.Brick) -> Listing:
    base = f"{BASE_MODELS}/{brick.base_model}"
    tags = _unique(
        ["brickyard", "brick", "lora", "peft", *brick.tags, f"base_model:{base}", f"base_model:adapter:{base}"]
        + ([f"license:{brick.license}"] if brick.license else [])
    )
    card = {
        "library_name": "peft",
        "base_model": base,
        "base_model_relation": "adapter",
        "license": brick.license,
        "tags": [t for t in tags if ":" not in t],
        "brickyard": {"brick": brick.name, "version": brick.version, "sha256": brick.sha256},
    }
    return Listing(
        repo_id=f"{BRICKS}/{brick.name}",
        library="peft",
        tags=tuple(tags),
        card={k: v for k, v in card.items() if v is not None},
        created_at=brick.created_at,
        last_modified=brick.updated_at,
        description=brick.description,
    )


def _brick_card(brick: domain.Brick, listing: Listing) -> bytes:
    examples = "".join(f"- {e}\n" for e in brick.examples)
    body = (
        f"# {brick.name} (version {brick.version})\n\n{brick.description}\n\n"
        + (f"## Examples\n\n{examples}\n" if examples else "")
        + f"LoRA rank {brick.rank}, alpha {brick.lora_alpha:g} on `{', '.join(brick.target_modules)}` of base model "
        f"`{brick.base_model}`. Served by Brickyard.\n\n"
        "```python\nfrom peft import AutoPeftModelForCausalLM\n\n"
        f'model = AutoPeftModelForCausalLM.from_pretrained("{listing.repo_id}", revision="{brick.version}")\n```\n'
    )
    return model_card(listing.card, body)


def _composition_listing(composition: domain.Composition) -> Listing:
    recipe = composition.recipe
    base_name = str(recipe["base_model"]["name"])  # type: ignore[index]
    base = f"{BASE_MODELS}/{base_name}"
    adapter = composition.output == "adapter"
    relation = "adapter" if adapter else "merge"
    library = "peft" if adapter else "transformers"
    bricks = [f"{b['name']}@{b['version']}" for b in recipe.get("bricks", [])]  # type: ignore[attr-defined]
    tags = _unique(
        [
            *("brickyard", "composition", "lora", "merge", composition.method, library),
            f"base_model:{base}",
            f"base_model:{relation}:{base}",
        ]
    )
    card = {
        "library_name": library,
        "base_model": base,
        "base_model_relation": relation,
        "tags": [t for t in tags if ":" not in t],
        "brickyard": {"composition": composition.id, "method": composition.method, "bricks": bricks},
    }
    description = f"{composition.method} composition of {', '.join(bricks)} on {base_name}"
    created = composition.finished_at or composition.created_at
    return Listing(
        repo_id=f"{COMPOSITIONS}/{composition.id}",
        library=library,
        tags=tuple(tags),
        card=card,
        created_at=composition.created_at,
        last_modified=created,
        description=description,
    )


def _base_listing(base: domain.BaseModel) -> Listing:
    tags = _unique(["brickyard", "base-model", "transformers", "safetensors", base.architecture])
    card = {"library_name": "transformers", "tags": list(tags)}
    return Listing(
        repo_id=f"{BASE_MODELS}/{base.name}",
        library="transformers",
        tags=tuple(tags),
        card=card,
        created_at=base.created_at,
        last_modified=base.created_at,
        description=base.description or f"{base.architecture} base model {base.name}",
    )


def _strip_front_matter(text: str) -> str:
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end >= 0:
            return text[end + 5 :]
    return text


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# -- file digests -----------------------------------------------------------------------


class _Digests:
    """sha256 and git blob id of files on disk, remembered by (path, inode, size, mtime): a
    composition's or a base model's weights are hashed once per process, not on every request.
    Blobs of the blob store are remembered by their sha256 (content-addressed: never stale)."""

    def __init__(self, size: int = 4096) -> None:
        self._known: OrderedDict[tuple[str, int, int, int], tuple[str, str]] = OrderedDict()
        self._blobs: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    def digests(self, path: Path) -> tuple[str, str, int]:
        """``(sha256, git blob id, size)`` of a file, read once for both."""
        stat = path.stat()
        key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            known = self._known.get(key)
            if known is not None:
                self._known.move_to_end(key)
                return known[0], known[1], stat.st_size
        sha256 = hashlib.sha256()
        git = hashlib.sha1(b"blob %d\0" % stat.st_size, usedforsecurity=False)
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                sha256.update(chunk)
                git.update(chunk)
        value = (sha256.hexdigest(), git.hexdigest())
        with self._lock:
            self._known[key] = value
            while len(self._known) > self._size:
                self._known.popitem(last=False)
        return value[0], value[1], stat.st_size

    def blob_git_id(self, sha256: str, read: Callable[[], bytes]) -> str:
        """The git blob id of the stored blob ``sha256``; ``read`` gives its bytes (once)."""
        with self._lock:
            known = self._blobs.get(sha256)
            if known is not None:
                self._blobs.move_to_end(sha256)
                return known
        value = git_blob_id(read())
        with self._lock:
            self._blobs[sha256] = value
            while len(self._blobs) > self._size:
                self._blobs.popitem(last=False)
        return value


_DIGESTS = _Digests()


def _disk_file(relative: str, path: Path) -> HubFile:
    sha256, git_sha1, size = _DIGESTS.digests(path)
    return HubFile(relative, size, sha256, local=path, git_sha1=git_sha1)


def _made_file(relative: str, content: bytes) -> HubFile:
    return HubFile(
        relative, len(content), hashlib.sha256(content).hexdigest(), content=content, git_sha1=git_blob_id(content)
    )


# -- the service ------------------------------------------------------------------------

AliasResolver = Callable[[str, str], int | None]


class Hub:
    """Repositories, revisions and listings over a `Registry`.

    Args:
        registry: the service to read from.
        resolve_alias: ``(brick name, revision) -> version`` or None, for revisions that are
            neither ``main``, a number nor a commit id (brick aliases).
    """

    def __init__(self, registry: Registry, *, resolve_alias: AliasResolver | None = None) -> None:
        self.registry = registry
        self.resolve_alias = resolve_alias

    # -- one repository ------------------------------------------------------------------

    def snapshot(self, repo_id: str, revision: str = MAIN) -> Snapshot:
        """The files of ``repo_id`` at ``revision``.

        Raises:
            RepoNotFound: no such repository (or a composition not ready).
            RevisionNotFound: no such revision of it.
        """
        namespace, name = parse_repo_id(repo_id)
        if namespace == BRICKS:
            return self._brick_snapshot(name, revision)
        snapshot = self._composition_snapshot(name) if namespace == COMPOSITIONS else self._base_snapshot(name)
        if revision not in (MAIN, snapshot.commit):
            raise RevisionNotFound(
                f"{repo_id} has no revision {revision[:100]!r}; its revisions are 'main' and {snapshot.commit}",
                extra={"repo_id": repo_id},
            )
        return snapshot

    def _brick_snapshot(self, name: str, revision: str) -> Snapshot:
        repo_id = f"{BRICKS}/{name}"
        try:
            latest = self.registry.get_brick(name)
        except BrickNotFound:
            raise RepoNotFound(f"no brick named {name[:100]!r}", extra={"repo_id": repo_id[:200]}) from None
        if latest.kind != "lora":  # an emergent brick (a neuron set) is no adapter repository
            raise RepoNotFound(f"{name!r} is an emergent brick, not an adapter", extra={"repo_id": repo_id[:200]})
        version: int | None = None
        if revision == MAIN:
            version = latest.version
        elif revision.isascii() and revision.isdigit() and len(revision) < 10:
            version = int(revision)
        elif _COMMIT.match(revision):
            for brick in self._brick_versions(name):
                snapshot = self._brick_files(brick)
                if snapshot.commit == revision:
                    return snapshot
        elif self.resolve_alias is not None:
            version = self.resolve_alias(name, revision)
        if version is None:
            raise RevisionNotFound(
                f"brick {name!r} has no revision {revision[:100]!r}; use a version number, 'main' or a commit id",
                extra={"repo_id": repo_id},
            )
        try:
            brick = latest if version == latest.version else self.registry.get_brick(name, version)
        except BrickNotFound:
            raise RevisionNotFound(
                f"brick {name!r} has no version {version} (the latest is {latest.version})", extra={"repo_id": repo_id}
            ) from None
        return self._brick_files(brick)

    def _brick_versions(self, name: str) -> list[domain.Brick]:
        bricks: list[domain.Brick] = []
        cursor = None
        while True:
            page = self.registry.list_bricks(name=name, all_versions=True, cursor=cursor, limit=500)
            bricks.extend(page.items)
            cursor = page.next_cursor
            if cursor is None:
                return bricks

    def _brick_files(self, brick: domain.Brick) -> Snapshot:
        listing = _brick_listing(brick)
        config = self.registry.brick_file(brick.name, brick.version, ADAPTER_CONFIG)
        weights = self.registry.brick_file(brick.name, brick.version, "adapter_model.safetensors")
        with self.registry.blobs.open(config.sha256) as handle:
            config_bytes = handle.read()
        files = (
            _made_file(ADAPTER_CONFIG, adapter_config_for_hub(config_bytes, brick.base_model)),
            HubFile(weights.filename, weights.size_bytes, weights.sha256, stored=True),
            _made_file(CARD_FILE, _brick_card(brick, listing)),
        )
        return Snapshot(listing, commit_id(listing.repo_id, files), files)

    def _composition_snapshot(self, composition_id: str) -> Snapshot:
        repo_id = f"{COMPOSITIONS}/{composition_id}"
        try:
            composition = self.registry.compositions.get(composition_id)
        except CompositionNotFound:
            raise RepoNotFound(f"no composition {composition_id[:80]!r}", extra={"repo_id": repo_id[:200]}) from None
        if composition.status != "ready":
            reason = f": {composition.error}" if composition.error else ""
            raise RepoNotFound(
                f"composition {composition_id} is {composition.status} ({composition.progress:.0%}), not ready"
                f"{reason}; poll GET /v1/compositions/{composition_id}",
                extra={"repo_id": repo_id, "composition_status": composition.status},
            )
        listing = _composition_listing(composition)
        published = self.registry.compositions.published(composition_id)
        if published is not None:
            return self._published_snapshot(listing, repo_id, composition_id, published)
        root = self.registry.compositions.directory(composition_id)
        base_name = listing.card["base_model"].split("/", 1)[1]
        files = []
        body = ""
        config = None
        for relative, _ in self.registry.compositions.files(composition_id):
            path = root / relative
            if relative == CARD_FILE:
                body = _strip_front_matter(path.read_text(encoding="utf-8"))
            elif relative == ADAPTER_CONFIG:
                files.append(_made_file(relative, adapter_config_for_hub(path.read_bytes(), base_name)))
            else:
                if relative == "config.json":
                    config = json.loads(path.read_bytes())
                files.append(_disk_file(relative, path))
        files.append(_made_file(CARD_FILE, model_card(listing.card, body or f"# {listing.description}")))
        return Snapshot(listing, commit_id(repo_id, files), tuple(files), config)

    def _published_snapshot(
        self, listing: Listing, repo_id: str, composition_id: str, published: list[PublishedFile]
    ) -> Snapshot:
        """As `_composition_snapshot`, for files in the blob store (their sha256 is known)."""
        base_name = listing.card["base_model"].split("/", 1)[1]
        files = []
        body = ""
        config = None
        for stored in published:
            if stored.path in (CARD_FILE, ADAPTER_CONFIG, "config.json"):
                with self.registry.compositions.open_file(composition_id, stored.path) as handle:
                    data = handle.read()
            if stored.path == CARD_FILE:
                body = _strip_front_matter(data.decode("utf-8"))
            elif stored.path == ADAPTER_CONFIG:
                files.append(_made_file(stored.path, adapter_config_for_hub(data, base_name)))
            else:
                if stored.path == "config.json":
                    config = json.loads(data)
                file = HubFile(stored.path, stored.size, stored.sha256, stored=True)
                if not file.lfs:  # small files (config, tokenizer): the Hub lists their git blob id
                    read = partial(self._read, composition_id, stored.path)
                    file = replace(file, git_sha1=_DIGESTS.blob_git_id(stored.sha256, read))
                files.append(file)
        files.append(_made_file(CARD_FILE, model_card(listing.card, body or f"# {listing.description}")))
        return Snapshot(listing, commit_id(repo_id, files), tuple(files), config)

    def _read(self, composition_id: str, path: str) -> bytes:
        with self.registry.compositions.open_file(composition_id, path) as handle:
            return handle.read()

    def _base_snapshot(self, name: str) -> Snapshot:
        repo_id = f"{BASE_MODELS}/{name}"
        try:
            base = self.registry.get_base_model(name)
        except BaseModelNotFound:
            raise RepoNotFound(f"no base model named {name[:100]!r}", extra={"repo_id": repo_id[:200]}) from None
        listing = _base_listing(base)
        from registry.storage.s3_bases import base_model_dir, is_s3_url

        # Only what a Hugging Face model carries (HF_MODEL_FILES) and its safetensors weights,
        # each inside the model roots and a regular file: never whatever else lies there. A base
        # in object storage is served from Brickyard's own verified local copy.
        roots = ModelRoots(self.registry.settings)
        local = not is_s3_url(base.path)
        try:
            root = roots.directory(base.path) if local else base_model_dir(base.path, self.registry.settings)
        except (InvalidInput, OSError, ValueError):
            raise RepoNotFound(f"base model {name[:100]!r} is not readable", extra={"repo_id": repo_id[:200]}) from None
        files = []
        for path in sorted(root.iterdir()):
            allowed = path.name in HF_MODEL_FILES or path.name.endswith(".safetensors") or path.name == INDEX_FILE
            if allowed and (not local or roots.check_file(root, path.name)) and path.is_file():
                files.append(_disk_file(path.name, path))
        body = (
            f"# {base.name}\n\n{listing.description}\n\n"
            f"{base.architecture}, {base.parameter_count} parameters ({base.dtype})."
        )
        files.append(_made_file(CARD_FILE, model_card(listing.card, body)))
        return Snapshot(listing, commit_id(repo_id, files), tuple(files), dict(base.config))

    # -- listings ------------------------------------------------------------------------

    def list_models(
        self,
        *,
        search: str | None = None,
        filters: Iterable[str] = (),
        author: str | None = None,
        limit: int = 1000,
    ) -> list[Listing]:
        """Bricks (latest versions), ready compositions and base models, newest first.

        ``search`` is a case-insensitive substring of the repository id or description;
        every ``filters`` entry must be one of a repository's tags (``base_model:<repo>``
        selects the bricks and compositions of a base); ``author`` is a namespace.
        """
        wanted = [f for f in filters if f]
        base_filter = next((f.split(":", 1)[1] for f in wanted if f.startswith(f"base_model:{BASE_MODELS}/")), None)
        base_name = base_filter.split("/", 1)[1] if base_filter else None
        listings: list[Listing] = []
        if author in (None, BRICKS):
            cursor = None
            while True:
                page = self.registry.list_bricks(base_model=base_name, cursor=cursor, limit=500, kind="lora")
                listings.extend(_brick_listing(b) for b in page.items)
                cursor = page.next_cursor
                if cursor is None:
                    break
        if author in (None, COMPOSITIONS):
            listings.extend(_composition_listing(c) for c in self.registry.ready_compositions(base_model=base_name))
        if author in (None, BASE_MODELS) and base_name is None:
            listings.extend(_base_listing(b) for b in self.registry.list_base_models())
        needle = (search or "").lower()
        chosen = [
            listing
            for listing in listings
            if (not needle or needle in listing.repo_id.lower() or needle in listing.description.lower())
            and all(f in listing.tags for f in wanted)
        ]
        chosen.sort(key=lambda listing: (listing.last_modified, listing.repo_id), reverse=True)
        return chosen[:limit]
