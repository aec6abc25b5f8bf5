"""Vision encoder: EfficientNet-Lite0 tokens, tiny ViT, local CLIP/ViT folders, freezing by block.

See docs/design.md §4.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from pmmrec.config import VisionConfig, load_config
from pmmrec.data.images import CLIP_MEAN, CLIP_STD
from pmmrec.errors import PmmrecError
from pmmrec.models.encoders.image import VisionEncoder, build_vision_encoder

EFFICIENTNET_FEATURES = 3_371_008  # EfficientNet-Lite0 without its ImageNet classifier
HEAD = 320 * 1280 + 2 * 1280  # head convolution + its BatchNorm (weight, bias)
TOP_BLOCKS = [  # parameters of MBConv blocks 15, 14, 13 (192 -> 1152 -> 320, then 192 -> 1152 -> 192 with 5x5)
    192 * 1152 + 2 * 1152 + 1152 * 9 + 2 * 1152 + 1152 * 320 + 2 * 320,
    192 * 1152 + 2 * 1152 + 1152 * 25 + 2 * 1152 + 1152 * 192 + 2 * 192,
    192 * 1152 + 2 * 1152 + 1152 * 25 + 2 * 1152 + 1152 * 192 + 2 * 192,
]
TINY = dict(image_size=32, tiny_patch=8, tiny_dim=32, tiny_layers=2)


def _trainable(encoder: nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in encoder.named_parameters() if p.requires_grad}


def _trainable_blocks(encoder: nn.Module) -> set[str]:
    """Indices of the blocks holding trainable parameters; other trainable modules by name (e.g. the CNN head)."""
    names = set()
    for name in _trainable(encoder):
        match = re.search(r"\.(?:layers?|_blocks)\.(\d+)\.", name)
        names.add(match.group(1) if match else name.rsplit(".", 1)[0])
    return names


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in module.named_buffers()}


@pytest.mark.parametrize("k", [0, 1, 2, 3, 16])
def test_efficientnet_freezes_all_but_the_top_k_blocks_and_the_head(k):
    encoder = build_vision_encoder(VisionConfig(trainable_layers=k))
    trainable = _trainable(encoder)
    expected = {str(i) for i in range(16 - k, 16)} | ({"backbone._conv_head", "backbone._bn1"} if k else set())
    assert _trainable_blocks(encoder) == expected
    if k <= 3:
        assert sum(trainable.values()) == (HEAD + sum(TOP_BLOCKS[:k]) if k else 0)
    assert sum(p.numel() for p in encoder.parameters()) == EFFICIENTNET_FEATURES
    assert encoder.trainable_layers == k and encoder.out_dim == 1280


def test_efficientnet_gives_49_tokens_and_its_own_preprocessing():
    encoder = build_vision_encoder(VisionConfig(trainable_layers=1)).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = encoder(images)  # (2, 49, 1280)
        feature_map = encoder.backbone.forward_features(images)  # (2, 1280, 7, 7)
    assert tokens.shape == (2, 49, 1280)
    assert torch.equal(tokens[:, 7 * 2 + 3], feature_map[:, :, 2, 3])  # row-major token order
    pre = encoder.preprocessor()
    assert (pre.size, pre.resize_shortest) == (224, 256)
    assert pre.mean == pytest.approx((127 / 255,) * 3) and pre.std == pytest.approx((128 / 255,) * 3)


def test_frozen_batchnorm_keeps_its_running_statistics_in_train_mode():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 64, 64)
    frozen = build_vision_encoder(VisionConfig(trainable_layers=0))
    nn.Sequential(frozen).train()
    before = _buffers(frozen)
    frozen(images)
    assert all(torch.equal(before[n], b) for n, b in frozen.named_buffers())
    partial = build_vision_encoder(VisionConfig(trainable_layers=1)).train()
    before = _buffers(partial)
    partial(images)
    changed = {n.rsplit(".", 1)[0] for n, b in partial.named_buffers() if not torch.equal(before[n], b)}
    # Only the trainable top block (15) and the head normalise with batch statistics and update their averages.
    assert changed == {"backbone._blocks.15._bn0", "backbone._blocks.15._bn1", "backbone._blocks.15._bn2",
                       "backbone._bn1"}


def test_tiny_vit_of_the_tiny_recipe(repo):
    cfg = load_config(repo / "configs" / "tiny.yaml").vision
    torch.manual_seed(0)
    a = build_vision_encoder(cfg)
    torch.manual_seed(0)
    b = build_vision_encoder(cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    tokens = a(torch.randn(3, 3, cfg.image_size, cfg.image_size))
    assert tokens.shape == (3, (cfg.image_size // cfg.tiny_patch) ** 2 + 1, cfg.tiny_dim)
    assert a.out_dim == cfg.tiny_dim
    assert _trainable_blocks(a) == {"0", "1"}  # blocks train; patch embeddings and the final norm do not
    pre = a.preprocessor()
    assert pre.size == cfg.image_size and pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)


def _save_clip(folder, full: bool) -> nn.Module:
    """A tiny random CLIP checkpoint (full model or vision tower) with a CLIP preprocessor_config.json."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
                  patch_size=8)
    if full:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        tower = model.vision_model
    else:
        model = tower = CLIPVisionModel(CLIPVisionConfig(**vision))
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"shortest_edge": 32}, "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "resample": 3}))
    return tower.eval()


@pytest.mark.parametrize("full", [True, False], ids=["full-clip", "vision-tower"])
def test_clip_vision_tower_from_a_local_folder(tmp_path, full):
    tower = _save_clip(tmp_path, full)
    encoder = build_vision_encoder(VisionConfig(encoder=str(tmp_path), image_size=32, trainable_layers=1))
    assert isinstance(encoder, VisionEncoder) and encoder.out_dim == 32
    assert type(encoder.backbone).__name__ == "CLIPVisionModel"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = encoder.eval()(images)
        expected = tower(pixel_values=images).last_hidden_state
    assert tokens.shape == (2, 17, 32)  # 4 x 4 patches + [CLS]
    assert torch.allclose(tokens, expected, atol=1e-5)
    assert _trainable_blocks(encoder) == {"2"}  # the top block of 3
    assert encoder.preprocessor().mean == pytest.approx(CLIP_MEAN)


def test_other_vision_models_load_through_automodel(tmp_path):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32)).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 32, "width": 32}}))
    encoder = build_vision_encoder(VisionConfig(encoder=str(tmp_path), image_size=32, trainable_layers=1))
    assert encoder(torch.randn(1, 3, 32, 32)).shape == (1, 5, 16)
    with pytest.raises(PmmrecError, match="vision.image_size=32"):
        build_vision_encoder(VisionConfig(encoder=str(tmp_path), image_size=224))


@pytest.mark.parametrize("name", ["openai/clip-vit-base-patch32", "/no/such/folder"])
def test_names_that_would_need_a_download_are_clear_errors(name):
    with pytest.raises(PmmrecError, match="cannot be downloaded"):
        build_vision_encoder(VisionConfig(encoder=name))


def test_invalid_tiny_geometry_is_a_clear_error():
    with pytest.raises(PmmrecError, match="multiple of"):
        build_vision_encoder(VisionConfig(encoder="tiny", image_size=30, tiny_patch=8))
