"""Method registry: a method name maps to its decomposition, layer builder and cost model.

A duplicate name raises; tests are parametrized over ``METHODS`` so a new method is tested the
moment it is registered. The CP methods register themselves from ``lowrank.cp``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .errors import LowRankError


@dataclass(frozen=True)
class KernelShape:
    """``(T, S_g, kh, kw)`` plus ``groups``; a Linear is ``(out, in, 1, 1)`` with one group."""

    t: int
    s: int
    kh: int
    kw: int
    groups: int = 1

    @property
    def t_g(self) -> int:
        return self.t // self.groups

    @property
    def dense_params(self) -> int:
        return self.t * self.s * self.kh * self.kw

    @classmethod
    def of(cls, weight_or_module, groups: int = 1) -> "KernelShape":
        if isinstance(weight_or_module, nn.Module):
            w = weight_or_module.weight
            groups = getattr(weight_or_module, "groups", 1)
        else:
            w = weight_or_module
        shape = tuple(w.shape)
        if len(shape) == 2:
            return cls(shape[0], shape[1], 1, 1, 1)
        if len(shape) == 4:
            if shape[0] % groups:
                raise LowRankError(f"out channels {shape[0]} not divisible by groups={groups}")
            return cls(shape[0], shape[1], shape[2], shape[3], groups)
        raise LowRankError(f"weight must be 2-D (Linear) or 4-D (Conv2d), got shape {shape}")


@dataclass(frozen=True)
class Method:
    name: str
    decompose: Callable  # (weight64, rank, *, groups, **options) -> factors
    build: Callable  # (module, factors) -> nn.Module
    max_rank: Callable[[KernelShape], int | tuple[int, int]]
    n_params: Callable[[KernelShape, object], int]  # weights only, no bias
    stages_macs: Callable  # (KernelShape, rank, hin, win, hout, wout) -> MACs
    pair_rank: bool = False
    linear_ok: bool = False
    kernel_ok: Callable[[KernelShape], str | None] = lambda k: None
    description: str = ""

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if isinstance(module, nn.Linear):
            return None if self.linear_ok else f"{self.name} does not apply to nn.Linear; use 'svd'"
        if isinstance(module, nn.Conv2d):
            return self.kernel_ok(KernelShape.of(module))
        return (f"unsupported module type {type(module).__name__} for method {self.name!r}; "
                f"accepted: nn.Conv2d" + (", nn.Linear" if self.linear_ok else ""))


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise LowRankError(f"unknown method {name!r}; accepted: {', '.join(sorted(METHODS))}") from None


def list_methods() -> list[str]:
    return sorted(METHODS)


def _only_1x1(k: KernelShape) -> str | None:
    if (k.kh, k.kw) != (1, 1):
        return f"svd factorizes Linear layers and 1x1 convs, got a {k.kh}x{k.kw} kernel; use spatial-svd, tucker2 or a CP method"
    return None


def _spatial_only(name):
    def check(k: KernelShape) -> str | None:
        if k.kh * k.kw == 1:
            return f"{name} needs a spatial kernel larger than 1x1; use 'svd' for 1x1 convs"
        return None
    return check


def _register_builtins() -> None:
    from .decompositions.spatial_svd import decompose_spatial_svd
    from .decompositions.svd import decompose_svd
    from .decompositions.tucker2 import decompose_tucker2
    from .layers import build_spatial_svd, build_svd, build_tucker2

    register_method(Method(
        name="svd",
        decompose=decompose_svd,
        build=build_svd,
        max_rank=lambda k: min(k.t_g, k.s),
        n_params=lambda k, r: k.groups * r * (k.t_g + k.s),
        stages_macs=lambda k, r, hi, wi, ho, wo: k.groups * r * (k.s + k.t_g) * ho * wo,
        linear_ok=True,
        kernel_ok=_only_1x1,
        description="truncated SVD: Linear -> two Linears, 1x1 conv -> two 1x1 convs",
    ))
    register_method(Method(
        name="spatial-svd",
        decompose=decompose_spatial_svd,
        build=build_spatial_svd,
        max_rank=lambda k: min(k.s * k.kh, k.t_g * k.kw),
        n_params=lambda k, r: k.groups * r * (k.s * k.kh + k.t_g * k.kw),
        # vertical stage runs at the un-strided (padded) input width
        stages_macs=lambda k, r, hi, wi, ho, wo: k.groups * r * (k.s * k.kh * ho * wi + k.t_g * k.kw * ho * wo),
        kernel_ok=_spatial_only("spatial-svd"),
        description="Tai et al. 2016: (kh x 1) conv -> (1 x kw) conv, exact global optimum",
    ))
    register_method(Method(
        name="tucker2",
        decompose=decompose_tucker2,
        build=build_tucker2,
        max_rank=lambda k: (k.s, k.t_g),
        n_params=lambda k, r: k.groups * (k.s * r[0] + k.kh * k.kw * r[0] * r[1] + k.t_g * r[1]),
        stages_macs=lambda k, r, hi, wi, ho, wo: k.groups * (
            k.s * r[0] * hi * wi + k.kh * k.kw * r[0] * r[1] * ho * wo + k.t_g * r[1] * ho * wo),
        pair_rank=True,
        kernel_ok=_spatial_only("tucker2"),
        description="Kim et al. 2016: 1x1 -> kh x kw core -> 1x1 (HOSVD + HOOI)",
    ))


def dense_macs(k: KernelShape, hout: int, wout: int) -> int:
    return k.t * k.s * k.kh * k.kw * hout * wout


def generic_cp_max_rank(dims: tuple[int, ...]) -> int:
    """Generic upper bound on the rank of a tensor: product of all dimensions but the largest."""
    return math.prod(dims) // max(dims)
