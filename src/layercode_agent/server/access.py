"""Who may mint a Layercode session through `POST /api/authorize`, and how often.

A session key lets its holder talk to the agent, billed to the owner of `LAYERCODE_API_KEY`, so the
endpoint must know its callers. One of three gates, chosen by the settings:

- **hook** (`AUTHORIZE_HOOK=module:function`): the user's own check. It gets the request (cookies,
  headers, the JSON body) and returns the metadata to attach to the session (user id, tenant), or
  `None` (or raises `AuthorizeRefused`) to refuse. What it returns is authoritative: it overrides any
  metadata key the browser sent, so a browser can never claim to be another user.
- **token** (`AUTHORIZE_TOKEN`): a shared bearer token, for a web app's backend calling this one.
- **loopback**: neither is set, so only clients on this machine are answered (`serve` says so).

The gate decides first, then the caller spends one request of its allowance (`AUTHORIZE_RATE_LIMIT`),
kept in the conversation store, so every worker and every server sharing a Redis store counts together.
A caller is its `user_id` when the hook returned one, otherwise its IP address (as uvicorn resolved it:
`X-Forwarded-For` is honoured from the proxies in `FORWARDED_ALLOW_IPS`, by default only 127.0.0.1).
Refused attempts count against the IP's allowance too, so guessing a token runs into `429` quickly.
While the store is unavailable a refusal still stands as it is (401/403, never a 503 that says more): it
cannot be counted then, which is logged; an admitted caller gets the 503, since its allowance is unknown.
"""

from __future__ import annotations

import hmac
import inspect
import ipaddress
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Request
from pydantic import SecretStr

from ..config import RateLimit
from ..stores import AgentStore, StoreError

__all__ = ["AuthorizeHook", "AuthorizeRefused", "Caller", "Gate", "RateLimited", "client_ip", "is_loopback_ip"]

logger = logging.getLogger("layercode_agent.server")

AuthorizeHook = Callable[[Request], "Awaitable[Mapping[str, Any] | None] | Mapping[str, Any] | None"]
"""`AUTHORIZE_HOOK`: given the request, the metadata to attach to the session, or `None` to refuse."""


class AuthorizeRefused(Exception):
    """Raise from an `AUTHORIZE_HOOK` to refuse a caller with a reason (sent back to it) and a status."""

    def __init__(self, reason: str, *, status: int = 403, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.headers = dict(headers or {})


class RateLimited(Exception):
    """A caller over its allowance; `retry_after` seconds until its next request would be allowed."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many requests; retry in {retry_after:.1f} s")
        self.retry_after = retry_after

    @property
    def header(self) -> str:
        """The `Retry-After` value: whole seconds, rounded up (at least 1)."""
        return str(max(1, math.ceil(self.retry_after)))


@dataclass(frozen=True)
class Caller:
    """An admitted caller."""

    identity: str
    """Whose allowance it spends: `user:<user_id>` or `ip:<address>`."""
    metadata: dict[str, Any] = field(default_factory=dict[str, Any])
    """Metadata the gate vouches for; it wins over what the browser sent."""


def is_loopback_ip(text: str) -> bool:
    """Whether `text` is a loopback IP literal (`127.x`, `::1`, IPv4-mapped `::ffff:127.x`), brackets allowed."""
    try:
        address = ipaddress.ip_address(text.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def client_ip(request: Request) -> str:
    """The client's address as uvicorn resolved it (after trusted proxy headers); `unknown` without one."""
    return request.client.host if request.client else "unknown"


class Gate:
    """Admit or refuse callers of `/api/authorize`, then count them against the rate limit."""

    def __init__(
        self,
        *,
        store: AgentStore,
        token: SecretStr | None = None,
        hook: AuthorizeHook | None = None,
        rate_limit: RateLimit | None = None,
    ) -> None:
        self._store = store
        self._token = token
        self._hook = hook
        self.rate_limit = rate_limit

    @property
    def mode(self) -> Literal["hook", "token", "loopback"]:
        """Which gate is in use."""
        return "hook" if self._hook is not None else "token" if self._token is not None else "loopback"

    async def admit(self, request: Request) -> Caller:
        """The caller, if it may mint a session now.

        Raises:
            AuthorizeRefused: Not allowed (401 without or with a wrong token, 403 refused), also while the store
                is unavailable.
            RateLimited: Over the allowance (a refused caller too, once its attempts used up its IP's).
            StoreError: The store that keeps the allowance of an admitted caller is unavailable.
        """
        ip = client_ip(request)
        try:
            caller = await self._check(request, ip)
        except AuthorizeRefused as refused:
            logger.warning("refused /api/authorize from %s: %s", ip, refused.reason)
            try:
                await self._spend(f"ip:{ip}")  # Failed attempts count, so guessing is slow.
            except StoreError as exc:
                # The refusal stands; the store's failure (and where it is) is for the log, not the caller.
                logger.error("could not count a refused /api/authorize attempt from %s: %s", ip, exc)
            raise
        await self._spend(caller.identity)
        return caller

    async def _spend(self, identity: str) -> None:
        if self.rate_limit is None:
            return
        wait = await self._store.take_allowance(
            f"authorize:{identity}", count=self.rate_limit.count, period=self.rate_limit.period
        )
        if wait > 0:
            logger.warning("rate limited /api/authorize for %s (%s)", identity, self.rate_limit)
            raise RateLimited(wait)

    async def _check(self, request: Request, ip: str) -> Caller:
        if self._hook is not None:
            return await self._ask_hook(request, ip)
        if self._token is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not given.strip():
                raise AuthorizeRefused(
                    "missing 'Authorization: Bearer <AUTHORIZE_TOKEN>'", status=401, headers=_CHALLENGE
                )
            if not hmac.compare_digest(given.strip().encode(), self._token.get_secret_value().encode()):
                raise AuthorizeRefused("wrong bearer token", status=401, headers=_CHALLENGE)
            return Caller(identity=f"ip:{ip}")
        if not is_loopback_ip(ip):
            raise AuthorizeRefused(
                "this server has neither AUTHORIZE_TOKEN nor AUTHORIZE_HOOK set, so it only authorizes clients "
                "on its own machine"
            )
        return Caller(identity=f"ip:{ip}")

    async def _ask_hook(self, request: Request, ip: str) -> Caller:
        assert self._hook is not None
        try:
            answer = self._hook(request)
            if inspect.isawaitable(answer):
                answer = await answer
        except AuthorizeRefused:
            raise
        except Exception:
            logger.exception("AUTHORIZE_HOOK failed")
            raise AuthorizeRefused("the authorization check failed", status=503) from None
        if answer is None:
            raise AuthorizeRefused("refused by the authorization check")
        if not isinstance(answer, Mapping):
            logger.error("AUTHORIZE_HOOK returned a %s; expected a dict of metadata or None", type(answer).__name__)
            raise AuthorizeRefused("the authorization check failed", status=503)
        metadata = {str(key): value for key, value in answer.items()}  # pyright: ignore[reportUnknownVariableType]
        user = metadata.get("user_id")
        identity = f"user:{user}" if isinstance(user, str | int) and str(user) else f"ip:{ip}"
        return Caller(identity=identity, metadata=metadata)


_CHALLENGE = {"WWW-Authenticate": "Bearer"}
