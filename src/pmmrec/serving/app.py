"""The HTTP service: FastAPI over a :class:`~pmmrec.inference.Recommender`; no model logic lives here.

``create_app(recommender)`` returns a plain FastAPI app, so more routes (an explorer page, item images) can be
added to it like to any other::

    app = create_app(Recommender.from_checkpoint("runs/x/checkpoints/best.pt"))
    @app.get("/hello")
    def hello(): ...

Routes: ``POST /recommend``, ``POST /items``, ``GET /items/{item_id}``, ``GET /health``, ``GET /metrics``; the
OpenAPI schema is at ``/openapi.json`` and its pages at ``/docs``. The explorer page is at ``/``, with its own
routes (:mod:`pmmrec.serving.explorer_api`), over the recommender and optionally a second one to compare. Bad input always gets a 4xx JSON answer
``{"detail": ...}`` (422 invalid, 404 unknown item, 409 conflict, 413 too large); a 500 means a bug.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations at run time, and the request
# models are local classes (made for the service's limits).

import base64
import binascii
import logging
import os
import re

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from pmmrec import __version__
from pmmrec.data.images import open_image
from pmmrec.errors import DataError, PmmrecError
from pmmrec.inference import NewItem, Recommender
from pmmrec.inference.catalogue import DuplicateItemsError
from pmmrec.inference.recommender import CannotAddItemsError
from pmmrec.serving.batching import CONCURRENCY, MAX_BATCH, RecommendBatcher
from pmmrec.serving.explorer import Explorer
from pmmrec.serving.explorer_api import add_explorer_routes
from pmmrec.serving.fastpath import RecommendFastPath
from pmmrec.serving.metrics import GuardMiddleware, Metrics
from pmmrec.serving.schemas import (
    AddItemsResponse,
    ErrorResponse,
    HealthResponse,
    ItemResponse,
    RecommendResponse,
    ServiceLimits,
    schemas,
)

log = logging.getLogger(__name__)

_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,")
_ERRORS = {code: {"model": ErrorResponse} for code in (404, 409, 413, 422)}


def create_app(recommender: Recommender, limits: ServiceLimits | None = None, *, persist_items: bool = False,
               add_items: bool = True, add_items_refusal: str | None = None, compare: Recommender | None = None,
               names: tuple[str, ...] | None = None, max_batch: int = MAX_BATCH,
               batch_concurrency: int = CONCURRENCY) -> FastAPI:
    """The service's app over ``recommender``.

    ``compare`` is a second model shown side by side on the explorer page (same catalogue domain); items added
    through ``POST /items`` are added to it too when it can take them. ``names`` label the models on the page.

    ``persist_items`` writes every item added through ``POST /items`` into the catalogue's domain folder.
    ``add_items=False`` answers ``POST /items`` with 409 and ``add_items_refusal`` as the reason (e.g. several
    worker processes without a shared vector store, whose catalogues additions would make diverge).

    ``max_batch`` and ``batch_concurrency``: concurrent ``POST /recommend`` requests are scored in batches of up
    to ``max_batch``, ``batch_concurrency`` batches at a time (:mod:`pmmrec.serving.batching`).
    """
    limits = limits or ServiceLimits()
    RecommendRequest, AddItemsRequest = schemas(limits)
    metrics = Metrics()
    app = FastAPI(title="pmmrec", version=__version__,
                  description="Next-item recommendations from a PMMRec checkpoint; new items are recommendable as "
                              "soon as they are added with a title and/or an image (no retraining).")
    app.state.recommender = recommender
    app.state.limits = limits
    app.state.can_add_items = add_items
    app.state.metrics = metrics
    batcher = RecommendBatcher(recommender, max_batch, batch_concurrency)
    app.state.batcher = batcher
    app.router.add_event_handler("shutdown", batcher.close)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The default answer echoes each bad input back (a whole base64 image, say): keep where and why only.
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(PmmrecError)
    async def user_error(request: Request, exc: PmmrecError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=_error_status(exc))

    async def answer(body) -> dict:
        # Concurrent requests are scored together, in worker threads (see pmmrec.serving.batching).
        result = await batcher.recommend(body.history, body.k, body.exclude_history, body.unknown_items)
        return {"items": [{"item_id": r.item_id, "score": r.score} for r in result.items],
                "unknown": result.unknown, "used": result.used}

    @app.post("/recommend", response_model=RecommendResponse, responses=_ERRORS,
              summary="top-K next items for a history of raw item ids")
    async def recommend(body: RecommendRequest) -> RecommendResponse:
        # Well-formed JSON requests are answered by RecommendFastPath with the same `answer`; this route answers
        # the rest (other content types, and every invalid body, so that its errors are FastAPI's own).
        return RecommendResponse(**await answer(body))

    route = next(r for r in app.routes if getattr(r, "path", None) == "/recommend")
    app.add_middleware(RecommendFastPath, path="/recommend", model=RecommendRequest, answer=answer,
                       error_status=_error_status, route=route)
    # Added last, so outermost: it times every request (fast path included) and limits every body.
    app.add_middleware(GuardMiddleware, metrics=metrics, max_body_bytes=limits.max_body_bytes)

    @app.post("/items", response_model=AddItemsResponse, status_code=201, responses=_ERRORS,
              summary="add new items (title and/or base64 image); recommendable at once")
    async def post_items(body: AddItemsRequest) -> AddItemsResponse:
        if not add_items:
            raise HTTPException(409, add_items_refusal or "this server does not accept new items")
        items = [NewItem(item.item_id, item.title, _image_bytes(item.item_id, item.image, limits))
                 for item in body.items]
        added = await run_in_threadpool(recommender.add_items, items, persist_items)
        if compare is not None and compare.can_add_items:
            try:
                await run_in_threadpool(compare.add_items, items, False)
            except PmmrecError as e:  # e.g. a text-only model given an image-only item: the page shows it absent
                log.warning("the compared model did not take the new item(s): %s", e)
        return AddItemsResponse(added=added, items=len(recommender), persisted=persist_items)

    @app.get("/items/{item_id}", response_model=ItemResponse, responses=_ERRORS, summary="one catalogue item")
    async def get_item(item_id: str) -> ItemResponse:
        info = recommender.item(item_id)
        if info is None:
            raise HTTPException(404, f"unknown item id {item_id!r}")
        return ItemResponse(item_id=info.item_id, number=info.number, title=info.title, has_image=info.has_image,
                            added=info.added)

    @app.get("/health", response_model=HealthResponse, summary="liveness and what is served")
    async def health() -> HealthResponse:
        model = recommender.config.model
        shared = recommender.shared_store
        return HealthResponse(status="ok", items=len(recommender), item_tower=model.item_tower,
                              modality=model.modality, fusion=model.fusion, dim=recommender.catalogue.dim,
                              can_add_items=recommender.can_add_items and add_items, index=recommender.index,
                              worker=os.getpid(), store_version=shared.version if shared is not None else None)

    @app.get("/metrics", summary="request counts and latency percentiles per route")
    async def get_metrics() -> dict:
        return metrics.snapshot()

    add_explorer_routes(app, Explorer.build(recommender, compare, names), limits)
    return app


def _error_status(exc: PmmrecError) -> int:
    """409 for a conflict with the catalogue, 422 for any other bad request."""
    return 409 if isinstance(exc, (DuplicateItemsError, CannotAddItemsError)) else 422


def _image_bytes(item_id: str, text: str | None, limits: ServiceLimits) -> bytes | None:
    """Decode a base64 image and check its size and header; errors are 413/422 naming the item."""
    if text is None:
        return None
    try:
        data = base64.b64decode(_DATA_URL.sub("", text.strip(), count=1), validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"item {item_id!r}: image is not valid base64") from None
    if len(data) > limits.max_image_bytes:
        raise HTTPException(413, f"item {item_id!r}: image is {len(data)} bytes, over the limit of "
                                 f"{limits.max_image_bytes}")
    try:
        open_image(data, max_pixels=limits.max_image_pixels)
    except DataError as e:
        raise HTTPException(422, f"item {item_id!r}: {e}") from None
    return data
