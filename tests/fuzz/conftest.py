"""The server tests' app factory, shared with the fuzz tests instead of copied."""

from __future__ import annotations

from ..server.conftest import make_app, settings_values

__all__ = ["make_app", "settings_values"]
