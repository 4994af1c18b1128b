"""Tai et al., ICLR 2016, Theorem 1: vertical (kh x 1) then horizontal (1 x kw) filters.

The map ``T[W]`` that puts filter ``W[n, c]`` in block ``(c, n)`` of a ``(C*kh, N*kw)`` matrix
is a linear isometric bijection, so the best rank-K separable approximation is the truncated
SVD of that matrix: error^2 = sum of the squared tail singular values (global optimum).
"""
from __future__ import annotations

import torch

from ..factors import SpatialSVDFactors
from ._common import fix_signs, kernel_groups


def tai_matrix(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``(T, C_g, kh, kw)`` -> ``(g, C_g*kh, T_g*kw)`` with rows (c, i) and columns (n, j)."""
    w = kernel_groups(weight, groups)  # (g, N, C, kh, kw)
    g, n, c, kh, kw = w.shape
    return w.permute(0, 2, 3, 1, 4).reshape(g, c * kh, n * kw)


def decompose_spatial_svd(weight: torch.Tensor, rank: int, *, groups: int = 1) -> SpatialSVDFactors:
    g = groups
    t, c, kh, kw = weight.shape
    n = t // g
    u, s, vh = torch.linalg.svd(tai_matrix(weight, g), full_matrices=False)
    u, v = fix_signs(u[..., :rank], vh[..., :rank, :].transpose(1, 2))
    root = s[..., :rank].sqrt().unsqueeze(1)
    # vertical[g, k, c, i] = sqrt(s_k) U[(c, i), k];  horizontal[g, n, k, j] = sqrt(s_k) Q[(n, j), k]
    vertical = (u * root).reshape(g, c, kh, rank).permute(0, 3, 1, 2).contiguous()
    horizontal = (v * root).reshape(g, n, kw, rank).permute(0, 1, 3, 2).contiguous()
    return SpatialSVDFactors(vertical=vertical, horizontal=horizontal, shape=tuple(weight.shape))


def tai_unfoldings(weight: torch.Tensor, groups: int = 1) -> list[list[torch.Tensor]]:
    """The one rank component of ``spatial-svd``: each group's Tai matrix (its rank is K)."""
    return [list(tai_matrix(weight, groups))]
