"""Dependency aliases that read like types (`RuntimeDep`), and the one way routes read a request body.

Every route that reads a body reads it with `read_body` and decodes it with `protocol.load_json_object` (the
webhook through `parse_event`, after checking the signature on the raw bytes; the others through `read_json`),
so the same bad body gets the same answer everywhere:

- over `MAX_BODY_BYTES`: 413 while it is read (the app's body limit);
- slower than `REQUEST_READ_TIMEOUT`: 408 from uvicorn's protocol (`server/http.py`); the route then sees
  `ClientDisconnect`, which `server/errors.py` answers without a traceback;
- not UTF-8, not JSON, not an object, nested too deeply, a lone surrogate in any string: 400 with the reason
  (`PayloadError`, mapped in `server/errors.py`).
"""

from __future__ import annotations

from typing import Annotated, Any, cast

from fastapi import Depends, Request

from ..protocol import load_json_object
from .runtime import Runtime

__all__ = ["RuntimeDep", "read_body", "read_json"]


async def get_runtime(request: Request) -> Runtime:
    """The process-wide services built at start-up."""
    return cast(Runtime, request.app.state.runtime)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def read_body(request: Request) -> bytes:
    """The request's raw body, within the app's size limit and uvicorn's read deadline (see the module docstring).

    Raises:
        ClientDisconnect: The client went away (or was cut off for being too slow) before the body was in.
    """
    return await request.body()


async def read_json(request: Request, *, optional: bool = False) -> dict[str, Any]:
    """The request's body as a JSON object, read and decoded as every route does (see the module docstring).

    Args:
        request: The request.
        optional: Whether an empty body stands for `{}`.

    Raises:
        MalformedPayloadError: The body is not a JSON object this server reads (a 400 with the reason).
        ClientDisconnect: The client went away before the body was in.
    """
    raw = await read_body(request)
    if optional and not raw.strip():
        return {}
    return load_json_object(raw)
