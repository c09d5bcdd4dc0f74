"""ASGI middleware counting the API's HTTP responses by route and status code
(`spin_ray_http_responses_total`). Paths that are not a route of the app count as route
"other", so a scan of random URLs adds no series. The series of the statuses the API answers
start at zero (a counter's first increment is invisible to rate() otherwise: an error rate
would miss the first error of each kind)."""

from __future__ import annotations

from spin_ray.metrics import definitions as m
from spin_ray.metrics.sink import MetricSink

STATUSES = (200, 400, 401, 404, 405, 413, 422, 500, 503)
"""What openai_api answers (and FastAPI's 405/422), counted from zero."""


class ResponseCounter:
    def __init__(self, app, sink: MetricSink, model: str, routes: frozenset[str]):
        self.app, self.sink, self.model, self.routes = app, sink, model, routes
        for route in (*sorted(routes), "other"):
            for status in STATUSES:
                sink.inc(m.HTTP_RESPONSES, 0, self._labels(route, status))

    def _labels(self, route: str, status: int) -> dict[str, str]:
        return {"model": self.model, "route": route, "status": str(status)}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            if status is not None:  # None: the client left before an answer started
                route = scope["path"] if scope["path"] in self.routes else "other"
                self.sink.inc(m.HTTP_RESPONSES, 1, self._labels(route, status))
