"""Truncated SVD of a Linear weight or a 1x1 conv kernel (Eckart-Young optimal)."""
from __future__ import annotations

import torch

from ..factors import SVDFactors
from ._common import fix_signs, kernel_groups


def decompose_svd(weight: torch.Tensor, rank: int, *, groups: int = 1) -> SVDFactors:
    """``weight``: ``(T, S)`` or ``(T, S_g, 1, 1)`` in the compute dtype.

    Returns ``left (g, T_g, R)`` and ``right (g, R, S_g)`` with the singular values split
    evenly (``sqrt(sigma)`` on each side), which keeps both stages at the same scale.
    """
    w = kernel_groups(weight, groups).reshape(groups, weight.shape[0] // groups, -1)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    u, v = fix_signs(u[..., :rank], vh[..., :rank, :].transpose(1, 2))
    root = s[..., :rank].sqrt().unsqueeze(1)
    return SVDFactors(left=u * root, right=(v * root).transpose(1, 2).contiguous(), shape=tuple(weight.shape))


def svd_unfoldings(weight: torch.Tensor, groups: int = 1) -> list[list[torch.Tensor]]:
    """The one rank component of ``svd``: each group's ``(T_g, S_g)`` matrix."""
    return [list(kernel_groups(weight, groups).reshape(groups, weight.shape[0] // groups, -1))]
