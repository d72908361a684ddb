"""Architectures by name, each a body that ends in its penultimate representation.

Small inputs (< 64 px: MNIST, CIFAR, digits) get CIFAR-style stems (3x3, stride 1, no early max-pool) as in the
paper's CIFAR experiments; larger inputs get the ImageNet layouts of torchvision. Grayscale inputs change only the
first convolution. ``width`` scales the channels of the models that are cheap enough to train on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# The boundary between CIFAR-style and ImageNet-style layouts.
LARGE_INPUT = 64


def _ch(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def cnn(in_channels: int, image_size: int, width: float) -> tuple[nn.Module, int]:
    """The paper's "DNN": two conv layers and two fully connected layers (the second is the head)."""
    c1, c2, hidden = _ch(32, width), _ch(64, width), _ch(128, width)
    side = image_size // 4
    body = nn.Sequential(
        nn.Conv2d(in_channels, c1, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * side * side, hidden),
        nn.ReLU(inplace=True),
    )
    return body, hidden


def cnn_bn(in_channels: int, image_size: int, width: float) -> tuple[nn.Module, int]:
    """A deeper BatchNorm CNN (4 conv + 1 fc before the head): a student that differs from ``cnn``."""
    chans = [_ch(c, width) for c in (32, 32, 64, 64)]
    layers: list[nn.Module] = []
    prev = in_channels
    for i, c in enumerate(chans):
        layers += [nn.Conv2d(prev, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        if i % 2 == 1:
            layers.append(nn.MaxPool2d(2))
        prev = c
    hidden = _ch(128, width)
    side = image_size // 4
    layers += [nn.Flatten(), nn.Linear(prev * side * side, hidden), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers), hidden


_VGG = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def _vgg(layout: list, in_channels: int, image_size: int, width: float) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    prev, side = in_channels, image_size
    for item in layout:
        if item == "M":
            if side >= 2:  # small inputs (28 px) run out of resolution before the fifth pool
                layers.append(nn.MaxPool2d(2))
                side //= 2
            continue
        c = _ch(item, width)
        layers += [nn.Conv2d(prev, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        prev = c
    if image_size >= LARGE_INPUT:
        # ImageNet layout: the penultimate layer is the second 4096-d fully connected layer.
        hidden = _ch(4096, width)
        layers += [
            nn.AdaptiveAvgPool2d(7),
            nn.Flatten(),
            nn.Linear(prev * 49, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(),
        ]
        return nn.Sequential(*layers), hidden
    # CIFAR layout: the flattened 512 conv features after ReLU.
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), prev


def _torchvision_resnet(name: str, in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    from torchvision import models as tvm  # imported when used: ~1.5 s that every `rrm` command would pay

    net = getattr(tvm, name)(weights=None)
    if image_size < LARGE_INPUT:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    dim = net.fc.in_features
    body = nn.Sequential(
        net.conv1,
        net.bn1,
        net.relu,
        net.maxpool,
        net.layer1,
        net.layer2,
        net.layer3,
        net.layer4,
        net.avgpool,
        nn.Flatten(),
    )
    return body, dim


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _thin_resnet(blocks_per_stage: int, in_channels: int, width: float) -> tuple[nn.Module, int]:
    """He et al.'s CIFAR ResNet (16-32-64 channels): ResNet-8 and ResNet-20 train at a useful speed on a CPU."""
    chans = [_ch(c, width) for c in (16, 32, 64)]
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, chans[0], 3, 1, 1, bias=False),
        nn.BatchNorm2d(chans[0]),
        nn.ReLU(inplace=True),
    ]
    prev = chans[0]
    for stage, c in enumerate(chans):
        for b in range(blocks_per_stage):
            layers.append(_BasicBlock(prev, c, 2 if stage > 0 and b == 0 else 1))
            prev = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), prev


def alexnet(in_channels: int, image_size: int, width: float) -> tuple[nn.Module, int]:
    """torchvision's AlexNet for large inputs (penultimate 4096); a 3x3-stem variant for small ones."""
    if image_size >= LARGE_INPUT:
        from torchvision import models as tvm

        net = tvm.alexnet(weights=None)
        if in_channels != 3:
            net.features[0] = nn.Conv2d(in_channels, 64, 11, stride=4, padding=2)
        hidden = net.classifier[-1].in_features
        body = nn.Sequential(net.features, net.avgpool, nn.Flatten(), *list(net.classifier)[:-1])
        return body, hidden
    c = [_ch(x, width) for x in (64, 192, 384, 256, 256)]
    hidden = _ch(512, width)
    body = nn.Sequential(
        nn.Conv2d(in_channels, c[0], 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(c[0], c[1], 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(c[1], c[2], 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(c[2], c[3], 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(c[3], c[4], 3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(),
        nn.Linear(c[4] * 4, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
    )
    return body, hidden


class _MixerBlock(nn.Module):
    """One ConvMixer layer: a residual depthwise convolution (mixing space), then a pointwise one (mixing channels)."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.depthwise = nn.Sequential(
            nn.Conv2d(dim, dim, kernel, groups=dim, padding=kernel // 2), nn.ReLU(inplace=True), nn.BatchNorm2d(dim)
        )
        self.shortcut = nn.Identity()  # marks a residual block for the stage protocol
        self.pointwise = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.ReLU(inplace=True), nn.BatchNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x) + self.shortcut(x))


def convmixer(in_channels: int, image_size: int, width: float) -> tuple[nn.Module, int]:
    """ConvMixer (Trockman & Kolter 2022), a patch-embedding model: its first layer is a convolution with kernel =
    stride = patch size (4 px on small inputs, 7 on large), then ``depth`` mixer blocks at that resolution.

    ReLU stands for the paper's GELU, so the stages follow the zoo's pre-activation protocol (``stem`` is the patch
    embedding before its activation); 128 channels and depth 4 on small inputs, 256 and 8 on large ones.
    """
    large = image_size >= LARGE_INPUT
    patch, depth, kernel = (7, 8, 9) if large else (4, 4, 5)
    dim = _ch(256 if large else 128, width)
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, dim, patch, stride=patch),
        nn.ReLU(inplace=True),
        nn.BatchNorm2d(dim),
        *(_MixerBlock(dim, kernel) for _ in range(depth)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ]
    return nn.Sequential(*layers), dim


# name -> (in_channels, image_size, width) -> (body, penultimate_dim)
ARCHITECTURES: dict[str, Callable[[int, int, float], tuple[nn.Module, int]]] = {
    "cnn": cnn,
    "cnn-bn": cnn_bn,
    "resnet8": lambda c, s, w: _thin_resnet(1, c, w),
    "resnet20": lambda c, s, w: _thin_resnet(3, c, w),
    "vgg11": lambda c, s, w: _vgg(_VGG["vgg11"], c, s, w),
    "vgg16": lambda c, s, w: _vgg(_VGG["vgg16"], c, s, w),
    "vgg19": lambda c, s, w: _vgg(_VGG["vgg19"], c, s, w),
    "resnet18": lambda c, s, w: _torchvision_resnet("resnet18", c, s),
    "resnet50": lambda c, s, w: _torchvision_resnet("resnet50", c, s),
    "alexnet": alexnet,
    "convmixer": convmixer,
}
# Models whose ``width`` option is honoured; the torchvision ResNets keep their published widths.
WIDTH_SCALABLE = {"cnn", "cnn-bn", "resnet8", "resnet20", "vgg11", "vgg16", "vgg19", "alexnet", "convmixer"}
