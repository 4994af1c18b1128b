"""One CP-ALS block-coordinate sweep over a batch of same-shaped tensors (a batch of one for a
single problem): the shared core of ``cp_als``, ``cp_als_batched`` and EPC's sweeps.

Each tensor is viewed as ``(I0, I1, K_1, ..., K_q)``: two large modes (out/in channels) and small
spatial modes, ``K = prod K_m``. MTTKRPs share a dimension tree, so one sweep costs two large
GEMMs of ``I0*I1*K*R`` multiply-adds instead of ``N`` (and no large Khatri-Rao product is formed):

* ``P = X x_1 B`` (contract the in-channel mode), ``(I0, K, R)``: the MTTKRP of mode 0 is
  ``sum_k P[:, k] * KR(small)[k]`` and, once ``U_0`` is updated, ``sum_i P[i] * U_0[i]`` feeds
  every small mode;
* ``Q = X^T U_0`` (contract the out-channel mode), ``(K, I1, R)``: the MTTKRP of mode 1 is
  ``sum_k Q[k] * KR(small)[k]``.

``X`` is held once, laid out ``(I0, K, I1)``, so that both GEMMs read it in place (the second as a
transposed operand). The contractions over ``k`` accumulate one ``(I, R)`` slice at a time into a
cache-sized buffer instead of materialising the ``(I, K, R)`` product (a third of the memory
traffic: these element-wise passes, not the GEMMs, bounded the small layers).
Updates run in the order ``U_0, U_2..U_{N-1}, U_1``: still exact block-coordinate descent.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ._lapack import cholesky_solve_right


def solve_normal(g: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``G Gamma^{-1}`` (``Gamma`` symmetric PSD) for one problem, ``(I, R)`` and ``(R, R)``, or a
    batch, ``(B, I, R)`` and ``(B, R, R)``: Cholesky (``_lapack``), the pseudo-inverse where
    ``Gamma`` is singular."""
    flat_g, flat_gamma = g.reshape(-1, *g.shape[-2:]), gamma.reshape(-1, *gamma.shape[-2:])
    out, bad = cholesky_solve_right(flat_g, flat_gamma)
    for b in bad:
        out[b] = flat_g[b] @ torch.linalg.pinv(flat_gamma[b], hermitian=True)
    return out.reshape(g.shape)


def rebalance(factors: list[torch.Tensor], grams: list[torch.Tensor] | None = None) -> None:
    """Give every mode of a component the same column norm ``lambda_r^(1/N)`` (tensor unchanged;
    keeps the normal equations well scaled), in place; factors ``(I_n, R)`` or batched ``(B, I_n, R)``.
    ``grams``, if given, are rescaled to match."""
    norms = torch.stack([f.norm(dim=-2) for f in factors])  # (N, R) or (N, B, R)
    target = norms.prod(0).clamp_min(0) ** (1.0 / len(factors))
    for n, f in enumerate(factors):
        scale = torch.where(norms[n] > 0, target / norms[n], torch.zeros_like(target))
        factors[n] = f * scale.unsqueeze(-2)
        if grams is not None:
            grams[n] = grams[n] * scale.unsqueeze(-1) * scale.unsqueeze(-2)


def khatri_rao(mats: list[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product, first matrix varying slowest: ``(I_m, R)`` each ->
    ``(prod I_m, R)``; with a leading batch dimension, ``(B, I_m, R)`` -> ``(B, prod I_m, R)``."""
    out = mats[0]
    for m in mats[1:]:
        out = (out.unsqueeze(-2) * m.unsqueeze(-3)).reshape(*out.shape[:-2], -1, out.shape[-1])
    return out


def gram_product(grams: list[torch.Tensor], skip: int) -> torch.Tensor:
    """The Hadamard product of every mode's Gram matrix but ``skip``'s (the normal equations'
    matrix of that mode); works on batched ``(B, R, R)`` Grams too."""
    others = [gm for m, gm in enumerate(grams) if m != skip]
    g = others[0] * others[1] if len(others) > 1 else others[0].clone()
    for gm in others[2:]:
        g.mul_(gm)
    return g


def model_norm2(grams: list[torch.Tensor]) -> torch.Tensor:
    """``||[[factors]]||^2`` from the Gram matrices: the sum of their Hadamard product (per problem
    where batched)."""
    g = grams[0]
    for gm in grams[1:]:
        g = g * gm
    return g.sum((-2, -1))


LS_FIRST_POWER, LS_REFUSALS = 2.0, 4  # line search's step it^(1/p): p from 2, one more per 4 refusals in a row


def ls_schedule(accepted, power, refused):
    """The step of line search's extrapolation (Bro 1998), ``it^(1/power)``, made to shrink where
    it keeps missing: ``power`` grows by one after ``LS_REFUSALS`` refused steps in a row (the
    schedule tensorly's ``parafac`` uses too). ``(power, refused)`` after a step was ``accepted``
    (a bool, or a 0/1 float tensor with one entry per problem)."""
    refused = (refused + 1) * (1 - accepted)
    bump = refused >= LS_REFUSALS
    return power + bump * 1.0, refused * (1 - bump * 1)


FUSED_BELOW = 1 << 19  # elements: below this, one broadcast multiply-and-sum beats a pass per slice


def weighted_slices(parts: torch.Tensor, weights: torch.Tensor, dim: int) -> torch.Tensor:
    """``sum_k parts.select(dim, k) * weights[:, k, None, :]``: ``parts`` ``(B, .., K, .., R)``,
    ``weights`` ``(B, K, R)`` -> ``(B, I, R)``. Small ``parts`` in one broadcast operation (its
    temporary stays in cache, and per-operation overhead is what bounds them); large ones one slice
    at a time (no ``(B, I, K, R)`` temporary: there memory traffic bounds them)."""
    if parts.numel() < FUSED_BELOW:
        return (parts * weights.unsqueeze(1 if dim == 2 else 2)).sum(dim)
    acc = parts.select(dim, 0) * weights[:, :1]
    for k in range(1, parts.shape[dim]):
        acc.addcmul_(parts.select(dim, k), weights[:, k:k + 1])
    return acc


def contract_rows(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``sum_i p[:, i] * u[:, i, None]``: ``p`` ``(B, I, K, R)``, ``u`` ``(B, I, R)`` -> ``(B, K, R)``
    (``P`` contracted with the new ``U_0``, which feeds every small mode)."""
    if p.numel() < FUSED_BELOW:
        return (p * u.unsqueeze(2)).sum(1)
    return torch.stack([torch.linalg.vecdot(p[:, :, k], u, dim=1) for k in range(p.shape[2])], 1)


def _als_update(n: int, g: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    return solve_normal(g, gamma)


class Sweep:
    """A batch of reshaped tensors ``(B, I0, I1, K_1, ...)`` and one sweep with a per-mode update."""

    def __init__(self, x: torch.Tensor):
        b, i0, i1, *small = x.shape
        self.i0, self.i1, self.small = i0, i1, tuple(small)
        self.k = math.prod(small)
        self.x = x.reshape(b, i0, i1, self.k).transpose(2, 3).contiguous()  # (B, I0, K, I1)
        self.norm2 = (x * x).flatten(1).sum(1)  # (B,)

    def keep(self, mask: torch.Tensor) -> None:
        """Drop the problems where ``mask`` is false (they have stopped)."""
        self.x, self.norm2 = self.x[mask], self.norm2[mask]

    def _small_mttkrp(self, q: torch.Tensor, smalls: list[torch.Tensor], m: int) -> torch.Tensor:
        if len(smalls) == 1:  # order 3: ``q`` is the MTTKRP already
            return q
        letters = "abcdefgh"[: len(smalls)]
        ins = ["z" + letters + "r"] + ["z" + letters[j] + "r" for j in range(len(smalls)) if j != m]
        ops = [q] + [smalls[j] for j in range(len(smalls)) if j != m]
        return torch.einsum(",".join(ins) + "->z" + letters[m] + "r", *ops)

    def start(self, factors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A sweep's first large GEMM for these factors: ``P = X x_1 U_1`` ``(B, I0, K, R)`` and
        the MTTKRP of mode 0. ``<X, [[factors]]>`` is then ``sum(G_0 * U_0)`` at no further GEMM,
        which is how line search checks an extrapolated point and starts the next sweep from it
        with the same product."""
        b, r = factors[0].shape[0], factors[0].shape[-1]
        p = (self.x.view(b, self.i0 * self.k, self.i1) @ factors[1]).view(b, self.i0, self.k, r)
        return p, weighted_slices(p, khatri_rao(factors[2:]), 2)

    def sweep(self, factors: list[torch.Tensor], grams: list[torch.Tensor], update: Callable | None,
              started: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One sweep; ``update(n, G, gamma)`` returns mode ``n``'s new factor from its MTTKRP ``G``
        ``(B, I_n, R)`` and normal-equations matrix ``gamma`` ``(B, R, R)``; ``None``: ALS's own
        update, ``G gamma^{-1}`` (``solve_normal``). ``started``: what
        ``start(factors)`` returned for these very factors (saves the first GEMM). Updates
        ``factors`` and ``grams`` in place; returns ``<X, X_hat>`` per problem (for the cheap
        error ``||X||^2 - 2<X, X_hat> + ||X_hat||^2``)."""
        if update is None:
            update = _als_update
        b, r = factors[0].shape[0], factors[0].shape[-1]
        p, g0 = started if started is not None else self.start(factors)
        factors[0] = update(0, g0, gram_product(grams, 0))
        grams[0] = factors[0].transpose(1, 2) @ factors[0]
        q = contract_rows(p, factors[0]).view(b, *self.small, r)
        for m in range(len(factors) - 2):
            factors[2 + m] = update(2 + m, self._small_mttkrp(q, factors[2:], m), gram_product(grams, 2 + m))
            grams[2 + m] = factors[2 + m].transpose(1, 2) @ factors[2 + m]
        g1 = self.mode1(factors)
        factors[1] = update(1, g1, gram_product(grams, 1))
        grams[1] = factors[1].transpose(1, 2) @ factors[1]
        return (g1 * factors[1]).sum((1, 2))

    def mode1(self, factors: list[torch.Tensor]) -> torch.Tensor:
        """The MTTKRP of mode 1, ``(B, I1, R)``, by the second large GEMM."""
        b, r = factors[0].shape[0], factors[0].shape[-1]
        qa = (self.x.view(b, self.i0, self.k * self.i1).transpose(1, 2) @ factors[0]).view(b, self.k, self.i1, r)
        return weighted_slices(qa, khatri_rao(factors[2:]), 1)
