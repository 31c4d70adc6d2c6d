"""Optional tracing: Logfire when `LOGFIRE_TOKEN` is set, else any OTLP endpoint; silent and free otherwise.

Two ways to send spans, both OpenTelemetry underneath:

- **Logfire** (`uv sync --extra logfire`): `logfire.configure` installs the global tracer provider and
  instruments pydantic-ai. Logfire also sends to an OTLP endpoint named in the process environment.
- **Any OTLP/HTTP collector** (`uv sync --extra otel`): with `OTEL_EXPORTER_OTLP_ENDPOINT` or
  `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, an SDK `TracerProvider` with a `BatchSpanProcessor` and the
  OTLP HTTP/protobuf exporter, service `OTEL_SERVICE_NAME` or `layercode-agent`. Endpoints follow the
  OTLP exporter spec (opentelemetry.io/docs/specs/otel/protocol/exporter, Nov 2025): `/v1/traces` is
  appended to the generic endpoint, the traces endpoint is used as given. The provider is this app's
  own (not installed globally), so only the turn spans of `observability` go through it.

With neither, `configure_tracing` returns `None` and no tracing work is done at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from opentelemetry.trace import Tracer, get_tracer
from pydantic import SecretStr

__all__ = ["DEFAULT_SERVICE_NAME", "Tracing", "configure_logfire", "configure_tracing", "traces_url"]

logger = logging.getLogger("layercode_agent")

DEFAULT_SERVICE_NAME = "layercode-agent"
"""`service.name` of the spans when `OTEL_SERVICE_NAME` is not set."""
TRACER_NAME = "layercode_agent"

_HEADER_PARSER_LOGGER = "opentelemetry.util.re"
"""Where OpenTelemetry warns about a malformed `OTEL_EXPORTER_OTLP_HEADERS` part, quoting it (often a bearer token)."""


class _HideArguments(logging.Filter):
    """Keep a warning's template but replace its arguments, which may quote a credential."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple("<not shown: it may hold a credential>" for _ in record.args)
        return True


def _hide_header_warnings() -> None:
    parser_logger = logging.getLogger(_HEADER_PARSER_LOGGER)
    if not any(isinstance(existing, _HideArguments) for existing in parser_logger.filters):
        parser_logger.addFilter(_HideArguments())


def configure_logfire(token: str | SecretStr | None, service_name: str | None = None) -> bool:
    """Send pydantic-ai spans to Logfire when a token is given; return whether tracing is on."""
    token = _reveal(token)
    if not token:
        return False
    try:
        import logfire
    except ImportError:
        logger.warning("LOGFIRE_TOKEN is set but logfire is not installed: uv sync --extra logfire")
        return False
    logfire.configure(token=token, service_name=service_name or DEFAULT_SERVICE_NAME, console=False)
    logfire.instrument_pydantic_ai()
    return True


@dataclass(frozen=True)
class Tracing:
    """A configured tracer, where its spans go, and how to flush them at shutdown."""

    tracer: Tracer
    destination: str
    """`Logfire` or the OTLP traces URL, for logs (no credentials: headers are never shown)."""
    shutdown: Callable[[], None]
    """Export what is still buffered and stop (blocking; call it off the event loop)."""


def traces_url(endpoint: str | None, traces_endpoint: str | None) -> str | None:
    """The URL spans are posted to: the traces endpoint as given, else `/v1/traces` under the generic one."""
    if traces_endpoint:
        return traces_endpoint
    if endpoint:
        parts = urlsplit(endpoint)
        return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/v1/traces"))
    return None


def configure_tracing(
    *,
    logfire_token: str | SecretStr | None = None,
    otlp_endpoint: str | None = None,
    otlp_traces_endpoint: str | None = None,
    otlp_headers: str | SecretStr | None = None,
    service_name: str | None = None,
) -> Tracing | None:
    """Set up tracing from the settings: Logfire first, else OTLP, else nothing (`None`).

    Credentials may come as `SecretStr`; they are unwrapped only where Logfire or the exporter is built.

    Args:
        logfire_token: `LOGFIRE_TOKEN`.
        otlp_endpoint: `OTEL_EXPORTER_OTLP_ENDPOINT`, the collector's base URL.
        otlp_traces_endpoint: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, the full traces URL.
        otlp_headers: `OTEL_EXPORTER_OTLP_HEADERS`, `key=value,...` (URL-encoded values); without
            it the exporter reads the OTEL_EXPORTER_OTLP_*HEADERS environment variables itself.
        service_name: `OTEL_SERVICE_NAME`; `layercode-agent` by default.
    """
    if configure_logfire(logfire_token, service_name):
        return Tracing(tracer=get_tracer(TRACER_NAME), destination="Logfire", shutdown=lambda: None)
    url = traces_url(otlp_endpoint, otlp_traces_endpoint)
    if url is None:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.util.re import parse_env_headers
    except ImportError:
        logger.warning("an OTLP endpoint is set but the OpenTelemetry SDK is not installed: uv sync --extra otel")
        return None
    # Resource.create() reads OTEL_RESOURCE_ATTRIBUTES (and OTEL_SERVICE_NAME) from the environment.
    resource = Resource.create({SERVICE_NAME: service_name} if service_name else None)
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    # Also covers the exporter's own reading of the OTEL_EXPORTER_OTLP_*HEADERS variables.
    _hide_header_warnings()
    raw_headers = _reveal(otlp_headers)
    headers = parse_env_headers(raw_headers, liberal=True) if raw_headers else None
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url, headers=headers)))
    return Tracing(tracer=provider.get_tracer(TRACER_NAME), destination=_shown(url), shutdown=provider.shutdown)


def _reveal(value: str | SecretStr | None) -> str | None:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def _shown(url: str) -> str:
    """The URL without credentials or query, fit for a log line."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
