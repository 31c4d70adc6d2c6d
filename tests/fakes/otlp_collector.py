"""A local OTLP/HTTP trace collector over loopback: decodes what the exporter posts to `/v1/traces`."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import uvicorn
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .net import free_port


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the collector received it."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, str]
    resource: dict[str, str]
    headers: dict[str, str]


def _strings(values: list[KeyValue]) -> dict[str, str]:
    return {item.key: item.value.string_value for item in values}


class FakeCollector:
    """`with FakeCollector() as collector:`; `collector.base_url` is `OTEL_EXPORTER_OTLP_ENDPOINT`."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        app = Starlette(routes=[Route("/v1/traces", self._traces, methods=["POST"])])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> FakeCollector:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake OTLP collector did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    async def _traces(self, request: Request) -> Response:
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.body())
        headers = dict(request.headers)
        for resource_spans in export.resource_spans:
            resource = _strings(list(resource_spans.resource.attributes))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            attributes=_strings(list(span.attributes)),
                            resource=resource,
                            headers=headers,
                        )
                    )
        return Response(ExportTraceServiceResponse().SerializeToString(), media_type="application/x-protobuf")
