"""Comparison reports: one table (HR@10, NDCG@10, gain vs a reference run) and a bar chart.

``pmmrec demo`` and ``pmmrec report RUN...`` both build their output here, so a user comparing their own run
folders gets exactly the demo's table and plot. A *row* is a plain dict (it goes into ``report.json`` as is)::

    {"name": ..., "HR@10": x, "NDCG@10": y,               # test split, exclude_history (the paper's protocol)
     "HR@10/include_history": ..., "NDCG@10/include_history": ...,
     "gain_vs_scratch": relative NDCG@10 against the reference row, or None,
     "seconds": wall time or None, "group": a section of the table or None, "run": the run folder or None}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pmmrec.errors import PmmrecError
from pmmrec.utils.io import atomic_file, atomic_write_text

METRICS = ("HR@10", "NDCG@10")
PROTOCOLS = ("exclude_history", "include_history")
GAIN = "gain_vs_scratch"  # docs/design.md §15: report.json's gain column


def make_row(name: str, results: dict[str, Any], seconds: float | None = None, group: str | None = None,
             run: str | Path | None = None) -> dict[str, Any]:
    """A table row from a ``results.json`` dict (its test split)."""
    if "test" not in results:
        raise PmmrecError(f"{run or name}: results have no test split")
    row: dict[str, Any] = {"name": name, "group": group, "run": None if run is None else str(run),
                           "seconds": None if seconds is None else round(seconds, 1)}
    for protocol in PROTOCOLS:
        metrics = results["test"].get(protocol, {})
        for metric in METRICS:
            if metric not in metrics:
                raise PmmrecError(f"{run or name}: results lack test/{protocol}/{metric} "
                                  "(evaluate with eval.ks including 10)")
            row[f"{metric}/{protocol}"] = metrics[metric]
    row["HR@10"], row["NDCG@10"] = row["HR@10/exclude_history"], row["NDCG@10/exclude_history"]
    row[GAIN] = None
    return row


def add_gains(rows: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    """Set every row's relative NDCG@10 gain against ``reference`` (None when the reference scores 0)."""
    base = reference["NDCG@10"]
    for row in rows:
        row[GAIN] = (row["NDCG@10"] - base) / base if base > 0 else None


def format_table(rows: Sequence[dict[str, Any]], reference: str = "scratch") -> str:
    """A Markdown table; rows with a ``group`` are listed under a bold group line."""
    lines = [f"| variant | HR@10 | NDCG@10 | HR@10 (incl. history) | NDCG@10 (incl. history) | gain vs {reference} "
             "| time |", "|---|---|---|---|---|---|---|"]
    group = None
    for r in rows:
        if r.get("group") and r["group"] != group:
            group = r["group"]
            lines.append(f"| **{group}** | | | | | | |")
        gain = "" if r.get(GAIN) is None else f"{r[GAIN]:+.1%}"
        took = "" if r.get("seconds") is None else f"{r['seconds']:.0f}s"
        lines.append(f"| {r['name']} | {r['HR@10']:.4f} | {r['NDCG@10']:.4f} | {r['HR@10/include_history']:.4f} | "
                     f"{r['NDCG@10/include_history']:.4f} | {gain} | {took} |")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> None:
    """Horizontal bars of HR@10 and NDCG@10 per row, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file
    import matplotlib.pyplot as plt

    height = 0.38
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.42 * len(rows)))
    ys = list(range(len(rows)))[::-1]  # first row on top
    for k, metric in enumerate(METRICS):
        ax.barh([y + (0.5 - k) * height for y in ys], [r[metric] for r in rows], height, label=metric)
    ax.set_yticks(ys, [r["name"] for r in rows], fontsize=8)
    ax.set_xlabel("test, full ranking, exclude_history")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def write_report(out: str | Path, rows: list[dict[str, Any]], title: str, intro: Sequence[str] = (),
                 extra: dict[str, Any] | None = None, sections: Sequence[str] = ()) -> None:
    """``report.md`` (title, intro lines, the table, extra sections), ``report.json`` and ``report.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", *intro, "", format_table(rows), "", *sections]
    atomic_write_text(out / "report.md", "\n".join(lines).rstrip() + "\n")
    atomic_write_text(out / "report.json", json.dumps({"rows": rows, **(extra or {})}, indent=2) + "\n")
    plot(rows, out / "report.png", title)


# ---------------------------------------------------------------------------------------------- pmmrec report
def describe_run(path: Path) -> str:
    """A short label for a run folder: its name plus how it was trained (from config.yaml / transfer.json)."""
    kind = run_kind(path)
    return f"{path.name} ({kind})" if kind else path.name


def run_kind(path: Path) -> str:
    """How a run folder's model was made, e.g. ``multimodal, transfer full``, ``IDs, scratch``, ``most popular``,
    ``multimodal, zero-shot`` (a ``pmmrec evaluate --out`` of a checkpoint on a domain it never trained on);
    empty without a config.yaml."""
    import yaml

    config_file = path / "config.yaml"
    if not config_file.is_file():
        return ""
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    results_file = path / "results.json"
    results = json.loads(results_file.read_text(encoding="utf-8")) if results_file.is_file() else {}
    if results.get("baseline"):
        return str(results["baseline"])
    model = config.get("model", {})
    tower = model.get("item_tower")
    bits = ["IDs" if tower == "id" else model.get("modality", "") + ("+IDs" if tower == "content+id" else "")]
    transfer = config.get("transfer", {})
    if results.get("evaluated"):
        bits.append("zero-shot" if results["evaluated"].get("zero_shot") else "evaluated")
    elif (path / "transfer.json").is_file() and transfer.get("checkpoint"):
        bits.append(f"transfer {transfer.get('parts', 'full')}")
    elif config.get("data", {}).get("sources"):
        bits.append("pretrain")
    else:
        bits.append("scratch")
    return ", ".join(b for b in bits if b)


def load_run(path: str | Path) -> dict[str, Any]:
    """A row from a run folder's ``results.json`` (written when a train/transfer/pretrain run finishes)."""
    path = Path(path)
    file = path / "results.json"
    if not file.is_file():
        raise PmmrecError(f"{path}: no results.json (is it a run folder, and did the run finish?)")
    try:
        results = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PmmrecError(f"{file}: not valid JSON ({e})") from None
    return make_row(describe_run(path), results, run=path)


def report_runs(runs: Sequence[str | Path], baseline: str | Path | None = None, out: str | Path | None = None,
                title: str = "pmmrec report") -> list[dict[str, Any]]:
    """Rows for ``runs`` with gains against ``baseline`` (a run folder among them or not; default: the first).

    With ``out``, also writes report.md / report.json / report.png there.
    """
    if not runs:
        raise PmmrecError("pmmrec report needs at least one run folder")
    rows = [load_run(run) for run in runs]
    reference = load_run(baseline) if baseline is not None else rows[0]
    add_gains(rows, reference)
    if out is not None:
        write_report(out, rows, title, intro=[f"Test split, full ranking. Gain: relative NDCG@10 "
                                              f"(exclude_history) against {reference['name']}."],
                     extra={"baseline": reference["run"]})
    return rows


# ---------------------------------------------------------------------------------------- pmmrec report --curve
def curve_points(runs: Sequence[str | Path], by: str = "kind") -> list[dict[str, Any]]:
    """One point per (variant, number of users) over ``runs``: the test NDCG@10 (and HR@10) averaged over the
    runs that share both, e.g. the seeds of one target size. The variant is :func:`run_kind` (``by="kind"``) or
    the run folder's name (``by="name"``, for studies that lay out SIZE-SEED/VARIANT folders); the users are the
    ``num_users`` its ``results.json`` records (the users of the domain it was trained or evaluated on)."""
    if by not in ("kind", "name"):
        raise ValueError(f"by must be kind or name, not {by!r}")
    import statistics

    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        row = load_run(run)
        path = Path(run)
        results = json.loads((path / "results.json").read_text(encoding="utf-8"))
        if "num_users" not in results:
            raise PmmrecError(f"{path / 'results.json'}: no num_users (results.json of an older pmmrec: evaluate or train the run again)")
        kind = (run_kind(path) if by == "kind" else "") or path.name
        groups.setdefault((kind, int(results["num_users"])), []).append(row)
    points = []
    for (kind, users), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        point: dict[str, Any] = {"variant": kind, "users": users, "runs": [r["run"] for r in rows]}
        for metric in METRICS:
            values = [r[metric] for r in rows]
            point[metric] = statistics.mean(values)
            point[f"{metric}/std"] = statistics.stdev(values) if len(values) > 1 else None
        points.append(point)
    return points


def format_curve(points: Sequence[dict[str, Any]], metric: str = "NDCG@10") -> str:
    """A Markdown table: a row per variant, a column per number of users, cells ``mean ± std (n)``."""
    sizes = sorted({p["users"] for p in points})
    variants = list(dict.fromkeys(p["variant"] for p in points))
    cell = {(p["variant"], p["users"]): p for p in points}
    lines = [f"| {metric} (test) | " + " | ".join(f"{n:,} users" for n in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for variant in variants:
        cells = []
        for n in sizes:
            p = cell.get((variant, n))
            if p is None:
                cells.append("")
                continue
            std = p[f"{metric}/std"]
            cells.append(f"{p[metric]:.4f}" + (f" ± {std:.4f}" if std is not None else "") + f" ({len(p['runs'])})")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curve(points: Sequence[dict[str, Any]], path: str | Path, title: str, metric: str = "NDCG@10") -> None:
    """Test ``metric`` against the number of users (log scale), one line per variant, standard deviations as
    error bars; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for variant in dict.fromkeys(p["variant"] for p in points):
        line = sorted((p for p in points if p["variant"] == variant), key=lambda p: p["users"])
        ax.errorbar([p["users"] for p in line], [p[metric] for p in line],
                    yerr=[p[f"{metric}/std"] or 0.0 for p in line], marker="o", capsize=3, label=variant)
    ax.set_xscale("log")
    ax.set_xlabel("users in the target domain's training data")
    ax.set_ylabel(f"test {metric} (full ranking, exclude_history)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def report_curve(runs: Sequence[str | Path], out: str | Path | None = None, title: str = "pmmrec report --curve",
                 by: str = "kind") -> list[dict[str, Any]]:
    """:func:`curve_points` of ``runs``; with ``out``, also curve.md / curve.json / curve.png there."""
    if not runs:
        raise PmmrecError("pmmrec report --curve needs run folders")
    points = curve_points(runs, by)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        text = (f"# {title}\n\nTest split, full ranking, seen items excluded; mean ± std over the runs of a cell "
                f"(their number in brackets).\n\n{format_curve(points)}\n\n{format_curve(points, 'HR@10')}\n")
        atomic_write_text(out / "curve.md", text)
        atomic_write_text(out / "curve.json", json.dumps({"points": points}, indent=2) + "\n")
        plot_curve(points, out / "curve.png", title)
    return points
