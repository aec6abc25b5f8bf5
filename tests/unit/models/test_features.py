from pathlib import Path

import numpy as np
import pytest
import torch

from pmmrec.config import load_config
from pmmrec.data.domain import read_domain
from pmmrec.data.item_features import ItemFeatureStore
from pmmrec.models.features import cache_frozen_features, pool_frozen_states
from pmmrec.models.item_encoder import ItemEncoder
from pmmrec.pretrained import tokenizer_dir

TINY = Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml"


def _setup(tiny_domain, *overrides):
    config = load_config(TINY, list(overrides))
    torch.manual_seed(0)
    encoder = ItemEncoder(config, num_items=6).eval()
    domain = read_domain(tiny_domain, missing_image="blank")
    store = ItemFeatureStore.build(domain.titles, domain.image_refs(), tokenizer_path=tokenizer_dir("tiny"),
                                   max_tokens=config.text.max_tokens,
                                   preprocessor=encoder.vision.preprocessor() if encoder.vision else None,
                                   missing_image="blank")
    return encoder, store


@pytest.mark.parametrize("fusion", ["merged_attention", "sum"])
def test_cached_features_match_the_live_forward(tiny_domain, fusion):
    encoder, store = _setup(tiny_domain, "text.trainable_layers=0", "vision.trainable_layers=0",
                            f"model.fusion={fusion}")
    items = np.array([3, 1, 6, 0, 2])
    with torch.no_grad():
        live = encoder(store.lookup(items))
    assert cache_frozen_features(encoder, store, torch.device("cpu"), batch_size=4, progress=False) == \
        ["text", "vision"]
    inputs = store.lookup(items)
    assert inputs.text_ids is None and inputs.images is None and inputs.text_states.dtype == torch.float16
    assert inputs.has_image.tolist() == [True, True, False, False, True]  # item 6 has no image; 0 is padding
    with torch.no_grad():
        cached = encoder(inputs)
    assert torch.allclose(live, cached, atol=2e-2, rtol=1e-2), (live - cached).abs().max()


@pytest.mark.parametrize("modality", ["multimodal", "text", "vision"])
def test_pooled_frozen_states_give_the_same_item_vectors_and_gradients(tiny_domain, modality):
    encoder, store = _setup(tiny_domain, "text.trainable_layers=0", "vision.trainable_layers=0", "model.fusion=sum",
                            f"model.modality={modality}")
    cache_frozen_features(encoder, store, torch.device("cpu"), batch_size=4, progress=False)
    items = np.array([3, 1, 6, 0, 2, 5, 3])  # with padding, a missing image and a repeat
    encoder.train()

    def vectors_and_grads():
        encoder.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out = encoder(store.lookup(items))
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}

    tokens, token_grads = vectors_and_grads()
    expected = {"multimodal": ["text", "vision"], "text": ["text"], "vision": ["vision"]}[modality]
    assert pool_frozen_states(encoder, store) == expected
    assert pool_frozen_states(encoder, store) == []  # pooled once
    inputs = store.lookup(items)
    for states in (inputs.text_states, inputs.image_states):
        assert states is None or states.shape[1:2] == (1,)
    pooled, pooled_grads = vectors_and_grads()
    torch.testing.assert_close(pooled, tokens, atol=1e-5, rtol=1e-5)
    assert pooled_grads.keys() == token_grads.keys()
    for name, grad in pooled_grads.items():
        torch.testing.assert_close(grad, token_grads[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("overrides", [("model.fusion=merged_attention", "vision.trainable_layers=0"),
                                       ("model.fusion=sum", "vision.trainable_layers=1")])
def test_states_a_step_still_needs_per_token_are_not_pooled(tiny_domain, overrides):
    encoder, store = _setup(tiny_domain, "text.trainable_layers=1", *overrides)
    cache_frozen_features(encoder, store, torch.device("cpu"), batch_size=4, progress=False)
    text, image = store.text_states, store.image_states
    assert pool_frozen_states(encoder, store) == []
    assert store.text_states is text and store.image_states is image and not store.text_pooled


def test_prefixes_off_leaves_encoders_with_trainable_blocks_uncached(tiny_domain):
    encoder, store = _setup(tiny_domain, "text.trainable_layers=0", "vision.trainable_layers=1")
    assert cache_frozen_features(encoder, store, torch.device("cpu"), progress=False, prefixes=False) == ["text"]
    inputs = store.lookup([1, 2])
    assert inputs.text_states is not None and inputs.images is not None and inputs.image_states is None
    out = encoder.train()(inputs)
    out.sum().backward()
    assert encoder.vision_proj.weight.grad is not None and encoder.text_proj.weight.grad is not None


@pytest.mark.parametrize("fusion", ["merged_attention", "sum"])
def test_frozen_prefix_cache_matches_the_full_forward_and_its_gradients(tiny_domain, fusion):
    encoder, store = _setup(tiny_domain, "text.trainable_layers=1", "vision.trainable_layers=1",
                            f"model.fusion={fusion}")
    items = np.array([3, 1, 6, 0, 2, 5])
    live_inputs = store.lookup(items)
    encoder.train()
    torch.manual_seed(1)  # the same dropout draws in the trainable blocks and the fusion on both paths
    live = encoder(live_inputs)
    live.square().sum().backward()
    live_grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    encoder.zero_grad(set_to_none=True)
    assert cache_frozen_features(encoder, store, torch.device("cpu"), batch_size=4, progress=False) == \
        ["text", "vision"]
    inputs = store.lookup(items)
    assert inputs.text_ids is None and inputs.images is None and inputs.image_states.dtype == torch.float16
    torch.manual_seed(1)
    cached = encoder(inputs)
    cached.square().sum().backward()
    real = slice(0, 3)  # rows of real items with an image; all rows are compared loosely below
    assert torch.allclose(live[real], cached[real], atol=2e-2, rtol=1e-2), (live - cached).abs().max()
    assert torch.allclose(live, cached, atol=5e-2, rtol=1e-2)
    cached_grads = {n: p.grad for n, p in encoder.named_parameters() if p.grad is not None}
    assert set(cached_grads) == set(live_grads)  # the same parameters train: the top blocks and everything after
    assert any(n.startswith("text.") for n in cached_grads) and any(n.startswith("vision.") for n in cached_grads)
    for name, grad in live_grads.items():
        assert torch.allclose(grad, cached_grads[name], atol=5e-2, rtol=5e-2), name


def test_training_curves_match_with_and_without_the_prefix_cache(tiny_domain, tmp_path):
    from pmmrec.training.api import build_trainer

    losses = {}
    for cache in (False, True):
        config = load_config(TINY, ["text.trainable_layers=1", "vision.trainable_layers=1", f"data.domain={tiny_domain}",
                                    "data.missing_image=blank", "data.min_seq_len=3", "train.batch_size=2",
                                    f"run.dir={tmp_path / str(cache)}", f"train.feature_cache={str(cache).lower()}",
                                    "train.device=cpu"])
        trainer = build_trainer(config)
        assert (trainer.batches.store.image_states is not None) == cache
        trainer.model.train()
        losses[cache] = []
        for epoch in range(3):
            trainer.epoch = epoch
            for batch in trainer.batches.epoch(epoch, 0):
                loss, _ = trainer.train_step(batch)
                losses[cache].append(loss)
    assert len(losses[True]) == 6
    np.testing.assert_allclose(losses[True], losses[False], rtol=2e-3)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_prefix_then_top_is_the_full_forward(k):
    from pmmrec.config import TextConfig, VisionConfig
    from pmmrec.models.encoders import build_text_encoder, build_vision_encoder

    torch.manual_seed(0)
    text = build_text_encoder(TextConfig(encoder="tiny", trainable_layers=k, tiny_layers=3)).eval()
    ids = torch.randint(1, 1000, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    with torch.no_grad():
        full, split = text(ids, mask), text.top(text.prefix(ids, mask), mask)
    assert torch.allclose(full[mask.bool()], split[mask.bool()], atol=1e-5)
    vision = build_vision_encoder(VisionConfig(encoder="tiny", trainable_layers=k, tiny_layers=3,
                                               image_size=16)).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(vision(images), vision.top(vision.prefix(images)), atol=1e-5)
    # The blocks are restored: a plain forward after top() still runs every block.
    with torch.no_grad():
        assert torch.allclose(vision(images), full_again := vision(images)) and full_again.shape[1] == 5


@pytest.mark.parametrize("k", [0, 1, 2, 5])
def test_efficientnet_prefix_and_channels_last(k):
    from pmmrec.data.images import ImagePreprocessor
    from pmmrec.models.encoders.efficientnet import EfficientNetLite
    from pmmrec.models.encoders.image import VisionEncoder

    torch.manual_seed(0)
    net = EfficientNetLite(num_classes=None)
    for module in net.modules():  # non-trivial BatchNorm statistics, so a misplaced stage would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    reference = {n: t.clone() for n, t in net.state_dict().items()}
    encoder = VisionEncoder(net, ImagePreprocessor.efficientnet_lite(64), k).eval()
    assert net._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        nchw = EfficientNetLite(num_classes=None)
        nchw.load_state_dict(reference)
        expected = nchw.eval().forward_features(images).flatten(2).transpose(1, 2)  # plain NCHW reference
        out = encoder(images)
        split = encoder.top(encoder.prefix(images))
    assert out.shape == (2, 4, 1280)
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4), (out - expected).abs().max()
    assert torch.allclose(split, out, atol=1e-5)


@pytest.mark.parametrize("overrides", [["model.fusion=sum"], ["model.fusion=gated"], ["model.modality=text"],
                                       ["model.modality=vision"]])
def test_pooling_before_the_projection_is_exact(tiny_domain, overrides):
    """Vector-level fusions pool first; the result equals projecting every token and pooling after."""
    encoder, store = _setup(tiny_domain, *overrides)
    assert encoder.pools_first
    inputs = store.lookup(np.array([1, 2, 3, 0]))
    with torch.no_grad():
        fast = encoder(inputs)
        t = encoder.text_proj(encoder.text(inputs.text_ids, inputs.text_mask)) if encoder.text else None
        v = encoder.vision_proj(encoder.vision(inputs.images)) if encoder.vision else None
        if encoder.fusion is not None:
            slow = encoder.fusion(t, inputs.text_mask, v, torch.ones(v.shape[:2], dtype=torch.long))
        else:
            from pmmrec.models.layers import masked_mean

            slow = masked_mean(t, inputs.text_mask) if t is not None else v.mean(1)
    # Real items agree exactly; the padding item (no tokens) may differ and is masked everywhere downstream.
    assert torch.allclose(fast[:3], slow[:3], atol=1e-5)


def _count_calls(module, counter):
    original = module.forward

    def counted(*args, **kwargs):
        out = original(*args, **kwargs)
        counter.append(len(out))  # items encoded in this call
        return out

    module.forward = counted


def test_features_are_reused_across_runs_from_one_cache_dir(tiny_domain, tmp_path, caplog):
    overrides = ("text.trainable_layers=0", "vision.trainable_layers=0")
    encoder, store = _setup(tiny_domain, *overrides)
    calls = []
    _count_calls(encoder.text, calls)
    _count_calls(encoder.vision, calls)
    with caplog.at_level("INFO", logger="pmmrec.models.features"):
        cache_frozen_features(encoder, store, torch.device("cpu"), batch_size=4, progress=False, cache_dir=tmp_path)
    assert sum(calls) > 0 and "cached text features: 7 items computed" in caplog.text
    first_text, first_image = store.text_states.clone(), store.image_states.clone()

    # A second run: same weights (same seed), same items -> nothing is computed, every row is identical.
    encoder2, store2 = _setup(tiny_domain, *overrides)
    calls.clear()
    _count_calls(encoder2.text, calls)
    _count_calls(encoder2.vision, calls)
    caplog.clear()
    with caplog.at_level("INFO", logger="pmmrec.models.features"):
        assert cache_frozen_features(encoder2, store2, torch.device("cpu"), batch_size=3, progress=False,
                                     cache_dir=tmp_path) == ["text", "vision"]
    assert calls == []
    assert "reused cached text features of 7 items" in caplog.text
    assert "reused cached vision features of 7 items" in caplog.text
    assert torch.equal(store2.text_states, first_text) and torch.equal(store2.image_states, first_image)
    assert store2.has_image.tolist() == [False, True, True, True, True, True, False]
    with torch.no_grad():
        live = encoder2(_setup(tiny_domain, *overrides)[1].lookup(np.arange(1, 7)))
        cached = encoder2(store2.lookup(np.arange(1, 7)))
    assert torch.allclose(live, cached, atol=2e-2, rtol=1e-2)


def test_changed_weights_or_items_miss_the_cache(tiny_domain, tmp_path):
    overrides = ("text.trainable_layers=0", "vision.trainable_layers=0")
    encoder, store = _setup(tiny_domain, *overrides)
    cache_frozen_features(encoder, store, torch.device("cpu"), progress=False, cache_dir=tmp_path)

    # Changed text weights: text recomputed for every item, images still reused.
    encoder2, store2 = _setup(tiny_domain, *overrides)
    with torch.no_grad():
        encoder2.text.blocks()[0].output.dense.weight.add_(0.01)
    calls = {"text": [], "vision": []}
    _count_calls(encoder2.text, calls["text"])
    _count_calls(encoder2.vision, calls["vision"])
    cache_frozen_features(encoder2, store2, torch.device("cpu"), progress=False, cache_dir=tmp_path)
    assert sum(calls["text"]) == 7 and calls["vision"] == []
    assert not torch.equal(store2.text_states, store.text_states)

    # One changed title: only that item's text is computed; the others come from the cache.
    encoder3, _ = _setup(tiny_domain, *overrides)
    domain = read_domain(tiny_domain, missing_image="blank")
    titles = list(domain.titles)
    titles[1] = "an entirely new title"
    store3 = ItemFeatureStore.build(titles, domain.image_refs(), tokenizer_path=tokenizer_dir("tiny"),
                                    max_tokens=16, preprocessor=encoder3.vision.preprocessor(), missing_image="blank")
    calls = {"text": [], "vision": []}
    _count_calls(encoder3.text, calls["text"])
    _count_calls(encoder3.vision, calls["vision"])
    cache_frozen_features(encoder3, store3, torch.device("cpu"), progress=False, cache_dir=tmp_path)
    assert calls["text"] == [1] and calls["vision"] == []
    rows = [0, 1, 3, 4, 5, 6]
    width = min(store3.text_states.shape[1], store.text_states.shape[1])
    assert torch.equal(store3.text_states[rows, :width], store.text_states[rows, :width])
    with torch.no_grad():
        assert torch.allclose(encoder3(store3.lookup(np.array([2]))),
                              encoder3(ItemFeatureStore.build(titles, domain.image_refs(),
                                                              tokenizer_path=tokenizer_dir("tiny"), max_tokens=16,
                                                              preprocessor=encoder3.vision.preprocessor(),
                                                              missing_image="blank").lookup(np.array([2]))),
                              atol=2e-2, rtol=1e-2)


def test_naive_data_path_gives_the_same_values(tiny_domain):
    """The benchmark's reference-code mode (every occurrence, full-width titles, DB reopened) changes no value."""
    from pmmrec.data.datasets import WindowCollator

    encoder, store = _setup(tiny_domain)
    windows = [np.array([0, 1, 2, 1]), np.array([3, 5, 5, 6])]
    fast = WindowCollator(store)(windows)
    store.naive = True
    slow = WindowCollator(store, naive=True)(windows)
    assert len(fast.unique) == 6 and len(slow.unique) == 8 and torch.equal(slow.unique[slow.inverse], slow.items)
    assert slow.inputs.text_ids.shape[1] == 16 > fast.inputs.text_ids.shape[1]  # padded to max_tokens
    with torch.no_grad():
        a = encoder(fast.inputs)[fast.inverse]
        b = encoder(slow.inputs)[slow.inverse]
    assert torch.allclose(a, b, atol=1e-5)
