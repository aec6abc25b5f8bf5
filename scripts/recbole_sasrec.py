#!/usr/bin/env python
"""Train RecBole's SASRec on a ``pmmrec data export-atomic`` folder: the cross-check of pmmrec's ID SASRec.

Runs under a *separate* virtual environment that has RecBole; RecBole is not, and must not become, a dependency
of pmmrec (this script imports nothing from pmmrec). The environment that works on the CPU machine:

    python3 -m venv /work/recbole-venv
    /work/recbole-venv/bin/pip install torch==2.13.0            # first: the CPU wheel on local disk
    /work/recbole-venv/bin/pip install torch==2.13.0 recbole==1.2.1 'setuptools<81' 'pandas<3' 'numpy<2'

(torch stays on the command line so that nothing pulls another build; ``setuptools<81`` because ray 2.6.3,
which RecBole pins and its ``quick_start`` imports, imports ``pkg_resources``; ``pandas<3`` because RecBole
fills NaN with ``df[col].fillna(..., inplace=True)``, which pandas 3's copy-on-write turns into a no-op;
``numpy<2`` because RecBole 1.2.1's ``Config`` aliases ``np.float_`` and friends and ray 2.6.3 uses
``np.bool8``, all removed in numpy 2: with numpy 2, ``Config(...)`` raises AttributeError.)

Usage::

    /work/recbole-venv/bin/python scripts/recbole_sasrec.py --data recbole/ml1m --out recbole-ml1m.json \\
        [--epochs 200] [--seed 0] [--max-seq-len 50] [--threads 2] [--gpu] [--max-minutes M] [--workdir DIR]

``--data`` is the exported folder (its name, or the manifest's ``name``, is the RecBole dataset name);
``--max-seq-len`` defaults to the manifest's ``split.max_seq_len`` and may not be smaller (SASRec's position
table would be shorter than the exported histories; export again instead). ``--out`` gets ``{"valid": M, "test": M, ...}`` with
``M = {"include_history": {"HR@10", "NDCG@10", "HR@20", "NDCG@20"}}`` (the same layout as pmmrec's
``results.json``), the best epoch, the epochs run, the wall time and seconds per training epoch, and the
RecBole settings used. RecBole's logs, TensorBoard events and checkpoint go to ``--workdir`` (default: a
temporary folder, removed at the end), never to the current directory.

How to compare on MovieLens-1M (hours on CPU; the ML-1M files are not part of pmmrec and are never committed):

    make ml1m ARGS="--only sasrec --seeds 0"   # = .venv/bin/python scripts/ml1m_table.py --only sasrec --seeds 0
    # it prepares runs/ml1m/data/ml1m (pmmrec data prepare ... ratings.csv movies.csv --images posters), then runs
    # pmmrec baseline sasrec -c configs/real-cpu.yaml data.domain=runs/ml1m/data/ml1m run.dir=runs/ml1m/runs/sasrec-s0 seed=0
    .venv/bin/pmmrec data export-atomic runs/ml1m/data/ml1m --out recbole/ml1m -c configs/real-cpu.yaml
    /work/recbole-venv/bin/python scripts/recbole_sasrec.py --data recbole/ml1m --out recbole-ml1m-s0.json \\
        --epochs 200 --seed 0 --threads 2

(``-c configs/real-cpu.yaml`` gives the recipe's split: ``data.history: all``, ``max_seq_len: 50``,
``min_seq_len: 3``.) Then compare ``test.include_history`` of ``recbole-ml1m-s0.json`` with
``test.include_history`` of ``runs/ml1m/runs/sasrec-s0/results.json`` (HR and NDCG at 10 and 20). Only
``include_history`` is comparable: see the protocol below. Measured on the 2-core CPU machine with an
ML-1M-shaped file (3,706 items, histories of 50, batch 128, one torch thread, the other core busy): about 0.19 s
a step, so about 25 minutes a training epoch (982,089 rows, 7,673 steps) plus about 4 s of validation; loading
the files takes under a minute.

What we rely on in RecBole (1.2.1), and why:

* ``benchmark_filename: [train, valid, test]``: RecBole reads ``<name>.{train,valid,test}.inter`` as they are,
  without filtering, re-sorting, splitting or data augmentation (``SequentialDataset`` only adds
  ``item_length``), so every training row is one (history, target) example of pmmrec's split and every
  valid/test row is one user's held-out example with the history pmmrec's user encoder sees. Sequential
  datasets still insist on ``eval_args.order: TO`` though nothing is sorted; no timestamp is needed.
* ``alias_of_item_id: [item_id_list]``: the history column shares the item-id token map with ``item_id``.
* ``load_col: {inter: [user_id, item_id_list, item_id], item: [item_id]}``: the ``.item`` file is read (ids only)
  so that RecBole's catalogue is every exported item, as pmmrec's is, even one that occurs in no row; the
  script checks that RecBole's item count equals the manifest's. RecBole parses the whole line with pandas
  (python engine, ``"`` as quote character) even for unloaded columns, so a title that starts with ``"`` breaks
  or alters the read: the script refuses such a file up front (``--no-item-file`` skips it; the catalogue is
  then the items occurring in the rows, which differs only when some item occurs in none).
* ``loss_type: CE`` with ``train_neg_sample_args: None``: softmax over the whole catalogue, like pmmrec's
  ``objectives.rec.negatives: catalogue`` in ``configs/real-cpu.yaml``.
* ``eval_args.mode: full``: every item is ranked (RecBole masks only item 0, its padding).
* ``MAX_ITEM_LIST_LENGTH``: SASRec's position table; histories are already cut to the export's max_seq_len.
* ``valid_metric: NDCG@10``, ``eval_step: 1``, ``stopping_step`` = ``--patience`` - 1: one validation per
  epoch and early stopping as pmmrec's recipe (``train.patience: 10``: pmmrec stops after 10 validations
  without a gain, RecBole once more than ``stopping_step`` have passed); the test metrics are those of the best
  validation checkpoint (``trainer.evaluate(load_best_model=True)``, which needs
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` under torch >= 2.6: RecBole's checkpoint pickles its Config; this
  script sets it).
* ``metrics: [Hit, NDCG]``, ``topk: [10, 20]``: RecBole's ``Hit@K`` is pmmrec's ``HR@K`` (one target per row).

Protocol: in full-sort evaluation RecBole masks a user's history items only for *non*-sequential models
(``FullSortEvalDataLoader`` builds ``uid2history_item`` only when ``MODEL_TYPE`` is not SEQUENTIAL; for
sequential models it yields ``history_index = None``, and ``Trainer._full_sort_batch_eval`` then sets only the
padding item's score to -inf). So for SASRec the items already in the user's history stay in the ranking:
pmmrec's ``include_history`` protocol, not the paper's ``exclude_history``.

Hyper-parameters: the defaults are those of ``configs/real-cpu.yaml`` where RecBole has the same knob (hidden
size 64, 2 layers, 1 head, dropout 0.2 on hidden states and attention, FFN 4 x 64 = 256, lr 1e-3, Adam, batch
128, no weight decay, patience 10) and pmmrec's SASRec block where it differs from RecBole's stock SASRec
(ReLU FFN, LayerNorm eps 1e-6; RecBole's own defaults are ``--hidden-act gelu --layer-norm-eps 1e-12``).
Differences that remain, on purpose (they are RecBole's SASRec): RecBole numbers positions from the left of
each history (pmmrec right-aligns them), initialises with N(0, 0.02) (pmmrec: Xavier normal), has attention
biases (pmmrec: none), has no learning-rate warm-up (pmmrec: 100 steps), and trains one row per target
(pmmrec's ``train.windows: all`` scores every position of a window in one pass: the same targets per epoch,
fewer and longer forward passes). And RecBole picks its best epoch on ``include_history`` NDCG@10 (a tie counts
as a gain), pmmrec on ``exclude_history`` NDCG@10 (``SELECT_METRIC`` in pmmrec's trainer).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

# RecBole's checkpoint holds its Config object; torch >= 2.6 loads weights only unless told otherwise.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

SPLITS = ("train", "valid", "test")
TOPK = (10, 20)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="train RecBole's SASRec (CE loss, full ranking) on a pmmrec export",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="a `pmmrec data export-atomic` output folder")
    p.add_argument("--out", required=True, type=Path, help="results JSON to write")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="MAX_ITEM_LIST_LENGTH (default: the manifest's split.max_seq_len)")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no training epoch after this many minutes; then test the best epoch so far "
                        "(the --out JSON then says `stopped: time limit ...`)")
    p.add_argument("--patience", type=int, default=10, help="RecBole stopping_step (validations without gain)")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--inner-size", type=int, default=None, help="FFN width (default: 4 x hidden size)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.2, help="hidden and attention dropout")
    p.add_argument("--hidden-act", default="relu", help="FFN activation (RecBole's default: gelu)")
    p.add_argument("--layer-norm-eps", type=float, default=1e-6, help="(RecBole's default: 1e-12)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--eval-batch-size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--gpu", action="store_true", help="use CUDA when available (default: CPU)")
    p.add_argument("--no-item-file", action="store_true",
                   help="do not read <name>.item: RecBole's catalogue is then the items occurring in the rows")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where RecBole writes log/, log_tensorboard/ and saved/ (default: a temporary folder)")
    return p.parse_args(argv)


def read_manifest(folder: Path) -> dict:
    manifests = sorted(folder.glob("*.split.json"))
    if len(manifests) != 1:
        sys.exit(f"{folder}: expected one <name>.split.json (a `pmmrec data export-atomic` folder), "
                 f"found {len(manifests)}")
    manifest = json.loads(manifests[0].read_text(encoding="utf-8"))
    if manifest.get("format") != "pmmrec-atomic-split":
        sys.exit(f"{manifests[0]}: not a pmmrec split manifest")
    for split in SPLITS:
        if not (folder / f"{manifest['name']}.{split}.inter").is_file():
            sys.exit(f"{folder}: {manifest['name']}.{split}.inter is missing")
    return manifest


def check_item_file(path: Path) -> None:
    """Refuse an ``.item`` file that RecBole's reader (pandas, python engine, ``"`` as quote) would misread.

    A field that starts with ``"`` is read as a quoted field: ``"Cats" 2`` or ``"Cats`` raise a ParserError deep
    inside RecBole, and ``"Cats"`` silently loses its quotes; pandas also reads an id such as ``NA``, ``null`` or
    ``None`` as a missing value. Say which line, instead.
    """
    na = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
          "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if number > 1 and fields[0] in na:
                sys.exit(f"{path}:{number}: item id {fields[0]!r} is read as a missing value by RecBole (pandas)")
            bad = next((x for x in fields if x.startswith('"')), None)
            if bad is not None:
                sys.exit(f"{path}:{number}: field {bad!r} starts with a double quote, which RecBole's reader "
                         "(pandas, quotechar '\"') takes for CSV quoting; use --no-item-file, or fix the export")


class OutOfTime(Exception):
    """Raised before a training epoch once --max-minutes have passed."""


def restore_numpy_aliases() -> None:
    """Give numpy >= 2 back the aliases RecBole 1.2.1 reads, so that it runs where numpy 2 is the only choice.

    ``Config`` runs ``np.float = np.float_`` (and ``complex_``, ``unicode_``), and RecBole's metrics use ``np.float``
    and ``np.bool``: numpy 2 removed the trailing-underscore names, and reading one raises AttributeError. Each name
    is set only when missing, to the type it was an alias of, so numpy 1 is left untouched. (Where pip can install
    ``numpy<2``, as in the venv above, that works too; GPU images often come with numpy 2 and packages built on it.)
    """
    import numpy as np

    for alias, value in {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_,
                         "string_": np.bytes_, "bool8": np.bool_}.items():
        if alias not in np.__dict__:
            setattr(np, alias, value)


def recbole_settings(args: argparse.Namespace, max_seq_len: int, data_path: str, workdir: Path) -> dict:
    return {
        # the data: the exported benchmark files, as they are
        "data_path": data_path,
        "benchmark_filename": list(SPLITS),
        "alias_of_item_id": ["item_id_list"],
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"],
                     **({} if args.no_item_file else {"item": ["item_id"]})},
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id",
        "MAX_ITEM_LIST_LENGTH": max_seq_len,
        # training: softmax over the catalogue
        "loss_type": "CE",
        "train_neg_sample_args": None,
        "epochs": args.epochs,
        "train_batch_size": args.batch_size,
        "learner": "adam",
        "learning_rate": args.lr,
        "weight_decay": args.weight_decay,
        "stopping_step": max(args.patience - 1, 0),  # RecBole stops when more than this many fail to improve
        "eval_step": 1,
        # SASRec
        "hidden_size": args.hidden_size,
        "inner_size": args.inner_size or 4 * args.hidden_size,
        "n_layers": args.layers,
        "n_heads": args.heads,
        "hidden_dropout_prob": args.dropout,
        "attn_dropout_prob": args.dropout,
        "hidden_act": args.hidden_act,
        "layer_norm_eps": args.layer_norm_eps,
        # evaluation: full ranking, RecBole's protocol (history items stay in the ranking)
        "eval_args": {"order": "TO", "mode": "full", "group_by": "user", "split": {"RS": [0.8, 0.1, 0.1]}},
        "metrics": ["Hit", "NDCG"],
        "topk": list(TOPK),
        "valid_metric": "NDCG@10",
        "eval_batch_size": args.eval_batch_size,
        "metric_decimal_place": 8,
        # the run
        "seed": args.seed,
        "reproducibility": True,
        "use_gpu": bool(args.gpu),
        "show_progress": False,
        "worker": 0,
        "checkpoint_dir": str(workdir / "saved"),
        "log_wandb": False,
    }


def pmmrec_metrics(result: dict) -> dict:
    """RecBole's ``{"hit@10": x, "ndcg@10": y, ...}`` as pmmrec's ``{"HR@10": x, "NDCG@10": y, ...}``."""
    out = {}
    for k in TOPK:
        out[f"HR@{k}"] = float(result[f"hit@{k}"])
        out[f"NDCG@{k}"] = float(result[f"ndcg@{k}"])
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = args.data.resolve()
    manifest = read_manifest(folder)
    name = manifest["name"]
    exported_len = int(manifest["split"]["max_seq_len"])
    max_seq_len = exported_len if args.max_seq_len is None else args.max_seq_len
    if max_seq_len < exported_len:
        sys.exit(f"--max-seq-len {max_seq_len} is below the export's {exported_len}: SASRec's position table would "
                 "be shorter than the exported histories (and RecBole's seq_len option would keep their oldest "
                 "items); export again with the smaller --max-seq-len instead")
    if not args.no_item_file:
        check_item_file(folder / f"{name}.item")
    out_path = args.out.resolve()
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="recbole-sasrec-")) if own_workdir else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # RecBole reads <data_path>/<dataset>/<dataset>.<split>.inter: link the folder if its name is not the dataset's
    if folder.name == name:
        data_path = str(folder.parent)
    else:
        (workdir / "data").mkdir(exist_ok=True)
        link = workdir / "data" / name
        if not link.exists():
            link.symlink_to(folder, target_is_directory=True)
        data_path = str(workdir / "data")
    settings = recbole_settings(args, max_seq_len, data_path, workdir)
    config_files = [str(p) for p in [folder / f"{name}.yaml"] if p.is_file()]

    start = time.perf_counter()
    cwd = os.getcwd()
    os.chdir(workdir)  # RecBole writes ./log/ and ./log_tensorboard/
    saved_argv, sys.argv = sys.argv, sys.argv[:1]  # RecBole's Config also parses --key=value from sys.argv
    try:
        from logging import getLogger

        import torch
        if args.threads:
            torch.set_num_threads(args.threads)
        restore_numpy_aliases()
        import recbole
        from recbole.config import Config
        from recbole.data import create_dataset, data_preparation
        from recbole.utils import get_model, get_trainer, init_logger, init_seed

        config = Config(model="SASRec", dataset=name, config_file_list=config_files, config_dict=settings)
        init_seed(config["seed"], config["reproducibility"])
        init_logger(config)
        logger = getLogger()
        dataset = create_dataset(config)
        logger.info(dataset)
        if dataset.item_num - 1 != manifest["items"]:
            message = f"RecBole sees {dataset.item_num - 1} items, the manifest {manifest['items']}"
            if not args.no_item_file:
                sys.exit(message)
            logger.warning(message + " (--no-item-file: items that occur in no row are not ranked)")
        train_data, valid_data, test_data = data_preparation(config, dataset)
        rows = {"train": len(train_data._dataset), "valid": len(valid_data._dataset), "test": len(test_data._dataset)}
        if rows != manifest["rows"]:
            sys.exit(f"RecBole loaded {rows} rows, the manifest says {manifest['rows']}")
        setup_s = time.perf_counter() - start
        init_seed(config["seed"] + config["local_rank"], config["reproducibility"])  # as run_recbole does
        model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

        epoch_s: list[float] = []
        valid_s: list[float] = []
        best = {"epoch": None}
        train_epoch, valid_epoch, save = trainer._train_epoch, trainer._valid_epoch, trainer._save_checkpoint

        def timed_train(*a, **kw):
            if args.max_minutes is not None and time.perf_counter() - train_start > 60 * args.max_minutes:
                raise OutOfTime  # before an epoch starts: the best checkpoint so far is complete on disk
            t = time.perf_counter()
            try:
                return train_epoch(*a, **kw)
            finally:
                epoch_s.append(time.perf_counter() - t)

        def timed_valid(*a, **kw):
            t = time.perf_counter()
            try:
                return valid_epoch(*a, **kw)
            finally:
                valid_s.append(time.perf_counter() - t)

        def save_best(epoch, *a, **kw):
            best["epoch"] = epoch + 1
            return save(epoch, *a, **kw)

        trainer._train_epoch, trainer._valid_epoch, trainer._save_checkpoint = timed_train, timed_valid, save_best
        train_start = time.perf_counter()
        try:
            _, best_valid = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
            stopped = "early stopping" if len(epoch_s) < args.epochs else "max epochs"
        except OutOfTime:
            if best["epoch"] is None:
                sys.exit(f"--max-minutes {args.max_minutes}: no epoch finished in time, nothing to test")
            best_valid, stopped = trainer.best_valid_result, f"time limit (--max-minutes {args.max_minutes})"
            logger.warning(f"stopped by --max-minutes {args.max_minutes} after {len(epoch_s)} epochs; "
                           f"testing the best epoch so far ({best['epoch']})")
        train_s = time.perf_counter() - train_start
        test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
        wall_s = time.perf_counter() - start
    finally:
        sys.argv = saved_argv
        os.chdir(cwd)
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    results = {
        "model": "RecBole SASRec",
        "data": str(folder), "dataset": name,
        "valid": {"include_history": pmmrec_metrics(best_valid)},
        "test": {"include_history": pmmrec_metrics(test)},
        "protocol": "include_history (RecBole full sort: only the padding item is masked for sequential models)",
        "best_epoch": best["epoch"], "epochs_run": len(epoch_s), "max_epochs": args.epochs, "stopped": stopped,
        "seed": args.seed, "max_seq_len": max_seq_len,
        "users": manifest["users"], "items": manifest["items"], "recbole_items": dataset.item_num - 1, "rows": rows,
        "wall_seconds": round(wall_s, 3), "setup_seconds": round(setup_s, 3), "train_seconds": round(train_s, 3),
        "train_epoch_seconds": [round(s, 3) for s in epoch_s],
        "valid_epoch_seconds": [round(s, 3) for s in valid_s],
        "torch_threads": torch.get_num_threads(), "device": str(config["device"]),
        "versions": {"recbole": recbole.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "recbole_settings": {k: v for k, v in settings.items() if k not in ("data_path", "checkpoint_dir")},
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    t = results["test"]["include_history"]
    print(f"RecBole SASRec on {name}: best epoch {best['epoch']} of {len(epoch_s)}; test (include_history) "
          f"HR@10 {t['HR@10']:.4f} NDCG@10 {t['NDCG@10']:.4f} HR@20 {t['HR@20']:.4f} NDCG@20 {t['NDCG@20']:.4f}; "
          f"{wall_s:.1f}s wall -> {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
