import numpy as np
import pytest
import torch

from pmmrec.data.domain import read_domain
from pmmrec.data.images import ImagePreprocessor
from pmmrec.data.item_features import ItemFeatureStore, TokenTable, load_tokenizer
from pmmrec.errors import DataError, PmmrecError
from pmmrec.pretrained import minilm_path, tokenizer_dir


def _store(domain, **kw):
    args = dict(tokenizer_path=minilm_path(), max_tokens=8, preprocessor=ImagePreprocessor(size=8),
                missing_image="blank")
    args.update(kw)
    return ItemFeatureStore.build(domain.titles, domain.image_refs(), **args)


def test_titles_tokenised_with_the_bundled_tokenizer(tiny_domain):
    domain = read_domain(tiny_domain, missing_image="blank")
    store = _store(domain)
    tok = load_tokenizer(minilm_path())
    inputs = store.lookup([1, 2])
    expected = tok("red apple pie")["input_ids"]  # lower-cased, as the reference code does
    assert inputs.text_ids[0, : len(expected)].tolist() == expected
    # Padded to the longest title of THIS batch, not to max_tokens.
    assert inputs.text_ids.shape[1] == len(expected) == int(inputs.text_mask[0].sum())
    assert inputs.text_mask[1].sum() == len(tok("green tea")["input_ids"])


def test_long_titles_are_capped_and_padding_item_is_empty(tiny_domain):
    domain = read_domain(tiny_domain, missing_image="blank")
    inputs = _store(domain).lookup([3, 0])
    assert inputs.text_ids.shape == (2, 8)
    assert inputs.text_mask[0].sum() == 8 and inputs.text_mask[1].sum() == 0
    assert inputs.items.tolist() == [3, 0]


def test_images_preprocessed_and_missing_ones_blank(tiny_domain):
    domain = read_domain(tiny_domain, missing_image="blank")
    store = _store(domain)
    inputs = store.lookup([1, 6, 1])
    assert inputs.images.shape == (3, 3, 8, 8) and inputs.images.dtype == torch.float32
    assert inputs.has_image.tolist() == [True, False, True]
    pre = ImagePreprocessor(size=8)
    assert torch.allclose(inputs.images[1], torch.from_numpy(np.asarray(pre.blank(), dtype=np.float32)))
    red = inputs.images[0]
    assert red[0].mean() > red[1].mean() and red[0].mean() > red[2].mean()  # red channel dominates
    assert torch.allclose(inputs.images[0], inputs.images[2], atol=1e-2)  # cache returns the same pixels


def test_missing_image_is_an_error_by_default(tiny_domain):
    domain = read_domain(tiny_domain, missing_image="blank")
    store = _store(domain, missing_image="error")
    with pytest.raises(DataError, match="'i6' has no image"):
        store.lookup([6])


def test_token_cache_is_reused(tiny_domain, tmp_path, monkeypatch):
    domain = read_domain(tiny_domain, missing_image="blank")
    first = TokenTable.build(domain.titles, minilm_path(), 8, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("tokens-*.npz"))) == 1
    import pmmrec.data.item_features as module

    monkeypatch.setattr(module, "load_tokenizer", lambda path: pytest.fail("cache should have been used"))
    second = TokenTable.build(domain.titles, minilm_path(), 8, cache_dir=tmp_path / "cache")
    assert np.array_equal(first.ids, second.ids) and np.array_equal(first.lengths, second.lengths)
    # A different cap is a different cache entry.
    monkeypatch.undo()
    TokenTable.build(domain.titles, minilm_path(), 4, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("tokens-*.npz"))) == 2


def test_text_only_store_and_bounds(tiny_domain):
    domain = read_domain(tiny_domain)
    store = ItemFeatureStore.build(domain.titles, None, tokenizer_path=minilm_path(), max_tokens=8)
    inputs = store.lookup(torch.tensor([2, 4]))
    assert inputs.images is None and inputs.text_ids.shape[0] == 2
    with pytest.raises(IndexError):
        store.lookup([7])
    with pytest.raises(PmmrecError):
        ItemFeatureStore.build(domain.titles, None, tokenizer_path=None)


def test_hub_names_are_refused_with_a_clear_message():
    with pytest.raises(PmmrecError, match="cannot be downloaded at run time.*text.encoder=DIR"):
        tokenizer_dir("bert-base-uncased")
    assert tokenizer_dir("tiny") == minilm_path()


def test_pixels_do_not_depend_on_the_cache(tiny_domain):
    domain = read_domain(tiny_domain, missing_image="blank")
    cached, uncached = _store(domain), _store(domain, image_cache_items=0)
    first = cached.lookup([1, 2]).images  # loads and caches
    again = cached.lookup([1, 2]).images  # served from the cache
    fresh = uncached.lookup([1, 2]).images
    assert torch.equal(first, again) and torch.equal(first, fresh)
