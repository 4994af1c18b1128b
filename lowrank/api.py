"""The public entry points for single tensors and single layers."""
from __future__ import annotations

import inspect

import torch
from torch import nn

from ._checks import check_finite, resolve_device
from .errors import LowRankError, UnsupportedLayerError
from .ranks import normalize_rank, select_rank
from .registry import KernelShape, get_method

# keyword arguments that belong to rank selection rather than to the decomposition
STRATEGY_OPTIONS = ("weakening", "min_rank", "energy", "ratio", "target", "input_size")


def decompose(weight: torch.Tensor, method: str, rank, *, groups: int = 1, dtype: torch.dtype = torch.float64,
              device=None, allow_larger: bool = False, **options):
    """Decompose a kernel ``(T, S/groups, kh, kw)`` or a Linear weight ``(out, in)``.

    Pure function: computes in ``dtype`` (float64 by default) on ``device`` (default: the
    weight's) and returns a frozen factor container with ``.to_weight()`` and ``.n_params``.
    ``options`` go to the method (e.g. ``n_iter_max``, ``tol``, ``callback`` for tucker2/CP).
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
    params = inspect.signature(m.decompose).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        accepted = [p for p in params if p not in ("weight", "rank", "groups")]
        raise LowRankError(f"unknown option(s) {unknown} for method {m.name!r}; accepted: {accepted or 'none'}")
    w = weight.detach().to(device=dev, dtype=dtype)
    return m.decompose(w, r, groups=k.groups, **options)


def relative_error(weight: torch.Tensor, factors) -> float:
    """``||W - W_hat||_F / ||W||_F`` in float64."""
    w = weight.detach().to(torch.float64)
    diff = w - factors.to_weight().to(device=w.device, dtype=torch.float64).reshape(w.shape)
    n = torch.linalg.vector_norm(w)
    return float(torch.linalg.vector_norm(diff) / n) if n > 0 else float(torch.linalg.vector_norm(diff))


def split_options(options: dict) -> tuple[dict, dict]:
    strat = {k: v for k, v in options.items() if k in STRATEGY_OPTIONS}
    rest = {k: v for k, v in options.items() if k not in STRATEGY_OPTIONS}
    return strat, rest


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
    """Like ``factorize_layer`` but also returns the factors and the resolved rank."""
    m = check_module(module, method)
    strat, rest = split_options(options)
    allow_larger = rest.pop("allow_larger", False)
    if isinstance(rank, str):
        rank = select_rank(module, method, rank, allow_larger=allow_larger, **strat)
    elif strat:
        raise LowRankError(f"option(s) {sorted(strat)} only apply with a rank strategy "
                           f"('vbmf', 'energy', 'ratio'), not with a fixed rank {rank!r}")
    factors = decompose(module.weight, method, rank, groups=getattr(module, "groups", 1),
                        allow_larger=allow_larger, **rest)
    return m.build(module, factors), factors


def factorize_layer(module: nn.Module, method: str, rank, **options) -> nn.Module:
    """``nn.Conv2d``/``nn.Linear`` in, factorized ``nn.Module`` out (same signature, same output
    shape, exact to float64 rounding at full rank). ``rank`` may also be a strategy name
    (``'vbmf'``, ``'energy'``, ``'ratio'``) with its options as keywords."""
    return factorize_with_factors(module, method, rank, **options)[0]
