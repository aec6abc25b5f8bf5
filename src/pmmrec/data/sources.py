"""The domains a run trains on: one (``data.domain``) or several source domains together (``data.sources``,
docs/design.md §3), read, validated and split leave-one-out.

The domains are merged into one catalogue with ids namespaced ``"<domain>/<id>"`` (equal ids in two domains never
collide), split leave-one-out like a single domain, and remembered as *views*: which users and which items belong
to each domain, so that validation ranks each domain's users against that domain's catalogue only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pmmrec.config import Config
from pmmrec.data.datasets import EvalSequences
from pmmrec.data.domain import read_domain
from pmmrec.data.split import NAMESPACE_SEP, SplitData, leave_one_out, merge_domains
from pmmrec.errors import PmmrecError

log = logging.getLogger(__name__)


@dataclass
class DomainView:
    """One domain inside a merged split."""

    name: str
    users: np.ndarray  # indices into the split's users (and train/valid/test lists)
    items: np.ndarray  # item numbers (merged numbering) of this domain's catalogue, ascending


def domain_views(split: SplitData) -> list[DomainView]:
    """Group users and items of a merged split by their ``"<domain>/"`` prefix, in order of first appearance."""
    def prefix(ids: list[str]) -> list[str]:
        return [i.split(NAMESPACE_SEP, 1)[0] for i in ids]

    user_domains, item_domains = np.array(prefix(split.user_ids)), np.array(prefix(split.item_ids))
    names = list(dict.fromkeys(user_domains.tolist()))
    return [DomainView(n, np.flatnonzero(user_domains == n), np.flatnonzero(item_domains == n) + 1) for n in names]


def load_sources(config: Config) -> tuple[SplitData, list[DomainView]]:
    """Read, validate, merge and split every domain of ``data.sources``."""
    if not config.data.sources:
        raise PmmrecError("no source domains: set data.sources=[FOLDER, FOLDER, ...] (e.g. the built-in world's "
                          "books, films and games)")
    domains = [read_domain(path, empty_title=config.data.empty_title,
                           missing_image=config.data.missing_image if config.model.uses_images else None)
               for path in config.data.sources]
    split = leave_one_out(merge_domains(domains), config.data.max_seq_len, config.data.min_seq_len,
                          config.data.history)
    views = domain_views(split)
    for view in views:
        log.info("source %s: %d users, %d items", view.name, len(view.users), len(view.items))
    return split, views


def load_split(config: Config, images: bool | None = None) -> SplitData:
    """Read, validate and split ``data.domain``; its images are checked when ``images`` (default: when the model
    reads them)."""
    images = config.model.uses_images if images is None else images
    if not config.data.domain:
        raise PmmrecError("no domain to train on: set data.domain=FOLDER (e.g. data.domain=data/world/target)")
    domain = read_domain(config.data.domain, empty_title=config.data.empty_title,
                         missing_image=config.data.missing_image if images else None)
    split = leave_one_out(domain, config.data.max_seq_len, config.data.min_seq_len, config.data.history)
    if not split.train:
        raise PmmrecError(f"{config.data.domain}: no user has {config.data.min_seq_len} or more interactions")
    log.info("domain %s: %d users (%d dropped as too short), %d items", domain.name, len(split.train),
             split.num_dropped_users, len(split.item_ids))
    return split


def eval_splits(split: SplitData, max_seq_len: int) -> tuple[EvalSequences, EvalSequences]:
    """Validation and test sequences ending in their targets, with the whole kept history before them."""
    valid_full = [np.concatenate([tr, va[-1:]]) for tr, va in zip(split.train, split.valid, strict=True)]
    test_full = [np.concatenate([v, te[-1:]]) for v, te in zip(valid_full, split.test, strict=True)]
    return EvalSequences.from_sequences(valid_full, max_seq_len), EvalSequences.from_sequences(test_full, max_seq_len)
