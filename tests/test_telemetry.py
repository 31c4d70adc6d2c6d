from __future__ import annotations

import pytest

from layercode_agent.telemetry import DEFAULT_SERVICE_NAME, configure_tracing, traces_url


def test_no_token_and_no_endpoint_means_no_tracing() -> None:
    assert configure_tracing() is None
    assert configure_tracing(otlp_headers="a=b", service_name="x") is None


@pytest.mark.parametrize(
    ("endpoint", "traces", "url"),
    [
        ("http://collector:4318", None, "http://collector:4318/v1/traces"),
        ("http://collector:4318/", None, "http://collector:4318/v1/traces"),
        ("http://collector:4318", "http://other/custom", "http://other/custom"),
        (None, "http://other/custom", "http://other/custom"),
        (None, None, None),
    ],
)
def test_the_traces_url_follows_the_otlp_exporter_spec(endpoint: str | None, traces: str | None, url: str) -> None:
    assert traces_url(endpoint, traces) == url


def test_an_otlp_endpoint_gets_its_own_provider_named_after_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    tracing = configure_tracing(otlp_endpoint="http://user:pw@127.0.0.1:9/base?token=t", otlp_headers="k=v")
    assert tracing is not None
    try:
        # Never a credential in what is logged.
        assert tracing.destination == "http://127.0.0.1:9/base/v1/traces"
        resource = tracing.tracer.resource  # type: ignore[attr-defined]
        assert resource.attributes["service.name"] == DEFAULT_SERVICE_NAME
    finally:
        tracing.shutdown()


def test_the_service_name_can_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    tracing = configure_tracing(otlp_traces_endpoint="http://127.0.0.1:9/v1/traces", service_name="front-desk")
    assert tracing is not None
    try:
        assert tracing.tracer.resource.attributes["service.name"] == "front-desk"  # type: ignore[attr-defined]
    finally:
        tracing.shutdown()
