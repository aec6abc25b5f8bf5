"""``pmmrec export-embeddings``: every catalogue item's vector as ``.npy``, its ids as text, optionally a faiss index.

Row ``i`` of the ``.npy`` file (float32, ``(N, D)``) is the item on line ``i + 1`` of the ids file. Scores are
inner products (the model ranks by ``user · item``), so the faiss index, when asked for, is an inner-product
index: exact (``flat``) or HNSW (``hnsw``, approximate, for very large catalogues).
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pmmrec.errors import PmmrecError
from pmmrec.inference.recommender import Recommender
from pmmrec.utils.io import atomic_write_bytes, atomic_write_text

FAISS_KINDS = ("flat", "hnsw")


@dataclass
class Export:
    vectors: Path
    ids: Path
    index: Path | None
    count: int
    dim: int


def build_faiss_index(vectors: np.ndarray, kind: str = "hnsw", hnsw_neighbours: int = 32):
    """An inner-product faiss index over ``vectors`` (N, D) float32."""
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
        index = faiss.IndexHNSWFlat(dim, hnsw_neighbours, faiss.METRIC_INNER_PRODUCT)
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def export_embeddings(recommender: Recommender, out: str | os.PathLike, ids_out: str | os.PathLike | None = None,
                      faiss_out: str | os.PathLike | None = None, faiss_kind: str = "hnsw") -> Export:
    """Write the vectors to ``out`` (.npy), the ids to ``ids_out`` (default: ``out`` with ``.ids.txt``)."""
    out = Path(out)
    if out.suffix != ".npy":
        raise PmmrecError(f"--out {out}: the vectors file must end in .npy")
    ids_path = Path(ids_out) if ids_out is not None else out.with_suffix(".ids.txt")
    ids, vectors = recommender.item_vectors()
    index = build_faiss_index(vectors, faiss_kind) if faiss_out is not None else None  # fail before writing
    buffer = io.BytesIO()
    np.save(buffer, vectors)
    atomic_write_bytes(out, buffer.getvalue())
    atomic_write_text(ids_path, "".join(f"{i}\n" for i in ids))
    if index is not None:
        import faiss

        atomic_write_bytes(faiss_out, faiss.serialize_index(index).tobytes())
    return Export(out, ids_path, Path(faiss_out) if faiss_out is not None else None, len(ids), vectors.shape[1])
