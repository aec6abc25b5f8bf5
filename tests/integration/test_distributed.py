"""Data-parallel training under torchrun: 2 CPU processes (gloo) against 1 process (docs/design.md §6).

The tiny recipe is made RNG-free so that two processes can equal one: ``model.dropout=0`` and a frozen text
encoder (the tiny BERT's own dropout would otherwise draw different masks in 1 and 2 processes; the tiny ViT has
none). ``data.min_seq_len=7`` leaves 43 users, so with one window per user (``train.windows=last``) and a global
batch of 14 the epoch's last batch holds one user: rank 1's slice is empty and it trains the all-padding window. Evaluation runs in chunks of 8 users and 8
items, so both are dealt to the ranks in several pieces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pmmrec.cli import main
from pmmrec.config import load_config
from pmmrec.runtime.checkpoint import load_checkpoint
from pmmrec.training.api import build_trainer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
STEPS = 4  # 43 users / 14 = 4 batches: one epoch, the last batch a single user


def _overrides(world: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.domain={world / 'target'}", f"run.dir={run_dir}", "data.min_seq_len=7", "train.batch_size=14",
            "model.dropout=0", "text.trainable_layers=0", f"train.max_steps={STEPS}", "train.eval_every=1",
            "train.patience=100", "eval.batch_size=8", "train.windows=last", *extra]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _train_2(world: Path, run_dir: Path, *extra: str) -> None:
    _torchrun("-m", "pmmrec", "train", "-c", str(TINY), *_overrides(world, run_dir, *extra))


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(quick_world, tmp_path_factory) -> dict[str, Path]:
    """The same 4 steps in one process and in two (trained once for the whole module)."""
    root = tmp_path_factory.mktemp("ddp")
    assert main(["train", "-c", str(TINY), *_overrides(quick_world, root / "one")]) == 0
    _train_2(quick_world, root / "two")
    return {"one": root / "one", "two": root / "two", "root": root}


def test_two_processes_train_like_one_with_the_whole_batch(runs):
    one, two = _lines(runs["one"]), _lines(runs["two"])
    assert [x["step"] for x in two] == list(range(1, STEPS + 1)), "rank 0 alone writes metrics.jsonl"
    for a, b in zip(one, two, strict=True):
        # The logged loss is the epoch's running mean: equal at every step to float rounding (measured ~1e-7).
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        for protocol in ("exclude_history", "include_history"):
            assert b["valid"][protocol] == pytest.approx(a["valid"][protocol], abs=1e-6)
    expected = json.loads((runs["one"] / "results.json").read_text())
    got = json.loads((runs["two"] / "results.json").read_text())
    for split in ("valid", "test"):
        for protocol in ("exclude_history", "include_history"):
            assert got[split][protocol] == pytest.approx(expected[split][protocol], abs=1e-6)
    assert got["steps"] == expected["steps"] == STEPS


PROBE = """
import sys
import torch
from pmmrec.config import load_config
from pmmrec.runtime import distributed
from pmmrec.training.api import build_trainer, fit

tiny, out, *overrides = sys.argv[1:]
trainer = build_trainer(load_config(tiny, overrides))
grads = {}
for gather in (True, False):
    trainer.objective.gather_negatives = gather
    for i, batch in enumerate(trainer.batches.epoch(0, 0)):
        trainer.optimizer.zero_grad(set_to_none=True)
        loss, _ = trainer.loss(batch.to(trainer.device))
        loss.backward()
        grads[f"{gather}/{i}"] = {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                  if p.grad is not None}
if distributed.is_main():
    torch.save(grads, out)
distributed.cleanup()
"""


def test_the_gradient_of_two_processes_is_the_gradient_of_the_whole_batch(quick_world, tmp_path):
    """DDP's averaged gradient equals one process's gradient of the mean over the global batch, batch by batch
    (the losses alone could not show it: AdamW does not see the gradient's scale)."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    _torchrun(str(script), str(TINY), str(tmp_path / "two.pt"), *_overrides(quick_world, tmp_path / "probe"))
    two = torch.load(tmp_path / "two.pt", weights_only=True)

    trainer = build_trainer(load_config(TINY, _overrides(quick_world, tmp_path / "probe1")))
    batches = list(trainer.batches.epoch(0, 0))
    assert len(batches) == STEPS and len(batches[-1].items) == 1
    for i, batch in enumerate(batches):
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.loss(batch)[0].backward()
        one = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
        gathered, local = two[f"True/{i}"], two[f"False/{i}"]
        assert set(gathered) == set(one) and len(one) > 20
        for name, grad in one.items():
            scale = float(grad.abs().max()) + 1e-12
            assert float((gathered[name] - grad).abs().max()) <= 1e-4 * scale + 1e-7, (i, name)
        if i < STEPS - 1:
            # Per-rank negatives (gather_negatives=false) is another objective: its gradient differs.
            worst = max(float((local[n] - g).abs().max()) / (float(g.abs().max()) + 1e-12) for n, g in one.items())
            assert worst > 1e-2


def test_two_processes_evaluate_exactly_like_one(runs, capsys):
    best = runs["one"] / "checkpoints" / "best.pt"
    assert main(["evaluate", "--checkpoint", str(best), "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    printed = _torchrun("-m", "pmmrec", "evaluate", "--checkpoint", str(best), "--json").stdout
    assert json.loads(printed) == expected  # rank 0 alone prints; every metric bit-identical


def test_two_processes_resume_exactly(runs, quick_world):
    """Stop after 2 steps, resume to 4 under 2 processes: the same weights and metrics as the uninterrupted run."""
    run = runs["root"] / "resumed"
    _train_2(quick_world, run, "train.max_steps=2")
    assert load_checkpoint(run / "checkpoints" / "last.pt")["trainer_state"]["update"] == 2
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert len(state["rng_ranks"]) == 2 and not torch.equal(state["rng_ranks"][0]["torch"],
                                                            state["rng_ranks"][1]["torch"])
    _train_2(quick_world, run, "--resume")
    expected = json.loads((runs["two"] / "results.json").read_text())
    got = json.loads((run / "results.json").read_text())
    for key in ("valid", "test", "steps", "best_step"):
        assert got[key] == expected[key]
    assert [x["valid"] for x in _lines(run)] == [x["valid"] for x in _lines(runs["two"])]
    uninterrupted = load_checkpoint(runs["two"] / "checkpoints" / "last.pt")["model"]
    resumed = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(resumed[k], v) for k, v in uninterrupted.items())


def test_two_processes_transfer_from_step_0_like_one(runs, quick_world):
    """A transfer validates its starting point (step 0) before training, sharded like every evaluation: rank 0
    logs it once, and 2 processes end where 1 does."""
    source = str(runs["one"] / "checkpoints" / "best.pt")
    one, two = runs["root"] / "transfer-one", runs["root"] / "transfer-two"
    assert main(["transfer", "--from", source, "-c", str(TINY), *_overrides(quick_world, one)]) == 0
    _torchrun("-m", "pmmrec", "transfer", "--from", source, "-c", str(TINY), *_overrides(quick_world, two))
    assert [x["step"] for x in _lines(two)] == list(range(STEPS + 1))
    for a, b in zip(_lines(one), _lines(two), strict=True):
        for protocol in ("exclude_history", "include_history"):
            assert b["valid"][protocol] == pytest.approx(a["valid"][protocol], abs=1e-6)
    assert _lines(two)[0]["valid"] == _lines(one)[0]["valid"]  # the same weights, evaluated bit for bit alike
    expected, got = (json.loads((run / "results.json").read_text()) for run in (one, two))
    assert got["best_step"] == expected["best_step"] and got["steps"] == expected["steps"] == STEPS


def test_a_batch_that_does_not_split_over_the_processes_is_refused(quick_world, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "pmmrec",
           "train", "-c", str(TINY), *_overrides(quick_world, tmp_path / "odd", "train.batch_size=15")]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300, cwd=REPO)
    assert done.returncode != 0
    assert "train.batch_size=15 (the global batch) does not split over the 2 processes" in done.stderr


@pytest.mark.parametrize("negatives", ["catalogue", "sampled"])
def test_catalogue_wide_losses_are_the_same_in_two_processes(quick_world, tmp_path, negatives):
    """objectives.rec.negatives=catalogue|sampled, whole-history windows: 2 processes log the losses of one."""
    extra = ["train.windows=all", f"objectives.rec.negatives={negatives}", "objectives.rec.num_negatives=50",
             "objectives.rec.sampling=popularity", "train.max_steps=3"]
    assert main(["train", "-c", str(TINY), *_overrides(quick_world, tmp_path / "one", *extra)]) == 0
    _train_2(quick_world, tmp_path / "two", *extra)
    one, two = _lines(tmp_path / "one"), _lines(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["valid"]["exclude_history"] == pytest.approx(a["valid"]["exclude_history"], abs=1e-6)
