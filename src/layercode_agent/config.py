"""Settings, read once from the environment and an optional `.env`, then passed down as values.

Variable names follow Layercode's own examples so users can bring the `.env` they already have
(`LAYERCODE_WEBHOOK_SECRET`, `GOOGLE_GENERATIVE_AI_API_KEY`, `HOST`, `PORT`, `UVICORN_RELOAD`, ...).
Only the composition roots (`server.app.create_app` and the CLI) call `get_settings()`.
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = [
    "DEV_SECRET_FILE",
    "DevSecretError",
    "MAX_BODY_BYTES",
    "RateLimit",
    "Settings",
    "WebhookSecrets",
    "get_settings",
    "resolve_webhook_secrets",
]

MAX_BODY_BYTES = 1024 * 1024
"""Largest webhook or authorize body accepted by default (1 MiB); larger ones get 413."""

_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}


@dataclass(frozen=True)
class RateLimit:
    """At most `count` requests per `period` seconds for one client (a burst of `count`, then evenly spread)."""

    count: int
    period: float

    @classmethod
    def parse(cls, text: str) -> RateLimit | None:
        """`"10/minute"` (or `second`, `hour`, `day`) into a limit; `"off"` into `None`.

        Raises:
            ValueError: anything else, saying what is expected.
        """
        value = text.strip().lower()
        if value in ("off", "none", "0"):
            return None
        count, _, unit = value.partition("/")
        unit = unit.strip().removesuffix("s") if unit.strip() != "s" else "second"
        if not count.strip().isdigit() or int(count) < 1 or unit not in _PERIODS:
            raise ValueError(f"expected 'N/second', 'N/minute', 'N/hour', 'N/day' or 'off', got {text!r}")
        return cls(int(count), _PERIODS[unit])

    def __str__(self) -> str:
        unit = next(name for name, seconds in _PERIODS.items() if seconds == self.period)
        return f"{self.count}/{unit}"


DEV_SECRET_FILE = "dev-webhook-secret"
"""Name of the development webhook secret kept in the data folder when none is configured."""


class Settings(BaseSettings):
    """Everything the service can be configured with; see the README's configuration table."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    layercode_webhook_secret: SecretStr | None = None
    """HMAC secret(s) from the dashboard; several comma-separated secrets are all accepted."""
    layercode_api_key: SecretStr | None = None
    layercode_agent_id: str | None = None
    layercode_api_url: str = "https://api.layercode.com"
    authorize_timeout: float = 10.0
    authorize_token: SecretStr | None = None
    """Bearer token callers of `/api/authorize` must send (your web app's backend, say)."""
    authorize_hook: str | None = None
    """`module:function` deciding who may get a session: async, given the request, returns the metadata to
    attach (user id, tenant) or `None` to refuse. Wins over `authorize_token`."""
    authorize_rate_limit: str = "10/minute"
    """Sessions one client (its IP, or the identity the hook returned) may mint: `N/second|minute|hour|day` or `off`."""
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(default_factory=list[str])
    """Origins (comma-separated) whose pages may call `/api/authorize` from the browser; none by default."""
    cors_allow_credentials: bool = False
    """Let those pages send cookies with the call (an `AUTHORIZE_HOOK` reading a session cookie); never with `*`."""

    max_body_bytes: int = Field(default=MAX_BODY_BYTES, ge=1024)
    """Largest request body accepted (webhook, authorize, admin); larger ones get 413 before being read."""
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    """Largest request head (request line and headers) accepted; larger ones get 431."""
    request_read_timeout: float = Field(default=10.0, gt=0)
    """Seconds a client may take to send a request's head, and again its body; slower ones get 408."""
    max_streams_per_conversation: int = Field(default=4, ge=1)
    """Reply streams of new turns one conversation may hold open at once on a worker, and as many again of
    repeated deliveries, one turn at most this many; more get 429 (`server/streams.py`)."""
    shutdown_drain_seconds: float = Field(default=15.0, ge=0)
    """On SIGTERM, how long open reply streams may go on while new requests get 503; then each still open
    is stopped and ends with `response.end`."""

    agent_model: str = "auto"
    agent: str | None = None
    """`module:attribute` of the user's own pydantic-ai `Agent`."""
    data_handler: str | None = None
    """`module:function` answering `data` webhooks (async, takes the `DataEvent`)."""
    llm_timeout: float = 30.0
    """Seconds a whole LLM turn may take before the caller hears an apology."""
    llm_request_limit: int = Field(default=50, ge=1)
    """Model requests one turn may make (each tool call costs one more); beyond it the caller hears an apology.
    Every turn has its own allowance: the conversation's running total is kept in the store, never counted."""
    llm_token_limit: int | None = Field(default=None, ge=1)
    """Tokens (input and output, all its requests) one turn may use before the caller hears an apology; unset:
    no limit."""
    store_retry_seconds: float = Field(default=10.0, ge=0)
    """Seconds a turn keeps trying to store its reply while the store fails; after that the reply waits in
    the worker's memory, and the conversation's next turn on that worker stores it first."""
    filler_after_ms: float | None = Field(default=None, gt=0)
    """Speak `filler_text` if the LLM has said nothing this many ms after the request; unset: never."""
    filler_text: str = "Let me think."
    """What a slow LLM's caller hears (stored as part of the reply)."""

    conversation_store: str | None = Field(default=None, repr=False)
    """May carry a password (`redis://:password@host`): never shown in a repr."""
    store_timeout: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    """Seconds one conversation-store call may take (a stalled disk, a hung Redis) before the caller hears
    the apology: a SQLite call as a whole, Redis's connect and reply timeouts (unless its URL sets them)."""
    data_dir: Path = Path("data")

    system_prompt: str | None = None
    system_prompt_file: Path | None = None
    welcome_message: str | None = None
    """`None` means the built-in greeting; an empty string means a silent start."""

    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    openai_client: Literal["lean", "sdk"] = "lean"
    """How `openai-chat:` models are reached: `lean`, this project's own streaming Chat Completions client
    (one keep-alive connection pool, at most one immediate retry); `sdk`, pydantic-ai's `OpenAIChatModel` on
    the OpenAI SDK. `openai:` names (the Responses API) always use the SDK."""
    anthropic_api_key: SecretStr | None = None
    gemini_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("GOOGLE_GENERATIVE_AI_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY"),
    )

    host: str = "127.0.0.1"
    port: int = 8000
    uvicorn_reload: bool = False
    workers: int = Field(default=1, ge=1, validation_alias=AliasChoices("WORKERS", "WEB_CONCURRENCY"))
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    logfire_token: SecretStr | None = None
    metrics: bool = True
    """Serve Prometheus metrics at `/metrics`; off, the route does not exist."""
    otel_exporter_otlp_endpoint: str | None = None
    """Base URL of an OTLP/HTTP collector for the turn spans (`/v1/traces` is appended)."""
    otel_exporter_otlp_traces_endpoint: str | None = None
    """Full OTLP/HTTP traces URL; wins over `otel_exporter_otlp_endpoint`."""
    otel_exporter_otlp_headers: SecretStr | None = None
    """Headers for the collector (`key=value,...`), often an API key."""
    otel_service_name: str | None = None
    """`service.name` of the spans; `layercode-agent` by default."""
    admin_token: SecretStr | None = None
    """Bearer token for `/api/conversations`; unset, those routes do not exist."""
    playground: bool = False
    """Serve the browser playground at `/playground`; only mounted when `host` is a loopback address."""

    @field_validator(
        "layercode_webhook_secret",
        "layercode_api_key",
        "layercode_agent_id",
        "openai_api_key",
        "openai_base_url",
        "anthropic_api_key",
        "gemini_api_key",
        "logfire_token",
        "otel_exporter_otlp_endpoint",
        "otel_exporter_otlp_traces_endpoint",
        "otel_exporter_otlp_headers",
        "otel_service_name",
        "admin_token",
        "authorize_token",
        "authorize_hook",
        "filler_after_ms",
        "llm_token_limit",
        "agent",
        "data_handler",
        "conversation_store",
        "system_prompt",
        "system_prompt_file",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `KEY=` in a .env copied from .env.example means "not set", not "set to the empty string".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("playground", "cors_allow_credentials", mode="before")
    @classmethod
    def _empty_is_off(cls, value: object) -> object:
        # `PLAYGROUND=` means off, like the other empty values, instead of failing bool parsing.
        return False if isinstance(value, str) and not value.strip() else value

    @field_validator("metrics", mode="before")
    @classmethod
    def _empty_is_on(cls, value: object) -> object:
        # `METRICS=` means the default (on), like the other empty values.
        return True if isinstance(value, str) and not value.strip() else value

    @field_validator("cors_allow_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list):
            return [str(part).strip().rstrip("/") for part in value if str(part).strip()]  # pyright: ignore[reportUnknownArgumentType, reportUnknownVariableType]
        return value

    @field_validator("authorize_rate_limit")
    @classmethod
    def _check_rate_limit(cls, value: str) -> str:
        RateLimit.parse(value)
        return value

    @model_validator(mode="after")
    def _no_wildcard_with_credentials(self) -> Settings:
        if self.cors_allow_credentials and "*" in self.cors_allow_origins:
            raise ValueError(
                "CORS_ALLOW_CREDENTIALS=true with CORS_ALLOW_ORIGINS=*: any site could call /api/authorize with "
                "your users' cookies; list the origins instead"
            )
        return self

    @property
    def rate_limit(self) -> RateLimit | None:
        """`authorize_rate_limit` parsed; `None` when off."""
        return RateLimit.parse(self.authorize_rate_limit)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @property
    def store_url(self) -> str:
        """The conversation store URL, defaulting to a SQLite file in the data folder."""
        if self.conversation_store:
            return self.conversation_store
        return f"sqlite:///{self.data_dir / 'conversations.db'}"

    def resolved_system_prompt(self) -> str | None:
        """The configured system prompt (inline or from a file), or `None` for the built-in one."""
        if self.system_prompt_file is not None:
            return self.system_prompt_file.read_text(encoding="utf-8").strip()
        return self.system_prompt


class WebhookSecrets:
    """The secrets webhooks are verified with, and where they came from (for the banner, never the values).

    The values are `SecretStr`, unwrapped only where the HMAC is computed (`protocol.signature`).
    """

    def __init__(self, values: list[SecretStr], source: str) -> None:
        self.values = values
        self.source = source

    def __repr__(self) -> str:
        return f"WebhookSecrets(<{len(self.values)} hidden>, source={self.source!r})"


class DevSecretError(ValueError):
    """The development secret file is not one to trust or use; the message says why and what to do, never its text."""


def resolve_webhook_secrets(settings: Settings, *, create: bool = True) -> WebhookSecrets:
    """Return the configured webhook secrets, or the development secret kept in the data folder.

    No webhook is ever accepted unsigned. With no `LAYERCODE_WEBHOOK_SECRET`, a random development
    secret is generated once and kept (mode 0600) in `DATA_DIR/dev-webhook-secret`; the CLI's `sign`
    and local tools read it from there, so a newcomer can talk to the server without configuring anything.
    It is only ever read from a regular file this user owns that nobody else may read or write.

    Raises:
        DevSecretError: If the development secret file is not one to trust (see `_read_secret`).
    """
    if settings.layercode_webhook_secret is not None:
        parts = [part.strip() for part in settings.layercode_webhook_secret.get_secret_value().split(",")]
        if values := [SecretStr(part) for part in parts if part]:
            return WebhookSecrets(values, "LAYERCODE_WEBHOOK_SECRET")
    path = settings.data_dir / DEV_SECRET_FILE
    if (existing := _read_secret(path)) is not None:
        return WebhookSecrets([existing], f"development secret in {path}")
    if not create:
        return WebhookSecrets([], "none configured")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # A folder we create is ours alone.
    value = "dev_" + secrets.token_hex(24)
    # Written whole to a temporary file this call creates (never one planted there, never through a
    # link), then linked into place: link() fails if the name exists, never follows a link, and so
    # lets the first worker win, and everyone uses its secret. Nobody ever reads a half-written file.
    temporary, fd = _create_private(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(value + "\n")
        try:
            os.link(temporary, path)
        except FileExistsError:
            if (existing := _read_secret(path)) is None:
                message = f"The development secret {path} vanished while it was created; start again."
                raise DevSecretError(message) from None
            return WebhookSecrets([existing], f"development secret in {path}")
    finally:
        temporary.unlink(missing_ok=True)
    return WebhookSecrets([SecretStr(value)], f"development secret generated in {path}")


_REMEDY = "remove it (a new one is generated) or set LAYERCODE_WEBHOOK_SECRET"


def _create_private(path: Path) -> tuple[Path, int]:
    """A new temporary file beside `path`, mode 0600, opened for writing; a name that exists is never reused."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(8):
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}")
        try:
            fd = os.open(temporary, flags, 0o600)
        except FileExistsError:
            continue
        os.fchmod(fd, 0o600)  # Exactly, whatever the umask.
        return temporary, fd
    raise DevSecretError(f"Cannot create a temporary file beside {path}: every name tried exists.")


def _read_secret(path: Path) -> SecretStr | None:
    """The secret in `path`, `None` if there is no such file.

    Raises:
        DevSecretError: If it is a symbolic link or not a regular file, is not owned by this user, or
            its group or others may read or write it (it was not created here, or was changed since),
            or it is empty or unreadable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if path.is_symlink():
            raise DevSecretError(f"The development secret {path} is a symbolic link; {_REMEDY}.") from None
        raise DevSecretError(f"Cannot read the development secret {path}: {exc.strerror}.") from None
    with os.fdopen(fd, "rb") as file:
        found = os.fstat(file.fileno())  # Of the file opened, so nothing can be swapped in between.
        if not stat.S_ISREG(found.st_mode):
            raise DevSecretError(f"The development secret {path} is not a regular file; {_REMEDY}.")
        if found.st_uid != os.geteuid():
            raise DevSecretError(
                f"The development secret {path} is not owned by this user (uid {os.geteuid()}, the file's is "
                f"{found.st_uid}); {_REMEDY}."
            )
        mode = stat.S_IMODE(found.st_mode)
        if mode & 0o077:
            raise DevSecretError(
                f"The development secret {path} has mode {mode:o}: others may read or change it. "
                f"Run `chmod 600 {path}` if it is yours, or {_REMEDY}."
            )
        raw = file.read()
    try:
        value = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        value = ""
    if not value:
        raise DevSecretError(f"The development secret {path} is empty or not text; {_REMEDY}.")
    return SecretStr(value)


def get_settings() -> Settings:
    """Read the settings from the environment and `.env` (only composition roots call this)."""
    return Settings()
