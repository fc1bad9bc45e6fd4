"""MobileNetV2 and ResNet-50 as torchvision defines them, without torchvision.

Serving needs only the two networks' structure: their ImageNet weights are torchvision's files,
so each module here has torchvision's parameter names, shapes, forward pass and initialisation
(modules built in the same order, so that one seed draws the same random weights).
``tests/model/test_architectures.py`` holds each to torchvision's own, state dict and outputs.
Keeping torchvision out of the import path lets the service run beside a CPU-only PyTorch build
for which no torchvision wheel exists, in a serving image a fifth of the CUDA one's size;
training still uses torchvision's augmentations.
"""

from __future__ import annotations

import torch
from torch import nn

# Where torchvision's ImageNet ResNet-50 (IMAGENET1K_V1) is published; its name ends in the
# first hex digits of its sha256, which torch.hub checks.
RESNET50_IMAGENET_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"


class ConvNormActivation(nn.Sequential):
    """Conv (no bias), batch norm, activation: torchvision's ``Conv2dNormActivation``."""

    def __init__(
        self,
        inp: int,
        out: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation: type[nn.Module] = nn.ReLU6,
    ) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(inp, out, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out),
            activation(inplace=True),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand (1 x 1), depthwise 3 x 3, project (1 x 1, linear)."""

    def __init__(self, inp: int, out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == out
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormActivation(inp, hidden, kernel_size=1))
        layers += [
            ConvNormActivation(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's ``mobilenet_v2()`` (width 1.0): ``features`` (stride 32, 1,280 channels),
    then ``classifier``."""

    # expansion t, channels c, repeats n, first stride s (Sandler et al., 2018, table 2)
    SETTING: tuple[tuple[int, int, int, int], ...] = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        channels = 32
        features: list[nn.Module] = [ConvNormActivation(3, channels, stride=2)]
        for t, c, n, s in self.SETTING:
            for i in range(n):
                features.append(InvertedResidual(channels, c, s if i == 0 else 1, t))
                channels = c
        features.append(ConvNormActivation(channels, 1280, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(1280, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class Bottleneck(nn.Module):
    """ResNet's bottleneck block, stride on the 3 x 3 convolution (ResNet v1.5)."""

    expansion = 4

    def __init__(
        self, inp: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inp, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50(nn.Module):
    """torchvision's ``resnet50()``: stem, ``layer1`` to ``layer4`` (stride 32, 2,048 channels),
    ``avgpool``, ``fc``."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self._channels = 64
        self.layer1 = self._layer(64, 3)
        self.layer2 = self._layer(128, 4, stride=2)
        self.layer3 = self._layer(256, 6, stride=2)
        self.layer4 = self._layer(512, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self._channels != out:
            downsample = nn.Sequential(
                nn.Conv2d(self._channels, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )
        layers = [Bottleneck(self._channels, planes, stride, downsample)]
        layers += [Bottleneck(out, planes) for _ in range(1, blocks)]
        self._channels = out
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
