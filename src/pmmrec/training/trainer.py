"""The training loop: epochs of batches, the optimiser step, evaluation, early stopping, checkpoints and resume.

What the loop trains on comes from outside (:mod:`pmmrec.training.api` builds it): the model, the epoch's batches
(:class:`~pmmrec.data.loader.TrainBatches`), the evaluator (:class:`~pmmrec.evaluation.evaluator.SplitEvaluator`)
and the objective (:class:`~pmmrec.training.objective.TrainingObjective`). The loop itself is AdamW with per-group
learning rates and a per-step schedule, gradient accumulation and clipping, AMP on GPU, evaluation with full ranking,
early stopping on validation NDCG@10 (from step 0, the starting point, when fine-tuning a pretrained model), and
checkpoints that resume *exactly*: the epoch's order is derived from (seed, epoch), the position inside it is saved,
and so are every RNG state, the optimiser, the scheduler and the scaler, so an interrupted run ends with the metrics
of an uninterrupted one (docs/design.md §6, docs/reliability.md).

Under ``torchrun`` the objective is wrapped in DDP, ``train.batch_size`` is the *global* batch (each rank trains its
slice), only rank 0 writes the run folder, and every rank reads checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pmmrec.config import Config, config_differences
from pmmrec.data.datasets import SequenceBatch
from pmmrec.data.loader import TrainBatches
from pmmrec.errors import PmmrecError
from pmmrec.evaluation.evaluator import SplitEvaluator
from pmmrec.models.pmmrec import PMMRec
from pmmrec.runtime import distributed
from pmmrec.runtime.checkpoint import (
    load_best_model,
    load_resume_checkpoint,
    previous_path,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pmmrec.runtime.device import seed_everything
from pmmrec.training.objective import TrainingObjective
from pmmrec.training.optim import build_optimizer, build_scheduler
from pmmrec.training.run_dir import RunDir
from pmmrec.utils.io import atomic_write_text

log = logging.getLogger(__name__)

SELECT_METRIC = ("exclude_history", "NDCG@10")  # early stopping and best.pt (paper protocol)
# Settings a resumed run may change: where things are, how long to go on, and how (not what) to compute.
RESUMABLE = ("run.dir", "data.domain", "data.sources", "train.cache_dir", "transfer.checkpoint", "train.epochs",
             "train.max_steps", "train.patience", "train.checkpoint_every", "train.device", "data.num_workers",
             "eval.batch_size", "eval.item_chunk", "eval.ks")


class Trainer:
    """Fits ``model`` on ``batches``, evaluating with ``evaluator``, and writes the run folder ``run``."""

    def __init__(self, config: Config, model: PMMRec, batches: TrainBatches, evaluator: SplitEvaluator,
                 run: RunDir, item_ids: list[str], device: torch.device, objective: TrainingObjective,
                 transfer_report: dict | None = None):
        """``transfer_report``: what a transfer loaded into ``model`` (written to the run's transfer.json). A model
        that starts from a pretrained checkpoint (a report is given) is validated before its first step: the starting
        point is a candidate best (docs/design.md §6)."""
        self.config, self.model, self.batches, self.evaluator, self.run = config, model, batches, evaluator, run
        self.transfer_report = transfer_report
        self.validate_start = transfer_report is not None
        self.item_ids, self.device = list(item_ids), device
        self.world, self.rank = distributed.world_size(), distributed.rank()
        cfg = config.train
        self.steps_per_epoch = len(batches)  # batches per epoch (the same every epoch)
        self.total_updates = cfg.max_steps or math.ceil(self.steps_per_epoch / cfg.grad_accum) * cfg.epochs
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_updates)
        self.scaler = torch.amp.GradScaler("cuda", enabled=objective.amp_dtype == torch.float16)
        self.objective = objective
        # Every trainable parameter is used by every step (heads exist only for the objectives in use), so DDP
        # needs no unused-parameter search.
        self.forward = self.objective
        if self.world > 1:
            self.forward = torch.nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[device.index] if device.type == "cuda" else None)
            # Dropout and the like draw from the global RNG: one stream per rank (the weights are already built,
            # and DDP made them rank 0's).
            seed_everything(config.seed + 7919 * self.rank, cfg.deterministic)
        # Loop state (everything a checkpoint restores). The epoch's batch losses and per-objective sums so far
        # are checkpointed, so the train loss logged after a mid-epoch resume is the whole epoch's mean.
        self.epoch, self.batch_in_epoch, self.update = 0, 0, 0
        self.best, self.bad_evals, self.best_update = -1.0, 0, 0
        self.epoch_losses: list[float] = []
        self.epoch_parts: dict[str, float] = {}
        self.writer = None

    # ------------------------------------------------------------------------------------------------- step
    def loss(self, batch: SequenceBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted sum of the objectives (under torchrun, this rank's share) and each term for the logs."""
        # Seeds of the step's draws (a resume redraws them identically): the corruption of L_NID/L_RCL per rank,
        # sampled negatives shared by every rank.
        step_seed = self.config.seed * 1_000_003 + self.epoch * 100_003 + self.batch_in_epoch
        parts = self.forward(batch, step_seed + 7919 * self.rank, step_seed)
        return self.objective.total(parts), self.objective.logged(parts)

    def train_step(self, batch: SequenceBatch, update: bool = True) -> tuple[float, dict[str, float]]:
        """batch -> loss -> backward -> (with ``update``) optimiser step. Returns the loss and its terms."""
        accum = self.config.train.grad_accum
        # Micro-batches that only accumulate skip DDP's gradient all-reduce; the stepping one syncs the sum.
        sync = self.forward.no_sync() if self.world > 1 and not update else contextlib.nullcontext()
        with sync:
            loss, parts = self.loss(batch.to(self.device, non_blocking=True))
            self.scaler.scale(loss / accum).backward()
        if update:
            if self.config.train.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.update += 1
        weights = self.config.objectives.weights
        value = loss.item() if self.world == 1 else sum(weights.get(n, 1.0) * v for n, v in parts.items())
        return value, parts

    # ------------------------------------------------------------------------------------------------- loop
    def fit(self, resume: bool = False) -> dict:
        main = distributed.is_main()  # the one process that writes the run folder
        if main:
            self.run.create(self.config)
            if self.transfer_report is not None:
                atomic_write_text(self.run.path / "transfer.json",
                                  json.dumps(self.transfer_report, indent=2) + "\n")
        try:
            resumed = self._resume() if resume else False
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                if main:
                    self.writer = SummaryWriter(str(self.run.path / "tensorboard"))
            # Fine-tuning first validates its pretrained starting point ("epoch 0", step 0), a candidate best like
            # any evaluation (best.pt, metrics.jsonl, patience), so the result is never below it on validation. A
            # run resumed from a checkpoint has done it already (its first checkpoints are that evaluation's).
            stop = self.validate_start and not resumed and self._evaluate_and_check()
            if not stop:
                self._loop()
            return self.finish()
        finally:
            if self.writer is not None:
                self.writer.close()
            self.run.close()

    def _loop(self) -> None:
        cfg = self.config.train
        self.model.train()
        stop = self.update >= self.total_updates
        while not stop and self.epoch < cfg.epochs:
            if self.batch_in_epoch == 0:  # a new epoch; a mid-epoch resume keeps the restored sums
                self.epoch_losses, self.epoch_parts = [], {}
            losses, part_sums = self.epoch_losses, self.epoch_parts
            bar = tqdm(self.batches.epoch(self.epoch, self.batch_in_epoch), desc=f"epoch {self.epoch}",
                       total=self.steps_per_epoch, initial=self.batch_in_epoch, leave=False,
                       disable=None if distributed.is_main() else True)
            for batch in bar:
                update = ((self.batch_in_epoch + 1) % cfg.grad_accum == 0
                          or self.batch_in_epoch + 1 >= self.steps_per_epoch)
                loss, parts = self.train_step(batch, update)
                losses.append(loss)
                for name, value in parts.items():
                    part_sums[name] = part_sums.get(name, 0.0) + value
                self.batch_in_epoch += 1
                if not update:
                    continue
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
                if self.writer is not None:
                    self.writer.add_scalar("train/loss", losses[-1], self.update)
                    for name, value in parts.items():
                        self.writer.add_scalar(f"train/{name}", value, self.update)
                if self.update >= self.total_updates:
                    stop = True
                    break
                if cfg.eval_every and self.update % cfg.eval_every == 0:
                    if self._evaluate_and_check():
                        return
                    self.model.train()
                elif (cfg.checkpoint_every and self.update % cfg.checkpoint_every == 0
                      and (cfg.eval_every or self.batch_in_epoch < self.steps_per_epoch)):
                    # Not at the end of an epoch that is then evaluated: that evaluation writes this step's
                    # checkpoints, and one written before it, at the same step, would be a resume point that
                    # evaluates (and logs) the step again.
                    self.save()
            bar.close()
            if self.batch_in_epoch >= self.steps_per_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            if not cfg.eval_every or stop:
                if self._evaluate_and_check():
                    return
                self.model.train()

    def _evaluate_and_check(self) -> bool:
        """Validate, log, checkpoint, early-stop. Returns True when training should stop."""
        metrics = self.evaluator.evaluate(self.model, "valid")
        losses = self.epoch_losses
        loss = float(np.mean(losses)) if losses else None
        terms = {k: v / len(losses) for k, v in self.epoch_parts.items()} if losses else {}
        protocol, name = SELECT_METRIC
        value = metrics[protocol].get(name, next(iter(metrics[protocol].values())))
        improved = value > self.best
        if improved:
            self.best, self.bad_evals, self.best_update = value, 0, self.update
        else:
            self.bad_evals += 1
        if distributed.is_main():
            self.run.log_metrics({"step": self.update, "epoch": self.epoch, "train_loss": loss,
                                  "train_terms": terms, "valid": metrics})
        if self.writer is not None:
            for proto, values in metrics.items():
                for key, v in values.items():
                    self.writer.add_scalar(f"valid/{proto}/{key}", v, self.update)
        log.info("step %d epoch %d: valid %s=%.4f (best %.4f)%s", self.update, self.epoch, name, value, self.best,
                 "" if improved else f", {self.bad_evals} without improvement")
        self.save(best=improved)
        return self.bad_evals >= self.config.train.patience

    def finish(self) -> dict:
        """Evaluate the best checkpoint on validation and test; write results.json."""
        if self.run.best.is_file():
            self.model.load_state_dict(load_best_model(self.run.best, self.run.last, self.best_update))
        started = time.perf_counter()
        item_vecs = self.evaluator.catalogue(self.model)
        results = {"valid": self.evaluator.evaluate(self.model, "valid", item_vecs),
                   "test": self.evaluator.evaluate(self.model, "test", item_vecs), "best_step": self.best_update,
                   "steps": self.update, "epochs": self.epoch, "num_items": len(self.item_ids),
                   "num_users": len(self.evaluator.sequences["test"]), "num_windows": len(self.batches.windows),
                   "data": {"history": self.config.data.history, "windows": self.config.train.windows}}
        results["eval_seconds"] = round(time.perf_counter() - started, 3)
        if self.evaluator.views is not None:
            per_domain = self.evaluator.per_domain
            results["per_domain"] = {view.name: {split: per_domain[split][view.name] for split in ("valid", "test")}
                                     for view in self.evaluator.views}
        if distributed.is_main():
            self.run.write_results(results)
        log.info("test (exclude_history): %s", {k: round(v, 4) for k, v in results["test"]["exclude_history"].items()})
        return results

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint. Under torchrun every rank must call it (it gathers each rank's RNG states)."""
        state = {"model": self.model.checkpoint_state(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng_state(),
                 "trainer_state": {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                                   "update": self.update, "best": self.best, "bad_evals": self.bad_evals,
                                   "best_update": self.best_update,
                                   "epoch_losses": torch.tensor(self.epoch_losses, dtype=torch.float64),
                                   "epoch_parts": dict(self.epoch_parts)},
                 "config": self.config.to_dict(), "item_ids": list(self.item_ids)}
        if self.world > 1:
            state["rng_ranks"] = distributed.all_gather_objects(state["rng"])  # rank r resumes from its own
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["item_ids"]) != self.item_ids:
            raise PmmrecError("the checkpoint was trained on a different item catalogue than data.domain")
        changed = config_differences(state["config"], self.config.to_dict(), ignore=RESUMABLE)
        if changed:
            raise PmmrecError("--resume: the run was started with other settings; resume with the same ones (or "
                              f"start a new run.dir): {'; '.join(changed)}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        t = state["trainer_state"]
        self.epoch, self.batch_in_epoch, self.update = t["epoch"], t["batch_in_epoch"], t["update"]
        self.best, self.bad_evals, self.best_update = t["best"], t["bad_evals"], t["best_update"]
        self.epoch_losses = t["epoch_losses"].tolist() if "epoch_losses" in t else []
        self.epoch_parts = dict(t.get("epoch_parts", {}))
        ranks = state.get("rng_ranks")
        if self.world > 1 and (ranks is None or len(ranks) != self.world):
            log.warning("the checkpoint holds RNG states for %s process(es), this run has %d: every process "
                        "resumes from rank 0's (dropout masks will differ from an uninterrupted run)",
                        len(ranks) if ranks is not None else 1, self.world)
        set_rng_state(ranks[self.rank] if ranks is not None and len(ranks) == self.world else state["rng"])

    def _resume(self) -> bool:
        """Restore the run's latest good checkpoint; False when there is none (the run starts from the beginning)."""
        # Any of the run's checkpoints is an exact resume point; a corrupted one is named and skipped.
        found = load_resume_checkpoint([self.run.last, previous_path(self.run.last), self.run.best])
        if found is None:
            # Lines a process logged before it was killed, ahead of its first complete checkpoint, are written again.
            if distributed.is_main():
                self.run.truncate_metrics(-1)
            log.warning("--resume: no checkpoint in %s yet, starting from the beginning", self.run.checkpoints)
            return False
        self.load_state_dict(found[1])
        if distributed.is_main():
            self.run.truncate_metrics(self.update)
        log.info("resumed from %s at epoch %d, batch %d, step %d", found[0], self.epoch, self.batch_in_epoch,
                 self.update)
        return True

    def save(self, best: bool = False) -> None:
        """Rank 0 writes; under torchrun every rank calls this and returns once the files are complete."""
        state = self.state_dict()
        if distributed.is_main():
            # best.pt first: a crash between the two writes then resumes from the previous last.pt, which redoes
            # this evaluation and rewrites best.pt. The other order could leave last.pt claiming a best.pt that
            # was never written. last.pt's predecessor stays as last.prev.pt: the resume point if last.pt is ever
            # found corrupted.
            if best:
                save_checkpoint(self.run.best, state)
            save_checkpoint(self.run.last, state, keep_previous=True)
        distributed.barrier()  # nobody reads best.pt (finish) before it exists
