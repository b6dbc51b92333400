"""The one error hierarchy of Brickyard. Every class carries its HTTP status and a stable
``code``; `registry.api.problems` renders any of them as RFC 9457 problem details.

```
BrickyardError                      500 internal
├── InvalidInput                    422 invalid-input          (``errors``: every problem)
│   ├── InvalidAdapter              422 invalid-adapter
│   ├── InvalidBaseModel            422 invalid-base-model
│   ├── IncompatibleBrick           422 incompatible-brick
│   ├── InvalidRecipe               422 invalid-recipe
│   └── RequestRefused              400 request-refused    (a serving engine refused a generation)
├── UnsupportedMediaType            415 unsupported-media-type
├── PayloadTooLarge                 413 payload-too-large
├── Unauthorized                    401 unauthorized
├── Forbidden                       403 forbidden
├── NotFound                        404 not-found
│   ├── BaseModelNotFound           404 base-model-not-found
│   ├── BrickNotFound               404 brick-not-found
│   ├── FileNotFound                404 file-not-found
│   └── CompositionNotFound         404 composition-not-found
├── Conflict                        409 conflict
│   ├── BaseModelExists             409 base-model-exists
│   ├── BaseModelInUse              409 base-model-in-use
│   ├── BrickExists                 409 brick-exists
│   ├── NameTaken                   409 name-taken             (the same name in another case)
│   └── VersionExists               409 version-exists
├── RangeNotSatisfiable             416 range-not-satisfiable
├── ServiceUnavailable              503 service-unavailable
│   └── SchemaOutOfDate             503 schema-out-of-date
├── InsufficientStorage             507 insufficient-storage   (the disk is full)
└── StorageCorrupt                  500 storage-corrupt
```

Routes never raise HTTP exceptions; they let these propagate. ``extra`` holds additional
problem members (for example the existing brick on a 409).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

__all__ = [
    "BaseModelExists",
    "BaseModelInUse",
    "BaseModelNotFound",
    "BrickExists",
    "BrickNotFound",
    "BrickyardError",
    "CompositionNotFound",
    "Conflict",
    "FileNotFound",
    "Forbidden",
    "IncompatibleBrick",
    "InsufficientStorage",
    "InvalidAdapter",
    "InvalidBaseModel",
    "InvalidInput",
    "InvalidRecipe",
    "NameTaken",
    "NotFound",
    "PayloadTooLarge",
    "RangeNotSatisfiable",
    "RequestRefused",
    "SchemaOutOfDate",
    "ServiceUnavailable",
    "StorageCorrupt",
    "Unauthorized",
    "UnsupportedMediaType",
    "VersionExists",
]


class BrickyardError(Exception):
    """Base class. ``detail`` is for humans; ``errors`` lists every individual problem."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str, *, errors: Iterable[str] = (), extra: Mapping[str, Any] | None = None) -> None:
        self.detail = detail
        self.errors = list(errors)
        self.extra = dict(extra or {})
        super().__init__(detail)

    def __str__(self) -> str:
        if not self.errors:
            return self.detail
        return self.detail + "".join(f"\n  - {e}" for e in self.errors)


class InvalidInput(BrickyardError):
    """The request is well-formed HTTP but its content is invalid."""

    status, code, title = 422, "invalid-input", "Invalid input"


class InvalidAdapter(InvalidInput):
    """The adapter config or weights are not a supported, well-formed LoRA."""

    code, title = "invalid-adapter", "Invalid adapter"


class InvalidBaseModel(InvalidInput):
    """The base model directory cannot be read or its architecture is unsupported."""

    code, title = "invalid-base-model", "Invalid base model"


class IncompatibleBrick(InvalidInput):
    """The adapter does not fit the base model it names (modules, shapes, ranks)."""

    code, title = "incompatible-brick", "Brick incompatible with base model"


class InvalidRecipe(InvalidInput):
    """A composition request that cannot be resolved or planned."""

    code, title = "invalid-recipe", "Invalid composition request"


class RequestRefused(InvalidInput):
    """A serving engine refused a generation (prompt over the context length, token ids outside
    the vocabulary, an adapter it cannot load). 400, as OpenAI answers these."""

    status, code, title = 400, "request-refused", "Request refused by the engine"


class UnsupportedMediaType(BrickyardError):
    """The uploaded weights are not safetensors (a pickle, a zip, ...)."""

    status, code, title = 415, "unsupported-media-type", "Unsupported media type"


class PayloadTooLarge(BrickyardError):
    """An upload exceeds a configured size limit."""

    status, code, title = 413, "payload-too-large", "Payload too large"


class Unauthorized(BrickyardError):
    """No valid API token was presented."""

    status, code, title = 401, "unauthorized", "Unauthorized"


class Forbidden(BrickyardError):
    """The token is valid but lacks the scope the operation needs."""

    status, code, title = 403, "forbidden", "Forbidden"


class NotFound(BrickyardError):
    """The addressed resource does not exist."""

    status, code, title = 404, "not-found", "Not found"


class BaseModelNotFound(NotFound):
    """No base model of that name is registered."""

    code, title = "base-model-not-found", "Base model not found"


class BrickNotFound(NotFound):
    """No brick (or brick version) of that name is registered."""

    code, title = "brick-not-found", "Brick not found"


class FileNotFound(NotFound):
    """The brick or composition has no file of that name."""

    code, title = "file-not-found", "File not found"


class CompositionNotFound(NotFound):
    """No composition with that id exists."""

    code, title = "composition-not-found", "Composition not found"


class Conflict(BrickyardError):
    """The request conflicts with the current state."""

    status, code, title = 409, "conflict", "Conflict"


class BaseModelExists(Conflict):
    """A base model of that name is already registered."""

    code, title = "base-model-exists", "Base model already registered"


class BrickExists(Conflict):
    """The same weights with the same config are already registered (``extra`` names the existing brick)."""

    code, title = "brick-exists", "Brick already registered"


class NameTaken(Conflict):
    """A name that differs from an existing one only in letter case (``Fine`` next to
    ``fine``): names are unique case-insensitively; ``extra["existing"]`` is the one kept."""

    code, title = "name-taken", "Name taken in another letter case"


class VersionExists(Conflict):
    """That name and version are already taken."""

    code, title = "version-exists", "Brick version already exists"


class RangeNotSatisfiable(BrickyardError):
    """The requested byte range lies outside the file."""

    status, code, title = 416, "range-not-satisfiable", "Range not satisfiable"


class InsufficientStorage(BrickyardError):
    """The server's disk (or quota) is full; nothing of the request was kept. Retry once
    space is freed (``brickyard fsck --repair``, a smaller composition cache)."""

    status, code, title = 507, "insufficient-storage", "Insufficient storage"


class ServiceUnavailable(BrickyardError):
    """A backing service (the database) is unreachable or busy; retry later."""

    status, code, title = 503, "service-unavailable", "Service unavailable"


class SchemaOutOfDate(ServiceUnavailable):
    """The database schema is older than this code; run ``brickyard db upgrade``."""

    code, title = "schema-out-of-date", "Database schema out of date"


class StorageCorrupt(BrickyardError):
    """Stored bytes are missing or do not match their recorded sha256."""

    code, title = "storage-corrupt", "Stored data is corrupt"


class BaseModelInUse(Conflict):
    """A base model cannot be removed while bricks or compositions reference it (``errors``
    names them)."""

    code, title = "base-model-in-use", "Base model in use"
