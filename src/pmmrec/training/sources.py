"""Several source domains trained together (``pmmrec pretrain``, DESIGN section 3).

The domains are merged into one catalogue with ids namespaced ``"<domain>/<id>"`` (equal ids in two domains never
collide), split leave-one-out like a single domain, and remembered as *views*: which users and which items belong
to each domain, so that validation ranks each domain's users against that domain's catalogue only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pmmrec.config import Config
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


def load_sources(config: Config, needs_images: bool) -> tuple[SplitData, list[DomainView]]:
    """Read, validate, merge and split every domain of ``data.sources``."""
    if not config.data.sources:
        raise PmmrecError("no source domains: set data.sources=[FOLDER, FOLDER, ...] (e.g. the built-in world's "
                          "books, films and games)")
    domains = [read_domain(path, empty_title=config.data.empty_title,
                           missing_image=config.data.missing_image if needs_images else None)
               for path in config.data.sources]
    split = leave_one_out(merge_domains(domains), config.data.max_seq_len, config.data.min_seq_len)
    views = domain_views(split)
    for view in views:
        log.info("source %s: %d users, %d items", view.name, len(view.users), len(view.items))
    return split, views
