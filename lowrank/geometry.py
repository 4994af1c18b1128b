"""Geometry of a conv layer, resolved once: kernel, stride, dilation, groups, explicit padding.

PyTorch accepts ``padding='same'`` (asymmetric for even effective kernels: the extra row/column
goes to the bottom/right) and non-zero padding modes. Factorized layers keep zero, symmetric
padding inside the convs when they can; otherwise they pad the input once up front, which is
exact because every factorized layer starts with a bias-free linear stage.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import UnsupportedLayerError

_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(x) for x in v)
    return (t[0], t[0]) if len(t) == 1 else (t[0], t[1])


@dataclass(frozen=True)
class ConvGeometry:
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    pad: tuple[int, int, int, int]  # (top, bottom, left, right)
    padding_mode: str
    has_bias: bool

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "ConvGeometry":
        if not isinstance(conv, nn.Conv2d):
            raise UnsupportedLayerError(f"expected nn.Conv2d, got {type(conv).__name__}")
        kernel, stride, dilation = _pair(conv.kernel_size), _pair(conv.stride), _pair(conv.dilation)
        if isinstance(conv.padding, str):
            if conv.padding == "valid":
                pad = (0, 0, 0, 0)
            else:  # 'same' (PyTorch only allows it with stride 1)
                tot_h, tot_w = dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1)
                pad = (tot_h // 2, tot_h - tot_h // 2, tot_w // 2, tot_w - tot_w // 2)
        else:
            ph, pw = _pair(conv.padding)
            pad = (ph, ph, pw, pw)
        if conv.padding_mode not in _PAD_MODES:
            raise UnsupportedLayerError(
                f"padding_mode {conv.padding_mode!r} is not supported; accepted: {sorted(_PAD_MODES)}"
            )
        return cls(
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            kernel=kernel,
            stride=stride,
            dilation=dilation,
            groups=conv.groups,
            pad=pad,
            padding_mode=conv.padding_mode,
            has_bias=conv.bias is not None,
        )

    @property
    def needs_prepad(self) -> bool:
        """True when the padding cannot live inside the convs (asymmetric or non-zero mode)."""
        top, bottom, left, right = self.pad
        return self.padding_mode != "zeros" or top != bottom or left != right

    @property
    def inner_padding(self) -> tuple[int, int]:
        """(pad_h, pad_w) for the convs of the factorized layer (0 when pre-padded)."""
        if self.needs_prepad:
            return (0, 0)
        return (self.pad[0], self.pad[2])

    def prepad(self) -> "Pad2d | None":
        if not self.needs_prepad or self.pad == (0, 0, 0, 0):
            return None
        top, bottom, left, right = self.pad
        return Pad2d((left, right, top, bottom), _PAD_MODES[self.padding_mode])

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        top, bottom, left, right = self.pad
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        return (
            (h + top + bottom - dh * (kh - 1) - 1) // sh + 1,
            (w + left + right - dw * (kw - 1) - 1) // sw + 1,
        )


class Pad2d(nn.Module):
    """Explicit input padding, ``pad = (left, right, top, bottom)`` as in ``F.pad``."""

    def __init__(self, pad: tuple[int, int, int, int], mode: str = "constant"):
        super().__init__()
        self.pad = tuple(int(p) for p in pad)
        self.mode = mode

    def forward(self, x):
        return nn.functional.pad(x, self.pad, mode=self.mode)

    def extra_repr(self) -> str:
        return f"pad={self.pad}, mode={self.mode!r}"
