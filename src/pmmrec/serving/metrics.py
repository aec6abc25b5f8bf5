"""Request counts and latency percentiles per route, and the request-size guard, as one ASGI middleware.

Latencies are kept per route template (``/items/{item_id}``, not each id, so the table stays small) in a ring
of the last ``window`` requests; ``GET /metrics`` reports p50/p95/p99 over that window and counts since start.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict, deque

import numpy as np
from starlette.exceptions import HTTPException

UNMATCHED = "(unmatched)"  # requests that matched no route (404s): one bucket, whatever their path


class Metrics:
    """Thread-safe counters: requests by route and status, and a window of recent latencies per route."""

    def __init__(self, window: int = 10_000):
        self.started = time.time()
        self._lock = threading.Lock()
        self._window = window
        self._status: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self._latency: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=self._window))

    def record(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._status[route][status] += 1
            self._latency[route].append(seconds * 1000.0)

    def snapshot(self) -> dict:
        with self._lock:
            rows = {route: (dict(codes), np.asarray(self._latency[route], dtype=np.float64))
                    for route, codes in self._status.items()}
        out = {}
        for route, (codes, ms) in sorted(rows.items()):
            p50, p95, p99 = np.percentile(ms, [50, 95, 99]).tolist() if len(ms) else (None, None, None)
            out[route] = {"count": sum(codes.values()), "status": {str(k): v for k, v in sorted(codes.items())},
                          "window": len(ms), "p50_ms": _round(p50), "p95_ms": _round(p95), "p99_ms": _round(p99),
                          "max_ms": _round(float(ms.max())) if len(ms) else None}
        return {"uptime_s": round(time.time() - self.started, 3),
                "requests": sum(r["count"] for r in out.values()), "routes": out}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class BodyTooLarge(HTTPException):
    """A request body over the limit. An HTTPException, so FastAPI's body reader passes it on as a 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over the limit of {limit} bytes")


class GuardMiddleware:
    """Times every HTTP request into :class:`Metrics` and refuses bodies over ``max_body_bytes`` (413)."""

    def __init__(self, app, metrics: Metrics, max_body_bytes: int):
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500, "sent": False}
        limit = self.max_body_bytes

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
            await send(message)

        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise BodyTooLarge(limit)
            seen = 0

            async def receive_wrapper():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:  # a chunked body without Content-Length
                        raise BodyTooLarge(limit)
                return message

            await self.app(scope, receive_wrapper, send_wrapper)
        except BodyTooLarge as e:
            if status["sent"]:
                raise
            await _send_json(send_wrapper, 413, {"detail": e.detail})
        finally:
            route = scope.get("route")
            self.metrics.record(getattr(route, "path", UNMATCHED), status["code"], time.perf_counter() - started)


async def _send_json(send, code: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})
