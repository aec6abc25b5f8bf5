"""bench serve's memory report: /proc figures of a process, and of its mapping of the shared vectors file."""

import os
import sys

import pytest

from pmmrec.bench.catalogue import shared_synthetic_recommender, write_synthetic_store
from pmmrec.bench.serve import process_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux /proc")


def test_the_mapped_vectors_file_is_counted_as_file_pages_of_this_process(tmp_path):
    write_synthetic_store(tmp_path / "store", 4096, dim=64)
    vectors_file = (tmp_path / "store" / "000001.vectors.npy").resolve()
    before = process_memory(os.getpid(), vectors_file)
    assert before["vectors_file"] == {"rss_mib": 0.0, "pss_mib": 0.0}  # not mapped yet
    rec = shared_synthetic_recommender(tmp_path / "store")
    rec.recommend(["i1", "i2"], k=5)  # scores every item: the whole file is read through the mapping
    after = process_memory(os.getpid(), vectors_file)
    assert after["vectors_file"]["rss_mib"] == pytest.approx(4096 * 64 * 4 / 2**20, abs=0.1)
    assert after["rss_file_mib"] >= after["vectors_file"]["rss_mib"] and after["peak_rss_mib"] >= after["rss_mib"]
    assert after["rss_mib"] == pytest.approx(after["rss_anon_mib"] + after["rss_file_mib"], abs=1.0)
