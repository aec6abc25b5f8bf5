"""Fine-tuning validates its starting point first ("epoch 0", step 0), a candidate best like any evaluation, so a
transfer never ends below the pretrained model on validation (docs/design.md §6). Scratch runs do not."""

import json
from pathlib import Path

import pytest

from pmmrec.config import load_config
from pmmrec.evaluation.checkpoint import evaluate_checkpoint
from pmmrec.runtime.checkpoint import load_checkpoint
from pmmrec.training import train, transfer
from pmmrec.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
# lr 1e6: the first AdamW steps move every weight by ~1e6, the loss turns NaN and every score with it, so each
# evaluation after step 0 ranks every target last (NDCG 0).
DIVERGE = ("train.lr=1e6", "train.encoder_lr=1e6", "train.warmup_steps=0")


@pytest.fixture(scope="module")
def pretrained(quick_world, tmp_path_factory) -> Path:
    """A checkpoint from one optimiser step on books: a start that fine-tuning on the target can improve on."""
    run = tmp_path_factory.mktemp("source") / "run"
    train(load_config(TINY, [f"data.domain={quick_world / 'books'}", f"run.dir={run}", "train.max_steps=1"]))
    return run / "checkpoints" / "best.pt"


def _transfer(pretrained, world, run, *overrides, resume=False):
    return transfer(str(pretrained), str(TINY), [f"data.domain={world / 'target'}", f"run.dir={run}", *overrides],
                    resume=resume)


def _lines(run: Path, timed: bool = True) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return lines if timed else [{k: v for k, v in x.items() if k != "time"} for x in lines]


def _ndcg(metrics: dict) -> float:
    return metrics["exclude_history"]["NDCG@10"]


def test_a_transfer_that_only_gets_worse_ends_at_the_pretrained_model(pretrained, quick_world, tmp_path):
    run = tmp_path / "run"
    results = _transfer(pretrained, quick_world, run, "train.epochs=2", *DIVERGE)
    lines = _lines(run)
    assert [(x["step"], x["epoch"]) for x in lines] == [(0, 0), (6, 1), (12, 2)]
    start = lines[0]
    assert start["train_loss"] is None and start["train_terms"] == {}
    assert _ndcg(start["valid"]) > 0 and all(_ndcg(x["valid"]) < _ndcg(start["valid"]) for x in lines[1:])
    assert results["best_step"] == 0 and results["steps"] == 12
    assert load_checkpoint(run / "checkpoints" / "best.pt")["trainer_state"]["update"] == 0
    # The result is the pretrained model itself, evaluated on the target with no trainer involved.
    direct = evaluate_checkpoint(str(pretrained), [f"data.domain={quick_world / 'target'}",
                                                   f"run.dir={tmp_path / 'direct'}"])
    assert results["valid"] == direct["valid"] == start["valid"]
    assert results["test"] == direct["test"]


def test_the_start_counts_for_patience_under_eval_every(pretrained, quick_world, tmp_path):
    # Patience 1: the first evaluation after step 0 does not beat the start, so training stops there.
    results = _transfer(pretrained, quick_world, tmp_path / "run", "train.eval_every=2", "train.max_steps=10",
                        "train.patience=1", *DIVERGE)
    assert [x["step"] for x in _lines(tmp_path / "run")] == [0, 2]
    assert results["steps"] == 2 and results["best_step"] == 0


def test_a_transfer_that_learns_goes_past_its_start(pretrained, quick_world, tmp_path):
    results = _transfer(pretrained, quick_world, tmp_path / "run", "train.epochs=2")
    lines = _lines(tmp_path / "run")
    assert [x["step"] for x in lines] == [0, 6, 12]
    assert results["best_step"] > 0
    assert _ndcg(results["valid"]) == max(_ndcg(x["valid"]) for x in lines) > _ndcg(lines[0]["valid"])


def test_training_from_scratch_does_not_evaluate_its_start(quick_world, tmp_path):
    results = train(load_config(TINY, [f"data.domain={quick_world / 'target'}", f"run.dir={tmp_path / 'run'}",
                                       "train.epochs=2"]))
    assert [(x["step"], x["epoch"]) for x in _lines(tmp_path / "run")] == [(6, 1), (12, 2)]
    assert results["best_step"] > 0


class Killed(Exception):
    """Stands for the process dying at that point (nothing after it runs)."""


@pytest.mark.parametrize("where", ["first_step", "first_checkpoint"])
def test_a_transfer_killed_around_its_start_resumes_to_the_same_result(pretrained, quick_world, tmp_path,
                                                                        monkeypatch, where):
    """first_step: killed after the step-0 evaluation and its checkpoints, before training; the resumed run does
    not evaluate step 0 again. first_checkpoint: killed after the step-0 line was logged but before any checkpoint
    was written; the resumed run starts over and logs step 0 once."""
    overrides = ("train.epochs=2", "train.checkpoint_every=3")
    full = _transfer(pretrained, quick_world, tmp_path / "full", *overrides)
    run = tmp_path / "run"
    name = {"first_step": "train_step", "first_checkpoint": "save"}[where]

    def die(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, name, die)
        with pytest.raises(Killed):
            _transfer(pretrained, quick_world, run, *overrides)
    assert [x["step"] for x in _lines(run)] == [0]
    saved = [load_checkpoint(run / "checkpoints" / f)["trainer_state"]["update"] for f in ("best.pt", "last.pt")
             if (run / "checkpoints" / f).is_file()]
    assert saved == ([0, 0] if where == "first_step" else [])

    evaluated = []  # the step of each evaluation of the resumed run
    evaluate = Trainer._evaluate_and_check

    def counting(self):
        evaluated.append(self.update)
        return evaluate(self)

    monkeypatch.setattr(Trainer, "_evaluate_and_check", counting)
    resumed = _transfer(pretrained, quick_world, run, *overrides, resume=True)
    assert evaluated == ([6, 12] if where == "first_step" else [0, 6, 12])
    for results in (resumed, full):
        results.pop("eval_seconds")
    assert resumed == full
    assert _lines(run, timed=False) == _lines(tmp_path / "full", timed=False)
