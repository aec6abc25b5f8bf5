"""``pmmrec export-embeddings``: a catalogue's item vectors as a vector store, encoded in parallel under torchrun.

The output folder is a vector store (:mod:`pmmrec.inference.vector_store`: ``store.json`` and per segment a
float32 ``.npy`` of vectors, the ids one per line and the content digests), which ``pmmrec serve --embeddings DIR``
serves as is and numpy reads directly (``np.load(DIR / "000001.vectors.npy", mmap_mode="r")``, or
:meth:`VectorStore.read`). Exporting into an existing store of the same model encodes only the items that are new
or changed since (docs/design.md §8). Under ``torchrun --nproc_per_node N -m pmmrec export-embeddings ...`` the
catalogue's batches are dealt to the N processes and gathered, so the vectors are the ones one process computes;
rank 0 writes the store.

Scores are inner products (the model ranks by ``user · item``), so the faiss index, when asked for, is an
inner-product index: exact (``flat``) or HNSW (``hnsw``, approximate, for very large catalogues).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pmmrec.data.domain import read_domain
from pmmrec.errors import PmmrecError
from pmmrec.inference.ann import IndexSettings
from pmmrec.inference.catalogue_vectors import CatalogueItems, model_key, sync_catalogue
from pmmrec.inference.vector_store import VectorStore
from pmmrec.models.loading import id_rows, load_model
from pmmrec.runtime import distributed
from pmmrec.runtime.device import resolve_device
from pmmrec.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

FAISS_KINDS = ("flat", "hnsw")


@dataclass
class Export:
    store: Path  # the vector store folder
    index: Path | None  # the faiss index, when asked for
    count: int
    dim: int
    reused: int  # vectors already in the store (same model, same content)
    encoded: int
    version: int  # the store's version after the export


def build_faiss_index(vectors: np.ndarray, kind: str = "hnsw", settings: IndexSettings | None = None):
    """An inner-product faiss index over ``vectors`` (N, D) float32.

    HNSW is built as ``serve --index hnsw`` builds it (:class:`~pmmrec.inference.ann.IndexSettings`: M,
    efConstruction and efSearch tuned with ``pmmrec bench recall``), so an exported index has the recall the README
    reports for the service."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs each CPU variant it tries
    try:
        import faiss
    except ImportError:
        raise PmmrecError("a faiss index needs the package faiss-cpu (pip install faiss-cpu)") from None
    if kind not in FAISS_KINDS:
        raise PmmrecError(f"faiss index kind must be one of {', '.join(FAISS_KINDS)}, got {kind!r}")
    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        s = settings or IndexSettings()
        index = faiss.IndexHNSWFlat(dim, s.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = s.hnsw_ef_construction
        index.hnsw.efSearch = s.hnsw_ef_search
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def export_store(checkpoint: str | os.PathLike, out: str | os.PathLike, domain: str | os.PathLike | None = None,
                 overrides: Sequence[str] = (), faiss_out: str | os.PathLike | None = None,
                 faiss_kind: str = "hnsw", progress: bool = True) -> Export | None:
    """Write the vectors of the catalogue of ``domain`` (default: the checkpoint's data.domain) into the vector
    store ``out``; an ID model exports the items it was trained on.

    ``overrides`` as on the command line (``train.device=cuda``, ``eval.batch_size=512``,
    ``data.missing_image=blank``...). Under torchrun every process calls this; rank 0 returns the
    :class:`Export`, the others None.
    """
    out = Path(out)
    if out.suffix == ".npy":
        raise PmmrecError(f"--out {out}: export-embeddings writes a vector store, a folder (store.json, the vectors as "
                          ".npy, the ids); give a folder name")
    if faiss_out is not None:
        build_faiss_index(np.zeros((1, 1), dtype=np.float32), faiss_kind)  # faiss missing or a bad kind: fail now
    store = VectorStore(out)
    try:
        loaded = load_model(checkpoint, list(overrides))
        model, config = loaded.model, loaded.config
        device = resolve_device(config.train.device)
        model.to(device)
        if distributed.is_main():
            store.check_writable()  # before any encoding: never into a folder of other files
        folder = Path(domain) if domain is not None else (Path(config.data.domain) if config.data.domain else None)
        if config.model.item_tower == "id":
            items = CatalogueItems(list(loaded.item_ids), [""] * len(loaded.item_ids), None)
        elif folder is None:
            raise PmmrecError(f"{checkpoint}: the checkpoint names no data.domain; give the catalogue's domain folder "
                              "(--domain FOLDER)")
        else:
            catalogue = read_domain(folder, empty_title=config.data.empty_title,
                                    missing_image=config.data.missing_image if config.model.uses_images else None)
            items = CatalogueItems.from_domain(catalogue, id_rows(loaded.item_ids, catalogue.item_ids),
                                               config.data.missing_image)
        key = model_key(model, config, loaded.item_ids)
        synced = sync_catalogue(model, config, items, key, store, device, config.eval.batch_size, progress,
                                info={"checkpoint": str(checkpoint), "domain": str(folder) if folder else None})
        if not distributed.is_main():
            return None
        if synced.wrote == "failed":
            raise PmmrecError(f"--out {out}: the vector store could not be written (see the warning above)")
        vectors = synced.vectors[1:].numpy()
        if faiss_out is not None:
            import faiss

            index = build_faiss_index(vectors, faiss_kind)
            atomic_write_bytes(faiss_out, faiss.serialize_index(index).tobytes())
        return Export(out, Path(faiss_out) if faiss_out is not None else None, len(items.ids), key.dim,
                      synced.reused, synced.encoded, int(store.manifest()["version"]))
    finally:
        distributed.cleanup()
