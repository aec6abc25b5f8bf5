"""The HTTP service through a real HTTP client against a real uvicorn server on loopback."""

import asyncio
import base64
import io
import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from pmmrec import Recommender
from pmmrec.config import load_config
from pmmrec.serving.app import create_app
from pmmrec.serving.schemas import ServiceLimits
from pmmrec.training.api import fit

REPO = Path(__file__).resolve().parents[3]
LIMITS = ServiceLimits(max_history=50, max_k=20, max_items_per_request=4, max_title_chars=100, max_id_chars=40,
                       max_image_bytes=30_000, max_image_pixels=500_000)


def train_tiny(domain: Path, run: Path, *overrides: str) -> Path:
    config = load_config(REPO / "configs" / "tiny.yaml", [f"data.domain={domain}", f"run.dir={run}",
                                                         "train.epochs=1", "train.max_steps=1", *overrides])
    fit(config)
    return run / "checkpoints" / "last.pt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app):
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def png(size: int = 24, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def checkpoint(quick_world, tmp_path_factory) -> Path:
    return train_tiny(quick_world / "target", tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def recommender(checkpoint) -> Recommender:
    return Recommender.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def client(recommender):
    with running(create_app(recommender, LIMITS)) as url, httpx.Client(base_url=url, timeout=30) as c:
        yield c


def test_recommend(client, recommender):
    history = recommender.catalogue.snapshot().ids[:3]
    r = client.post("/recommend", json={"history": [*history, "unknown"], "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["item_id"] for x in body["items"]] == [x.item_id for x in recommender.recommend(history, k=5)]
    assert body["unknown"] == ["unknown"] and body["used"] == 3
    r = client.post("/recommend", json={"history": history, "k": 20, "exclude_history": False})
    assert r.status_code == 200 and len(r.json()["items"]) == 20


def test_fast_path_answers_like_the_route(client, recommender, monkeypatch):
    """application/json requests are answered by RecommendFastPath, other JSON types by the FastAPI route: the
    same answers (success and errors), both counted under /recommend."""
    import pmmrec.serving.app as app_module

    built = []
    real = app_module.RecommendResponse
    monkeypatch.setattr(app_module, "RecommendResponse", lambda **kw: built.append(kw) or real(**kw))
    ids = recommender.catalogue.snapshot().ids
    before = client.get("/metrics").json()["routes"]["/recommend"]["count"]
    bodies = [{"history": [*ids[:4], "unknown"], "k": 7}, {"history": ids[2:5], "k": 3, "exclude_history": False},
              {"history": ["nope"]}, {"history": [ids[0], "nope"], "unknown_items": "reject"}]
    for body in bodies:
        data = json.dumps(body).encode()
        fast = client.post("/recommend", content=data, headers={"content-type": "application/json; charset=utf-8"})
        routed = client.post("/recommend", content=data, headers={"content-type": "application/x-test+json"})
        assert (fast.status_code, fast.json()) == (routed.status_code, routed.json()), body
    assert len(built) == 2  # the route built the two successful answers; the fast path built none
    assert client.get("/metrics").json()["routes"]["/recommend"]["count"] == before + 2 * len(bodies)


def test_add_get_and_recommend_a_new_item(client, recommender):
    r = client.post("/items", json={"items": [
        {"item_id": "svc_new", "title": "Sea wave ship", "image": "data:image/png;base64," + b64(png())},
        {"item_id": "svc_text", "title": "Forest owl"}]})
    assert r.status_code == 201, r.text
    assert r.json()["added"] == ["svc_new", "svc_text"] and r.json()["items"] == len(recommender)
    item = client.get("/items/svc_new").json()
    assert item == {"item_id": "svc_new", "number": recommender.item("svc_new").number, "title": "Sea wave ship",
                    "has_image": True, "added": True}
    first = recommender.catalogue.snapshot().ids[0]
    assert client.get(f"/items/{first}").json()["added"] is False
    everything = client.post("/recommend", json={"history": [first], "k": 20}).json()["items"]
    ranked = [x.item_id for x in recommender.recommend([first], k=len(recommender))]
    assert "svc_new" in ranked and [x["item_id"] for x in everything] == ranked[:20]


def test_health_metrics_and_openapi(client, recommender):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["items"] == len(recommender) and health["can_add_items"]
    assert health["index"] == "exact"  # auto, on a catalogue far below the threshold
    client.post("/recommend", json={"history": ["x"], "k": 0})
    metrics = client.get("/metrics").json()
    route = metrics["routes"]["/recommend"]
    assert route["count"] >= 1 and route["status"].get("422", 0) >= 1
    assert 0 <= route["p50_ms"] <= route["p95_ms"] <= route["p99_ms"]
    schema = client.get("/openapi.json").json()
    assert {"/recommend", "/items", "/items/{item_id}", "/health", "/metrics"} <= set(schema["paths"])
    k = schema["components"]["schemas"]["RecommendRequest"]["properties"]["k"]
    assert k["maximum"] == LIMITS.max_k


def _error(client, method: str, path: str, expected: int, **kw) -> str:
    r = client.request(method, path, **kw)
    assert r.status_code == expected, (path, kw.get("json"), r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    return str(r.json()["detail"])


def test_recommend_validation_errors(client, recommender):
    ok = recommender.catalogue.snapshot().ids[:2]
    cases = [
        ({"history": [], "k": 5}, "at least 1"),
        ({"history": ["a"] * (LIMITS.max_history + 1)}, "at most 50"),
        ({"history": ok, "k": 0}, "greater than or equal to 1"),
        ({"history": ok, "k": LIMITS.max_k + 1}, "less than or equal to 20"),
        ({"history": ok, "k": "ten"}, "valid integer"),
        ({"history": ok, "k": 2.5}, "valid integer"),
        ({"history": [1, 2]}, "valid string"),
        ({"history": "a b"}, "valid list"),
        ({"history": [""]}, "at least 1 character"),
        ({"history": ["x" * 41]}, "at most 40 characters"),
        ({"history": ok, "exclude_history": "maybe"}, "valid boolean"),
        ({"history": ok, "unknown_items": "ignore"}, "'skip' or 'reject'"),
        ({"history": ok, "surprise": 1}, "Extra inputs"),
        ({"k": 3}, "Field required"),
        ({"history": ["nope"]}, "no item of the history"),
        ({"history": [ok[0], "nope"], "unknown_items": "reject"}, "unknown item id(s) in the history: 'nope'"),
    ]
    for body, message in cases:
        assert message in _error(client, "POST", "/recommend", 422, json=body), body
    assert _error(client, "POST", "/recommend", 422, content=b"{not json",
                  headers={"content-type": "application/json"})
    assert _error(client, "POST", "/recommend", 422, content=b"[1, 2]", headers={"content-type": "application/json"})


def test_items_validation_errors(client, recommender):
    existing = recommender.catalogue.snapshot().ids[0]
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)  # incompressible
    noisy = Image.fromarray(noise)
    buf = io.BytesIO()
    noisy.save(buf, format="PNG")
    too_big = buf.getvalue()
    assert len(too_big) > LIMITS.max_image_bytes
    huge_canvas = png(800, (0, 0, 0))  # 640,000 pixels, a small file
    assert len(huge_canvas) < LIMITS.max_image_bytes
    cases = [
        ({"items": []}, 422, "at least 1"),
        ({"items": [{"item_id": f"m{i}", "title": "t"} for i in range(5)]}, 422, "at most 4"),
        ({"items": [{"item_id": "has space", "title": "t"}]}, 422, "pattern"),
        ({"items": [{"item_id": "", "title": "t"}]}, 422, "at least 1 character"),
        ({"items": [{"item_id": "t1", "title": "t" * 101}]}, 422, "at most 100 characters"),
        ({"items": [{"item_id": "t1"}]}, 422, "a title, an image, or both"),
        ({"items": [{"item_id": "t1", "title": "t", "colour": "red"}]}, 422, "Extra inputs"),
        ({"items": [{"item_id": "t1", "image": "***"}]}, 422, "not valid base64"),
        ({"items": [{"item_id": "t1", "image": b64(b"plain text, not an image")}]}, 422, "not an image"),
        ({"items": [{"item_id": "t1", "image": b64(too_big)}]}, 422, f"at most {LIMITS.max_image_base64} characters"),
        ({"items": [{"item_id": "t1", "image": b64(huge_canvas)}]}, 422, "over the limit of 500000 pixels"),
        ({"items": [{"item_id": existing, "title": "t"}]}, 409, "already in the catalogue"),
        ({"items": [{"item_id": "t1", "title": "a"}, {"item_id": "t1", "title": "b"}]}, 422, "given twice"),
    ]
    for body, code, message in cases:
        assert message in _error(client, "POST", "/items", code, json=body), body
    assert "t1" not in recommender
    assert "request body over the limit" in _error(client, "POST", "/items", 413,
                                                   content=b"x" * (LIMITS.max_body_bytes + 1))
    assert "unknown item id 'nope'" in _error(client, "GET", "/items/nope", 404)
    assert _error(client, "GET", "/no-such-route", 404)
    assert _error(client, "GET", "/recommend", 405)


def test_concurrent_requests_keep_the_catalogue_consistent(client, recommender):
    history = recommender.catalogue.snapshot().ids[:4]
    start = len(recommender)
    url = str(client.base_url)

    async def load():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            adds = [c.post("/items", json={"items": [{"item_id": f"c{i}", "title": f"sea wave {i}"}]})
                    for i in range(12)]
            recs = [c.post("/recommend", json={"history": history, "k": 20}) for _ in range(60)]
            return await asyncio.gather(*adds, *recs)

    responses = asyncio.run(load())
    assert [r.status_code for r in responses[:12]] == [201] * 12
    assert all(r.status_code == 200 and len(r.json()["items"]) == 20 for r in responses[12:])
    assert len(recommender) == start + 12
    numbers = sorted(client.get(f"/items/c{i}").json()["number"] for i in range(12))
    assert numbers == list(range(start + 1, start + 13))


def test_id_tower_and_refusing_servers_answer_409(quick_world, tmp_path, recommender):
    id_rec = Recommender.from_checkpoint(train_tiny(quick_world / "target", tmp_path / "id", "model.item_tower=id"))
    with running(create_app(id_rec)) as url, httpx.Client(base_url=url) as c:
        assert "model.item_tower=id" in _error(c, "POST", "/items", 409, json={"items": [{"item_id": "n",
                                                                                          "title": "t"}]})
        assert c.get("/health").json()["can_add_items"] is False
        assert c.post("/recommend", json={"history": id_rec.catalogue.snapshot().ids[:2]}).status_code == 200
    app = create_app(recommender, add_items=False, add_items_refusal="no shared vector store")
    with running(app) as url, httpx.Client(base_url=url) as c:
        assert _error(c, "POST", "/items", 409, json={"items": [{"item_id": "n", "title": "t"}]}) == \
            "no shared vector store"


def test_decoded_image_size_is_checked_too():
    from fastapi import HTTPException

    from pmmrec.serving.app import _image_bytes

    limits = ServiceLimits(max_image_bytes=10)  # 40 bytes of base64 fit in its 80 characters, and decode to 30
    with pytest.raises(HTTPException) as e:
        _image_bytes("x", b64(b"y" * 30), limits)
    assert e.value.status_code == 413 and "over the limit of 10" in e.value.detail
    assert _image_bytes("x", None, limits) is None
