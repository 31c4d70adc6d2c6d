"""The HTTP edge: the only package that imports FastAPI or Starlette."""

from __future__ import annotations

from .app import Runtime, create_app, create_app_from_env

__all__ = ["Runtime", "create_app", "create_app_from_env"]
