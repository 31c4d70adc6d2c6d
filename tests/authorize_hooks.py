"""`AUTHORIZE_HOOK` functions the tests name by `module:function`, as a user would configure theirs."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from layercode_agent.server import AuthorizeRefused

SESSIONS = {"cookie-alice": {"user_id": "alice", "tenant": "acme"}, "cookie-bob": {"user_id": "bob", "tenant": "acme"}}


async def by_cookie(request: Request) -> dict[str, Any] | None:
    """The signed-in user from a session cookie; `None` (refused) without a known one."""
    return SESSIONS.get(request.cookies.get("session", ""))


def by_header_sync(request: Request) -> dict[str, Any] | None:
    """A plain function works too; refuses with a reason and a status of its own."""
    user = request.headers.get("x-user")
    if user == "banned":
        raise AuthorizeRefused("this account is suspended", status=401)
    return {"user_id": user} if user else None


async def broken(request: Request) -> dict[str, Any] | None:
    """A hook with a bug in it."""
    raise RuntimeError("database password is hunter2")


async def not_a_mapping(request: Request) -> Any:
    """A hook that returns the wrong thing."""
    return ["alice"]
