"""Request and response bodies of the HTTP service (pydantic), with the service's limits built in.

The limits are run-time settings (:class:`ServiceLimits`), so the request models are made by :func:`schemas`
for a given set of limits; the OpenAPI schema then states every bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints


@dataclass(frozen=True)
class ServiceLimits:
    """Bounds on what one request may ask (docs/design.md §13); anything beyond gets a 4xx answer."""

    max_history: int = 512  # items in one history (the model reads the last data.max_seq_len of them)
    max_k: int = 1000  # recommendations per request
    max_items_per_request: int = 16  # new items in one POST /items
    max_title_chars: int = 2000
    max_id_chars: int = 200
    max_image_bytes: int = 4 << 20  # one decoded image file
    max_image_pixels: int = 25_000_000  # width x height, checked from the header before decoding

    def __post_init__(self):
        for name in ("max_history", "max_k", "max_items_per_request", "max_title_chars", "max_id_chars",
                     "max_image_bytes", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServiceLimits.{name} must be positive")

    @property
    def max_image_base64(self) -> int:
        """Characters of a base64 image of max_image_bytes, plus room for a ``data:image/...;base64,`` prefix."""
        return 4 * math.ceil(self.max_image_bytes / 3) + 64

    @property
    def max_body_bytes(self) -> int:
        per_item = self.max_image_base64 + 4 * self.max_title_chars + 4 * self.max_id_chars + 256
        return max(1 << 20, self.max_items_per_request * per_item + 4096)


class Recommendation(BaseModel):
    item_id: str
    score: float


class RecommendResponse(BaseModel):
    items: list[Recommendation] = Field(description="best first")
    unknown: list[str] = Field(description="history ids not in the catalogue (skipped)")
    used: int = Field(description="history items the user vector was built from (the last data.max_seq_len)")


class ItemResponse(BaseModel):
    item_id: str
    number: int = Field(description="1-based position in the catalogue")
    title: str | None
    has_image: bool
    added: bool = Field(description="added through POST /items (cold start) rather than read at start-up")


class AddItemsResponse(BaseModel):
    added: list[str]
    items: int = Field(description="catalogue size after the addition")
    persisted: bool


class HealthResponse(BaseModel):
    status: Literal["ok"]
    items: int
    item_tower: str
    modality: str
    fusion: str
    dim: int
    can_add_items: bool
    index: Literal["exact", "hnsw", "ivf"] = Field(description="how top-K is searched: exact, or faiss candidates "
                                                             "re-ranked exactly")
    worker: int = Field(description="the process id of the worker that answered (pmmrec serve --workers N)")
    store_version: int | None = Field(None, description="the version of the shared vector store this worker is in "
                                                        "step with (several workers), else null")


class ErrorResponse(BaseModel):
    detail: str | list[dict]


def schemas(limits: ServiceLimits) -> tuple[type[BaseModel], type[BaseModel]]:
    """The request models ``(RecommendRequest, AddItemsRequest)`` for ``limits``."""
    ItemId = Annotated[str, StringConstraints(min_length=1, max_length=limits.max_id_chars)]
    NewId = Annotated[str, StringConstraints(min_length=1, max_length=limits.max_id_chars, pattern=r"^\S+$")]

    class RecommendRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={
            "examples": [{"history": ["ta3", "ta17", "ta5"], "k": 10}]})
        history: list[ItemId] = Field(min_length=1, max_length=limits.max_history,
                                      description="raw item ids, oldest first")
        k: int = Field(10, ge=1, le=limits.max_k, description="how many items to recommend")
        exclude_history: bool = Field(True, description="never recommend an item of the history")
        unknown_items: Literal["skip", "reject"] = Field(
            "skip", description="ids not in the catalogue: skip them (listed in the answer) or answer 422")

    class NewItemBody(BaseModel):
        model_config = ConfigDict(extra="forbid")
        item_id: NewId = Field(description="a new raw id (no whitespace)")
        title: str | None = Field(None, max_length=limits.max_title_chars)
        image: str | None = Field(None, max_length=limits.max_image_base64,
                                  description="the image file (JPEG/PNG/WebP/GIF/BMP), base64, optionally as a "
                                              "data: URL")

    class AddItemsRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={
            "examples": [{"items": [{"item_id": "new1", "title": "Sea wave ship", "image": "iVBORw0KGgo..."}]}]})
        items: list[NewItemBody] = Field(min_length=1, max_length=limits.max_items_per_request)

    return RecommendRequest, AddItemsRequest


# ------------------------------------------------------------------------------------------- explorer (GET /)
class ModelInfo(BaseModel):
    name: str
    modality: str
    fusion: str
    item_tower: str
    can_add_items: bool


class ExplorerInfo(BaseModel):
    models: list[ModelInfo] = Field(description="the served model first, then the --compare one")
    users: int = Field(description="users of the catalogue's domain (users.tsv)")
    items: int
    max_k: int
    can_add_items: bool


class UserSummary(BaseModel):
    user_id: str
    length: int = Field(description="interactions in users.tsv, the held-out next item included")


class UsersResponse(BaseModel):
    total: int = Field(description="users matching the query")
    users: list[UserSummary]


class ItemCard(BaseModel):
    item_id: str
    title: str | None
    has_image: bool
    added: bool


class RecommendedCard(ItemCard):
    score: float
    rank: int
    hit: bool = Field(description="this is the user's held-out next item")


class ModelColumn(BaseModel):
    name: str
    items: list[RecommendedCard]
    hit_rank: int | None = Field(description="rank of the held-out next item in the top K, if there")
    error: str | None = None
    unknown: int = Field(0, description="history items this model's catalogue does not have (skipped)")


class ExploreResponse(BaseModel):
    user_id: str
    k: int
    exclude_history: bool
    history_length: int = Field(description="items the models see (the held-out next item excluded)")
    history: list[ItemCard] = Field(description="the most recent of them, oldest first")
    next: ItemCard | None = Field(description="the held-out next item (leave-one-out, as in evaluation)")
    models: list[ModelColumn]


class ReachUser(BaseModel):
    user_id: str
    rank: int
    score: float


class ReachColumn(BaseModel):
    name: str
    in_catalogue: bool
    users: list[ReachUser] = Field(description="sampled users whose top K holds the item, best rank first")


class ReachResponse(BaseModel):
    item: ItemCard
    k: int
    sampled: int
    models: list[ReachColumn]
