"""The REST API: `create_app` builds the FastAPI application."""

from registry.api.app import create_app

__all__ = ["create_app"]
