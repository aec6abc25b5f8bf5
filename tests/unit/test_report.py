"""Comparison reports (pmmrec.report): rows, gains, the Markdown table, the plot, and `pmmrec report` errors."""

import json

import pytest

from pmmrec.cli import main
from pmmrec.errors import PmmrecError
from pmmrec.report import add_gains, format_table, load_run, make_row, report_curve, report_runs


def _results(hr: float, ndcg: float) -> dict:
    metrics = {"HR@5": hr / 2, "HR@10": hr, "NDCG@10": ndcg}
    return {"valid": {"exclude_history": metrics, "include_history": metrics},
            "test": {"exclude_history": metrics, "include_history": {"HR@10": hr / 2, "NDCG@10": ndcg / 2}}}


def _run(folder, hr, ndcg, config: str | None = None):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(_results(hr, ndcg)))
    if config:
        (folder / "config.yaml").write_text(config)
    return folder


def test_rows_read_the_test_split_and_gains_are_relative_ndcg():
    rows = [make_row("a", _results(0.4, 0.20)), make_row("b", _results(0.5, 0.25)), make_row("c", _results(0.1, 0))]
    add_gains(rows, rows[0])
    assert [r["gain_vs_scratch"] for r in rows] == [0.0, pytest.approx(0.25), pytest.approx(-1.0)]
    assert rows[1]["HR@10"] == 0.5 and rows[1]["NDCG@10/include_history"] == 0.125
    add_gains(rows, rows[2])  # a reference scoring 0: no gain can be stated
    assert all(r["gain_vs_scratch"] is None for r in rows)


def test_table_lists_groups_once_and_formats_gains():
    rows = [make_row("scratch", _results(0.4, 0.2), seconds=12.3, group="main"),
            make_row("transfer", _results(0.5, 0.25), group="main"),
            make_row("ablation rec", _results(0.45, 0.21), group="ablation")]
    add_gains(rows, rows[0])
    table = format_table(rows).splitlines()
    assert table[2] == "| **main** | | | | | | |" and sum("**" in line for line in table) == 2
    assert "| transfer | 0.5000 | 0.2500 | 0.2500 | 0.1250 | +25.0% |  |" in table
    assert table[3].endswith("| +0.0% | 12s |")


def test_missing_metric_or_split_is_a_clear_error(tmp_path):
    with pytest.raises(PmmrecError, match="no test split"):
        make_row("x", {"valid": {}})
    with pytest.raises(PmmrecError, match="lack test/exclude_history/NDCG@10"):
        make_row("x", {"test": {"exclude_history": {"HR@10": 1}, "include_history": {}}})
    with pytest.raises(PmmrecError, match="no results.json"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text("{broken")
    with pytest.raises(PmmrecError, match="not valid JSON"):
        load_run(tmp_path)


def test_report_runs_writes_table_json_and_png(tmp_path):
    a = _run(tmp_path / "scratch", 0.4, 0.2, "model: {modality: multimodal}\ndata: {domain: d}\n")
    b = _run(tmp_path / "tr", 0.5, 0.3, "model: {modality: text}\ntransfer: {checkpoint: x.pt, parts: full}\n")
    (b / "transfer.json").write_text("{}")
    c = _run(tmp_path / "ids", 0.2, 0.1, "model: {item_tower: id}\n")
    rows = report_runs([b, c], baseline=a, out=tmp_path / "out")
    assert [r["name"] for r in rows] == ["tr (text, transfer full)", "ids (IDs, scratch)"]
    assert rows[0]["gain_vs_scratch"] == pytest.approx(0.5)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["baseline"] == str(a) and len(saved["rows"]) == 2
    assert "tr (text, transfer full)" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_command_prints_the_table_and_fails_cleanly(tmp_path, capsys):
    a, b = _run(tmp_path / "a", 0.4, 0.2), _run(tmp_path / "b", 0.3, 0.1)
    assert main(["report", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "| a | 0.4000 | 0.2000 |" in out and "-50.0%" in out
    assert main(["report", str(a), str(tmp_path / "nope")]) == 2
    assert "no results.json" in capsys.readouterr().err


def _sized_run(folder, ndcg, users, config, zero_shot=False):
    _run(folder, 2 * ndcg, ndcg, config)
    results = json.loads((folder / "results.json").read_text())
    results["num_users"] = users
    if zero_shot:
        results["evaluated"] = {"checkpoint": "pre.pt", "zero_shot": True}
    (folder / "results.json").write_text(json.dumps(results))
    if "transfer:" in config:
        (folder / "transfer.json").write_text("{}")
    return folder


def test_curve_averages_seeds_per_kind_and_size_and_draws_one_line_per_kind(tmp_path):
    scratch = "model: {modality: multimodal}\ndata: {domain: d}\n"
    full = "model: {modality: multimodal}\ntransfer: {checkpoint: pre.pt, parts: full}\n"
    runs = [_sized_run(tmp_path / "s100-0", 0.10, 100, scratch), _sized_run(tmp_path / "s100-1", 0.20, 100, scratch),
            _sized_run(tmp_path / "s1000", 0.30, 1000, scratch), _sized_run(tmp_path / "t100", 0.25, 100, full),
            _sized_run(tmp_path / "z", 0.05, 1000, scratch, zero_shot=True)]
    assert main(["report", "--curve", *map(str, runs), "--out", str(tmp_path / "out")]) == 0
    points = json.loads((tmp_path / "out" / "curve.json").read_text())["points"]
    by = {(p["variant"], p["users"]): p for p in points}
    assert set(by) == {("multimodal, scratch", 100), ("multimodal, scratch", 1000),
                       ("multimodal, transfer full", 100), ("multimodal, zero-shot", 1000)}
    assert by["multimodal, scratch", 100]["NDCG@10"] == pytest.approx(0.15)
    assert by["multimodal, scratch", 100]["NDCG@10/std"] == pytest.approx(0.0707, abs=1e-4)
    assert by["multimodal, scratch", 1000]["NDCG@10/std"] is None
    table = (tmp_path / "out" / "curve.md").read_text()
    assert "| NDCG@10 (test) | 100 users | 1,000 users |" in table
    assert "| multimodal, scratch | 0.1500 ± 0.0707 (2) | 0.3000 (1) |" in table
    assert "| multimodal, zero-shot |  | 0.0500 (1) |" in table
    assert (tmp_path / "out" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    by_name = {(p["variant"], p["users"]) for p in report_curve(runs, by="name")}
    assert ("s100-0", 100) in by_name and len(by_name) == 5


def test_curve_needs_the_users_of_each_run(tmp_path):
    run = _run(tmp_path / "old", 0.4, 0.2, "model: {modality: text}\n")
    with pytest.raises(PmmrecError, match="no num_users"):
        main(["report", "--curve", str(run), "--debug"])
