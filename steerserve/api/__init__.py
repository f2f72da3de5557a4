"""The HTTP edge (FastAPI): the only package, with ``steerserve.cli``, that imports fastapi or pydantic."""

from steerserve.api.app import create_app

__all__ = ["create_app"]
