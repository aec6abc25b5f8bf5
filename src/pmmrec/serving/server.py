"""``pmmrec serve``: load a checkpoint and run the service under uvicorn (127.0.0.1 unless told otherwise).

With ``--workers N > 1`` the N processes share one catalogue (docs/design.md §8): the vector store is brought in
step with the domain once, in a child process, before uvicorn starts them; each worker then memory-maps the store,
follows it (:meth:`~pmmrec.inference.Recommender.follow`) and adds items through it, so an item posted to any
worker is served by all of them.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from pathlib import Path

from pmmrec.errors import PmmrecError

log = logging.getLogger(__name__)

_ENV = "PMMREC_SERVE_OPTIONS"  # JSON options for each worker process (--workers > 1)


def _check_server_deps() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise PmmrecError("pmmrec serve needs FastAPI and uvicorn: pip install 'pmmrec[serve]'") from None


def build_app(checkpoint: str, domain: str | None = None, threads: int | None = None, persist_items: bool = False,
              workers: int = 1, unknown_items: str = "skip", compare: str | None = None, store: str | None = "auto",
              embeddings: str | None = None, index: str = "auto", index_options: dict | None = None,
              shared: bool = False):
    """The app for one process: load the checkpoint and the catalogue's vectors, wrap them in :func:`create_app`.

    ``compare`` is a second checkpoint for the explorer page, over the same catalogue domain. ``store`` and
    ``embeddings``: where the item vectors come from (``Recommender.from_checkpoint``). ``index`` and
    ``index_options`` (fields of :class:`~pmmrec.inference.ann.IndexSettings`): exact or approximate top-K, for
    both models. ``shared``: this process is one of ``workers`` sharing the store (``Recommender.from_checkpoint
    (shared=True)``); it follows the store while it serves. Several workers without a shared store refuse
    ``POST /items`` (each would add to its own catalogue).
    """
    import torch

    from pmmrec.inference import Recommender
    from pmmrec.inference.ann import IndexSettings
    from pmmrec.serving.app import create_app
    from pmmrec.serving.explorer import model_name

    settings = IndexSettings(**(index_options or {}))
    # What the imports made lives as long as the process: out of the collector's sight now, so that the collections
    # the loading's millions of small objects set off do not walk it all again (freeze_heap below does the rest).
    gc.freeze()
    # Loading encodes the catalogue (and builds an approximate index) with all of torch's threads. Serving then
    # scores batches side by side.
    recommender = Recommender.from_checkpoint(checkpoint, domain, unknown_items=unknown_items, store=store,
                                              embeddings=embeddings, index=index, index_settings=settings,
                                              shared=shared)
    other = None
    if compare is not None:
        other = Recommender.from_checkpoint(compare, recommender.domain, unknown_items=unknown_items,
                                            store=None if store is None else "auto", index=index,
                                            index_settings=settings, shared=shared and store is not None)
    threads = threads or 1
    torch.set_num_threads(threads)
    refusal = None
    if workers > 1 and recommender.shared_store is None and recommender.can_add_items:
        refusal = (f"this server runs {workers} worker processes without a shared vector store (--no-store, or a "
                   "store that cannot be written), so each holds its own catalogue, which additions would make "
                   "diverge; serve with a writable store (the default, or --store DIR), or with --workers 1, to add "
                   "items")
    names = (model_name(checkpoint),) + ((model_name(compare),) if compare is not None else ())
    app = create_app(recommender, persist_items=persist_items, add_items=refusal is None, add_items_refusal=refusal,
                     compare=other, names=names, batch_concurrency=batch_concurrency(threads, workers))
    for model in (recommender, other):
        if model is not None and model.shared_store is not None:
            model.follow()  # picks up the other workers' items (a stat of store.json every 0.25 s)
            app.router.add_event_handler("shutdown", model.close)
    freeze_heap()
    return app


def batch_concurrency(threads: int, workers: int = 1) -> int:
    """Batches scored at once per process: one per core left to it at ``threads`` torch threads each (1..8)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(1, threads * workers)))


def freeze_heap() -> None:
    """Move everything allocated so far (the model, the catalogue, the libraries) out of the garbage collector's
    sight. A full collection otherwise walks all of it: measured with 100,000 items, a ~150 ms pause every ~1.2 s
    under load, which stalled every request in flight (p99 4x the p50). Objects frozen here are still freed by
    reference counting; only cycles among them are never collected."""
    gc.collect()
    gc.freeze()


def _sync_stores(checkpoint: str, domain: str | None, store: str | None, compare: str | None,
                 embeddings: str | None = None, index: str = "auto", index_options: dict | None = None) -> None:
    """(A child process.) Bring the stores of ``checkpoint`` and ``compare`` in step with the catalogue, and
    build their approximate indexes into the stores' index caches, so that the workers read them back instead of
    each building its own at the same time."""
    from pmmrec.inference.ann import IndexSettings, resolve_index
    from pmmrec.inference.recommender import Recommender, sync_store
    from pmmrec.inference.vector_store import VectorStore

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    settings = IndexSettings(**(index_options or {}))
    try:
        for path, store_of in ((checkpoint, store), (compare, "auto")):
            if path is None:
                continue
            folder = Path(embeddings) if embeddings is not None else sync_store(path, domain, store=store_of)
            if folder is None or index == "exact" or resolve_index(
                    index, int(VectorStore(folder).manifest()["count"]), settings) == "exact":
                continue
            Recommender.from_checkpoint(path, domain, store=store_of, embeddings=embeddings, index=index,
                                        index_settings=settings, shared=True).close()
            if embeddings is not None:
                break  # --compare serves its own store beside its checkpoint, not the exported one
    except PmmrecError as e:  # as a plain PmmrecError: it comes back to the parent pickled
        raise PmmrecError(str(e)) from None


def _sync_in_child(*args) -> None:
    """Run :func:`_sync_stores` once, before the workers start, in a child process, so that the process uvicorn
    keeps as the workers' supervisor holds neither the model nor the vectors. Its errors are raised here."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(_sync_stores, *args).result()


def app_from_env():
    """uvicorn factory for worker processes: the options come from the parent through the environment."""
    return build_app(**json.loads(os.environ[_ENV]))


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, domain: str | None = None,
          threads: int | None = None, persist_items: bool = False, unknown_items: str = "skip",
          log_level: str = "info", compare: str | None = None, store: str | None = "auto",
          embeddings: str | None = None, index: str = "auto", index_options: dict | None = None) -> None:
    """Run the service until interrupted (the explorer page at ``/``; ``compare``: a second checkpoint on it).

    ``store``: the catalogue's vector store (``"auto"``: beside the checkpoint; a folder; None: none);
    ``embeddings``: serve an exported store as the catalogue (see ``Recommender.from_checkpoint``); ``index``,
    ``index_options``: see :func:`build_app`."""
    _check_server_deps()
    import uvicorn

    from pmmrec.inference.ann import IndexSettings, check_index

    # A bad value or a missing faiss: one line now, not once the catalogue is encoded.
    check_index(index)
    IndexSettings(**(index_options or {}))
    if workers < 1:
        raise PmmrecError(f"--workers must be at least 1, got {workers}")
    if not 0 <= port <= 65535:
        raise PmmrecError(f"--port must be in 0..65535, got {port}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding to %s: the service has no authentication; anyone who can reach this address can "
                    "use it and add items", host)
    options = {"checkpoint": checkpoint, "domain": domain, "threads": threads, "persist_items": persist_items,
               "workers": workers, "unknown_items": unknown_items, "compare": compare, "store": store,
               "embeddings": embeddings, "index": index, "index_options": index_options}
    if workers == 1:
        app = build_app(**options)  # load before binding, so a bad checkpoint fails here with one line
        uvicorn.run(app, host=host, port=port, log_level=log_level)
        return
    # Several processes: uvicorn imports the app in each of them. Check the checkpoint once here first.
    from pmmrec.models.loading import read_checkpoint

    config = read_checkpoint(checkpoint).config
    if compare is not None:
        read_checkpoint(compare)
    if store is not None or embeddings is not None:
        # An exported store needs no sync, only its index; its domain (for titles) is optional, as in the workers.
        folder = domain if domain is not None or embeddings is not None else config.data.domain
        if embeddings is None or index != "exact":
            _sync_in_child(checkpoint, folder, store, compare, embeddings, index, index_options)
        options["shared"] = True
    os.environ[_ENV] = json.dumps(options)
    uvicorn.run("pmmrec.serving.server:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level=log_level)
