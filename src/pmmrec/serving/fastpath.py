"""``POST /recommend`` answered past FastAPI's per-request machinery, with the route's own model and answer.

Under load, FastAPI's routing, exception and exit-stack middlewares, dependency solving and response-model
re-validation cost more CPU per request than the Python side of scoring it: on 2 cores (``pmmrec bench serve``,
100,000 items, 50 clients) they took about a quarter of the service's CPU, and the service is CPU bound there.
This ASGI middleware answers a well-formed request itself:

- it handles only ``POST /recommend`` with a JSON content type; anything else goes to the app unchanged;
- the body is validated by the very pydantic model the route declares (``model_validate_json``); a body it
  rejects is handed to the route as it came, so every validation error is FastAPI's own answer;
- the answer is the route's (``answer(request)``), and a :class:`~pmmrec.errors.PmmrecError` gets the status the
  app's exception handler gives it (``error_status``);
- the request is recorded under the route's path by the metrics middleware, which sits outside this one (and
  enforces the body-size limit while the body is read here).

The route stays the definition of the endpoint (OpenAPI schema, docs, and every answer this does not give).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from pydantic import BaseModel, ValidationError

from pmmrec.errors import PmmrecError

_JSON = b"application/json"


class RecommendFastPath:
    def __init__(self, app, *, path: str, model: type[BaseModel], answer: Callable[[BaseModel], Awaitable[dict]],
                 error_status: Callable[[PmmrecError], int], route=None):
        self.app, self.path, self.model, self.answer = app, path, model, answer
        self.error_status, self.route = error_status, route

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path
                or not _is_json(scope)):
            await self.app(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # the client went away before sending its body
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        try:
            request = self.model.model_validate_json(body)
        except ValidationError:  # FastAPI words the error, from the same bytes
            await self.app(scope, _replay(bytes(body), receive), send)
            return
        if self.route is not None:
            scope["route"] = self.route  # what the metrics middleware files the request under
        try:
            payload, status = await self.answer(request), 200
        except PmmrecError as e:
            payload, status = {"detail": str(e)}, self.error_status(e)
        data = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", _JSON), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})


def _is_json(scope) -> bool:
    for name, value in scope.get("headers") or ():
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == _JSON
    return False


def _replay(body: bytes, receive):
    """An ASGI ``receive`` that gives the already-read body once, then defers to the real one."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
