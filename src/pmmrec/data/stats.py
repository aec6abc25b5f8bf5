"""``pmmrec data stats``: the size and shape of a domain, as a dict (``--json``) or an aligned table."""

from __future__ import annotations

import os

import numpy as np

from pmmrec.data.domain import Domain, items_without_image, read_domain

PERCENTILES = (("p25", 25), ("p50", 50), ("p75", 75), ("p90", 90))


def domain_stats(domain: Domain | str | os.PathLike) -> dict:
    """Users, items, interactions, density, sequence-length percentiles and catalogue gaps of a domain.

    A path is read with empty titles allowed (counting them is part of the point) and no image check.
    ``items_without_image`` is ``None`` when the domain has no image database at all.
    """
    if not isinstance(domain, Domain):
        domain = read_domain(domain, empty_title="blank", missing_image=None)
    lengths = np.array([len(s) for s in domain.sequences], dtype=np.int64)
    interactions = int(lengths.sum())
    counts = np.zeros(domain.num_items + 1, dtype=np.int64)
    if interactions:
        counts = np.bincount(np.concatenate(domain.sequences), minlength=domain.num_items + 1)
    has_images = domain.image_db is not None or domain.image_sources is not None
    cells = domain.num_users * domain.num_items
    seq_len: dict[str, float] = {}
    if len(lengths):
        seq_len["min"] = int(lengths.min())
        seq_len.update({k: float(np.percentile(lengths, q)) for k, q in PERCENTILES})
        seq_len["max"] = int(lengths.max())
        seq_len["mean"] = round(float(lengths.mean()), 3)
    return {
        "name": domain.name,
        "path": str(domain.path) if domain.path is not None else None,
        "users": domain.num_users,
        "items": domain.num_items,
        "interactions": interactions,
        "density": interactions / cells if cells else 0.0,
        "seq_len": seq_len,
        "items_without_image": len(items_without_image(domain)) if has_images else None,
        "items_empty_title": sum(1 for t in domain.titles if not t.strip()),
        "items_never_interacted": int((counts[1:] == 0).sum()),
    }


def _number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}" if abs(value) < 1 else f"{value:,.2f}"
    return f"{int(value):,}"


def format_stats(stats: dict) -> str:
    """A two-column table: labels left-aligned, numbers right-aligned."""
    no_db = "(no image database)" if stats.get("items_without_image") is None else ""
    rows = [("users", stats["users"]), ("items", stats["items"]), ("interactions", stats["interactions"]),
            ("density", stats["density"])]
    rows += [(f"sequence length {k}", v) for k, v in stats.get("seq_len", {}).items()]
    rows += [("items without image", stats.get("items_without_image")),
             ("items with empty title", stats["items_empty_title"]),
             ("items never interacted", stats["items_never_interacted"])]
    width = max(len(label) for label, _ in rows)
    values = [_number(v) for _, v in rows]
    vwidth = max(len(v) for v in values)
    header = f"domain {stats.get('name')}" + (f" ({stats['path']})" if stats.get("path") else "")
    lines = [header]
    for (label, _), value in zip(rows, values, strict=True):
        note = f"  {no_db}" if label == "items without image" and no_db else ""
        lines.append(f"  {label:<{width}}  {value:>{vwidth}}{note}")
    return "\n".join(lines)
