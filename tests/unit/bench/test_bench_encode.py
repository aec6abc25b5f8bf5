"""`pmmrec bench encode --quick`: the JSON contract (items/s of a cold encode, the warm restart from the store)."""

import json

import numpy as np

from pmmrec.bench import encode
from pmmrec.cli import main
from pmmrec.data.domain import read_domain
from pmmrec.data.image_db import ImageDB
from pmmrec.data.images import open_image


def test_bench_encode_quick_writes_items_per_second(tmp_path):
    out = tmp_path / "encode.json"
    assert main(["bench", "encode", "--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "encode" and result["quick"] is True
    case = result["cases"][0]
    assert case["name"] == "tiny" and case["items"] == 64
    assert result["items_per_s"] == case["items_per_s"] == case["cold"]["items_per_s"] > 0
    # The cold pass encoded every item; the warm one read them all back from the store.
    assert case["cold"]["encoded"] == 64 and case["warm"]["encoded"] == 0
    assert abs(case["cold"]["items_per_s"] * case["cold"]["seconds"] - 64) < 0.5  # items/s = items / seconds
    assert result["warm_seconds"] == case["warm"]["seconds"] > 0 and case["cold"]["peak_rss_mb"] > 0


def test_the_benchmark_catalogue_is_a_real_domain(tmp_path):
    domain = encode.write_catalogue(tmp_path / "c", 12)
    d = read_domain(domain, missing_image="error")
    assert len(d.item_ids) == 12 and len(set(d.titles)) > 1 and all(len(t.split()) >= 4 for t in d.titles)
    db = ImageDB(domain / "images.lmdb")
    try:
        sizes = {open_image(db.get(i)).size for i in d.item_ids}
        assert sizes == {(encode.IMAGE_SIZE, encode.IMAGE_SIZE)}
        assert len({np.frombuffer(db.get(i), np.uint8).sum() for i in d.item_ids}) == 12  # all different
    finally:
        db.close()
