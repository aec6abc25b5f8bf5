"""ItemFeatureStore: every item's model inputs, looked up by item number (docs/design.md §2 and §9).

Titles are tokenised once, with any Hugging Face tokenizer from a local folder, and the token ids are cached on
disk (keyed by the tokenizer's files, ``max_tokens``, lower-casing and the titles themselves), so a second run or
a transfer run skips tokenisation. Images are decoded and preprocessed on demand from the image LMDB(s) and kept
in a bounded in-memory cache. ``lookup(items)`` is the one entry point that training, evaluation and serving use.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pmmrec.data.batch import ItemInputs
from pmmrec.data.image_db import ImageDB
from pmmrec.data.images import ImagePreprocessor
from pmmrec.errors import DataError, PmmrecError
from pmmrec.runtime.feature_files import DIGEST_BYTES  # per-item content digests: the feature cache's keys
from pmmrec.utils.io import atomic_file

log = logging.getLogger(__name__)

ImageRef = tuple[Path | None, str]  # (image LMDB folder or None, key inside it)
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "sentencepiece.bpe.model", "spiece.model", "vocab.json",
                    "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def load_tokenizer(path: str | os.PathLike):
    """A Hugging Face tokenizer from a local folder (never the hub)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise PmmrecError(f"cannot load a tokenizer from {path}: {e}".splitlines()[0]) from None


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of a tokenizer folder's files (what decides the token ids of a title)."""
    path = Path(path)
    digest = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        file = path / name
        if file.is_file():
            digest.update(name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def image_digest(data: bytes | None) -> bytes:
    """The content digest of an item's encoded image bytes (``DIGEST_BYTES``); None (no image: the blank image
    stands in) has a digest of its own. The key of the feature cache and of the catalogue vector store."""
    return hashlib.blake2b(b"blank image" if data is None else data, digest_size=DIGEST_BYTES).digest()


class TokenTable:
    """Token ids of every title, padded to ``max_tokens`` (row 0 = the padding item, all zeros)."""

    def __init__(self, ids: np.ndarray, lengths: np.ndarray, pad_id: int):
        self.ids, self.lengths, self.pad_id = ids, lengths, pad_id  # (N+1, max_tokens) int32, (N+1,) int32

    @classmethod
    def build(cls, titles: Sequence[str], tokenizer_path: str | os.PathLike, max_tokens: int,
              lowercase: bool = True, cache_dir: str | os.PathLike | None = None) -> TokenTable:
        path = Path(tokenizer_path)
        key = hashlib.sha256()
        key.update(tokenizer_fingerprint(path).encode())
        key.update(f"{max_tokens}|{int(lowercase)}|{len(titles)}".encode())
        for title in titles:
            key.update(title.encode("utf-8", "surrogatepass") + b"\0")
        cache = Path(cache_dir) / f"tokens-{key.hexdigest()[:24]}.npz" if cache_dir is not None else None
        if cache is not None and cache.is_file():
            with np.load(cache) as z:
                log.info("token cache hit: %s", cache)
                return cls(z["ids"], z["lengths"], int(z["pad_id"]))
        tokenizer = load_tokenizer(path)
        texts = [t.lower() if lowercase else t for t in titles]  # the reference code lower-cases titles
        encoded = tokenizer(texts, max_length=max_tokens, truncation=True, padding=False,
                            return_attention_mask=False)["input_ids"]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = np.full((len(titles) + 1, max_tokens), pad_id, dtype=np.int32)
        lengths = np.zeros(len(titles) + 1, dtype=np.int32)
        for row, tokens in enumerate(encoded, start=1):
            ids[row, : len(tokens)] = tokens
            lengths[row] = len(tokens)
        if cache is not None:
            with atomic_file(cache, "wb") as f:
                np.savez(f, ids=ids, lengths=lengths, pad_id=np.int64(pad_id))
        return cls(ids, lengths, pad_id)

    def content_digests(self) -> np.ndarray:
        """(N+1, DIGEST_BYTES) uint8: a digest of every title's token ids (what a text encoder sees)."""
        out = np.zeros((len(self.ids), DIGEST_BYTES), dtype=np.uint8)
        for row, (ids, length) in enumerate(zip(self.ids, self.lengths, strict=True)):
            digest = hashlib.blake2b(ids[:length].astype("<i4").tobytes(), digest_size=DIGEST_BYTES).digest()
            out[row] = np.frombuffer(digest, dtype=np.uint8)
        return out

    def lookup(self, items: np.ndarray, full_width: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) item numbers -> token ids and mask (N, T), T = the longest of these titles (at least 1).

        ``full_width`` pads to ``max_tokens`` instead, as the reference code does (the naive benchmark path).
        """
        width = self.ids.shape[1] if full_width else max(int(self.lengths[items].max(initial=0)), 1)
        ids = torch.from_numpy(self.ids[items, :width].astype(np.int64))
        mask = (torch.arange(width)[None, :] < torch.from_numpy(self.lengths[items].astype(np.int64))[:, None])
        return ids, mask.long()


class ImageTable:
    """Preprocessed image tensors by item number, decoded on demand, with a bounded LRU cache."""

    def __init__(self, refs: Sequence[ImageRef], preprocessor: ImagePreprocessor, missing_image: str = "error",
                 cache_items: int = 4096):
        self.refs = list(refs)
        self.preprocessor = preprocessor
        self.missing_image = missing_image
        self.cache_items = cache_items
        self._dbs: dict[Path, ImageDB] = {}
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._blank = np.asarray(preprocessor.blank(), dtype=np.float32)

    def _db(self, path: Path) -> ImageDB:
        db = self._dbs.get(path)
        if db is None:
            db = self._dbs[path] = ImageDB(path)
        return db

    def _load(self, item: int, reopen: bool = False) -> tuple[np.ndarray, bool]:
        if item == 0:
            return self._blank, False
        path, key = self.refs[item - 1]
        if path is not None and reopen:  # the reference code's behaviour: open the database for every sample
            db = ImageDB(path)
            try:
                data = db.get(key)
            finally:
                db.close()
        else:
            data = self._db(path).get(key) if path is not None else None
        if data is None:
            if self.missing_image == "error":
                raise DataError(f"item {key!r} has no image (set data.missing_image: blank to allow)",
                                path, field="images")
            return self._blank, False
        try:
            return np.asarray(self.preprocessor(data), dtype=np.float32), True
        except DataError as e:
            raise DataError(f"image of item {key!r} cannot be decoded: {e}", path) from None

    def content_digests(self) -> tuple[np.ndarray, np.ndarray]:
        """A digest of every item's encoded image bytes and whether it has an image, rows 0..N (0 = padding).

        This identifies what a frozen vision encoder sees without decoding anything (the feature cache's key):
        items without an image all share the digest of the blank image. ``missing_image: error`` raises for an
        item without an image, as :meth:`lookup` would.
        """
        digests = np.zeros((len(self.refs) + 1, DIGEST_BYTES), dtype=np.uint8)
        present = np.zeros(len(self.refs) + 1, dtype=bool)
        blank = np.frombuffer(image_digest(None), dtype=np.uint8)
        digests[0] = blank
        for item, (path, key) in enumerate(self.refs, start=1):
            data = self._db(path).get(key) if path is not None else None
            if data is None:
                if self.missing_image == "error":
                    raise DataError(f"item {key!r} has no image (set data.missing_image: blank to allow)",
                                    path, field="images")
                digests[item] = blank
                continue
            digests[item] = np.frombuffer(image_digest(data), dtype=np.uint8)
            present[item] = True
        return digests, present

    def lookup(self, items: np.ndarray, naive: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) item numbers -> images (N, 3, S, S) float32 and has_image (N,) bool.

        ``naive`` reproduces the reference code's data path for the benchmark: no preprocessed-image cache, and
        the database opened anew for every image (the values are the same).
        """
        pixels, present = [], []
        for item in items.tolist():
            cached = self._cache.get(item) if not naive else None
            if cached is None:
                image, ok = self._load(item, reopen=naive)
                if ok:
                    # Pixels are kept as float16 (half the memory) and served from that rounding *every* time,
                    # first load included: results must not depend on what happens to be cached (exact resume).
                    stored = image.astype(np.float16)
                    image = stored.astype(np.float32)
                    if self.cache_items > 0 and not naive:
                        self._cache[item] = stored
                        if len(self._cache) > self.cache_items:
                            self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(item)
                image, ok = cached.astype(np.float32), True
            pixels.append(image)
            present.append(ok)
        return torch.from_numpy(np.stack(pixels)), torch.tensor(present, dtype=torch.bool)

    def close(self) -> None:
        """Release the read-only LMDB handles (LMDB allows one environment per database and process, so a
        writer of the same database, such as ``Recommender.add_items(persist=True)``, needs them closed)."""
        for db in self._dbs.values():
            db.close()
        self._dbs.clear()

    def __getstate__(self) -> dict:  # DataLoader workers open their own LMDB handles and start a fresh cache
        state = self.__dict__.copy()
        state["_dbs"], state["_cache"] = {}, OrderedDict()
        return state


class ItemFeatureStore:
    """Model inputs of every item of a catalogue; ``lookup(items)`` -> :class:`ItemInputs`."""

    def __init__(self, tokens: TokenTable | None, images: ImageTable | None, num_items: int):
        if tokens is None and images is None:
            raise PmmrecError("an item feature store needs text, images, or both")
        self.tokens, self.images, self.num_items = tokens, images, num_items
        # The reference code's data path, kept as a mode of this one for `pmmrec bench train`: titles padded to
        # max_tokens, images decoded for every occurrence with the database reopened per image.
        self.naive = False
        # Frozen-encoder outputs per item (see pmmrec.models.features); None = run the encoder.
        self.text_states: torch.Tensor | None = None  # (N+1, T_max, H) float16
        self.image_states: torch.Tensor | None = None  # (N+1, P, H) float16
        self.has_image: torch.Tensor | None = None  # (N+1,) bool, kept with image_states
        # True when text_states holds one pooled vector per item, (N+1, 1, H) float32 (see
        # pmmrec.models.features.pool_frozen_states): lookups then give a one-token mask.
        self.text_pooled = False
        # (N+1,) each item's row in the model's ID table (0 = no ID), for an ID-bearing model serving a catalogue
        # other than the one it trained on; None = the item numbers themselves.
        self.id_rows: np.ndarray | None = None

    @classmethod
    def build(cls, titles: Sequence[str], image_refs: Sequence[ImageRef] | None, *,
              tokenizer_path: str | os.PathLike | None, max_tokens: int = 50, lowercase: bool = True,
              preprocessor: ImagePreprocessor | None = None, missing_image: str = "error",
              cache_dir: str | os.PathLike | None = None, image_cache_items: int = 4096) -> ItemFeatureStore:
        """Tokenise titles (when ``tokenizer_path``) and prepare image access (when ``preprocessor``)."""
        tokens = images = None
        if tokenizer_path is not None:
            tokens = TokenTable.build(titles, tokenizer_path, max_tokens, lowercase, cache_dir)
        if preprocessor is not None:
            if image_refs is None or len(image_refs) != len(titles):
                raise PmmrecError("image references must be given for every item when images are used")
            images = ImageTable(image_refs, preprocessor, missing_image, image_cache_items)
        return cls(tokens, images, len(titles))

    def close(self) -> None:
        """Release the image databases' handles (reopened on the next lookup)."""
        if self.images is not None:
            self.images.close()

    def lookup(self, items: np.ndarray | torch.Tensor | Sequence[int]) -> ItemInputs:
        """Inputs for item numbers ``items`` (N,), in that order; 0 is the padding item."""
        items_np = np.asarray(items.cpu() if isinstance(items, torch.Tensor) else items, dtype=np.int64)
        if items_np.ndim != 1:
            raise ValueError(f"items must be 1-D, got shape {items_np.shape}")
        if items_np.size and (items_np.min() < 0 or items_np.max() > self.num_items):
            raise IndexError(f"item numbers must be in [0, {self.num_items}]")
        index = torch.from_numpy(items_np)
        out = ItemInputs(items=index if self.id_rows is None else torch.from_numpy(self.id_rows[items_np]))
        if self.text_states is not None and self.text_pooled:
            out.text_states, out.text_mask = self.text_states[index], torch.ones(len(index), 1, dtype=torch.long)
        elif self.text_states is not None:
            width = max(int(self.tokens.lengths[items_np].max(initial=0)), 1)
            out.text_mask = self.tokens.lookup(items_np)[1]
            out.text_states = self.text_states[index, :width]
        elif self.tokens is not None:
            out.text_ids, out.text_mask = self.tokens.lookup(items_np, full_width=self.naive)
        if self.image_states is not None:
            out.image_states, out.has_image = self.image_states[index], self.has_image[index]
        elif self.images is not None:
            out.images, out.has_image = self.images.lookup(items_np, naive=self.naive)
        return out
