"""``nn.Module``s that run factors: plain convs/linears in an ``nn.Sequential``.

Every builder takes the dense module and the factors and returns a module with the same call
signature and output shape. Stride, padding, dilation and groups go to the stage that carries
the spatial kernel; the original bias goes to the last stage.
"""
from __future__ import annotations

import torch
from torch import nn

from .factors import CPFactors, SpatialSVDFactors, SVDFactors, Tucker2Factors
from .geometry import ConvGeometry


class _Factorized(nn.Sequential):
    def __init__(self, *stages: nn.Module, method: str, rank, geometry: ConvGeometry | None = None):
        super().__init__(*stages)
        self.method = method
        self.rank = rank
        self.geometry = geometry  # the dense conv this layer replaces (None for Linear)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, rank={self.rank}"


class FactorizedConv2d(_Factorized):
    """A conv replaced by a chain of smaller convs (see ``method``)."""


class FactorizedLinear(_Factorized):
    """A Linear replaced by two Linears (truncated SVD)."""


def _conv(cin, cout, kernel, *, stride=1, padding=0, dilation=1, groups=1, bias=False, like: nn.Module):
    w = like.weight
    return nn.Conv2d(
        cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
        device=w.device, dtype=w.dtype,
    )


@torch.no_grad()
def _set(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    module.weight.copy_(weight.reshape(module.weight.shape).to(module.weight))
    if bias is not None:
        module.bias.copy_(bias.detach().to(module.bias))
    return module


def _stages(geo: ConvGeometry, stages: list[nn.Module]) -> list[nn.Module]:
    pre = geo.prepad()
    return ([pre] if pre is not None else []) + stages


def build_svd(module: nn.Module, f: SVDFactors) -> nn.Module:
    g, _, r = f.left.shape
    if isinstance(module, nn.Linear):
        w = module.weight
        first = nn.Linear(module.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        last = nn.Linear(r, module.out_features, bias=module.bias is not None, device=w.device, dtype=w.dtype)
        return FactorizedLinear(_set(first, f.right[0]), _set(last, f.left[0], module.bias), method="svd", rank=r)
    geo = ConvGeometry.from_conv(module)
    # 1x1 kernel: the first stage takes stride and padding (zeros at padded positions, the
    # bias of the last stage then reproduces the dense layer's output there).
    first = _conv(geo.in_channels, g * r, 1, stride=geo.stride, padding=geo.inner_padding, groups=g, like=module)
    last = _conv(g * r, geo.out_channels, 1, groups=g, bias=geo.has_bias, like=module)
    return FactorizedConv2d(
        *_stages(geo, [_set(first, f.right), _set(last, f.left, module.bias)]), method="svd", rank=r, geometry=geo
    )


def build_spatial_svd(module: nn.Conv2d, f: SpatialSVDFactors) -> nn.Module:
    geo = ConvGeometry.from_conv(module)
    g, k = f.vertical.shape[:2]
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = geo.kernel, geo.stride, geo.dilation, geo.inner_padding
    vb = f.vertical_bias
    vertical = _conv(geo.in_channels, g * k, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1),
                     groups=g, bias=vb is not None, like=module)
    horizontal = _conv(g * k, geo.out_channels, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw),
                       groups=g, bias=geo.has_bias, like=module)
    return FactorizedConv2d(
        *_stages(geo, [_set(vertical, f.vertical, None if vb is None else vb.reshape(-1)),
                       _set(horizontal, f.horizontal, module.bias)]),
        method="spatial-svd", rank=k, geometry=geo,
    )


def build_tucker2(module: nn.Conv2d, f: Tucker2Factors) -> nn.Module:
    geo = ConvGeometry.from_conv(module)
    g = f.core.shape[0]
    r3, r4 = f.rank
    first = _conv(geo.in_channels, g * r3, 1, groups=g, like=module)
    core = _conv(g * r3, g * r4, geo.kernel, stride=geo.stride, padding=geo.inner_padding,
                 dilation=geo.dilation, groups=g, like=module)
    last = _conv(g * r4, geo.out_channels, 1, groups=g, bias=geo.has_bias, like=module)
    return FactorizedConv2d(
        *_stages(geo, [
            _set(first, f.in_factor.transpose(1, 2)),
            _set(core, f.core),
            _set(last, f.out_factor, module.bias),
        ]),
        method="tucker2", rank=(r3, r4), geometry=geo,
    )


def build_cp(module: nn.Conv2d, f: CPFactors) -> nn.Module:
    """``cp3``: 1x1 -> depthwise kh x kw -> 1x1; ``cp4``: 1x1 -> dw kh x 1 -> dw 1 x kw -> 1x1."""
    geo = ConvGeometry.from_conv(module)
    a, b = f.factors[0], f.factors[1]  # (g, T_g, R), (g, S_g, R)
    g, _, r = a.shape
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = geo.kernel, geo.stride, geo.dilation, geo.inner_padding
    first = _set(_conv(geo.in_channels, g * r, 1, groups=g, like=module), b.transpose(1, 2))
    last = _set(_conv(g * r, geo.out_channels, 1, groups=g, bias=geo.has_bias, like=module), a, module.bias)
    if len(f.factors) == 3:  # spatial modes merged: (g, kh*kw, R)
        dw_conv = _conv(g * r, g * r, (kh, kw), stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw),
                        groups=g * r, like=module)
        middle = [_set(dw_conv, f.factors[2].transpose(1, 2))]
    else:
        vert = _conv(g * r, g * r, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), groups=g * r,
                     like=module)
        horiz = _conv(g * r, g * r, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw), groups=g * r,
                      like=module)
        middle = [_set(vert, f.factors[2].transpose(1, 2)), _set(horiz, f.factors[3].transpose(1, 2))]
    return FactorizedConv2d(*_stages(geo, [first, *middle, last]), method=f.method, rank=r, geometry=geo)
