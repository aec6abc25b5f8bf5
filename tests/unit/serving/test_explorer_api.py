"""The explorer's JSON routes and item images, through a real HTTP client against uvicorn on loopback."""

import io

import httpx
import pytest
from PIL import Image
from tests.unit.serving.test_service import LIMITS, b64, running, train_tiny

from pmmrec import Recommender
from pmmrec.serving.app import create_app
from pmmrec.serving.explorer import UserBook, model_name, split_next
from pmmrec.serving.explorer_api import image_type


@pytest.fixture(scope="module")
def models(quick_world, tmp_path_factory) -> tuple[Recommender, Recommender]:
    run = tmp_path_factory.mktemp("explorer-api")
    a = Recommender.from_checkpoint(train_tiny(quick_world / "target", run / "a", "seed=42"))
    b = Recommender.from_checkpoint(train_tiny(quick_world / "target", run / "b", "seed=3"))
    return a, b


@pytest.fixture(scope="module")
def client(models):
    a, b = models
    with running(create_app(a, LIMITS, compare=b, names=("A", "B"))) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def users(models) -> UserBook:
    return UserBook.from_domain(models[0].domain)


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/explorer.js"' in page.text and 'lang="en"' in page.text
    for path, kind in (("/static/explorer.js", "javascript"), ("/static/explorer.css", "text/css")):
        r = client.get(path)
        assert r.status_code == 200 and kind in r.headers["content-type"] and r.headers.get("etag")
    assert "//" not in client.get("/static/explorer.css").text.replace("/*", "")  # no external fonts or CDNs
    assert client.get("/static/nope.js").status_code == 404


def test_explorer_info(client, models, users):
    info = client.get("/explorer").json()
    assert [m["name"] for m in info["models"]] == ["A", "B"]
    assert info["users"] == len(users) > 0 and info["items"] == len(models[0]) and info["max_k"] == LIMITS.max_k


def test_user_search(client, users):
    everyone = client.get("/users", params={"limit": 100}).json()
    assert everyone["total"] == len(users) and [u["user_id"] for u in everyone["users"]] == users.user_ids[:100]
    first = users.user_ids[1]
    found = client.get("/users", params={"q": first.upper()}).json()
    assert found["users"][0] == {"user_id": first, "length": len(users.history(first))}  # exact id first
    assert all(first in u["user_id"] for u in found["users"])
    assert client.get("/users", params={"q": "no-such-user"}).json() == {"total": 0, "users": []}
    page = client.get("/users", params={"offset": 3, "limit": 2}).json()["users"]
    assert [u["user_id"] for u in page] == users.user_ids[3:5]


def test_explore_a_user(client, models, users):
    a, b = models
    user = users.user_ids[0]
    seen, held_out = split_next(users.history(user))
    body = client.get(f"/users/{user}", params={"k": 7}).json()
    assert [x["item_id"] for x in body["history"]] == seen and body["history_length"] == len(seen)
    assert body["next"]["item_id"] == held_out and body["next"]["title"] == a.item(held_out).title
    for column, model in zip(body["models"], (a, b), strict=True):
        expected = model.recommend(seen, k=7)
        assert [x["item_id"] for x in column["items"]] == [r.item_id for r in expected]
        assert [x["score"] for x in column["items"]] == pytest.approx([r.score for r in expected], rel=1e-5)
        assert [x["rank"] for x in column["items"]] == list(range(1, 8))
        assert not set(seen) & {x["item_id"] for x in column["items"]}
        assert [x["hit"] for x in column["items"]] == [x["item_id"] == held_out for x in column["items"]]
        ranks = [x["rank"] for x in column["items"] if x["hit"]]
        assert column["hit_rank"] == (ranks[0] if ranks else None)
    # A user whose held-out item the model ranks in its top 20 (history allowed): the page marks it there.
    k = LIMITS.max_k
    hit_user = next(u for u in users.user_ids
                    if split_next(users.history(u))[1] in
                    [r.item_id for r in a.recommend(split_next(users.history(u))[0], k=k, exclude_history=False)])
    held_out = split_next(users.history(hit_user))[1]
    column = client.get(f"/users/{hit_user}", params={"k": k, "exclude_history": False}).json()["models"][0]
    assert len(column["items"]) == k and column["hit_rank"] is not None
    assert column["items"][column["hit_rank"] - 1]["item_id"] == held_out
    assert [x["item_id"] for x in column["items"] if x["hit"]] == [held_out]


@pytest.mark.parametrize(("path", "params", "code", "says"), [
    ("/users/nobody", {}, 404, "unknown user id 'nobody'"),
    ("/users/x", {"k": 0}, 422, "greater than or equal to 1"),
    ("/users/x", {"k": LIMITS.max_k + 1}, 422, "less than or equal to 20"),
    ("/users/x", {"k": "ten"}, 422, "valid integer"),
    ("/users/x", {"exclude_history": "maybe"}, 422, "valid boolean"),
    ("/users/" + "u" * 41, {}, 422, "longer than 40"),
    ("/users", {"limit": 0}, 422, "greater than or equal to 1"),
    ("/users", {"limit": 101}, 422, "less than or equal to 100"),
    ("/users", {"offset": -1}, 422, "greater than or equal to 0"),
    ("/users", {"q": "q" * 41}, 422, "at most 40 characters"),
    ("/items/nope/image", {}, 404, "unknown item id 'nope'"),
    ("/items/nope/reach", {}, 404, "unknown item id 'nope'"),
    ("/items/x/reach", {"sample": 0}, 422, "greater than or equal to 1"),
])
def test_bad_input_is_a_4xx(client, path, params, code, says):
    r = client.get(path, params=params)
    assert r.status_code == code, (path, params, r.text)
    assert says in str(r.json()["detail"])


def test_item_image_bytes_type_and_caching(client, models):
    a, _ = models
    item = a.catalogue.snapshot().ids[4]
    stored = a.item_image(item)
    r = client.get(f"/items/{item}/image")
    assert r.status_code == 200 and r.content == stored
    assert r.headers["content-type"] == image_type(stored) != "application/octet-stream"
    assert "max-age" in r.headers["cache-control"] and r.headers["x-content-type-options"] == "nosniff"
    etag = r.headers["etag"]
    again = client.get(f"/items/{item}/image", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    other = a.catalogue.snapshot().ids[5]
    assert client.get(f"/items/{other}/image", headers={"If-None-Match": etag}).status_code == 200
    assert client.get(f"/items/{other}/image").headers["etag"] != etag


def test_added_item_has_its_image_and_reaches_users(client, models, users):
    a, b = models
    user = users.user_ids[2]
    seen, _ = split_next(users.history(user))
    best = a.recommend(seen, k=1)[0].item_id
    twin_image = a.item_image(best)
    r = client.post("/items", json={"items": [
        {"item_id": "api_twin", "title": a.item(best).title, "image": b64(twin_image)},
        {"item_id": "api_text_only", "title": "Forest owl"}]})
    assert r.status_code == 201, r.text
    assert b.item("api_twin") is not None  # the compared model took it too
    image = client.get("/items/api_twin/image")
    assert image.status_code == 200 and image.content == twin_image
    assert client.get("/items/api_text_only/image").json()["detail"] == "item 'api_text_only' has no image"
    reach = client.get("/items/api_twin/reach", params={"k": 3, "sample": 1000}).json()
    assert reach["item"] == {"item_id": "api_twin", "title": a.item(best).title, "has_image": True, "added": True}
    assert reach["sampled"] == len(users) and [c["name"] for c in reach["models"]] == ["A", "B"]
    ranked = {u["user_id"]: u["rank"] for u in reach["models"][0]["users"]}
    assert ranked[user] <= 2  # as good as its twin, the user's best item
    for column, model in zip(reach["models"], (a, b), strict=True):  # exactly the users whose top 3 holds it
        # One batch, as the route scores them (the twin ties with its original: batch-size rounding decides ties).
        tops = model.recommend_many([split_next(h)[0] for h in users.histories], k=3)
        expected = [u for u, top in zip(users.user_ids, tops, strict=True)
                    if "api_twin" in [x.item_id for x in top.items]]
        assert sorted(u["user_id"] for u in column["users"]) == sorted(expected)
        assert [u["rank"] for u in column["users"]] == sorted(u["rank"] for u in column["users"])
    explored = client.get(f"/users/{user}", params={"k": 3}).json()["models"][0]["items"]
    assert any(x["item_id"] == "api_twin" and x["added"] for x in explored)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_image_type_by_signature(fmt):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, format=fmt)
    assert image_type(buf.getvalue()) == Image.MIME[fmt]
    assert image_type(b"not an image") == "application/octet-stream"


def test_user_book_sample_and_model_names(tmp_path):
    book = UserBook([f"u{i}" for i in range(10)], [["a", "b"]] * 10)
    assert book.sample(3) == [0, 4, 9] and book.sample(50) == list(range(10))
    assert split_next(["a"]) == (["a"], None) and split_next(["a", "b", "c"]) == (["a", "b"], "c")
    assert model_name("runs/transfer/checkpoints/best.pt") == "transfer (best.pt)"
    assert model_name(tmp_path / "model.pt") == "model.pt"
