"""Leave-one-out split and multi-domain merging (docs/design.md §3).

Users with fewer than ``min_seq_len`` items are dropped (and counted). Two ways to treat the rest
(``data.history``):

* ``all`` (default): every interaction is kept and the catalogue is every item of the domain (its numbering
  unchanged). Train = ``seq[:-2]`` in full; the validation target is item n-1 and the test target item n; the
  evaluation input is the last ``max_seq_len`` items before the target, and the whole history before it is what
  ``exclude_history`` removes from the ranking.
* ``reference``: the PMMRec reference code's rule (``read_behaviors`` in its data utilities), written for
  datasets already cut to about 23 interactions a user: each sequence is cut to its last ``max_seq_len + 3`` items
  first, and the catalogue keeps only the items occurring in the cut sequences (renumbered 1..N in their original
  order). On real logs this discards most of the data (86% of MovieLens-1M); keep it to reproduce the paper on its
  own datasets.

In both, train = ``seq[:-2]``, valid = ``seq[-(max_seq_len + 2):-1]`` (inputs, then the validation target) and
test = ``seq[-(max_seq_len + 1):]`` (inputs, then the test target). Popularity statistics come from the training
part only, so they never see a validation or test target.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pmmrec.data.domain import Domain
from pmmrec.errors import ConfigError, DataError, PmmrecError

NAMESPACE_SEP = "/"  # merged ids are "<domain name>/<id>"


@dataclass
class SplitData:
    """One domain after leave-one-out. Item number ``k`` (1..N) is ``item_ids[k - 1]``; 0 is padding."""

    name: str
    item_ids: list[str]
    titles: list[str]
    item_index: np.ndarray  # (N + 1,) new number -> the item's number in the source Domain (0 -> 0)
    image_sources: list[tuple[Path | None, str]]  # per kept item: (image LMDB folder or None, key)
    user_ids: list[str]  # the kept users, in domain order
    train: list[np.ndarray]  # per user: int64 item numbers, oldest first
    valid: list[np.ndarray]  # per user: inputs then the validation target (last element)
    test: list[np.ndarray]  # per user: inputs then the test target (last element)
    train_counts: np.ndarray  # (N + 1,) occurrences of each item in the training sequences (index 0 unused)
    num_dropped_users: int  # users with fewer than min_seq_len items

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)


HISTORIES = ("all", "reference")


def leave_one_out(domain: Domain, max_seq_len: int = 20, min_seq_len: int = 3, history: str = "all") -> SplitData:
    """Split ``domain`` (see the module docstring for ``history``: ``all`` or ``reference``)."""
    if history not in HISTORIES:
        raise ConfigError(f"data.history must be one of {list(HISTORIES)}, got {history!r}")
    if min_seq_len < 3:
        # A kept user needs a training item, a validation target and a test target.
        raise ConfigError(f"min_seq_len must be >= 3 (got {min_seq_len})")
    if max_seq_len < 1:
        raise ConfigError(f"max_seq_len must be >= 1 (got {max_seq_len})")
    user_ids: list[str] = []
    cut: list[np.ndarray] = []
    for uid, seq in zip(domain.user_ids, domain.sequences, strict=True):
        if len(seq) >= min_seq_len:
            user_ids.append(uid)
            seq = np.asarray(seq, dtype=np.int64)
            cut.append(seq[-(max_seq_len + 3):] if history == "reference" else seq)
    if not cut:
        raise DataError(f"no user of domain {domain.name!r} has at least {min_seq_len} interactions",
                        domain.path)
    occurs = np.zeros(domain.num_items + 1, dtype=bool)
    if history == "reference":  # the catalogue: the items of the cut sequences
        occurs[np.concatenate(cut)] = True
    else:  # every item of the domain
        occurs[:] = True
    occurs[0] = False
    old = np.flatnonzero(occurs)  # ascending: the original order survives renumbering
    renumber = np.zeros(domain.num_items + 1, dtype=np.int64)
    renumber[old] = np.arange(1, len(old) + 1)
    train, valid, test = [], [], []
    for seq in cut:
        seq = renumber[seq]
        train.append(seq[:-2])
        valid.append(seq[-(max_seq_len + 2):-1])
        test.append(seq[-(max_seq_len + 1):])
    train_counts = np.bincount(np.concatenate(train), minlength=len(old) + 1).astype(np.int64)
    sources = domain.image_refs()
    return SplitData(
        name=domain.name,
        item_ids=[domain.item_ids[i - 1] for i in old],
        titles=[domain.titles[i - 1] for i in old],
        item_index=np.concatenate([[0], old]).astype(np.int64),
        image_sources=[sources[i - 1] for i in old],
        user_ids=user_ids,
        train=train, valid=valid, test=test,
        train_counts=train_counts,
        num_dropped_users=len(domain.user_ids) - len(user_ids),
    )


def merge_domains(domains: list[Domain], name: str | None = None) -> Domain:
    """One catalogue from several domains, ids namespaced ``"<domain name>/<id>"`` so equal ids never collide.

    Items keep their domain's order, domain after domain; each keeps where its image lives in ``image_sources``.
    Domain names must be distinct and free of ``/`` (else two namespaced ids could still be equal).
    """
    if not domains:
        raise PmmrecError("merge_domains needs at least one domain")
    names = [d.name for d in domains]
    for n in names:
        if not n or NAMESPACE_SEP in n:
            raise PmmrecError(f"domain name {n!r} cannot namespace ids (it must be non-empty, without '/')")
    if len(set(names)) != len(names):
        raise PmmrecError(f"domain names must be distinct to namespace their ids, got {names} "
                          "(rename a domain folder)")
    item_ids: list[str] = []
    titles: list[str] = []
    user_ids: list[str] = []
    sequences: list[np.ndarray] = []
    sources: list[tuple[Path | None, str]] = []
    dropped: dict[str, int] = {}
    offset = 0
    for d in domains:
        prefix = d.name + NAMESPACE_SEP
        item_ids += [prefix + iid for iid in d.item_ids]
        titles += d.titles
        sources += d.image_refs()
        user_ids += [prefix + uid for uid in d.user_ids]
        # Item numbers shift by the items before this domain; 0 (padding) stays 0.
        sequences += [np.where(s > 0, s + offset, 0).astype(np.int64) for s in d.sequences]
        dropped.update({prefix + k: v for k, v in d.dropped.items()})
        offset += d.num_items
    return Domain(name or "+".join(names), item_ids, titles, user_ids, sequences, image_db=None, path=None,
                  dropped=dropped, image_sources=sources)
