"""Dependency aliases that read like types (`RuntimeDep`)."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Request

from .runtime import Runtime

__all__ = ["RuntimeDep"]


def get_runtime(request: Request) -> Runtime:
    """The process-wide services built at start-up."""
    return cast(Runtime, request.app.state.runtime)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
