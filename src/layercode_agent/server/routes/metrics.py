"""`GET /metrics`: the per-turn metrics in Prometheus text format, for a scraper.

Mounted unless `METRICS=false`. Under `serve --workers N` every worker writes to the shared
`PROMETHEUS_MULTIPROC_DIR` and whichever worker answers a scrape adds up all of them, so one target
per server is enough. The numbers carry no conversation content or ids, but they say how busy the
server is: keep the port off the public internet, or turn the route off.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from ...observability import exposition

__all__ = ["METRICS_PATH", "metrics_router"]

METRICS_PATH = "/metrics"


def metrics_router(multiprocess_dir: str | None) -> APIRouter:
    """The `/metrics` route, reading every worker's numbers from `multiprocess_dir` when one is given."""
    router = APIRouter()

    @router.get(
        METRICS_PATH,
        summary="Prometheus metrics",
        responses={
            200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
        },
    )
    async def get_metrics() -> Response:
        """Every metric of this server, in Prometheus text format."""
        body, content_type = exposition(multiprocess_dir=multiprocess_dir)
        return Response(body, media_type=content_type)

    return router
