"""Method registry: a method name maps to its decomposition, layer builder and cost model.

A duplicate name raises; tests are parametrized over ``METHODS`` so a new method is tested the
moment it is registered. Every built-in method is registered the same way, in ``lowrank.methods``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .errors import LowRankError
from .options import NoOptions, parse_options


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
    """What the runner and the rank strategies may know about a method, in one place.

    ``decompose(weight64, rank, *, groups, **options, **callbacks)`` is the pure function;
    ``options`` the frozen dataclass of its typed options (``lowrank.options``); ``callbacks``
    the names of its runtime hooks (not options: never in a spec); ``unfoldings(weight64,
    groups)`` the matrices whose spectra set each rank component (one list per component, for
    the ``vbmf`` and ``energy`` strategies; ``None`` when the method has no matrix rank);
    ``gpu`` whether its decomposition is iterative work worth moving to a worker's GPU.
    """

    name: str
    decompose: Callable  # (weight64, rank, *, groups, **options) -> factors
    build: Callable  # (module, factors) -> nn.Module
    max_rank: Callable[[KernelShape], int | tuple[int, int]]
    n_params: Callable[[KernelShape, object], int]  # weights only, no bias
    stages_macs: Callable  # (KernelShape, rank, hin, win, hout, wout) -> MACs
    options: type = NoOptions
    callbacks: tuple[str, ...] = ()
    unfoldings: Callable | None = None
    gpu: bool = False
    pair_rank: bool = False
    linear_ok: bool = False
    kernel_ok: Callable[[KernelShape], str | None] = lambda k: None
    description: str = ""

    def parse_options(self, given: dict):
        """Plain mapping -> the method's typed options (raises ``LowRankError`` on a bad one)."""
        return parse_options(self.name, self.options, dict(given or {}))

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


def dense_macs(k: KernelShape, hout: int, wout: int) -> int:
    return k.t * k.s * k.kh * k.kw * hout * wout


def generic_cp_max_rank(dims: tuple[int, ...]) -> int:
    """Generic upper bound on the rank of a tensor: product of all dimensions but the largest."""
    return math.prod(dims) // max(dims)
