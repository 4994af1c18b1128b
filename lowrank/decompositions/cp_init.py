"""Initial factors for CP-ALS, by name (``INITS``): ``svd``, ``random`` and ``slices``.

A tensor is viewed as ``(I0, I1, K_1, ..., K_q)``: two channel modes and small spatial modes.

``slices`` is the best rank-``R`` CP model whose spatial factors are restricted to the left
singular vectors of the spatial modes' unfoldings (``P_m``, ``K_m x K_m``, one per spatial mode;
the eigenvectors of the ``K_m x K_m`` Gram matrix, not an SVD of the wide unfolding).
The products ``c_j = p_{a_1} o .. o p_{a_q}`` (``j = (a_1, .., a_q)``, ``K = prod K_m`` of them)
are orthonormal, so rotating every spatial mode onto its basis gives ``X = sum_j M_j o c_j`` with
``I0 x I1`` slices ``M_j``, and the error of a model ``sum_j N_j o c_j`` splits as
``sum_j ||M_j - N_j||^2``. A CP model of rank ``R`` of that kind gives each slice some rank ``r_j``
with ``sum_j r_j = R``; by Eckart-Young per slice, and since each slice's singular values
decrease, the optimum keeps the ``R`` largest singular values ``s_{j,i}`` over all slices:
component ``(j, i)`` is ``(sqrt(s) u_{j,i}, sqrt(s) v_{j,i}, p_{a_1}, .., p_{a_q})``, and its error is
``sqrt(sum of the dropped s^2) / ||X||``. For ``cp3`` (one spatial mode of ``kh*kw``) the ``c_j``
are the singular vectors of that mode; for ``cp4`` they are rank-one ``kh x kw`` by construction.
Where ``R`` exceeds the ``K * min(I0, I1)`` candidate terms (or the nonzero ones), the rest are
small random columns.
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


def _batched_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(m, full_matrices=False)`` of a stack of matrices, from the eigenvectors of
    the smaller Gram matrix (a batched ``eigh`` costs less than a batched SVD). Singular values below ``sqrt(eps)`` of the largest lose their relative accuracy this
    way, and ``slices_init`` keeps none below ``10 sqrt(eps)`` of it."""
    wide = m.shape[-2] <= m.shape[-1]
    a = m if wide else m.transpose(-2, -1)
    lam, u = torch.linalg.eigh(a @ a.transpose(-2, -1))
    s, u = lam.flip(-1).clamp_min(0).sqrt(), u.flip(-1)
    v = (a.transpose(-2, -1) @ u) / s.clamp_min(torch.finfo(m.dtype).tiny).unsqueeze(-2)
    return (u, s, v.transpose(-2, -1)) if wide else (v, s, u.transpose(-2, -1))


def slices_init(x: torch.Tensor, rank: int, seed: int = 0) -> list[torch.Tensor]:
    """The best CP model on the spatial modes' singular vectors (module docstring): an orthonormal
    basis per spatial mode, an SVD of each rotated ``I0 x I1`` slice, the ``rank`` largest terms."""
    i0, i1, *small = x.shape
    bases = [leading_left_singular_vectors(x.movedim(2 + m, 0).reshape(k, -1), k) for m, k in enumerate(small)]
    core = x
    for m, u in enumerate(bases):  # rotate spatial mode m onto its basis
        core = torch.tensordot(core, u, dims=([2], [0]))  # the rotated mode moves to the end
    slices = core.reshape(i0, i1, -1).permute(2, 0, 1)  # (K, I0, I1), slice j = multi-index (a_1, .., a_q)
    u, s, vh = _batched_svd(slices)  # (K, I0, m), (K, m), (K, m, I1)
    m = s.shape[1]
    flat = s.flatten()
    nonzero = int((flat > flat.max() * 10 * torch.finfo(x.dtype).eps ** 0.5).sum())  # zero terms: zero columns
    keep = torch.argsort(flat, descending=True)[: min(rank, nonzero)]
    j, i = keep // m, keep % m
    kept = s[j, i]
    factors = [u[j, :, i].T * kept.sqrt(), vh[j, i, :].T * kept.sqrt()]
    sizes = [b.shape[1] for b in bases]
    for n, basis in enumerate(bases):  # slice j's vector in spatial mode n
        factors.append(basis[:, (j // math.prod(sizes[n + 1:])) % sizes[n]])
    if rank > keep.numel():  # more components than candidate terms: small random ones
        gen, extra = _generator(seed), rank - keep.numel()
        tiny = 1e-3 * float(kept.min() if keep.numel() else x.norm()) ** (1.0 / len(factors))
        factors = [torch.cat([f, tiny * torch.randn(f.shape[0], extra, generator=gen, dtype=x.dtype).to(x.device)], 1)
                   for f in factors]
    return factors


INITS = {"svd": svd_init, "random": random_init, "slices": slices_init}


def init_factors(x: torch.Tensor, rank: int, init: str = "svd", seed: int = 0) -> list[torch.Tensor]:
    """Initial factors by name (``INITS``); seeded, so deterministic."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; accepted: {', '.join(repr(k) for k in INITS)}")
    return INITS[init](x, rank, seed)
