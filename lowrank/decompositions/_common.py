"""Shared helpers for the decompositions."""
from __future__ import annotations

import torch


def kernel_groups(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``(T, S_g, ...)`` -> ``(g, T_g, S_g, ...)``: the per-group kernels of a grouped conv."""
    t = weight.shape[0]
    return weight.reshape(groups, t // groups, *weight.shape[1:])


def fix_signs(u: torch.Tensor, *others: torch.Tensor):
    """Deterministic signs for singular vectors: the largest-magnitude entry of each column of
    ``u`` is made positive (and ``others``, sharing the column index in their last axis, follow)."""
    idx = u.abs().argmax(dim=-2, keepdim=True)
    s = torch.sign(torch.gather(u, -2, idx))
    s = torch.where(s == 0, torch.ones_like(s), s)
    return (u * s, *(o * s for o in others))


def leading_left_singular_vectors(x: torch.Tensor, r: int) -> torch.Tensor:
    """Top-``r`` left singular vectors of a matrix ``x`` (columns orthonormal, signs fixed)."""
    if x.shape[0] < x.shape[1] and r <= x.shape[0]:
        # wide matrix: the leading eigenvectors of the small Gram matrix X X^T span the same
        # subspace and cost one GEMM plus a (rows x rows) eigendecomposition, the whole basis too
        _, v = torch.linalg.eigh(x @ x.T)
        u = v.flip(-1)
    else:
        u, _, _ = torch.linalg.svd(x, full_matrices=False)
    if u.shape[1] < r:  # more columns requested than the matrix has: complete the basis
        q, _ = torch.linalg.qr(torch.cat([u, torch.eye(x.shape[0], dtype=x.dtype, device=x.device)], dim=1))
        u = q
    return fix_signs(u[:, :r])[0]
