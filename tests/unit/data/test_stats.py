"""``domain_stats`` / ``format_stats`` against hand-counted numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pmmrec.data.domain import Domain, read_domain
from pmmrec.data.stats import domain_stats, format_stats


def test_stats_of_the_tiny_domain(tiny_domain):
    # Sequences of lengths 3, 4, 4, 3 over 6 items; i6 has no image.
    stats = domain_stats(read_domain(tiny_domain))
    assert (stats["users"], stats["items"], stats["interactions"]) == (4, 6, 14)
    assert stats["density"] == pytest.approx(14 / 24)
    assert stats["seq_len"] == {"min": 3, "p25": 3.0, "p50": 3.5, "p75": 4.0, "p90": 4.0, "max": 4, "mean": 3.5}
    assert stats["items_without_image"] == 1
    assert stats["items_empty_title"] == 0 and stats["items_never_interacted"] == 0
    json.dumps(stats)  # --json must be able to print it
    assert domain_stats(tiny_domain) == stats  # a path works too


def test_gaps_are_counted():
    d = Domain("d", ["a", "b", "c", "d"], ["A", "", "C", "  "], ["u1", "u2"],
               [np.array([1, 1, 2]), np.array([1])])
    stats = domain_stats(d)
    assert stats["items_empty_title"] == 2
    assert stats["items_never_interacted"] == 2  # c and d
    assert stats["items_without_image"] is None  # no image database at all
    assert stats["seq_len"]["min"] == 1 and stats["seq_len"]["max"] == 3


def test_empty_titles_read_from_a_path(tmp_path):
    from pmmrec.data.domain import write_domain_tables

    write_domain_tables(tmp_path, ["a", "b"], ["A", ""], ["u"], [["a", "b", "a"]])
    assert domain_stats(tmp_path)["items_empty_title"] == 1


def test_table_is_aligned(tiny_domain):
    text = format_stats(domain_stats(read_domain(tiny_domain)))
    lines = text.splitlines()
    assert lines[0].startswith("domain tiny")
    rows = lines[1:]
    assert any(r.split()[0] == "users" and r.rstrip().endswith(" 4") for r in rows)
    assert any("density" in r and "0.5833" in r for r in rows)
    assert any("sequence length p50" in r and r.rstrip().endswith("3.50") for r in rows)
    # Values end in one column.
    ends = {len(r.rstrip()) for r in rows}
    assert len(ends) == 1
    no_db = format_stats(domain_stats(Domain("d", ["a"], ["A"], ["u"], [np.array([1])])))
    assert "(no image database)" in no_db
