"""The training loop: ``pmmrec train`` (from scratch on one domain) and the base of pretrain/transfer.

One window per user and epoch (reference code), in-batch next-item loss with logQ correction, AdamW with
per-group learning rates and a per-step schedule, gradient accumulation and clipping, AMP on GPU, evaluation
with full ranking, early stopping on validation NDCG@10, and checkpoints that resume *exactly*: the epoch's
permutation is derived from (seed, epoch), the position inside it is saved, and so are every RNG state, the
optimiser, the scheduler and the scaler, so an interrupted run ends with the metrics of an uninterrupted one.

Under ``torchrun`` (:mod:`pmmrec.training.distributed`) the model is wrapped in DDP and ``train.batch_size`` is the
*global* batch: each global batch of the plan is cut into one contiguous slice per rank, so N processes see in
every step exactly the users one process sees. What crosses ranks:

* L_rec: with ``train.gather_negatives`` the item vectors, item numbers (hence the popularity terms and the
  same-user masks) of every rank's slots are gathered *with gradients*, and each rank's loss is its sum over its
  positions times N divided by the number of positions of the global batch, so that DDP's gradient average is
  the gradient of the mean over the global batch: N x B/N trains the objective of 1 x B (tested). Without
  gathering, each rank's positions are scored against its own slots only (the reference code's per-GPU
  negatives), weighted the same way.
* L_NICL, L_NID, L_RCL run per rank on the rank's slice (their negatives are that slice's) and DDP averages
  their gradients: the mean over ranks of per-slice losses. Equal to one process only for L_NID.
* Only rank 0 writes the run folder (config, logs, metrics, checkpoints, results); every rank reads
  checkpoints; evaluation is sharded and reduced exactly (:mod:`pmmrec.evaluation.evaluator`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pmmrec.config import Config
from pmmrec.data.datasets import EvalSequences, SequenceBatch, TrainWindows, WindowCollator
from pmmrec.data.domain import read_domain
from pmmrec.data.item_features import ItemFeatureStore
from pmmrec.data.split import SplitData, leave_one_out
from pmmrec.errors import PmmrecError
from pmmrec.evaluation.evaluator import encode_catalogue, evaluate, mean_over_domains
from pmmrec.models.feature_cache import cache_frozen_features
from pmmrec.models.pmmrec import PMMRec
from pmmrec.objectives import corrupt, log_popularity, next_item_loss, nicl_loss, nid_loss, rcl_loss
from pmmrec.pretrained import tokenizer_dir
from pmmrec.training import distributed
from pmmrec.training.checkpoint import (
    load_checkpoint,
    load_resume_checkpoint,
    previous_path,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pmmrec.training.optim import build_optimizer, build_scheduler
from pmmrec.training.run_dir import RunDir
from pmmrec.training.sources import DomainView, load_sources
from pmmrec.training.transfer import init_from, transfer_config
from pmmrec.utils.io import atomic_write_text

log = logging.getLogger(__name__)

SELECT_METRIC = ("exclude_history", "NDCG@10")  # early stopping and best.pt (paper protocol)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str) -> torch.device:
    """This process's device (and, under torchrun, its place in the process group)."""
    return distributed.setup(name)


@dataclass
class TrainData:
    """A domain's split plus everything the loop needs from it."""

    split: SplitData
    store: ItemFeatureStore | None
    windows: TrainWindows
    valid: EvalSequences
    test: EvalSequences

    @property
    def num_items(self) -> int:
        return self.split.num_items


def build_store(config: Config, model: PMMRec, split: SplitData, cache_dir: Path | None) -> ItemFeatureStore | None:
    """Item features for exactly the modalities the model reads (none for the ID tower)."""
    encoder = model.item_encoder
    if not (encoder.uses_text or encoder.uses_vision):
        return None
    return ItemFeatureStore.build(
        split.titles, split.image_sources,
        tokenizer_path=tokenizer_dir(config.text.encoder) if encoder.uses_text else None,
        max_tokens=config.text.max_tokens, lowercase=config.text.lowercase,
        preprocessor=encoder.vision.preprocessor() if encoder.uses_vision else None,
        missing_image=config.data.missing_image, cache_dir=cache_dir)


def eval_splits(split: SplitData, max_seq_len: int) -> tuple[EvalSequences, EvalSequences]:
    """Validation and test sequences ending in their targets, with the whole kept history before them."""
    valid_full = [np.concatenate([tr, va[-1:]]) for tr, va in zip(split.train, split.valid, strict=True)]
    test_full = [np.concatenate([v, te[-1:]]) for v, te in zip(valid_full, split.test, strict=True)]
    return EvalSequences.from_sequences(valid_full, max_seq_len), EvalSequences.from_sequences(test_full, max_seq_len)


def load_split(config: Config) -> SplitData:
    if not config.data.domain:
        raise PmmrecError("no domain to train on: set data.domain=FOLDER (e.g. data.domain=data/world/target)")
    domain = read_domain(config.data.domain, empty_title=config.data.empty_title,
                         missing_image=config.data.missing_image if needs_images(config) else None)
    split = leave_one_out(domain, config.data.max_seq_len, config.data.min_seq_len)
    if not split.train:
        raise PmmrecError(f"{config.data.domain}: no user has {config.data.min_seq_len} or more interactions")
    log.info("domain %s: %d users (%d dropped as too short), %d items", domain.name, len(split.train),
             split.num_dropped_users, len(split.item_ids))
    return split


def needs_images(config: Config) -> bool:
    return config.model.item_tower == "content" and config.model.modality in ("multimodal", "vision")


class _Objective(torch.nn.Module):
    """What DDP wraps: the model, with the training objective as its forward. DDP arms its gradient hooks in
    ``forward``, and the trainer reaches into the model's parts (item encoder, user encoder, heads), so the whole
    loss must run inside one forward call."""

    def __init__(self, model: PMMRec, terms):
        super().__init__()
        self.model = model
        self.terms = terms

    def forward(self, batch: SequenceBatch) -> dict[str, torch.Tensor]:
        return self.terms(batch)


class _RankCollator:
    """The window collator, plus one all-padding window for an empty slice (picklable for workers).

    A rank whose slice of the global batch is empty (the epoch's last batch has fewer users than there are ranks)
    still takes part in every collective: it trains one all-padding window, which has no position to predict and
    contributes nothing but zeros.
    """

    def __init__(self, collate: WindowCollator, slots: int):
        self.collate, self.slots = collate, slots

    def __call__(self, windows: list[np.ndarray]) -> SequenceBatch:
        return self.collate(windows if windows else [np.zeros(self.slots, dtype=np.int64)])


def check_run_dir(run: RunDir, resume: bool) -> None:
    """Refuse to start afresh over a run that exists (checked before any expensive set-up)."""
    if not resume and (run.last.is_file() or (run.path / "metrics.jsonl").is_file()):
        raise PmmrecError(f"run.dir {run.path} already holds a run; pass --resume to continue it, "
                          "or set another run.dir (or delete that folder) to start afresh")


class Trainer:
    """Fits a PMMRec model on one domain's leave-one-out split and writes the run folder."""

    def __init__(self, config: Config, model: PMMRec | None = None, split: SplitData | None = None,
                 views: list[DomainView] | None = None, init: str | None = None):
        """``views`` (pretraining): the source domains inside a merged ``split``, each validated on its own.
        ``init`` (transfer): a checkpoint whose ``transfer.parts`` initialise the model before anything is
        computed from it (such as the frozen-feature cache)."""
        self.config = config
        self.device = resolve_device(config.train.device)
        self.world, self.rank = distributed.world_size(), distributed.rank()
        if config.train.batch_size % self.world:
            raise PmmrecError(f"train.batch_size={config.train.batch_size} (the global batch) does not split over "
                              f"the {self.world} processes of this torchrun launch: use a multiple of {self.world}")
        seed_everything(config.seed, config.train.deterministic)
        self.run = RunDir(config.run.dir)
        split = split if split is not None else load_split(config)
        self.views = views
        self.per_domain: dict[str, dict] = {}
        self.model = model if model is not None else PMMRec(config, len(split.item_ids))
        self.transfer_report = init_from(self.model, init, config.transfer.parts) if init is not None else None
        self.model.to(self.device)
        cache_dir = Path(config.train.cache_dir) if config.train.cache_dir else self.run.path / "cache"
        with distributed.main_first():  # rank 0 computes and stores the caches; the others then read them
            store = build_store(config, self.model, split, cache_dir)
            cache_frozen_features(self.model.item_encoder, store, self.device, config.eval.batch_size,
                                  cache_dir=cache_dir, prefixes=config.train.feature_cache,
                                  progress=distributed.is_main())
        valid, test = eval_splits(split, config.data.max_seq_len)
        self.data = TrainData(split, store, TrainWindows(split.train, config.data.max_seq_len), valid, test)
        self.log_pop = log_popularity(split.train_counts).to(self.device) if config.objectives.logq else None
        cfg = config.train
        self.steps_per_epoch = len(self.batch_plan(0))  # batches per epoch (the same every epoch)
        self.updates_per_epoch = math.ceil(self.steps_per_epoch / cfg.grad_accum)
        self.total_updates = cfg.max_steps or self.updates_per_epoch * cfg.epochs
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_updates)
        use_amp = self.device.type == "cuda" and cfg.amp != "off"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if use_amp else None
        if self.amp_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            log.warning("train.amp=bf16 but this GPU has no bfloat16: using float16 with a gradient scaler")
            self.amp_dtype = torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        # DDP (under torchrun) wraps the objective, not just the model: see _Objective. Every trainable parameter
        # is used by every step (heads exist only for the objectives in use), so no unused-parameter search.
        self.ddp = None
        if self.world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                _Objective(self.model, self._terms),
                device_ids=[self.device.index] if self.device.type == "cuda" else None)
            # Dropout and the like draw from the global RNG: one stream per rank (the weights are already
            # built, and DDP made them rank 0's).
            seed_everything(config.seed + 7919 * self.rank, config.train.deterministic)
        # Loop state (everything a checkpoint restores).
        self.epoch, self.batch_in_epoch, self.update = 0, 0, 0
        self.best, self.bad_evals, self.best_update = -1.0, 0, 0
        # This epoch's batch losses and per-objective sums so far: checkpointed, so the train loss logged after a
        # mid-epoch resume is the whole epoch's mean, as in an uninterrupted run.
        self.epoch_losses: list[float] = []
        self.epoch_parts: dict[str, float] = {}
        self.writer = None

    # -------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint. Under torchrun every rank must call it (it gathers each rank's RNG states)."""
        state = {"model": self.model.checkpoint_state(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng_state(),
                 "trainer_state": {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                                   "update": self.update, "best": self.best, "bad_evals": self.bad_evals,
                                   "best_update": self.best_update,
                                   "epoch_losses": torch.tensor(self.epoch_losses, dtype=torch.float64),
                                   "epoch_parts": dict(self.epoch_parts)},
                 "config": self.config.to_dict(), "item_ids": list(self.data.split.item_ids)}
        if self.world > 1:
            state["rng_ranks"] = distributed.all_gather_objects(state["rng"])  # rank r resumes from its own
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["item_ids"]) != list(self.data.split.item_ids):
            raise PmmrecError("the checkpoint was trained on a different item catalogue than data.domain")
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

    def save(self, best: bool = False) -> None:
        """Rank 0 writes; under torchrun every rank calls this and returns once the files are complete."""
        state = self.state_dict()
        if distributed.is_main():
            # best.pt first: a crash between the two writes then resumes from the previous last.pt, which redoes
            # this evaluation and rewrites best.pt. The other order could leave last.pt claiming a best.pt that
            # was never written.
            # last.pt's predecessor stays as last.prev.pt: the resume point if last.pt is ever found corrupted.
            if best:
                save_checkpoint(self.run.best, state)
            save_checkpoint(self.run.last, state, keep_previous=True)
        distributed.barrier()  # nobody reads best.pt (finish) before it exists

    # -------------------------------------------------------------------------------------------------- data
    def batch_plan(self, epoch: int) -> list[list[int]]:
        """The epoch's batches (lists of user indices) in a (seed, epoch)-determined order.

        ``data.mix: per_domain`` (pretraining) keeps every batch inside one source domain, so in-batch negatives
        come from the same domain; the order of those batches is shuffled. Otherwise batches mix users freely.

        Under torchrun the plan is the same (``train.batch_size`` is the global batch) and this rank gets its
        contiguous slice of each batch (possibly empty in a last batch with fewer users than ranks).
        """
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        size = self.config.train.batch_size
        if self.views is None or self.config.data.mix == "mixed":
            order = torch.randperm(len(self.data.windows), generator=generator).tolist()
            plan = [order[i:i + size] for i in range(0, len(order), size)]
        else:
            plan = []
            for view in self.views:
                users = view.users[torch.randperm(len(view.users), generator=generator).numpy()].tolist()
                plan += [users[i:i + size] for i in range(0, len(users), size)]
            plan = [plan[i] for i in torch.randperm(len(plan), generator=generator).tolist()]
        return plan if self.world == 1 else [self._my_slice(batch) for batch in plan]

    def _my_slice(self, batch: list[int]) -> list[int]:
        sizes = distributed.shard_sizes(len(batch), self.world)
        start = sum(sizes[:self.rank])
        return batch[start:start + sizes[self.rank]]

    def batches(self, epoch: int, skip: int) -> DataLoader:
        """The epoch's batches, skipping the first ``skip`` (resume)."""
        # A generator of its own, so creating the loader never draws from the global RNG (exact resume).
        return DataLoader(self.data.windows, batch_sampler=self.batch_plan(epoch)[skip:],
                          collate_fn=_RankCollator(WindowCollator(self.data.store), self.config.data.max_seq_len + 1),
                          num_workers=self.config.data.num_workers,
                          generator=torch.Generator().manual_seed(epoch), pin_memory=self.device.type == "cuda",
                          persistent_workers=False)

    # ------------------------------------------------------------------------------------------------ steps
    def loss(self, batch: SequenceBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted sum of the objectives in ``objectives.use`` and each term's value (for logging).

        Under torchrun the sum is this rank's share of the global objective (what backward needs), and the
        logged values are the global batch's: L_rec's mean over all positions, the auxiliary terms' mean over
        ranks.
        """
        cfg = self.config.objectives
        parts = self.ddp(batch) if self.ddp is not None else self._terms(batch)
        total = sum(cfg.weights.get(name, 1.0) * value for name, value in parts.items())
        if self.world == 1:
            return total, {name: float(value.detach()) for name, value in parts.items()}
        # Each term is scaled so that DDP's average over ranks is the global value (see _rec_loss).
        values = distributed.all_reduce_sum(torch.stack([v.detach() for v in parts.values()])) / self.world
        return total, dict(zip(parts, values.tolist(), strict=True))

    def _terms(self, batch: SequenceBatch) -> dict[str, torch.Tensor]:
        """Each objective's value on ``batch`` (under torchrun, this rank's share; DDP runs this as forward)."""
        cfg = self.config.objectives
        use = set(cfg.use)
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        encoder = self.model.item_encoder
        with autocast:
            tokens = encoder.modality_tokens(batch.inputs) if encoder.tower == "content" else None
            unique_embs = encoder.fuse(tokens) if tokens is not None else self.model.encode_items(batch.inputs)
            item_embs = unique_embs[batch.inverse]  # (B, L+1, D): each distinct item was encoded once
            mask = batch.items[:, :-1] != 0  # (B, L)
            states = self.model.encode_sequences(item_embs[:, :-1], mask)  # (B, L, D)
            parts: dict[str, torch.Tensor] = {}
            if "rec" in use:
                parts["rec"] = self._rec_loss(states.float(), item_embs.float(), batch.items)
            if "nicl" in use:
                text = self.model.heads["nicl_text"](tokens.pooled_text())[batch.inverse]  # (B, L+1, D)
                image = self.model.heads["nicl_image"](tokens.pooled_image())[batch.inverse]
                parts["nicl"] = nicl_loss(text.float(), image.float(), batch.items, cfg.nicl.tau,
                                          cfg.nicl.next_item_positives)
            if use & {"nid", "rcl"}:
                # The corruption is drawn from (seed, epoch, batch): deterministic, and identical after a resume.
                generator = torch.Generator().manual_seed(
                    self.config.seed * 1_000_003 + self.epoch * 100_003 + self.batch_in_epoch + 7919 * self.rank)
                corrupted, changed = corrupt(batch.items[:, :-1], cfg.nid.ratio, generator, cfg.nid.shuffle)
                # Replacements come from the batch's own items, whose vectors are already computed.
                noisy = unique_embs[torch.searchsorted(batch.unique, corrupted.to(batch.unique.device))]
                noisy_states = self.model.encode_sequences(noisy, mask)  # (B, L, D)
                if "nid" in use:
                    parts["nid"] = nid_loss(self.model.heads["nid"](noisy_states).float(),
                                            changed.to(mask.device), mask)
                if "rcl" in use:
                    head = self.model.heads["rcl"]
                    parts["rcl"] = rcl_loss(head(states[:, -1]).float(), head(noisy_states[:, -1]).float(),
                                            cfg.rcl.tau, batch.items[:, -1] if cfg.rcl.mask_same_target else None)
        return parts

    def _rec_loss(self, states: torch.Tensor, item_embs: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """L_rec; under torchrun, this rank's share of the mean over the global batch's positions."""
        if self.world == 1:
            return next_item_loss(states, item_embs, items, self.log_pop)
        gathered = {}
        if self.config.train.gather_negatives:
            # Every rank's slots, in rank order (= the global batch's order); the gradient that this rank's
            # positions send to other ranks' item vectors flows back to them through the gather.
            embs = distributed.all_gather_varlen(item_embs.reshape(-1, item_embs.shape[-1]), grad=True)
            slots = distributed.all_gather_varlen(items.reshape(-1))
            gathered = {"cand_embs": torch.cat(embs), "cand_items": torch.cat(slots),
                        "cand_offset": sum(len(s) for s in slots[:self.rank])}
        total = next_item_loss(states, item_embs, items, self.log_pop, reduction="sum", **gathered)
        positions = distributed.all_reduce_sum((items[:, :-1] != 0).sum()).clamp(min=1)
        # DDP averages gradients over the N ranks, so N * (this rank's sum) / (all positions) makes that average
        # the gradient of the mean over every position of the global batch, which one process computes.
        return total * self.world / positions

    def catalogue(self) -> torch.Tensor:
        """(N+1, D) vectors of every item, each encoded once with the current weights."""
        self.model.eval()
        return encode_catalogue(self.model, self.data.store, self.data.num_items, self.device,
                                self.config.eval.batch_size)

    def evaluate(self, which: str = "valid", item_vecs: torch.Tensor | None = None) -> dict:
        """Full-ranking metrics on one split; with views, per domain (kept in ``per_domain``) and their mean.

        ``item_vecs`` (from :meth:`catalogue`) lets several splits share one encoding of the catalogue.
        """
        item_vecs = self.catalogue() if item_vecs is None else item_vecs
        sequences = self.data.valid if which == "valid" else self.data.test
        if self.views is None:
            return evaluate(self.model, item_vecs, sequences, self.config.eval)
        self.per_domain[which] = {
            view.name: evaluate(self.model, item_vecs, sequences.subset(view.users), self.config.eval,
                                candidates=torch.from_numpy(view.items)) for view in self.views}
        return mean_over_domains(self.per_domain[which])

    def _after_eval(self, metrics: dict, loss: float | None, terms: dict[str, float]) -> bool:
        """Log, checkpoint, early-stop. Returns True when training should stop."""
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

    def fit(self, resume: bool = False) -> dict:
        cfg = self.config.train
        check_run_dir(self.run, resume)
        main = distributed.is_main()  # the one process that writes the run folder
        if main:
            self.run.create(self.config)
        if self.transfer_report is not None and main:
            atomic_write_text(self.run.path / "transfer.json",
                              json.dumps(self.transfer_report.to_dict(), indent=2) + "\n")
        try:
            # Any of the run's checkpoints is an exact resume point; a corrupted one is named and skipped.
            found = load_resume_checkpoint([self.run.last, previous_path(self.run.last), self.run.best]) \
                if resume else None
            if resume and found is None:
                log.warning("--resume: no checkpoint in %s yet, starting from the beginning", self.run.checkpoints)
            if found is not None:
                self.load_state_dict(found[1])
                if main:
                    self.run.truncate_metrics(self.update)
                log.info("resumed from %s at epoch %d, batch %d, step %d", found[0], self.epoch,
                         self.batch_in_epoch, self.update)
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                if main:
                    self.writer = SummaryWriter(str(self.run.path / "tensorboard"))
            self._loop(cfg)
            return self.finish()
        finally:
            if self.writer is not None:
                self.writer.close()
            self.run.close()

    def _loop(self, cfg) -> None:
        self.model.train()
        stop = self.update >= self.total_updates
        while not stop and self.epoch < cfg.epochs:
            if self.batch_in_epoch == 0:  # a new epoch; a mid-epoch resume keeps the restored sums
                self.epoch_losses, self.epoch_parts = [], {}
            losses = self.epoch_losses
            part_sums = self.epoch_parts  # objective -> sum over this epoch's batches (mean logged)
            bar = tqdm(self.batches(self.epoch, self.batch_in_epoch), desc=f"epoch {self.epoch}",
                       total=self.steps_per_epoch, initial=self.batch_in_epoch, leave=False,
                       disable=None if distributed.is_main() else True)
            for batch in bar:
                stepping = ((self.batch_in_epoch + 1) % cfg.grad_accum == 0
                            or self.batch_in_epoch + 1 >= self.steps_per_epoch)
                # Micro-batches that only accumulate skip DDP's gradient all-reduce; the stepping one syncs the sum.
                sync = self.ddp.no_sync() if self.ddp is not None and not stepping else contextlib.nullcontext()
                with sync:
                    loss, parts = self.loss(batch.to(self.device, non_blocking=True))
                    self.scaler.scale(loss / cfg.grad_accum).backward()
                losses.append(loss.item() if self.world == 1 else
                              sum(self.config.objectives.weights.get(n, 1.0) * v for n, v in parts.items()))
                for name, value in parts.items():
                    part_sums[name] = part_sums.get(name, 0.0) + value
                self.batch_in_epoch += 1
                if self.batch_in_epoch % cfg.grad_accum and self.batch_in_epoch < self.steps_per_epoch:
                    continue
                self._optimizer_step(cfg)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
                if self.writer is not None:
                    self.writer.add_scalar("train/loss", losses[-1], self.update)
                    for name, value in parts.items():
                        self.writer.add_scalar(f"train/{name}", value, self.update)
                if self.update >= self.total_updates:
                    stop = True
                    break
                if cfg.eval_every and self.update % cfg.eval_every == 0:
                    if self._after_eval(self.evaluate("valid"), float(np.mean(losses)),
                                        {k: v / len(losses) for k, v in part_sums.items()}):
                        return
                    self.model.train()
                elif cfg.checkpoint_every and self.update % cfg.checkpoint_every == 0:
                    self.save()
            bar.close()
            if self.batch_in_epoch >= self.steps_per_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            if not cfg.eval_every or stop:
                if self._after_eval(self.evaluate("valid"), float(np.mean(losses)) if losses else None,
                                    {k: v / len(losses) for k, v in part_sums.items()}):
                    return
                self.model.train()

    def _optimizer_step(self, cfg) -> None:
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.update += 1

    def _best_weights(self) -> dict[str, Any]:
        """best.pt's model; if best.pt is corrupted, the same weights from last.pt/last.prev.pt when one of them
        was written at the same evaluation (same step), else the checksum error."""
        try:
            return load_checkpoint(self.run.best)["model"]
        except PmmrecError as e:
            for path in (self.run.last, previous_path(self.run.last)):
                if path.is_file():
                    with contextlib.suppress(PmmrecError):
                        state = load_checkpoint(path)
                        if state["trainer_state"]["update"] == self.best_update:
                            log.error("%s; using %s, written at the same step %d", e, path, self.best_update)
                            return state["model"]
            raise

    def finish(self) -> dict:
        """Evaluate the best checkpoint on validation and test; write results.json."""
        if self.run.best.is_file():
            self.model.load_state_dict(self._best_weights())
        started = time.perf_counter()
        item_vecs = self.catalogue()
        results = {"valid": self.evaluate("valid", item_vecs), "test": self.evaluate("test", item_vecs),
                   "best_step": self.best_update,
                   "steps": self.update, "epochs": self.epoch, "num_items": self.data.num_items,
                   "num_users": len(self.data.windows)}
        results["eval_seconds"] = round(time.perf_counter() - started, 3)
        if self.views is not None:
            results["per_domain"] = {view.name: {split: self.per_domain[split][view.name]
                                                 for split in ("valid", "test")} for view in self.views}
        if distributed.is_main():
            self.run.write_results(results)
        log.info("test (exclude_history): %s", {k: round(v, 4) for k, v in results["test"]["exclude_history"].items()})
        return results


def train(config: Config, resume: bool = False) -> dict:
    """``pmmrec train``: fit on ``data.domain`` from scratch and return ``results.json``'s content."""
    check_run_dir(RunDir(config.run.dir), resume)
    try:
        return Trainer(config).fit(resume=resume)
    finally:
        distributed.cleanup()


def transfer(checkpoint: str, recipe: str | None, overrides: list[str] | tuple[str, ...] = (),
             resume: bool = False) -> dict:
    """``pmmrec transfer --from CKPT``: fine-tune on ``data.domain`` starting from ``transfer.parts`` of CKPT.

    The architecture (text, vision, model sections) comes from the checkpoint unless the recipe or the overrides
    change it (``model.modality=text`` uses only the pretrained text branch).
    """
    config = transfer_config(load_checkpoint(checkpoint), recipe, [*overrides, f"transfer.checkpoint={checkpoint}"],
                             checkpoint)
    check_run_dir(RunDir(config.run.dir), resume)
    try:
        return Trainer(config, init=checkpoint).fit(resume=resume)
    finally:
        distributed.cleanup()


def pretrain(config: Config, resume: bool = False) -> dict:
    """``pmmrec pretrain``: fit on all of ``data.sources`` together; validation per source domain."""
    check_run_dir(RunDir(config.run.dir), resume)
    split, views = load_sources(config, needs_images(config))
    try:
        return Trainer(config, split=split, views=views).fit(resume=resume)
    finally:
        distributed.cleanup()
