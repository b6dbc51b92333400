"""The error hierarchy: every class has a distinct code and a client or server status,
and renders as RFC 9457 problem details."""

from __future__ import annotations

import inspect

from fastapi import FastAPI
from fastapi.testclient import TestClient

import registry.errors as errors_module
from registry.api.problems import install_problem_handlers
from registry.errors import BrickyardError


def _error_classes() -> list[type[BrickyardError]]:
    return [obj for _, obj in inspect.getmembers(errors_module, inspect.isclass) if issubclass(obj, BrickyardError)]


def test_every_error_class_is_exported_with_status_and_unique_code() -> None:
    classes = _error_classes()
    assert {c.__name__ for c in classes} == set(errors_module.__all__)
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes))
    for cls in classes:
        assert 400 <= cls.status < 600, cls
        assert cls.title and cls.__doc__, cls
        if cls is not BrickyardError and cls.status >= 500:
            assert cls.__name__ in {"ServiceUnavailable", "SchemaOutOfDate", "StorageCorrupt", "InsufficientStorage"}, (
                cls
            )


def test_every_error_class_renders_as_problem_json() -> None:
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/raise/{name}")
    def raise_error(name: str) -> None:
        cls = getattr(errors_module, name)
        raise cls("something went wrong", errors=["first", "second"], extra={"hint": 1})

    with TestClient(app, raise_server_exceptions=False) as client:
        for cls in _error_classes():
            response = client.get(f"/raise/{cls.__name__}")
            assert response.status_code == cls.status
            assert response.headers["content-type"] == "application/problem+json"
            body = response.json()
            assert body["type"].endswith("/" + cls.code)
            assert body["title"] == cls.title
            assert body["status"] == cls.status
            assert body["detail"] == "something went wrong"
            assert body["errors"] == ["first", "second"]
            assert body["hint"] == 1
            assert body["instance"] == f"/raise/{cls.__name__}"


def test_unexpected_exceptions_are_500_problems_without_internals() -> None:
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise KeyError("secret internal detail")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert "secret" not in response.text
