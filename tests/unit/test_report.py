"""Comparison reports (pmmrec.report): rows, gains, the Markdown table, the plot, and `pmmrec report` errors."""

import json

import pytest

from pmmrec.cli import main
from pmmrec.errors import PmmrecError
from pmmrec.report import add_gains, format_table, load_run, make_row, report_runs


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
