"""The HTTP edge: the only package that imports FastAPI or Starlette."""

from __future__ import annotations

from .access import AuthorizeRefused
from .app import Runtime, create_app, create_app_from_env

__all__ = ["AuthorizeRefused", "Runtime", "create_app", "create_app_from_env"]
