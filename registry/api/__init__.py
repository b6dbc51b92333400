"""The REST API: `create_app` builds the FastAPI application.

`create_app` is imported lazily so that clients importing `registry.api.schemas` (the
CLI, the HTTP client) do not pay for FastAPI and the service at start-up.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from registry.api.app import create_app

        return create_app
    raise AttributeError(name)
