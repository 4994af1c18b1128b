"""Low-rank parametrisations that live beyond one-shot decomposition.

* The vertical-BN-horizontal form of Tai et al. (ICLR 2016, section 4): every spatial conv
  ``C -> N`` with a ``kh x kw`` kernel becomes a ``kh x 1`` conv ``C -> K``, a BatchNorm over the
  ``K`` channels, and a ``1 x kw`` conv ``K -> N`` (stride, dilation and padding split between
  them as in spatial SVD; no nonlinearity, so the layer stays rank-``K`` in the Tai sense).
  ``to_lowrank_bn`` converts a model's convs, randomly initialised for training from scratch or
  from the spatial-SVD closed form; ``fold_bn`` folds each BatchNorm into the vertical conv
  (weights scaled, a bias added) for inference, giving the same function as eval mode.

* Already factorized layers back to one dense conv (``factors_of``, ``to_dense``): a fine-tuned
  factorized layer is a linear chain, so its dense kernel is exact; multi-stage compression
  re-decomposes that kernel at the next stage's rank.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .api import decompose
from .errors import LowRankError
from .factors import CPFactors, SpatialSVDFactors, SVDFactors, Tucker2Factors
from .geometry import ConvGeometry
from .layers import FactorizedConv2d, FactorizedLinear, build_spatial_svd
from .ranks import select_rank
from .surgery import LayerReport, replace_submodule, select_layers


class LowRankBNConv2d(FactorizedConv2d):
    """``[pad] -> vertical kh x 1 conv -> BatchNorm2d(K) -> horizontal 1 x kw conv``."""


def geometry_to_conv(geo: ConvGeometry, *, device=None, dtype=None) -> nn.Conv2d:
    """An ``nn.Conv2d`` with ``geo``'s signature (weights uninitialised)."""
    top, bottom, left, right = geo.pad
    padding = (top, left) if (top, left) == (bottom, right) else "same"
    return nn.Conv2d(geo.in_channels, geo.out_channels, geo.kernel, stride=geo.stride, padding=padding,
                     dilation=geo.dilation, groups=geo.groups, bias=geo.has_bias, padding_mode=geo.padding_mode,
                     device=device, dtype=dtype)


def _identity_bn(k: int, like: torch.Tensor) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(k, device=like.device, dtype=like.dtype)
    with torch.no_grad():  # eval mode: (x - 0) / sqrt((1 - eps) + eps) * 1 + 0 = x exactly
        bn.running_var.fill_(1.0 - bn.eps)
    return bn


def build_lowrank_bn(conv: nn.Conv2d, rank: int, *, init: str = "random") -> LowRankBNConv2d:
    """One conv in the vertical-BN-horizontal form. ``init='svd'``: the spatial-SVD closed form
    at ``rank`` with an identity BatchNorm (the same function as the rank-``rank`` spatial SVD
    in eval mode); ``init='random'``: PyTorch's default conv initialisation, for training from
    scratch."""
    if init not in ("random", "svd"):
        raise LowRankError(f"unknown init {init!r}; accepted: 'random', 'svd'")
    geo = ConvGeometry.from_conv(conv)
    if init == "svd":
        f = decompose(conv.weight, "spatial-svd", rank, groups=conv.groups)
    else:
        g = conv.groups
        (kh, kw), c_g, n_g = geo.kernel, geo.in_channels // g, geo.out_channels // g
        w = conv.weight
        f = SpatialSVDFactors(vertical=w.new_zeros(g, rank, c_g, kh), horizontal=w.new_zeros(g, n_g, rank, kw),
                              shape=tuple(w.shape))
    layer = build_spatial_svd(conv, f)
    stages = list(layer)
    convs = [i for i, m in enumerate(stages) if isinstance(m, nn.Conv2d)]
    if init == "random":
        for i in convs:
            stages[i].reset_parameters()
    stages.insert(convs[0] + 1, _identity_bn(stages[convs[0]].out_channels, conv.weight))
    return LowRankBNConv2d(*stages, method="spatial-svd-bn", rank=layer.rank, geometry=geo)


def to_lowrank_bn(model: nn.Module, *, rank: int | None = None, ratio: float | None = None, init: str = "random",
                  include=None, exclude=None, skip_first: bool = False,
                  inplace: bool = False) -> tuple[nn.Module, list[LayerReport]]:
    """Convert every spatial conv (both kernel sides > 1) selected by ``include``/``exclude``/
    ``skip_first`` into the vertical-BN-horizontal form at a fixed ``rank`` or at the rank that
    makes the layer ``ratio`` times smaller in parameters. Returns ``(model, reports)``."""
    if (rank is None) == (ratio is None):
        raise LowRankError("give exactly one of rank=<int> or ratio=<float >= 1>")
    model = model if inplace else copy.deepcopy(model)
    plan = select_layers(model, "spatial-svd", include=include, exclude=exclude, skip_first=skip_first)
    if not plan:
        raise LowRankError("no conv with a spatial kernel (both sides > 1) matches the layer selection")
    reports = []
    for name in plan:
        conv = model.get_submodule(name)
        k = (select_rank(conv, "spatial-svd", "fixed", rank=rank) if rank is not None
             else select_rank(conv, "spatial-svd", "ratio", ratio=ratio))
        new = build_lowrank_bn(conv, k, init=init)
        replace_submodule(model, name, new)
        reports.append(LayerReport(name=name, method="spatial-svd-bn", rank=k, layer_type="Conv2d",
                                   params_before=sum(p.numel() for p in conv.parameters()),
                                   params_after=sum(p.numel() for p in new.parameters())))
    return model, reports


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, c)``, float64, with ``bn(y) = s * y + c`` per channel in eval mode: ``s = gamma /
    sqrt(var + eps)``, ``c = beta - s * mean`` (mean 0 and variance 1 where it keeps no running
    statistics, gamma 1 and beta 0 where it has no affine)."""
    ref = next(iter([*bn.parameters(), *bn.buffers()]), None)
    ones = torch.ones(bn.num_features, dtype=torch.float64, device=ref.device if ref is not None else None)
    mean = bn.running_mean.double() if bn.running_mean is not None else torch.zeros_like(ones)
    var = bn.running_var.double() if bn.running_var is not None else ones
    gamma = bn.weight.double() if bn.weight is not None else ones
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(ones)
    s = gamma / torch.sqrt(var + bn.eps)
    return s, beta - s * mean


@torch.no_grad()
def fold_layer(layer: LowRankBNConv2d) -> tuple[FactorizedConv2d, SpatialSVDFactors]:
    """The BatchNorm folded into the vertical conv: ``V' = V * s``, ``b' = (b - mean) * s + beta``
    with ``s = gamma / sqrt(var + eps)``. Same output as ``layer.eval()``; the horizontal conv
    zero-pads the BN output in both forms, so borders match too."""
    stages = list(layer)
    convs = [m for m in stages if isinstance(m, nn.Conv2d)]
    bn = next(m for m in stages if isinstance(m, nn.BatchNorm2d))
    vertical, horizontal = convs
    geo = layer.geometry
    g, k = geo.groups, vertical.out_channels // geo.groups
    (kh, kw), c_g, n_g = geo.kernel, geo.in_channels // g, geo.out_channels // g
    v = vertical.weight.double()
    s, shift = bn_affine(bn)
    b = vertical.bias.double() if vertical.bias is not None else torch.zeros_like(s)
    dt = vertical.weight.dtype
    f = SpatialSVDFactors(vertical=(v * s[:, None, None, None]).to(dt).reshape(g, k, c_g, kh),
                          horizontal=horizontal.weight.detach().reshape(g, n_g, k, kw).clone(),
                          shape=(geo.out_channels, c_g, kh, kw),
                          vertical_bias=(b * s + shift).to(dt).reshape(g, k))
    template = geometry_to_conv(geo, device=vertical.weight.device, dtype=dt)
    if horizontal.bias is not None:
        template.bias.copy_(horizontal.bias)
    return build_spatial_svd(template, f), f


def fold_bn(model: nn.Module, *, inplace: bool = False) -> tuple[nn.Module, dict[str, SpatialSVDFactors]]:
    """Every ``LowRankBNConv2d`` replaced by its folded two-conv form (for inference and export).
    Returns ``(model, {layer name: folded factors})``; the model computes what the input model
    computes in eval mode."""
    model = model if inplace else copy.deepcopy(model)
    factors = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, LowRankBNConv2d):
            new, f = fold_layer(m)
            new.train(m.training)
            replace_submodule(model, name, new)
            factors[name] = f
    return model, factors


def factors_of(layer: FactorizedConv2d):
    """The factors a ``FactorizedConv2d`` holds now (e.g. after fine-tuning): the inverse of the
    builders' weight layout."""
    if not isinstance(layer, FactorizedConv2d) or layer.geometry is None:
        raise LowRankError(f"expected a FactorizedConv2d built by lowrank, got {type(layer).__name__}")
    if isinstance(layer, LowRankBNConv2d):
        raise LowRankError("fold the BatchNorm first (lowrank.reparam.fold_bn)")
    geo = layer.geometry
    g = geo.groups
    (kh, kw), s_g, t_g = geo.kernel, geo.in_channels // g, geo.out_channels // g
    shape = (geo.out_channels, s_g, kh, kw)
    w = [m.weight.detach() for m in layer if isinstance(m, nn.Conv2d)]
    method = layer.method
    if method == "svd":
        r = w[0].shape[0] // g
        return SVDFactors(left=w[1].reshape(g, t_g, r), right=w[0].reshape(g, r, -1), shape=shape)
    if method == "spatial-svd":
        k = w[0].shape[0] // g
        vb = next(m for m in layer if isinstance(m, nn.Conv2d)).bias
        return SpatialSVDFactors(vertical=w[0].reshape(g, k, s_g, kh), horizontal=w[1].reshape(g, t_g, k, kw),
                                 shape=shape, vertical_bias=None if vb is None else vb.detach().reshape(g, k))
    if method == "tucker2":
        r3, r4 = w[0].shape[0] // g, w[1].shape[0] // g
        return Tucker2Factors(in_factor=w[0].reshape(g, r3, s_g).transpose(1, 2), core=w[1].reshape(g, r4, r3, kh, kw),
                              out_factor=w[2].reshape(g, t_g, r4), shape=shape)
    if method.startswith("cp"):
        r = w[0].shape[0] // g
        a, b = w[-1].reshape(g, t_g, r), w[0].reshape(g, r, s_g).transpose(1, 2)
        if len(w) == 3:
            return CPFactors(factors=(a, b, w[1].reshape(g, r, kh * kw).transpose(1, 2)), shape=shape, method=method)
        return CPFactors(factors=(a, b, w[1].reshape(g, r, kh).transpose(1, 2), w[2].reshape(g, r, kw).transpose(1, 2)),
                         shape=shape, method=method)
    raise LowRankError(f"cannot read the factors of a {method!r} layer")


@torch.no_grad()
def to_dense(layer: FactorizedConv2d | FactorizedLinear) -> nn.Conv2d | nn.Linear:
    """The dense conv a factorized layer computes (exact: the stages are linear, the bias is the
    last stage's). Layers with a folded BatchNorm are affine at zero-padded borders, not a conv:
    refused."""
    if isinstance(layer, FactorizedLinear):
        first, last = layer[0], layer[1]
        lin = nn.Linear(first.in_features, last.out_features, bias=last.bias is not None,
                        device=last.weight.device, dtype=last.weight.dtype)
        lin.weight.copy_(last.weight @ first.weight)
        if lin.bias is not None:
            lin.bias.copy_(last.bias)
        return lin
    f = factors_of(layer)
    if getattr(f, "vertical_bias", None) is not None:
        raise LowRankError("a layer with a folded BatchNorm (vertical bias) is not exactly one dense conv")
    last = [m for m in layer if isinstance(m, nn.Conv2d)][-1]
    conv = geometry_to_conv(layer.geometry, device=last.weight.device, dtype=last.weight.dtype)
    conv.weight.copy_(f.to_weight().reshape(conv.weight.shape))
    if conv.bias is not None:
        conv.bias.copy_(last.bias)
    return conv
