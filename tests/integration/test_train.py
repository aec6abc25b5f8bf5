"""`pmmrec train` end to end on the quick built-in world with tiny encoders."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pmmrec.cli import main
from pmmrec.config import load_config
from pmmrec.errors import PmmrecError
from pmmrec.runtime.checkpoint import load_checkpoint
from pmmrec.training import trainer as trainer_module
from pmmrec.training.api import build_trainer, fit
from pmmrec.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def _config(world, run_dir, *overrides):
    return load_config(TINY, [f"data.domain={world / 'target'}", f"run.dir={run_dir}", *overrides])


@pytest.mark.parametrize("overrides", [
    ["model.fusion=merged_attention"], ["model.fusion=co_attention"], ["model.fusion=sum"],
    ["model.fusion=concat"], ["model.fusion=film"], ["model.fusion=gated"],
    ["model.user_encoder=nextitnet"], ["model.user_encoder=gru4rec"],
    ["model.modality=text"], ["model.modality=vision"], ["model.item_tower=id"], ["model.item_tower=content+id"],
], ids=lambda o: o[0].split(".")[-1])
def test_every_variant_trains_and_learns(quick_world, tmp_path, overrides):
    config = _config(quick_world, tmp_path / "run", "train.max_steps=3", "train.epochs=5", *overrides)
    trainer = build_trainer(config)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    results = trainer.fit()
    changed = [k for k, v in trainer.model.state_dict().items() if v.dtype.is_floating_point
               and not torch.equal(v, before[k])]
    assert changed, "no parameter changed"
    assert results["steps"] == 3
    for split in ("valid", "test"):
        for protocol in ("exclude_history", "include_history"):
            metrics = results[split][protocol]
            assert set(metrics) >= {"HR@10", "NDCG@10", "MRR@10"} and 0.0 <= metrics["NDCG@10"] <= 1.0
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["test"] == results["test"]
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "checkpoints" / "best.pt").is_file()


@pytest.mark.slow
def test_loss_goes_down_and_beats_chance(quick_world, tmp_path):
    config = load_config(TINY, [f"data.domain={quick_world / 'books'}", f"run.dir={tmp_path / 'run'}",
                                "train.epochs=40", "train.patience=40", "model.fusion=sum", "train.lr=3e-3",
                                "train.encoder_lr=3e-3"])
    results = fit(config)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 40 and lines[-1]["train_loss"] < lines[0]["train_loss"] - 0.5
    # 96 items: a random ranking gets HR@10 ~ 0.1; following the concept chain gets far more.
    assert results["test"]["exclude_history"]["HR@10"] > 0.2  # measured 0.29 (seed 42)


def test_evaluate_cli_reproduces_results(quick_world, tmp_path, capsys):
    config = _config(quick_world, tmp_path / "run", "train.max_steps=4")
    results = fit(config)
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    assert main(["evaluate", "--checkpoint", str(best), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for protocol in ("exclude_history", "include_history"):
        assert printed["test"][protocol] == pytest.approx(results["test"][protocol], abs=1e-9)
    state = load_checkpoint(best)
    assert state["config"]["run"]["dir"] == str(tmp_path / "run") and len(state["item_ids"]) == 96


def _train_cmd(world, run_dir, *extra):
    return [sys.executable, "-m", "pmmrec", "train", "-c", str(TINY), f"data.domain={world / 'target'}",
            f"run.dir={run_dir}", "train.epochs=3", "train.batch_size=8", "train.checkpoint_every=1",
            "model.fusion=merged_attention", *extra]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(quick_world, tmp_path):
    """SIGKILL mid-epoch, `--resume`, and the final metrics equal an uninterrupted run's (CPU, deterministic)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run(_train_cmd(quick_world, tmp_path / "full"), capture_output=True, text=True, env=env,
                          timeout=600)
    assert full.returncode == 0, full.stderr
    expected = json.loads((tmp_path / "full" / "results.json").read_text())

    run = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(quick_world, run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    last = run / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last.is_file() and load_checkpoint(last)["trainer_state"]["update"] >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted_at = load_checkpoint(last)["trainer_state"]
    assert interrupted_at["update"] < expected["steps"] and not (run / "results.json").exists()

    resumed = subprocess.run(_train_cmd(quick_world, run, "--resume"), capture_output=True, text=True, env=env,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads((run / "results.json").read_text())
    for key in ("valid", "test"):
        assert got[key] == expected[key]
    assert got["steps"] == expected["steps"]


def test_a_finished_run_is_not_overwritten_without_resume(quick_world, tmp_path, capsys):
    args = ["train", "-c", str(TINY), f"data.domain={quick_world / 'target'}", f"run.dir={tmp_path / 'run'}",
            "train.max_steps=1"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err


def test_early_stopping_and_gradient_accumulation(quick_world, tmp_path):
    # lr 0: validation never improves after the first evaluation, so patience 2 stops after 3 evaluations.
    config = _config(quick_world, tmp_path / "stop", "train.epochs=20", "train.patience=2", "train.lr=0",
                     "train.encoder_lr=0", "model.fusion=sum", "train.windows=last")
    results = fit(config)
    assert results["epochs"] == 3 and results["best_step"] == 4
    # 60 users (one window each), batch 16 -> 4 batches an epoch; accumulating 2 makes 2 optimiser steps an epoch.
    config = _config(quick_world, tmp_path / "accum", "train.epochs=2", "train.grad_accum=2", "model.fusion=sum",
                     "train.windows=last")
    assert fit(config)["steps"] == 4


def test_logq_switch_changes_the_loss(tmp_path, tiny_domain):
    common = [f"data.domain={tiny_domain}", "train.max_steps=1", "model.modality=text"]
    with_q = build_trainer(load_config(TINY, [*common, f"run.dir={tmp_path / 'a'}"]))
    without = build_trainer(load_config(TINY, [*common, f"run.dir={tmp_path / 'b'}", "objectives.logq=false"]))
    assert with_q.objective.log_pop is not None and without.objective.log_pop is None
    batch = next(iter(with_q.batches.epoch(0, 0)))
    a, _ = with_q.loss(batch)
    b, _ = without.loss(batch)
    assert not torch.isclose(a, b)


def test_resume_refuses_other_settings_and_accepts_a_longer_run(quick_world, tmp_path, capsys):
    """--resume compares the saved config with the resumed one: what defines the run must be equal (the error
    lists every difference); how long to go on may change."""
    run = tmp_path / "run"
    args = ["train", "-c", str(TINY), f"data.domain={quick_world / 'target'}", f"run.dir={run}", "train.max_steps=1"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "model.dropout=0.3", "train.lr=0.01", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume: the run was started with other settings" in err
    assert "model.dropout: 0.1 (saved), now 0.3" in err and "train.lr: 0.001 (saved), now 0.01" in err
    assert main([*args[:-1], "train.max_steps=2", "--resume"]) == 0
    assert json.loads((run / "results.json").read_text())["steps"] == 2


def test_a_run_killed_before_its_first_checkpoint_logs_each_evaluation_once(quick_world, tmp_path, monkeypatch):
    """Killed after logging its first evaluation but before that evaluation's checkpoint was complete, a run
    resumes from the beginning and evaluates again: metrics.jsonl must not keep the killed process's line."""
    class Killed(Exception):
        pass

    def die(self, best=False):
        raise Killed

    config = _config(quick_world, tmp_path / "run", "train.max_steps=2", "train.eval_every=1", "model.fusion=sum")
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "save", die)
        with pytest.raises(Killed):
            fit(config)
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1]
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    fit(config, resume=True)
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2]


def test_a_run_killed_between_the_checkpoints_of_an_evaluation_logs_it_once(quick_world, tmp_path, monkeypatch):
    """Killed after an epoch's evaluation wrote best.pt and before its last.pt, a run resumes from best.pt: no
    checkpoint of the same step from before that evaluation (train.checkpoint_every falls on the epoch's end) may
    win the tie and make the resumed run evaluate and log the step again."""
    class Killed(Exception):
        pass

    real = trainer_module.save_checkpoint

    def dying(path, state, keep_previous=False):
        if path.name == "last.pt" and state["trainer_state"]["epoch"] == 1:  # after epoch 1's evaluation (step 6)
            raise Killed
        real(path, state, keep_previous)

    config = _config(quick_world, tmp_path / "run", "train.epochs=2", "train.checkpoint_every=3", "model.fusion=sum")
    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "save_checkpoint", dying)
        with pytest.raises(Killed):
            fit(config)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["trainer_state"]["update"] == 6
    fit(config, resume=True)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [6, 12]


def test_baselines_run_from_the_command_line_and_report_beside_models(quick_world, tmp_path, capsys):
    domain = f"data.domain={quick_world / 'target'}"
    assert main(["baseline", "pop", "-c", str(TINY), domain, f"run.dir={tmp_path / 'pop'}"]) == 0
    pop = json.loads((tmp_path / "pop" / "results.json").read_text())
    assert pop["baseline"] == "most popular" and pop["num_items"] == 96 and pop["data"]["history"] == "all"
    assert 0 < pop["test"]["exclude_history"]["NDCG@10"] < 1
    assert main(["baseline", "pop", "-c", str(TINY), domain, f"run.dir={tmp_path / 'pop'}"]) == 2  # not over a run
    # counts_from: another domain's training counts, matched by item id (the same domain gives the same ranking)
    from pmmrec.evaluation.baselines import run_most_popular

    same = run_most_popular(load_config(TINY, [domain, f"run.dir={tmp_path / 'pop-same'}"]),
                            counts_from=quick_world / "target")
    assert same["test"] == pop["test"] and same["valid"] == pop["valid"]
    assert same["baseline"] == f"most popular by the training counts of {quick_world / 'target'}"
    other = run_most_popular(load_config(TINY, [domain, f"run.dir={tmp_path / 'pop-other'}"]),
                             counts_from=quick_world / "books")
    assert other["test"] != pop["test"]  # no target item is in that domain: every count is 0
    assert main(["baseline", "sasrec", "-c", str(TINY), domain, f"run.dir={tmp_path / 'ids'}",
                 "train.max_steps=2"]) == 0
    assert yaml.safe_load((tmp_path / "ids" / "config.yaml").read_text())["model"]["item_tower"] == "id"
    capsys.readouterr()
    assert main(["report", str(tmp_path / "pop"), str(tmp_path / "ids"), "--baseline", str(tmp_path / "pop")]) == 0
    table = capsys.readouterr().out
    assert "pop (most popular)" in table and "ids (IDs, scratch)" in table


def test_real_data_options_bad_input(quick_world, tmp_path, tiny_domain, capsys):
    domain = f"data.domain={quick_world / 'target'}"
    # sampled negatives: more than the catalogue holds is a clear error, before any training.
    with pytest.raises(PmmrecError, match=r"objectives.rec.num_negatives=500 is larger than the catalogue \(96 items\)"):
        build_trainer(load_config(TINY, [domain, f"run.dir={tmp_path / 'k'}", "objectives.rec.negatives=sampled",
                                         "objectives.rec.num_negatives=500"]))
    # Unknown choices name the key and the choices.
    for key, value in (("data.history", "cut"), ("train.windows", "every"), ("objectives.rec.negatives", "full")):
        with pytest.raises(PmmrecError, match=f"'{key}' must be one of"):
            load_config(TINY, [f"{key}={value}"])
    # A domain too small for max_seq_len trains, left-padded.
    results = fit(load_config(TINY, [f"data.domain={tiny_domain}", f"run.dir={tmp_path / 'small'}",
                                     "data.max_seq_len=50", "data.missing_image=blank", "train.max_steps=2",
                                     "objectives.rec.negatives=catalogue"]))
    assert results["steps"] == 2 and results["data"] == {"history": "all", "windows": "all"}
    # Resuming with another history or windows mode is refused, naming both values.
    args = ["train", "-c", str(TINY), domain, f"run.dir={tmp_path / 'r'}", "train.max_steps=1"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "train.windows=last", "data.history=reference", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "train.windows: 'all' (saved), now 'last'" in err and "data.history: 'all' (saved), now 'reference'" in err
