"""The vector store's format: atomic writes and appends, versions, and damaged files detected, never read."""

import json

import numpy as np
import pytest

from pmmrec.inference import vector_store as vs
from pmmrec.inference.vector_store import MANIFEST, StoreError, StoreKey, VectorStore

KEY = StoreKey(weights="a" * 32, dim=4, model={"tower": "content"}, inputs={"max_tokens": 16})


def _items(n: int, start: int = 0, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [f"i{k}" for k in range(start, start + n)]
    digests = rng.integers(0, 256, size=(n, vs.DIGEST_BYTES), dtype=np.uint8)
    return ids, digests, rng.standard_normal((n, KEY.dim)).astype(np.float32)


def _segment_files(store: VectorStore) -> list[str]:
    return sorted(p.name for p in store.path.iterdir() if p.name not in (MANIFEST, vs.LOCK))


def test_write_then_read_gives_the_items_back_memory_mapped(tmp_path):
    store = VectorStore(tmp_path / "s")
    ids, digests, vectors = _items(5)
    assert store.write(KEY, ids, digests, vectors, info={"checkpoint": "x.pt"}) == 1
    got = store.read()
    assert got.ids == ids and got.key == KEY and got.version == 1
    np.testing.assert_array_equal(got.digests, digests)
    np.testing.assert_array_equal(got.vectors, vectors)
    assert isinstance(got.vectors, np.memmap)  # one segment: mapped, not copied
    # The vectors file is a plain .npy any tool reads; the ids file is one id per line.
    assert np.array_equal(np.load(tmp_path / "s" / "000001.vectors.npy"), vectors)
    assert (tmp_path / "s" / "000001.ids.txt").read_text().split("\n")[:-1] == ids
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert manifest["count"] == 5 and manifest["info"] == {"checkpoint": "x.pt"} and manifest["key"]["dim"] == 4


def test_append_adds_a_segment_and_leaves_the_others_untouched(tmp_path):
    store = VectorStore(tmp_path / "s")
    ids, digests, vectors = _items(5)
    store.write(KEY, ids, digests, vectors)
    before = {p.name: p.read_bytes() for p in store.path.glob("000001.*")}
    more = _items(2, start=5, seed=1)
    assert store.append(KEY, *more) == 2
    got = store.read()
    assert got.ids == ids + more[0] and got.version == 2 and len(got.segments) == 2
    np.testing.assert_array_equal(got.vectors, np.concatenate([vectors, more[2]]))
    assert {p.name: p.read_bytes() for p in store.path.glob("000001.*")} == before
    # An id already stored, or another model's key: refused, nothing changes.
    with pytest.raises(StoreError, match="already in the store: i0"):
        store.append(KEY, *_items(1))
    with pytest.raises(StoreError, match="another model"):
        store.append(StoreKey("b" * 32, 4), *_items(1, start=9))
    assert store.read().version == 2 and len(store.read().ids) == 7


def test_many_appends_merge_the_tail_segments_not_the_base(tmp_path, monkeypatch):
    monkeypatch.setattr(vs, "MAX_SEGMENTS", 3)
    store = VectorStore(tmp_path / "s")
    ids, digests, vectors = _items(5)
    store.write(KEY, ids, digests, vectors)
    base = (store.path / "000001.vectors.npy").read_bytes()
    all_ids, all_vectors = list(ids), [vectors]
    for k in range(4):
        more = _items(1, start=10 + k, seed=k)
        store.append(KEY, *more)
        all_ids += more[0]
        all_vectors.append(more[2])
        assert len(store.read().segments) <= 3
    got = store.read()
    assert got.ids == all_ids and got.version == 5
    np.testing.assert_array_equal(got.vectors, np.concatenate(all_vectors))
    assert (store.path / "000001.vectors.npy").read_bytes() == base
    assert len(_segment_files(store)) == 3 * len(got.segments)  # merged-away segments are deleted


def test_rewrite_replaces_everything_and_removes_stale_files(tmp_path):
    store = VectorStore(tmp_path / "s")
    store.write(KEY, *_items(5))
    store.append(KEY, *_items(1, start=5))
    (store.path / ".000009.vectors.npy.abc.tmp").write_bytes(b"left by a crash")
    ids, digests, vectors = _items(3, start=20)
    assert store.write(KEY, ids, digests, vectors) == 3
    assert store.read().ids == ids
    assert _segment_files(store) == ["000003.digests.npy", "000003.ids.txt", "000003.vectors.npy"]


def _damage(store: VectorStore, how: str) -> None:
    vectors = store.path / "000001.vectors.npy"
    data = vectors.read_bytes()
    if how == "truncated":
        vectors.write_bytes(data[:-7])
    elif how == "flipped":
        vectors.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])
    elif how == "missing":
        vectors.unlink()
    elif how == "manifest":
        store.manifest_path.write_text(store.manifest_path.read_text()[:50])
    elif how == "ids":
        (store.path / "000001.ids.txt").write_text("i0\ni1\n")


@pytest.mark.parametrize(("how", "message"), [("truncated", "truncated"), ("flipped", "checksum mismatch"),
                                              ("missing", "missing"), ("manifest", "unreadable manifest"),
                                              ("ids", "bytes, the manifest says")])
def test_damaged_files_are_detected(tmp_path, how, message):
    store = VectorStore(tmp_path / "s")
    store.write(KEY, *_items(5))
    store.read()
    _damage(store, how)
    with pytest.raises(StoreError, match=message):
        store.read()


def test_a_crash_before_the_manifest_leaves_the_old_store(tmp_path, monkeypatch):
    store = VectorStore(tmp_path / "s")
    ids, digests, vectors = _items(5)
    store.write(KEY, ids, digests, vectors)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(vs, "atomic_write_text", crash)
    with pytest.raises(OSError):
        store.write(KEY, *_items(3, start=9))
    with pytest.raises(OSError):
        store.append(KEY, *_items(1, start=9))
    got = store.read()  # the manifest still names the first segment, intact
    assert got.ids == ids and got.version == 1
    np.testing.assert_array_equal(got.vectors, vectors)


def test_other_formats_and_folders_are_refused(tmp_path):
    store = VectorStore(tmp_path / "s")
    with pytest.raises(StoreError, match="no vector store here"):
        store.read()
    store.write(KEY, *_items(2))
    manifest = json.loads(store.manifest_path.read_text())
    store.manifest_path.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(StoreError, match="format version 99"):
        store.read()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("do not delete")
    with pytest.raises(StoreError, match="not a vector store's"):
        VectorStore(tmp_path / "mine").write(KEY, *_items(2))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "do not delete"
    with pytest.raises(StoreError, match="line break"):
        store.write(KEY, ["a\nb"], *_items(1)[1:])


def test_key_differences_name_both_values():
    other = StoreKey(weights="b" * 32, dim=8, model={"tower": "content"}, inputs={"max_tokens": 32})
    text = "; ".join(KEY.differences(other))
    assert "dimension 4 in the store, 8 for the model" in text
    assert "a" * 16 in text and "b" * 16 in text and "inputs.max_tokens 16 in the store, 32" in text
    assert KEY.differences(StoreKey.from_dict(KEY.to_dict())) == []


def test_appended_content_is_kept_and_merged_with_its_segments(tmp_path, monkeypatch):
    monkeypatch.setattr(vs, "MAX_SEGMENTS", 3)
    store = VectorStore(tmp_path / "s")
    store.write(KEY, *_items(4))
    for k in range(4):  # the 4th append merges the segments after the first, content files included
        ids, digests, vectors = _items(1, start=10 + k, seed=k)
        image = None if k % 2 else bytes([k, 0, 255])
        store.append(KEY, ids, digests, vectors, content=[(f"title {k}", image)])
    manifest = store.manifest()
    assert [s["rows"] for s in manifest["segments"]] == [4, 3, 1]  # base, merged (3 items), the last one
    content = {}
    for segment in manifest["segments"]:
        content.update(store.read_content(segment))
    assert content == {f"i{10 + k}": (f"title {k}", None if k % 2 else bytes([k, 0, 255])) for k in range(4)}
    assert store.read().ids == [f"i{k}" for k in range(4)] + [f"i{10 + k}" for k in range(4)]
    # Content files are the store's own: a rewrite removes the stale ones, and the folder stays writable.
    store.check_writable()
    store.write(KEY, *_items(2))
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.endswith(".items.jsonl")]


def test_a_damaged_content_file_is_detected(tmp_path):
    store = VectorStore(tmp_path / "s")
    store.write(KEY, *_items(2))
    store.append(KEY, *_items(1, start=5), content=[("t", b"\x89PNG")])
    segment = store.manifest()["segments"][1]
    path = tmp_path / "s" / segment["files"]["items"]["name"]
    path.write_bytes(path.read_bytes().replace(b'"t"', b'"x"'))
    with pytest.raises(StoreError, match="checksum mismatch"):
        store.read_content(segment)


def test_the_stamp_changes_with_every_commit(tmp_path):
    store = VectorStore(tmp_path / "s")
    assert store.stamp() is None
    store.write(KEY, *_items(2))
    seen = {store.stamp()}
    for k in range(5):
        store.append(KEY, *_items(1, start=10 + k, seed=k))
        seen.add(store.stamp())
    assert len(seen) == 6
