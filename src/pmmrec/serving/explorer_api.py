"""The explorer's routes: the page at ``/``, its static files, item images and the JSON it reads.

Routes (all GET): ``/`` (the page), ``/static/...`` (its script and style sheet, package data), ``/explorer``
(what is served), ``/users?q=`` (search users), ``/users/{user_id}`` (history, held-out next item and each model's
top-K), ``/items/{item_id}/image`` (the stored image bytes, with ETag and Cache-Control) and
``/items/{item_id}/reach`` (which sampled users now get an item in their top-K). The page adds items through the
service's own ``POST /items``. The queries themselves live in :mod:`pmmrec.serving.explorer`.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at run time.

import hashlib
from pathlib import Path

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from pmmrec.serving.explorer import Explorer
from pmmrec.serving.schemas import (
    ErrorResponse,
    ExploreResponse,
    ExplorerInfo,
    ModelInfo,
    ReachResponse,
    ServiceLimits,
    UsersResponse,
    UserSummary,
)

STATIC = Path(__file__).parent / "static"
IMAGE_CACHE = "public, max-age=3600"  # an id's image never changes while a server runs; the ETag covers restarts
MAX_PAGE = 100  # users per search answer
MAX_SAMPLE = 2000  # users scored by one reach request
_ERRORS = {code: {"model": ErrorResponse} for code in (404, 422)}
# The formats the image store accepts (pmmrec.data.images), by their leading bytes.
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
          (b"GIF89a", "image/gif"), (b"BM", "image/bmp"))


def image_type(data: bytes) -> str:
    """The MIME type of encoded image bytes, from their signature (``application/octet-stream`` if unknown)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((mime for magic, mime in _MAGIC if data.startswith(magic)), "application/octet-stream")


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


def add_explorer_routes(app: FastAPI, explorer: Explorer, limits: ServiceLimits) -> None:
    """Add the explorer's page and routes to the service's ``app``."""
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    max_k = limits.max_k

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/explorer", response_model=ExplorerInfo, summary="what the explorer page serves")
    def explorer_info() -> ExplorerInfo:
        models = [ModelInfo(name=m.name, modality=m.recommender.config.model.modality,
                            fusion=m.recommender.config.model.fusion,
                            item_tower=m.recommender.config.model.item_tower,
                            can_add_items=m.recommender.can_add_items) for m in explorer.models]
        return ExplorerInfo(models=models, users=len(explorer.users), items=len(explorer.primary), max_k=max_k,
                            can_add_items=app.state.can_add_items and explorer.primary.can_add_items)

    @app.get("/users", response_model=UsersResponse, responses=_ERRORS,
             summary="users of the catalogue's domain whose id contains q (all users without q)")
    def users(q: str = Query("", max_length=limits.max_id_chars), offset: int = Query(0, ge=0),
              limit: int = Query(20, ge=1, le=MAX_PAGE)) -> UsersResponse:
        total, page_of = explorer.users.search(q, offset, limit)
        return UsersResponse(total=total, users=[
            UserSummary(user_id=explorer.users.user_ids[i], length=len(explorer.users.histories[i]))
            for i in page_of])

    @app.get("/users/{user_id:path}", response_model=ExploreResponse, responses=_ERRORS,
             summary="a user's history, held-out next item, and each model's top-K")
    def user(user_id: str, k: int = Query(10, ge=1, le=max_k),
             exclude_history: bool = Query(True)) -> ExploreResponse:
        if len(user_id) > limits.max_id_chars:
            raise HTTPException(422, f"user id longer than {limits.max_id_chars} characters")
        answer = explorer.explore(user_id, k, exclude_history)
        if answer is None:
            raise HTTPException(404, f"unknown user id {user_id!r}")
        return ExploreResponse(**answer)

    @app.get("/items/{item_id:path}/image", responses={**_ERRORS, 200: {"content": {"image/png": {}}}},
             summary="an item's image, as stored (catalogue LMDB, or uploaded through POST /items)")
    def item_image(item_id: str, request: Request) -> Response:
        if explorer.primary.item(item_id) is None:
            raise HTTPException(404, f"unknown item id {item_id!r}")
        data = explorer.primary.item_image(item_id)
        if data is None:
            raise HTTPException(404, f"item {item_id!r} has no image")
        etag = '"' + hashlib.blake2b(data, digest_size=16).hexdigest() + '"'
        headers = {"ETag": etag, "Cache-Control": IMAGE_CACHE, "X-Content-Type-Options": "nosniff"}
        if _etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        return Response(data, media_type=image_type(data), headers=headers)

    @app.get("/items/{item_id:path}/reach", response_model=ReachResponse, responses=_ERRORS,
             summary="which of a sample of users have this item in their top-K, per model")
    def item_reach(item_id: str, k: int = Query(10, ge=1, le=max_k),
                   sample: int = Query(200, ge=1, le=MAX_SAMPLE),
                   exclude_history: bool = Query(True)) -> ReachResponse:
        answer = explorer.reach(item_id, k, sample, exclude_history)
        if answer is None:
            raise HTTPException(404, f"unknown item id {item_id!r}")
        return ReachResponse(**answer)
