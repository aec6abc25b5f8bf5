"""``pmmrec train``, ``pretrain`` and ``transfer``: set up a run (data, model, transfer, feature caches, evaluator),
then hand it to the :class:`~pmmrec.training.trainer.Trainer`.

Example::

    from pmmrec.config import load_config
    from pmmrec.training import train
    results = train(load_config("configs/tiny.yaml", ["data.domain=data/world/target", "run.dir=runs/tiny"]))
"""

from __future__ import annotations

import logging

from pmmrec.config import Config
from pmmrec.data.datasets import TrainWindows
from pmmrec.data.loader import TrainBatches
from pmmrec.data.sources import DomainView, eval_splits, load_sources, load_split
from pmmrec.data.split import SplitData
from pmmrec.errors import PmmrecError
from pmmrec.evaluation.evaluator import SplitEvaluator
from pmmrec.models.features import run_feature_store
from pmmrec.models.loading import read_checkpoint
from pmmrec.models.pmmrec import PMMRec
from pmmrec.objectives import log_popularity
from pmmrec.runtime import distributed
from pmmrec.runtime.device import autocast_dtype, resolve_device, seed_everything
from pmmrec.training.objective import TrainingObjective
from pmmrec.training.run_dir import RunDir
from pmmrec.training.trainer import Trainer
from pmmrec.training.transfer import init_from, transfer_config

log = logging.getLogger(__name__)

__all__ = ["build_trainer", "check_run_dir", "fit", "pretrain", "train", "transfer"]


def check_run_dir(run: RunDir, resume: bool) -> None:
    """Refuse to start afresh over a run that exists (checked before any expensive set-up)."""
    if not resume and (run.last.is_file() or (run.path / "metrics.jsonl").is_file()):
        raise PmmrecError(f"run.dir {run.path} already holds a run; pass --resume to continue it, "
                          "or set another run.dir (or delete that folder) to start afresh")


def build_trainer(config: Config, split: SplitData | None = None, views: list[DomainView] | None = None,
                  init: str | None = None) -> Trainer:
    """Everything a run trains on, assembled: ``split`` (default: ``data.domain``'s), ``views`` (pretraining: the
    source domains inside a merged ``split``, each validated on its own), ``init`` (transfer: a checkpoint whose
    ``transfer.parts`` initialise the model before anything is computed from it, such as the feature cache)."""
    device = resolve_device(config.train.device)
    world = distributed.world_size()
    if config.train.batch_size % world:
        raise PmmrecError(f"train.batch_size={config.train.batch_size} (the global batch) does not split over "
                          f"the {world} processes of this torchrun launch: use a multiple of {world}")
    seed_everything(config.seed, config.train.deterministic)
    split = split if split is not None else load_split(config)
    model = PMMRec(config, len(split.item_ids))
    report = init_from(model, init, config.transfer.parts) if init is not None else None
    model.to(device)
    store = run_feature_store(config, model.item_encoder, split.titles, split.image_sources, device)
    valid, test = eval_splits(split, config.data.max_seq_len)
    windows = TrainWindows(split.train, config.data.max_seq_len, config.train.windows, config.seed)
    batches = TrainBatches(windows, store,
                           batch_size=config.train.batch_size, seed=config.seed, views=views, mix=config.data.mix,
                           num_workers=config.data.num_workers, pin_memory=device.type == "cuda")
    evaluator = SplitEvaluator(store, split.num_items, valid, test, config.eval, device, views)
    log_pop = log_popularity(split.train_counts).to(device) if config.objectives.logq else None
    objective = TrainingObjective(model, config, log_pop, autocast_dtype(device, config.train.amp), store,
                                  split.train_counts)
    return Trainer(config, model, batches, evaluator, RunDir(config.run.dir), split.item_ids, device, objective,
                   transfer_report=report.to_dict() if report is not None else None)


def fit(config: Config, split: SplitData | None = None, views: list[DomainView] | None = None,
        init: str | None = None, resume: bool = False) -> dict:
    """Set up (:func:`build_trainer`) and train; returns ``results.json``'s content."""
    check_run_dir(RunDir(config.run.dir), resume)
    return build_trainer(config, split, views, init).fit(resume=resume)


def train(config: Config, resume: bool = False) -> dict:
    """``pmmrec train``: fit on ``data.domain`` from scratch and return ``results.json``'s content."""
    check_run_dir(RunDir(config.run.dir), resume)
    try:
        return fit(config, resume=resume)
    finally:
        distributed.cleanup()


def transfer(checkpoint: str, recipe: str | None, overrides: list[str] | tuple[str, ...] = (),
             resume: bool = False) -> dict:
    """``pmmrec transfer --from CKPT``: fine-tune on ``data.domain`` starting from ``transfer.parts`` of CKPT.

    The architecture (text, vision, model sections) comes from the checkpoint unless the recipe or the overrides
    change it (``model.modality=text`` uses only the pretrained text branch).
    """
    config = transfer_config(read_checkpoint(checkpoint).state, recipe,
                             [*overrides, f"transfer.checkpoint={checkpoint}"], checkpoint)
    check_run_dir(RunDir(config.run.dir), resume)
    try:
        return fit(config, init=checkpoint, resume=resume)
    finally:
        distributed.cleanup()


def pretrain(config: Config, resume: bool = False) -> dict:
    """``pmmrec pretrain``: fit on all of ``data.sources`` together; validation per source domain."""
    check_run_dir(RunDir(config.run.dir), resume)
    split, views = load_sources(config)
    try:
        return fit(config, split=split, views=views, resume=resume)
    finally:
        distributed.cleanup()
