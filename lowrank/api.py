"""The public entry points for single tensors and single layers."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ._checks import check_finite, resolve_device
from .errors import UnsupportedLayerError
from .ranks import RankRule, normalize_rank
from .registry import KernelShape, get_method


def decompose(weight: torch.Tensor, method: str, rank, *, groups: int = 1, dtype: torch.dtype = torch.float64,
              device=None, allow_larger: bool = False, **options):
    """Decompose a kernel ``(T, S/groups, kh, kw)`` or a Linear weight ``(out, in)``.

    Pure function: computes in ``dtype`` (float64 by default) on ``device`` (default: the
    weight's) and returns a frozen factor container with ``.to_weight()`` and ``.n_params``.
    ``options`` are the method's typed options (e.g. ``n_iter_max``, ``tol``; checked by
    ``Method.parse_options``) and its callbacks (``callback`` for tucker2/CP).
    """
    m = get_method(method)
    check_finite(weight)
    k = KernelShape.of(weight, groups)
    if weight.dim() == 2 and not m.linear_ok:
        raise UnsupportedLayerError(f"{m.name} needs a 4-D conv kernel, got a 2-D (Linear) weight; use 'svd'")
    if weight.dim() == 4:
        reason = m.kernel_ok(k)
        if reason:
            raise UnsupportedLayerError(reason)
    r = normalize_rank(m, k, rank, allow_larger=allow_larger)
    dev = resolve_device(device) or weight.device
    hooks = {name: options.pop(name) for name in m.callbacks if name in options}
    typed = m.parse_options(options)
    w = weight.detach().to(device=dev, dtype=dtype)
    return m.decompose(w, r, groups=k.groups, **dataclasses.asdict(typed), **hooks)


def relative_error(weight: torch.Tensor, factors) -> float:
    """``||W - W_hat||_F / ||W||_F`` in float64."""
    w = weight.detach().to(torch.float64)
    diff = w - factors.to_weight().to(device=w.device, dtype=torch.float64).reshape(w.shape)
    n = torch.linalg.vector_norm(w)
    return float(torch.linalg.vector_norm(diff) / n) if n > 0 else float(torch.linalg.vector_norm(diff))


def check_module(module: nn.Module, method: str):
    m = get_method(method)
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        raise UnsupportedLayerError(
            f"unsupported module type {type(module).__name__}; accepted: nn.Conv2d, nn.Linear")
    reason = m.unsupported_reason(module)
    if reason:
        raise UnsupportedLayerError(reason)
    return m


def factorize_with_factors(module: nn.Module, method: str, rank, **options):
    """``(factorized layer, factors)`` for one ``nn.Conv2d``/``nn.Linear``.

    ``rank``: an int or ``(R3, R4)``, a ``RankRule``, or a strategy name (``'vbmf'``,
    ``'energy'``, ``'ratio'``) whose settings come as keywords (``ratio=2, target='macs'``).
    The other keywords are the method's options, plus ``allow_larger``.
    """
    m = check_module(module, method)
    settings = {k: options.pop(k) for k in RankRule.keywords() if k in options}
    rule = RankRule.of(rank, **settings)
    allow_larger = bool(options.pop("allow_larger", False))
    groups = getattr(module, "groups", 1)
    r = rule.resolve(module, method, groups=groups, allow_larger=allow_larger)
    factors = decompose(module.weight, method, r, groups=groups, allow_larger=allow_larger, **options)
    return m.build(module, factors), factors


def factorize_layer(module: nn.Module, method: str, rank, **options) -> nn.Module:
    """``nn.Conv2d``/``nn.Linear`` in, factorized ``nn.Module`` out (same signature, same output
    shape, exact to float64 rounding at full rank). ``rank`` may also be a strategy name
    (``'vbmf'``, ``'energy'``, ``'ratio'``) with its settings as keywords, or a ``RankRule``."""
    return factorize_with_factors(module, method, rank, **options)[0]
