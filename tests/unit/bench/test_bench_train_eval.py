"""`pmmrec bench train` and `pmmrec bench eval` in quick mode: the JSON contract of docs/design.md §15."""

import json
from types import SimpleNamespace


def test_bench_train_quick_writes_speedup_and_agreeing_losses(tmp_path):
    from pmmrec.bench import train

    out = tmp_path / "train.json"
    result = train.run(SimpleNamespace(out=str(out), quick=True))
    assert json.loads(out.read_text()) == result
    assert result["speedup"] > 0 and result["ratio_to_floor"] > 0
    assert result["first_loss"]["agree"], result["first_loss"]
    naive, fast = result["naive"], result["optimised"]
    # The naive path encodes every occurrence; the optimised one each distinct item once.
    assert naive["items_encoded_per_step"] >= naive["item_slots_per_step"] > fast["items_encoded_per_step"]
    assert naive["peak_rss_mb"] > 0 and fast["cache_build_s"] >= 0 and result["floor"]["step_s"] > 0


def test_bench_eval_quick_writes_ratio_to_floor(tmp_path):
    from pmmrec.bench import eval as bench_eval

    out = tmp_path / "eval.json"
    result = bench_eval.run(SimpleNamespace(out=str(out), quick=True))
    assert json.loads(out.read_text()) == result
    case = result["cases"][0]
    assert result["ratio_to_floor"] == case["ratio_to_floor"] > 0
    assert case["ours"]["users_per_s"] > 0 and case["floor"]["users_per_s"] > 0 and result["peak_rss_mb"] > 0
    # The floor is the faster of its two forms, and the ratio is taken against it.
    fastest = min(case["floor_whole"]["seconds"], case["floor_chunked"]["seconds"])
    assert case["floor"]["seconds"] == fastest and case["floor"]["form"] in ("floor_whole", "floor_chunked")
    assert case["ratio_to_floor"] == round(case["ours"]["seconds"] / fastest, 3)
    if result["device"] == "cpu":
        shortlist = case["recommend_shortlist"]
        assert shortlist["users_per_s"] > 0 and 0 <= shortlist["fallback_users"] <= case["users"]
