"""Crash safety: `pmmrec train` / `pretrain` / `transfer` killed with SIGKILL at seeded points, resumed, same final result.

Each kill is a real SIGKILL of the training process (no handler, no cleanup runs). To land it at chosen
places (between checkpoints, halfway through a checkpoint file's bytes, inside an evaluation) the process is
started through a small driver that wraps one pmmrec function and kills itself there; everything else is
the ordinary CLI. After the kills a checkpoint is also corrupted on disk (truncated, or one byte flipped):
resume must name the bad file and fall back to the previous good one. The final results.json and
metrics.jsonl must equal an uninterrupted run's (CPU, ``train.deterministic=true``).
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from pmmrec.runtime.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# argv: KIND N pmmrec-args...  KIND step: after optimiser update N; write: halfway through the N-th checkpoint
# file this process writes; eval: inside its N-th validation.
DRIVER = r"""
import contextlib, os, signal, sys
from pmmrec.evaluation import evaluator
from pmmrec.runtime import checkpoint
from pmmrec.training import trainer
kind, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if kind == "step":
    step = trainer.Trainer.train_step
    def killing_step(self, batch, update=True):
        out = step(self, batch, update)
        if update and self.update == n:
            die()
        return out
    trainer.Trainer.train_step = killing_step
elif kind == "write":
    real, count = checkpoint.atomic_file, [0]
    class Torn:
        def __init__(self, f):
            self.f = f
        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            die()
    @contextlib.contextmanager
    def torn(path, mode="w", encoding="utf-8"):
        with real(path, mode, encoding) as f:
            count[0] += 1
            yield Torn(f) if count[0] == n else f
    checkpoint.atomic_file = torn
elif kind == "eval":
    evaluate, count = evaluator.SplitEvaluator.evaluate, [0]
    def killing_evaluate(self, *args, **kwargs):
        count[0] += 1
        if count[0] == n:
            die()
        return evaluate(self, *args, **kwargs)
    evaluator.SplitEvaluator.evaluate = killing_evaluate
from pmmrec.cli import main
sys.exit(main(argv))
"""


def _run(args, kill=None):
    cmd = [sys.executable, "-m", "pmmrec", *args] if kill is None else \
        [sys.executable, "-c", DRIVER, kill[0], str(kill[1]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


def _outcome(run: Path) -> tuple[dict, list[dict]]:
    results = json.loads((run / "results.json").read_text())
    results.pop("eval_seconds")  # wall time
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("time")
    return results, lines


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":  # what a torn, non-atomic write would leave
        data = data[: len(data) // 2]
    else:  # bit rot
        data[len(data) // 3] ^= 0x40
    path.write_bytes(bytes(data))


def _kill_resume_compare(args: list[str], run: Path, kills: list[tuple[str, int]], corrupt: str) -> int:
    """Uninterrupted run, then the same run under ``kills`` (each resumed), then a corrupted last.pt."""
    full = _run([*args, f"run.dir={run.parent / 'full'}"])
    assert full.returncode == 0, full.stderr
    expected = _outcome(run.parent / "full")
    args = [*args, f"run.dir={run}"]
    for i, kill in enumerate(kills):
        killed = _run([*args, *(["--resume"] if i else [])], kill)
        assert killed.returncode == -9, f"{kill} never happened: {killed.stderr[-2000:]}"
        assert not (run / "results.json").exists()
        ckpts = run / "checkpoints"
        if kill[0] == "write":  # the half-written file is the hidden temporary; every visible checkpoint loads
            assert list(ckpts.glob(".*.tmp")), "the kill did not land inside a checkpoint write"
        for name in ("last.pt", "last.prev.pt", "best.pt"):
            if (ckpts / name).is_file():
                load_checkpoint(ckpts / name)
    last = run / "checkpoints" / "last.pt"
    assert last.is_file() and (run / "checkpoints" / "last.prev.pt").is_file()
    step = load_checkpoint(last)["trainer_state"]["update"]
    _corrupt(last, corrupt)
    resumed = _run([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"{last}: " in resumed.stderr and "falling back to an earlier checkpoint" in resumed.stderr
    assert not list((run / "checkpoints").glob(".*.tmp"))  # the torn temporary was cleared
    assert _outcome(run) == expected
    return step


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_result(quick_world, tmp_path):
    rng = random.Random(8)  # the kill points; 12 updates, checkpoints every 3, evaluations every 4 (epoch ends)
    kills = [("step", rng.randint(2, 5)), ("write", rng.randint(1, 3)), ("eval", 1), ("step", rng.randint(9, 10))]
    args = ["train", "-c", str(TINY), f"data.domain={quick_world / 'target'}", "train.epochs=3",
            "train.batch_size=16", "train.checkpoint_every=3", "model.fusion=sum"]
    step = _kill_resume_compare(args, tmp_path / "run", kills, "truncate")
    assert step < 12


@pytest.mark.slow
def test_killed_pretraining_resumes_to_the_same_result(quick_world, tmp_path):
    rng = random.Random(9)
    kills = [("write", rng.randint(1, 2)), ("step", rng.randint(4, 6))]
    sources = ", ".join(str(quick_world / s) for s in ("books", "films"))
    args = ["pretrain", "-c", str(TINY), f"data.sources=[{sources}]", "objectives.use=[rec, nicl, nid, rcl]",
            "train.batch_size=16", "train.max_steps=9", "train.eval_every=4", "train.checkpoint_every=2",
            "model.fusion=sum"]
    _kill_resume_compare(args, tmp_path / "run", kills, "flip")



@pytest.mark.slow
def test_killed_transfer_resumes_to_the_same_result(quick_world, tmp_path):
    """Around the validation of the starting point (step 0): killed halfway through its best.pt (the step-0 line
    is logged, no checkpoint is complete: the resumed run starts over and logs it once), then halfway through its
    last.pt (best.pt at step 0 is the resume point: step 0 is not evaluated again), then during training."""
    from pmmrec.cli import main

    source = tmp_path / "source"
    assert main(["train", "-c", str(TINY), f"data.domain={quick_world / 'books'}", f"run.dir={source}",
                 "train.max_steps=1", "model.fusion=sum"]) == 0
    kills = [("write", 1), ("write", 2), ("step", random.Random(10).randint(7, 10))]
    args = ["transfer", "--from", str(source / "checkpoints" / "best.pt"), "-c", str(TINY),
            f"data.domain={quick_world / 'target'}", "train.epochs=2", "train.batch_size=16",
            "train.checkpoint_every=3", "model.fusion=sum"]
    _kill_resume_compare(args, tmp_path / "run", kills, "flip")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 6, 12]
