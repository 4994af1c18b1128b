"""Initial factors for CP-ALS, by name (``INITS``): ``svd``, ``random`` and ``slices``.

A tensor is viewed as ``(I0, I1, K_1, ..., K_q)``: two channel modes and small spatial modes.

``slices`` is the best rank-``R`` CP model whose spatial factors are restricted to the left
singular vectors ``c_1..c_K`` of the spatial unfolding (``K = prod K_m``). Rotating the spatial
mode onto them, ``X = sum_j M_j o c_j`` with ``I0 x I1`` slices ``M_j``; the ``c_j`` are
orthonormal, so the error of a model ``sum_j N_j o c_j`` splits as ``sum_j ||M_j - N_j||^2``, and
a CP model of rank ``R`` gives each slice some rank ``r_j`` with ``sum_j r_j = R``. By Eckart-Young,
per slice, and since each slice's singular values decrease, the optimum keeps the ``R`` largest
singular values ``s_{j,i}`` over all slices: component ``(j, i)`` is ``(s u_{j,i}, v_{j,i}, c_j)``.
Its error is ``sqrt(sum of the dropped s^2) / ||X||``. For ``q > 1`` spatial modes each ``c_j`` is
then replaced by its best rank-one approximation (leading singular vectors of its unfoldings),
which is no longer optimal but stays a close start. Where ``R`` exceeds the ``K * min(I0, I1)``
candidate terms, the rest are small random columns.
"""
from __future__ import annotations

import math

import torch

from ._common import leading_left_singular_vectors
from .cp_sweep import model_norm2


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def svd_init(x: torch.Tensor, rank: int, seed: int = 0) -> list[torch.Tensor]:
    """Leading left singular vectors of each unfolding; standard normal columns where the rank
    exceeds the mode size (tensorly's ``init='svd'``)."""
    gen, out = _generator(seed), []
    for n, size in enumerate(x.shape):
        k = min(rank, size)
        u = leading_left_singular_vectors(x.movedim(n, 0).reshape(size, -1), k).cpu()
        if rank > k:
            u = torch.cat([u, torch.randn(size, rank - k, generator=gen, dtype=x.dtype)], dim=1)
        out.append(u.to(x.device))
    return out


def random_init(x: torch.Tensor, rank: int, seed: int = 0) -> list[torch.Tensor]:
    """Standard normal factors, scaled so that the model has the data's norm."""
    gen = _generator(seed)
    out = [torch.randn(size, rank, generator=gen, dtype=x.dtype).to(x.device) for size in x.shape]
    s = (x.norm() / model_norm2([f.T @ f for f in out]).clamp_min(1e-300).sqrt()) ** (1.0 / len(out))
    return [f * s for f in out]


def _rank_one(c: torch.Tensor, small: tuple[int, ...]) -> list[torch.Tensor]:
    """Columns ``c`` ``(K, R)`` as rank-one tensors of shape ``small``: one ``(K_m, R)`` factor per
    mode, leading singular vectors of each unfolding, the first scaled by ``<c, u_1 o .. o u_q>``."""
    if len(small) == 1:
        return [c]
    t = c.T.reshape(-1, *small)  # (R, K_1, .., K_q)
    vecs = []
    for m in range(len(small)):
        unf = t.movedim(m + 1, 1).reshape(t.shape[0], small[m], -1)
        u, _, _ = torch.linalg.svd(unf, full_matrices=False)
        vecs.append(u[:, :, 0])  # (R, K_m)
    proj = t
    for v in vecs:  # contract each mode with its vector: the scale of the rank-one term
        proj = torch.einsum("rk...,rk->r...", proj, v)
    return [(vecs[0] * proj.unsqueeze(1)).T] + [v.T for v in vecs[1:]]


def slices_init(x: torch.Tensor, rank: int, seed: int = 0) -> list[torch.Tensor]:
    """The best CP model on the spatial singular vectors (module docstring): a spatial SVD,
    then an SVD of each rotated ``I0 x I1`` slice, keeping the ``rank`` largest terms."""
    i0, i1, *small = x.shape
    k = math.prod(small)
    flat = x.reshape(i0 * i1, k)
    _, c = torch.linalg.eigh(flat.T @ flat)  # (K, K), ascending
    c = c.flip(-1)
    slices = (flat @ c).T.reshape(k, i0, i1)  # M_j = X x_s c_j
    u, s, vh = torch.linalg.svd(slices, full_matrices=False)  # (K, I0, m), (K, m), (K, m, I1)
    m = s.shape[1]
    keep = torch.argsort(s.flatten(), descending=True)[: min(rank, k * m)]
    j, i = keep // m, keep % m
    scale = s[j, i].clamp_min(0)
    a = u[j, :, i].T * scale.sqrt()
    b = vh[j, i, :].T * scale.sqrt()
    factors = [a, b, *_rank_one(c[:, j], tuple(small))]
    if rank > keep.numel():  # more components than candidate terms: small random ones
        gen, extra = _generator(seed), rank - keep.numel()
        tiny = 1e-3 * float(scale.min() if scale.numel() else x.norm()) ** (1.0 / len(factors))
        factors = [torch.cat([f, tiny * torch.randn(f.shape[0], extra, generator=gen, dtype=x.dtype).to(x.device)], 1)
                   for f in factors]
    return factors


INITS = {"svd": svd_init, "random": random_init, "slices": slices_init}


def init_factors(x: torch.Tensor, rank: int, init: str = "svd", seed: int = 0) -> list[torch.Tensor]:
    """Initial factors by name (``INITS``); seeded, so deterministic."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; accepted: {', '.join(repr(k) for k in INITS)}")
    return INITS[init](x, rank, seed)
