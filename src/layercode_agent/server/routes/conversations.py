"""`/api/conversations`: read and delete stored conversations, for operators holding `ADMIN_TOKEN`.

Every route needs `Authorization: Bearer <ADMIN_TOKEN>`, compared in constant time. The app only
mounts this router when `ADMIN_TOKEN` is set, so without one the paths are plain 404s. The answers
are the models of `layercode_agent.conversations`, the same ones `layercode-agent conversations --json`
prints.

Every id the webhook accepts is reachable, `/` and all (`a/b`, `../x`): the rest of the path after
`/api/conversations/` is the id (a `path` parameter), percent-decoded once, by uvicorn, so `%2F` is a
slash in the id and `%252F` the three characters `%2F`. Encode dots too (`%2E%2E`) when an id is `.` or
`..`, since HTTP clients resolve those segments before sending. The id is only ever a key in the store:
nothing is a file path, so `..` reaches nothing but the conversation of that name.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from ... import conversations as history
from ..deps import RuntimeDep
from ..errors import AdminAuthError

__all__ = ["MAX_LIMIT", "router"]

MAX_LIMIT = 1000
"""Most conversations one list request returns."""


async def require_admin(request: Request, runtime: RuntimeDep) -> None:
    """Refuse the request unless it carries the admin bearer token.

    Raises:
        AdminAuthError: If the header is missing, not a bearer token, or the wrong token.
    """
    expected = runtime.settings.admin_token
    header = request.headers.get("authorization")
    if not header:
        raise AdminAuthError("missing Authorization header; send 'Authorization: Bearer <ADMIN_TOKEN>'")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AdminAuthError("the Authorization header must be 'Bearer <ADMIN_TOKEN>'")
    if expected is None or not hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
        raise AdminAuthError("wrong token")


router = APIRouter(prefix="/api/conversations", dependencies=[Depends(require_admin)])


def _not_found(conversation_id: str) -> JSONResponse:
    return JSONResponse({"error": "conversation not found", "conversation_id": conversation_id}, status_code=404)


@router.get(
    "",
    summary="List stored conversations, most recently saved first",
    responses={401: {"description": "The `Authorization: Bearer <ADMIN_TOKEN>` header is missing or wrong"}},
)
async def list_conversations(
    runtime: RuntimeDep, limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50
) -> list[history.ConversationSummary]:
    """The most recently saved conversations first, at most `limit` of them."""
    return await history.list_conversations(runtime.store, limit)


@router.get(
    "/{conversation_id:path}",
    response_model=None,
    summary="Read one conversation turn by turn",
    responses={
        200: {"model": history.ConversationDetail},
        401: {"description": "The `Authorization: Bearer <ADMIN_TOKEN>` header is missing or wrong"},
        404: {"description": "Nothing is stored for this conversation"},
    },
)
async def get_conversation(conversation_id: str, runtime: RuntimeDep) -> history.ConversationDetail | JSONResponse:
    """A conversation turn by turn, with its usage and session events; 404 if nothing is stored for it."""
    detail = await history.get_conversation(runtime.store, conversation_id)
    return detail if detail is not None else _not_found(conversation_id)


@router.delete(
    "/{conversation_id:path}",
    status_code=204,
    response_model=None,
    summary="Delete a conversation and its session events",
    responses={
        401: {"description": "The `Authorization: Bearer <ADMIN_TOKEN>` header is missing or wrong"},
        404: {"description": "Nothing is stored for this conversation"},
    },
)
async def delete_conversation(conversation_id: str, runtime: RuntimeDep) -> Response:
    """Delete a conversation with its session events: 204, or 404 if nothing was stored for it."""
    if not await history.delete_conversation(runtime.store, conversation_id):
        return _not_found(conversation_id)
    return Response(status_code=204)
