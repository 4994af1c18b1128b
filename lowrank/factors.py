"""Frozen containers for the factors each decomposition returns.

Convolution kernels use PyTorch order ``(T, S/groups, kh, kw)``; grouped kernels are decomposed
per group, so every factor carries a leading group axis ``g``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SVDFactors:
    """``W[g] ~ left[g] @ right[g]`` with ``left: (g, T_g, R)`` and ``right: (g, R, S_g*kh*kw)``.

    For a Linear ``g == 1`` and ``kh == kw == 1``; a 1x1 conv has ``kh == kw == 1``.
    """

    left: torch.Tensor
    right: torch.Tensor
    shape: tuple[int, ...]
    method: str = "svd"

    @property
    def rank(self) -> int:
        return int(self.left.shape[-1])

    @property
    def n_params(self) -> int:
        return self.left.numel() + self.right.numel()

    def to_weight(self) -> torch.Tensor:
        w = torch.bmm(self.left, self.right)  # (g, T_g, S_g*kh*kw)
        return w.reshape(self.shape)


@dataclass(frozen=True)
class SpatialSVDFactors:
    """Tai et al. 2016: ``vertical: (g, K, C_g, kh)``, ``horizontal: (g, N_g, K, kw)``.

    ``vertical_bias: (g, K)`` is only set for a layer trained in the vertical-BN-horizontal form
    with its BatchNorm folded in (``lowrank.reparam.fold_bn``); the layer is then affine and
    ``to_weight`` is its linear part.
    """

    vertical: torch.Tensor
    horizontal: torch.Tensor
    shape: tuple[int, ...]
    method: str = "spatial-svd"
    vertical_bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.vertical.shape[1])

    @property
    def n_params(self) -> int:
        extra = 0 if self.vertical_bias is None else self.vertical_bias.numel()
        return self.vertical.numel() + self.horizontal.numel() + extra

    def to_weight(self) -> torch.Tensor:
        # W[n, c, i, j] = sum_k V[k, c, i] H[n, k, j]  (per group)
        w = torch.einsum("gkci,gnkj->gncij", self.vertical, self.horizontal)
        return w.reshape(self.shape)


@dataclass(frozen=True)
class Tucker2Factors:
    """Kim et al. 2016: ``W[g] ~ core[g] x_T out_factor[g] x_S in_factor[g]``.

    ``in_factor: (g, S_g, R3)``, ``core: (g, R4, R3, kh, kw)``, ``out_factor: (g, T_g, R4)``;
    the two factor matrices have orthonormal columns.
    """

    in_factor: torch.Tensor
    core: torch.Tensor
    out_factor: torch.Tensor
    shape: tuple[int, ...]
    method: str = "tucker2"

    @property
    def rank(self) -> tuple[int, int]:
        return int(self.in_factor.shape[-1]), int(self.out_factor.shape[-1])

    @property
    def n_params(self) -> int:
        return self.in_factor.numel() + self.core.numel() + self.out_factor.numel()

    def to_weight(self) -> torch.Tensor:
        w = torch.einsum("gtp,gpqij,gsq->gtsij", self.out_factor, self.core, self.in_factor)
        return w.reshape(self.shape)


@dataclass(frozen=True)
class CPFactors:
    """CP model ``[[U_1, ..., U_N]]`` of a kernel, one factor list per group.

    ``factors[n]`` has shape ``(g, I_n, R)``. Mode order: ``(T, S, kh*kw)`` for ``cp3`` and
    ``(T, S, kh, kw)`` for ``cp4``. ``diagnostics`` holds the degeneracy diagnostics of the fit
    (before/after EPC where EPC ran).
    """

    factors: tuple[torch.Tensor, ...]
    shape: tuple[int, ...]
    method: str = "cp3"
    diagnostics: dict = field(default_factory=dict, compare=False)

    @property
    def rank(self) -> int:
        return int(self.factors[0].shape[-1])

    @property
    def n_params(self) -> int:
        # the layer stores (T + S + kh*kw) * R for cp3 and (T + S + kh + kw) * R for cp4
        return sum(f.numel() for f in self.factors)

    def to_weight(self) -> torch.Tensor:
        letters = "abcd"[: len(self.factors)]
        expr = ",".join(f"g{c}r" for c in letters) + "->g" + letters
        w = torch.einsum(expr, *self.factors)
        return w.reshape(self.shape)


Factors = SVDFactors | SpatialSVDFactors | Tucker2Factors | CPFactors


def factors_to(factors, device) -> "Factors":
    """The same factors with every tensor on ``device`` (e.g. CPU before crossing process bounds)."""
    changes = {}
    for f in dataclasses.fields(factors):
        v = getattr(factors, f.name)
        if torch.is_tensor(v):
            changes[f.name] = v.to(device)
        elif isinstance(v, tuple) and v and torch.is_tensor(v[0]):
            changes[f.name] = tuple(t.to(device) for t in v)
    return dataclasses.replace(factors, **changes) if changes else factors
