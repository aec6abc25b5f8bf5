"""What the explorer page shows, computed over one or two :class:`~pmmrec.inference.Recommender` objects.

docs/design.md §8: a user's history and the models' next items as pictures, two checkpoints side by side, and
where a newly added item lands. Users are read from the catalogue's domain folder (``users.tsv``) and split as
evaluation splits them (leave-one-out): the last item is the *held-out next item*, the ones before it the
history the models see, so a recommendation equal to the held-out item is a hit. No HTTP here (see
:mod:`pmmrec.serving.explorer_api`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pmmrec.data.domain import find_domain_files, read_items, read_users
from pmmrec.errors import PmmrecError
from pmmrec.inference import Recommender

log = logging.getLogger(__name__)

SHOWN_HISTORY = 60  # cards of history sent to the page: the most recent ones (the model reads max_seq_len)


@dataclass(frozen=True)
class ExplorerModel:
    """A served model: a short name for the page and its recommender."""

    name: str
    recommender: Recommender


class UserBook:
    """A domain's users and their interactions as raw item ids, oldest first, in file order."""

    def __init__(self, user_ids: list[str], histories: list[list[str]]):
        self.user_ids = user_ids
        self.histories = histories
        self._index = {uid: i for i, uid in enumerate(user_ids)}
        self._folded = [uid.casefold() for uid in user_ids]

    @classmethod
    def from_domain(cls, folder: str | Path) -> UserBook:
        files = find_domain_files(folder)
        item_ids, _ = read_items(files.items, empty_title="blank")
        user_ids, sequences = read_users(files.users, {iid: i + 1 for i, iid in enumerate(item_ids)})
        return cls(user_ids, [[item_ids[n - 1] for n in seq.tolist()] for seq in sequences])

    @classmethod
    def empty(cls) -> UserBook:
        return cls([], [])

    def __len__(self) -> int:
        return len(self.user_ids)

    def history(self, user_id: str) -> list[str] | None:
        i = self._index.get(user_id)
        return None if i is None else self.histories[i]

    def search(self, query: str, offset: int, limit: int) -> tuple[int, list[int]]:
        """Positions of the users whose id contains ``query`` (case-insensitive): ``(matches, page)``."""
        query = query.strip()
        needle = query.casefold()
        exact = self._index.get(query)  # an exact id comes first
        found = ([exact] if exact is not None else []) + [
            i for i, uid in enumerate(self._folded) if needle in uid and i != exact]
        return len(found), found[offset:offset + limit]

    def sample(self, size: int) -> list[int]:
        """``size`` users spread evenly over the file (deterministic, so the page's answers are repeatable)."""
        if size >= len(self):
            return list(range(len(self)))
        return np.linspace(0, len(self) - 1, size).round().astype(int).tolist()


def split_next(history: list[str]) -> tuple[list[str], str | None]:
    """Leave-one-out, as evaluation does: ``(what the model sees, the held-out next item)``."""
    if len(history) < 2:
        return history, None
    return history[:-1], history[-1]


def model_name(checkpoint: str | Path) -> str:
    """A short name for a checkpoint: its run folder for ``RUN/checkpoints/X.pt``, else the file name."""
    path = Path(checkpoint)
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        return f"{path.parent.parent.name} ({path.name})"
    return path.name


class Explorer:
    """The explorer's queries over ``models`` (the first is the primary one, whose catalogue images come from)."""

    def __init__(self, models: list[ExplorerModel], users: UserBook | Callable[[], UserBook]):
        """``users``: the user book, or what reads it when the page first needs it (``users.tsv`` can be large,
        and a service's start waits for nothing it does not need to answer)."""
        if not models:
            raise ValueError("the explorer needs at least one model")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise PmmrecError(f"two served models have the same name: {names}")
        self.models = models
        self._users = users
        self._users_lock = threading.Lock()

    @property
    def users(self) -> UserBook:
        with self._users_lock:
            if not isinstance(self._users, UserBook):
                self._users = self._users()
            return self._users

    @classmethod
    def build(cls, recommender: Recommender, compare: Recommender | None = None,
              names: tuple[str, ...] | None = None) -> Explorer:
        recommenders = [recommender] + ([compare] if compare is not None else [])
        names = tuple(names) if names else ("A", "B")[: len(recommenders)]
        if len(names) != len(recommenders):
            raise ValueError(f"{len(recommenders)} model(s) but {len(names)} name(s)")
        if len(set(names)) != len(names):  # two runs' "best.pt": tell them apart
            names = tuple(f"{n} [{tag}]" for n, tag in zip(names, "AB", strict=False))
        domain = recommender.domain

        def users() -> UserBook:
            book = UserBook.from_domain(domain) if domain is not None else UserBook.empty()
            log.info("explorer: %d users from %s, model(s) %s", len(book), domain, ", ".join(names))
            return book

        return cls([ExplorerModel(n, r) for n, r in zip(names, recommenders, strict=True)], users)

    @property
    def primary(self) -> Recommender:
        return self.models[0].recommender

    def card(self, item_id: str) -> dict:
        """What the page shows of an item: title, whether it has an image, whether it was added (cold start)."""
        info = None
        for model in self.models:
            info = model.recommender.item(item_id)
            if info is not None:
                break
        if info is None:
            return {"item_id": item_id, "title": None, "has_image": False, "added": False}
        return {"item_id": item_id, "title": info.title, "has_image": info.has_image, "added": info.added}

    def explore(self, user_id: str, k: int, exclude_history: bool) -> dict | None:
        """A user's history, held-out next item and every model's top-``k`` (None: no such user)."""
        full = self.users.history(user_id)
        if full is None:
            return None
        seen, held_out = split_next(full)
        columns = []
        for model in self.models:
            # One request through the batch path; errors (no known item in the history) come back as values.
            result = model.recommender.recommend_batch([(seen, k, exclude_history, "skip")])[0]
            if isinstance(result, PmmrecError):
                columns.append({"name": model.name, "items": [], "hit_rank": None, "error": str(result)})
                continue
            items = [{**self.card(r.item_id), "score": r.score, "rank": rank,
                      "hit": r.item_id == held_out} for rank, r in enumerate(result.items, start=1)]
            hit = next((x["rank"] for x in items if x["hit"]), None)
            columns.append({"name": model.name, "items": items, "hit_rank": hit, "error": None,
                            "unknown": len(result.unknown)})
        shown = seen[-SHOWN_HISTORY:]
        return {"user_id": user_id, "k": k, "exclude_history": exclude_history, "history_length": len(seen),
                "history": [self.card(i) for i in shown],
                "next": self.card(held_out) if held_out is not None else None, "models": columns}

    def reach(self, item_id: str, k: int, sample: int, exclude_history: bool) -> dict | None:
        """For a sample of users, where ``item_id`` ranks in each model's top-``k`` (None: unknown item)."""
        if all(m.recommender.item(item_id) is None for m in self.models):
            return None
        chosen = self.users.sample(sample)
        histories = [split_next(self.users.histories[i])[0] for i in chosen]
        columns = []
        for model in self.models:
            if model.recommender.item(item_id) is None:  # e.g. an ID-tower model, which cannot take new items
                columns.append({"name": model.name, "in_catalogue": False, "users": []})
                continue
            results = model.recommender.recommend_batch([(h, k, exclude_history, "skip") for h in histories])
            reached = []
            for i, result in zip(chosen, results, strict=True):
                if isinstance(result, PmmrecError):
                    continue
                for rank, r in enumerate(result.items, start=1):
                    if r.item_id == item_id:
                        reached.append({"user_id": self.users.user_ids[i], "rank": rank, "score": r.score})
                        break
            reached.sort(key=lambda x: (x["rank"], -x["score"]))
            columns.append({"name": model.name, "in_catalogue": True, "users": reached})
        return {"item": self.card(item_id), "k": k, "sampled": len(chosen), "models": columns}
