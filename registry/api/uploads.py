"""Brick uploads: the multipart body streamed once, straight into the blob store.

Starlette's form parser spools every file part to a temporary file (``/tmp``), which the
service then copied again into the blob store's staging directory: two copies on disk per
upload. Here the weights part is written, as it arrives, into a `StagingFile` of the blob
store (hashed and size-bounded while written) and handed to the service as a `StagedBlob`;
the small parts (metadata, adapter config) stay with Starlette's parser (in memory below
1 MiB). Starlette's parser is reused (only where a file part goes is changed), so the
multipart grammar and its limits are the well-tested ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from registry.errors import InvalidInput, PayloadTooLarge

if TYPE_CHECKING:
    from registry.settings import LimitSettings
    from registry.storage.blobs import BlobStore, StagedBlob, StagingFile

__all__ = ["BrickUpload", "receive_brick_upload"]

METADATA, CONFIG, WEIGHTS = "metadata", "adapter_config", "adapter_weights"


@dataclass
class BrickUpload:
    """The parts of a brick upload; ``weights`` is staged in the blob store (the service
    commits or discards it)."""

    metadata: str
    config: BinaryIO
    weights: StagedBlob
    form: FormData

    async def close(self) -> None:
        """Close the parts' files (the staged weights stay for the service)."""
        await self.form.close()


class _StagingParser(MultiPartParser):
    """Starlette's multipart parser, writing the weights part into a blob-store staging file."""

    def __init__(self, request: Request, blobs: BlobStore, limits: LimitSettings) -> None:
        super().__init__(
            request.headers,
            request.stream(),
            max_files=2,
            max_fields=1,
            # The metadata field: one byte over its limit is enough to refuse it (413).
            max_part_size=limits.max_metadata_bytes + 1,
        )
        self._blobs = blobs
        self._max_weights = limits.max_adapter_bytes
        self.staging: list[StagingFile] = []

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        part = self._current_part
        if part.file is not None and part.field_name == WEIGHTS:
            part.file.file.close()  # the spooled file Starlette made for it: never written
            staging = self._blobs.staging_file(max_bytes=self._max_weights, what="adapter_model.safetensors")
            self.staging.append(staging)
            # UploadFile writes a file without ``_rolled`` in a worker thread: the event loop
            # never waits on the disk.
            part.file.file = staging  # type: ignore[assignment]


async def receive_brick_upload(request: Request, blobs: BlobStore, limits: LimitSettings) -> BrickUpload:
    """Parse a ``POST /v1/bricks`` body: ``metadata`` (a form field), ``adapter_config`` and
    ``adapter_weights`` (file parts), the weights written once, into the blob store's staging.

    Raises:
        InvalidInput: a malformed body, or missing or repeated parts (every problem listed).
        PayloadTooLarge: a part over its limit (nothing is left behind).
    """
    parser = _StagingParser(request, blobs, limits)
    try:
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            form = await parser.parse()
        else:  # a form without files (or no form): what is missing is listed below
            form = await request.form(max_files=0)
    except MultiPartException as exc:
        _discard(parser.staging)
        if "maximum size" in str(exc.message):
            raise PayloadTooLarge(
                f"metadata is larger than the limit of {limits.max_metadata_bytes} bytes",
                extra={"limit_bytes": limits.max_metadata_bytes},
            ) from None
        raise InvalidInput("the request body is not valid multipart/form-data", errors=[str(exc.message)]) from None
    except BaseException:
        _discard(parser.staging)
        raise
    try:
        problems = []
        metadata, config, weights = form.get(METADATA), form.get(CONFIG), form.get(WEIGHTS)
        if not isinstance(metadata, str):
            problems.append(f"{METADATA}: a form field with the brick's JSON metadata is required")
        for name, part in ((CONFIG, config), (WEIGHTS, weights)):
            if not isinstance(part, UploadFile):
                problems.append(f"{name}: a file part is required")
            elif len(form.getlist(name)) > 1:
                problems.append(f"{name}: give it once")
        if problems:
            raise InvalidInput("the upload is incomplete", errors=problems)
        assert isinstance(metadata, str) and isinstance(config, UploadFile) and isinstance(weights, UploadFile)
        staged = _finish(weights.file)
        return BrickUpload(metadata=metadata, config=config.file, weights=staged, form=form)
    except BaseException:
        _discard(parser.staging)
        await form.close()
        raise


def _finish(file: Any) -> StagedBlob:
    from registry.storage.blobs import StagingFile

    if not isinstance(file, StagingFile):  # pragma: no cover - the parser always stages this part
        raise InvalidInput("the upload is incomplete", errors=[f"{WEIGHTS}: a file part is required"])
    return file.finish()


def _discard(staging: list[StagingFile]) -> None:
    for file in staging:
        file.close()  # removes it unless finished (then the service owns it)
