"""EfficientNet-Lite0 in plain PyTorch: strict loading, TF "SAME" padding, ImageNet sanity (docs/design.md §10)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pmmrec.data.images import ImagePreprocessor
from pmmrec.errors import PmmrecError
from pmmrec.models.encoders.efficientnet import EfficientNetLite, SameConv2d, load_efficientnet_lite0
from pmmrec.pretrained import efficientnet_lite0_file

LITE0_PARAMS = 4_652_008  # 3,371,008 feature extractor + 1,281,000 ImageNet classifier
BUILDINGS = {442, 483, 497, 538, 663, 668, 698, 832}  # bell cote, castle, church, dome, monastery, mosque, palace, stupa
PALACE, DAISY = 698, 985


def _sample_photo(name: str) -> Path:
    """One of the two photos scikit-learn ships (``sklearn.datasets.load_sample_image``), found without importing
    scikit-learn (seconds of import time)."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "images" / name if spec and spec.origin else None
    if path is None or not path.is_file():
        pytest.skip(f"scikit-learn's sample photo {name} is not installed")
    return path


@pytest.fixture(scope="module")
def classifier() -> EfficientNetLite:
    return load_efficientnet_lite0(efficientnet_lite0_file(), with_classifier=True).eval()


def test_weights_load_strictly_with_the_b0_stage_table(classifier):
    assert sum(p.numel() for p in classifier.parameters()) == LITE0_PARAMS
    assert len(classifier._blocks) == 16
    features = load_efficientnet_lite0(efficientnet_lite0_file())  # without the classifier
    assert features._fc is None
    assert sum(p.numel() for p in features.parameters()) == LITE0_PARAMS - 1_281_000
    with pytest.raises(PmmrecError, match="without its classifier"):
        features(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("size,tokens", [(224, 7), (225, 8), (64, 2)])
def test_feature_map_size_is_ceil_of_size_over_32(classifier, size, tokens):
    with torch.no_grad():
        assert classifier.forward_features(torch.zeros(1, 3, size, size)).shape == (1, 1280, tokens, tokens)


def test_same_padding_pads_bottom_right_for_stride_two_on_even_inputs():
    torch.manual_seed(0)
    conv = SameConv2d(2, 3, kernel_size=5, stride=2)
    x = torch.randn(1, 2, 10, 11)
    # TensorFlow: total padding = (ceil(n / 2) - 1) * 2 + 5 - n, the extra pixel at the end: 3 -> (1, 2); 11 -> 2 each.
    expected = F.conv2d(F.pad(x, (2, 2, 1, 2)), conv.weight, stride=2)
    assert torch.allclose(conv(x), expected)
    assert SameConv2d(2, 3, 3)(x).shape == (1, 3, 10, 11)


def test_matches_the_reference_implementation(classifier):
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    ref = reference.EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(efficientnet_lite0_file(), map_location="cpu", weights_only=True))
    ref.eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(classifier.forward_features(x), ref.extract_features(x), atol=1e-5)
        assert torch.allclose(classifier(x), ref(x), atol=1e-4)


def test_imagenet_head_recognises_the_sample_photos(classifier):
    preprocess = ImagePreprocessor.efficientnet_lite()
    photos = [Image.open(_sample_photo(name)) for name in ("china.jpg", "flower.jpg")]
    with torch.no_grad():
        probs = classifier(preprocess.batch(photos)).softmax(-1)  # (2, 1000)
    top = probs.topk(5).indices.tolist()
    # china.jpg is a Chinese temple: measured top-5 palace, bell cote, monastery, lakeside, castle.
    assert top[0][0] == PALACE and probs[0, PALACE] > 0.25
    assert len(BUILDINGS & set(top[0])) >= 3
    # flower.jpg is a close-up of a flower: measured top-1 daisy (p = 0.31).
    assert top[1][0] == DAISY and probs[1, DAISY] > 0.2
    # A randomly initialised network is near-uniform: the confidence above comes from the weights.
    torch.manual_seed(0)
    with torch.no_grad():
        assert EfficientNetLite().eval()(preprocess.batch(photos)).softmax(-1).max() < 0.05


def test_unreadable_or_foreign_weights_are_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(PmmrecError, match="cannot read"):
        load_efficientnet_lite0(garbage)
    foreign = tmp_path / "foreign.pth"
    torch.save({"conv.weight": torch.zeros(1)}, foreign)
    with pytest.raises(PmmrecError, match="not EfficientNet-Lite0 weights"):
        load_efficientnet_lite0(foreign)
