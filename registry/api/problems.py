"""RFC 9457 problem details: the one place where errors become HTTP responses.

Every `BrickyardError` renders as ``application/problem+json`` with ``type``, ``title``,
``status``, ``detail``, ``instance``, ``errors`` (every individual problem) and the error's
extra members. Request validation errors and Starlette's own HTTP errors (unknown route,
wrong method, malformed body) get the same shape. Anything unexpected is logged and
answered as a 500 problem that reveals nothing internal.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from registry.errors import BrickyardError, InsufficientStorage

__all__ = [
    "PROBLEM_MEDIA_TYPE",
    "PROBLEM_RESPONSES",
    "Problem",
    "document_problems",
    "install_problem_handlers",
    "openai_error_response",
    "problem_response",
]

log = logging.getLogger("brickyard.api")

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://brickyard.dev/problems/"

_HTTP_CODES = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Unauthorized"),
    403: ("forbidden", "Forbidden"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    406: ("not-acceptable", "Not acceptable"),
    413: ("payload-too-large", "Payload too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    416: ("range-not-satisfiable", "Range not satisfiable"),
    422: ("invalid-input", "Invalid input"),
    503: ("service-unavailable", "Service unavailable"),
}


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="URI identifying the problem type")
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[str] = Field(default_factory=list, description="every individual problem found")


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"description": "Client error (problem details)"},
    "5XX": {"description": "Server error (problem details)"},
}


def document_problems(schema: dict[str, Any]) -> dict[str, Any]:
    """Make every error response of an OpenAPI schema ``application/problem+json`` with the
    `Problem` schema (FastAPI would describe them as ``application/json``)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    problem = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            for status, response in operation.get("responses", {}).items():
                if status in ("4XX", "5XX") or (status.isdigit() and int(status) >= 400):
                    response["content"] = problem
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema


def problem_response(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    instance: str | None = None,
    errors: list[str] | None = None,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """Build a problem+json response."""
    body: dict[str, Any] = {
        "type": TYPE_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
        "errors": errors or [],
    }
    for key, value in (extra or {}).items():
        body.setdefault(key, value)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


# The OpenAI-compatible routes (`registry.api.routes.openai`) answer errors in OpenAI's shape.
_OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error"}


def _is_openai(request: Request) -> bool:
    return request.url.path.rstrip("/") in _OPENAI_PATHS


def openai_error_response(
    status: int, message: str, code: str, *, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """``{"error": {"message", "type", "param", "code"}}`` (OpenAI's error body). Validation
    errors are 400 there, as OpenAI and vLLM answer them."""
    status = 400 if status == 422 else status
    kind = _OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _from_error(request: Request, exc: BrickyardError) -> JSONResponse:
    if exc.status >= 500:
        log.error("%s on %s %s: %s", exc.code, request.method, request.url.path, exc)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    if exc.status == 503:
        headers = {"Retry-After": "1"}
    if _is_openai(request):
        code = str(exc.extra.get("openai_code") or exc.code.replace("-", "_"))
        param = exc.extra.get("param")
        message = str(exc) if exc.errors else exc.detail
        return openai_error_response(exc.status, message, code, param=param, headers=headers)
    return problem_response(
        exc.status,
        exc.code,
        exc.title,
        exc.detail,
        instance=request.url.path,
        errors=exc.errors,
        extra=exc.extra,
        headers=headers,
    )


def _from_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error.get("loc", ()))
        errors.append(f"{location}: {error.get('msg', 'invalid')}")
    if _is_openai(request):
        return openai_error_response(422, "; ".join(errors), "invalid_input")
    return problem_response(
        422, "invalid-input", "Invalid input", "the request is invalid", instance=request.url.path, errors=errors
    )


def _from_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code, title = _HTTP_CODES.get(exc.status_code, ("http-error", "HTTP error"))
    detail = exc.detail if isinstance(exc.detail, str) else title
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # Starlette names only the first route whose path matched; list every method served here.
        headers["Allow"] = ", ".join(sorted(_allowed_methods(request)))
    if _is_openai(request):
        return openai_error_response(exc.status_code, detail, code.replace("-", "_"), headers=headers or None)
    return problem_response(exc.status_code, code, title, detail, instance=request.url.path, headers=headers or None)


def _allowed_methods(request: Request) -> set[str]:
    from starlette.routing import Match

    allowed: set[str] = set()
    for route in request.app.routes:
        match, _ = route.matches(request.scope)
        methods = getattr(route, "methods", None)
        if match != Match.NONE and methods:
            allowed |= set(methods)
    return allowed


_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def _disk_full(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 8:  # the OSError may be the cause of what was raised
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _from_unexpected(request: Request, exc: Exception) -> JSONResponse:
    if _disk_full(exc):
        # Every write path cleans up after itself (staging files, partial outputs), so a full
        # disk is the client's cue to retry later, not an internal error.
        log.warning("disk full on %s %s: %s", request.method, request.url.path, exc)
        full = InsufficientStorage("the server's storage is full; nothing was kept, retry later")
        return _from_error(request, full)
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    if _is_openai(request):
        return openai_error_response(500, "an unexpected error occurred; it has been logged", "internal")
    return problem_response(
        500, "internal", "Internal error", "an unexpected error occurred; it has been logged", instance=request.url.path
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(BrickyardError, _from_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _from_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _from_http)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _from_unexpected)
