"""CP-ALS in torch (float64 by default, CPU or CUDA).

The tensor is viewed as ``(I0, I1, K_1, ..., K_q)``: two large modes (out/in channels) and small
spatial modes. MTTKRPs share a dimension tree, so one sweep costs two large GEMMs of
``I0*I1*K*R`` multiply-adds instead of ``N`` (and no large Khatri-Rao product is formed):

* ``P = X x_1 B`` (contract the in-channel mode), shape ``(I0, K, R)``; it serves the MTTKRP of
  mode 0 (with the Khatri-Rao product of the small factors, ``K x R``) and, once ``U_0`` is
  updated, of every small mode;
* ``Q = U_0^T X``, shape ``(R, I1, K)``, serves mode 1.

Updates run in the order ``U_0, U_2..U_{N-1}, U_1``: still exact block-coordinate descent.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ._common import leading_left_singular_vectors


def khatri_rao(mats: list[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product, first matrix varying slowest: ``(prod I_m, R)``."""
    out = mats[0]
    for m in mats[1:]:
        out = (out.unsqueeze(1) * m.unsqueeze(0)).reshape(-1, out.shape[-1])
    return out


def reconstruct(factors: list[torch.Tensor]) -> torch.Tensor:
    shape = [f.shape[0] for f in factors]
    return (factors[0] @ khatri_rao(factors[1:]).T).reshape(shape)


def gram_product(grams: list[torch.Tensor], skip: int) -> torch.Tensor:
    """The Hadamard product of every mode's Gram matrix but ``skip``'s (the normal equations'
    matrix of that mode); works on batched ``(B, R, R)`` Grams too."""
    g = torch.ones_like(grams[0])
    for m, gm in enumerate(grams):
        if m != skip:
            g = g * gm
    return g


class SweepEngine:
    """Holds the reshaped tensor and runs one block-coordinate sweep with a per-mode update."""

    def __init__(self, x: torch.Tensor):
        if x.dim() < 3:
            raise ValueError(f"CP needs a tensor of order >= 3, got shape {tuple(x.shape)}")
        self.shape = tuple(x.shape)
        i0, i1 = self.shape[:2]
        self.small = self.shape[2:]
        self.k = math.prod(self.small)
        x3 = x.reshape(i0, i1, self.k)
        self.x_for_b = x3.permute(0, 2, 1).reshape(i0 * self.k, i1).contiguous()  # (I0*K, I1)
        self.x_for_a = x3.reshape(i0, i1 * self.k)  # (I0, I1*K)
        self.norm2 = float((x * x).sum())

    def _small_mttkrp(self, q: torch.Tensor, smalls: list[torch.Tensor], m: int) -> torch.Tensor:
        """MTTKRP of small mode ``m`` from ``q`` (``(K_1, ..., K_q, R)``) and the other small factors."""
        letters = "abcdefgh"[: len(smalls)]
        ins = [letters + "r"] + [letters[j] + "r" for j in range(len(smalls)) if j != m]
        ops = [q] + [smalls[j] for j in range(len(smalls)) if j != m]
        return torch.einsum(",".join(ins) + "->" + letters[m] + "r", *ops)

    def sweep(self, factors: list[torch.Tensor], grams: list[torch.Tensor], update: Callable) -> float:
        """One sweep; ``update(n, G, gamma)`` returns the new factor of mode ``n``.

        Updates ``factors`` and ``grams`` in place and returns ``<X, X_hat>`` for the final model
        (used for the cheap error ``||X||^2 - 2<X, X_hat> + ||X_hat||^2``).
        """
        r = factors[0].shape[1]

        def gamma(n):
            return gram_product(grams, n)

        i0 = self.shape[0]
        smalls = factors[2:]
        p = (self.x_for_b @ factors[1]).reshape(i0, self.k, r)  # X x_1 B
        ks = khatri_rao(smalls)  # (K, R)
        factors[0] = update(0, (p * ks.unsqueeze(0)).sum(1), gamma(0))
        grams[0] = factors[0].T @ factors[0]
        q = (p * factors[0].unsqueeze(1)).sum(0).reshape(*self.small, r)
        for m in range(len(smalls)):
            n = 2 + m
            factors[n] = update(n, self._small_mttkrp(q, factors[2:], m), gamma(n))
            grams[n] = factors[n].T @ factors[n]
        ks = khatri_rao(factors[2:])
        pa = (factors[0].T @ self.x_for_a).reshape(r, self.shape[1], self.k)  # U_0^T X
        g1 = (pa * ks.T.unsqueeze(1)).sum(2).T  # (I1, R)
        factors[1] = update(1, g1, gamma(1))
        grams[1] = factors[1].T @ factors[1]
        return float((g1 * factors[1]).sum())

    def inner(self, factors: list[torch.Tensor]) -> float:
        """``<X, [[factors]]>`` by one large GEMM (the mode-1 MTTKRP)."""
        r = factors[0].shape[1]
        pa = (factors[0].T @ self.x_for_a).reshape(r, self.shape[1], self.k)
        return float(((pa * khatri_rao(factors[2:]).T.unsqueeze(1)).sum(2).T * factors[1]).sum())

    def model_norm2(self, grams: list[torch.Tensor]) -> float:
        g = grams[0]
        for m in grams[1:]:
            g = g * m
        return float(g.sum())


def rebalance(factors: list[torch.Tensor], grams: list[torch.Tensor] | None = None) -> None:
    """Give every mode of a component the same column norm ``lambda_r^(1/N)`` (tensor unchanged;
    keeps the normal equations well scaled). ``grams``, if given, are rescaled to match."""
    norms = torch.stack([f.norm(dim=0) for f in factors])  # (N, R)
    lam = norms.prod(0)
    target = lam.clamp_min(0) ** (1.0 / len(factors))
    for n, f in enumerate(factors):
        scale = torch.where(norms[n] > 0, target / norms[n], torch.zeros_like(target))
        factors[n] = f * scale
        if grams is not None:
            grams[n] = grams[n] * scale[:, None] * scale[None, :]


def _ls_solve(g: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``G Gamma^{-1}`` (Gamma symmetric PSD): Cholesky, pseudo-inverse when singular."""
    chol, info = torch.linalg.cholesky_ex(gamma)
    if int(info) == 0:
        return torch.cholesky_solve(g.T, chol).T
    return g @ torch.linalg.pinv(gamma, hermitian=True)


def init_factors(x: torch.Tensor, rank: int, init: str = "svd", seed: int = 0) -> list[torch.Tensor]:
    """``'svd'``: leading left singular vectors of each unfolding (random columns where the rank
    exceeds the mode size); ``'random'``: standard normal. Seeded, so deterministic."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    out = []
    for n, size in enumerate(x.shape):
        if init == "random":
            f = torch.randn(size, rank, generator=gen, dtype=x.dtype)
        elif init == "svd":
            unf = x.movedim(n, 0).reshape(size, -1)
            k = min(rank, size)
            u = leading_left_singular_vectors(unf, k).cpu()
            if rank > k:
                u = torch.cat([u, torch.randn(size, rank - k, generator=gen, dtype=x.dtype)], dim=1)
            f = u
        else:
            raise ValueError(f"unknown init {init!r}; accepted: 'svd', 'random'")
        out.append(f.to(x.device))
    if init == "random":  # scale so that the initial model has the data's norm
        model = reconstruct(out)
        s = (x.norm() / model.norm().clamp_min(1e-300)) ** (1.0 / len(out))
        out = [f * s for f in out]
    return out


def cp_als(x: torch.Tensor, rank: int, *, init="svd", seed: int = 0, n_iter_max: int = 500, tol: float = 1e-8,
           callback: Callable | None = None, linesearch: bool = False,
           stop_at: float | None = None) -> tuple[list[torch.Tensor], list[float]]:
    """Fit a rank-``rank`` CP model to ``x`` by ALS.

    ``init``: ``'svd'``, ``'random'`` or a list of initial factors. Stops when the relative
    error changes by less than ``tol`` (absolute difference, as tensorly), falls to ``stop_at``,
    or after ``n_iter_max`` sweeps. ``linesearch``: after each sweep, try the extrapolation
    ``A_prev + s (A - A_prev)`` (Bro 1998, ``s = it^(1/3)``, halved after a miss) and keep it
    when its error is lower (one more large GEMM per sweep). ``callback(iteration, rel_error)``
    is called after every sweep. Returns ``(factors, errors)``.
    """
    if isinstance(init, (list, tuple)):
        factors = [f.to(device=x.device, dtype=x.dtype).clone() for f in init]
    else:
        factors = init_factors(x, rank, init, seed)
    engine = SweepEngine(x)
    grams = [f.T @ f for f in factors]
    norm = math.sqrt(engine.norm2) or 1.0
    errors: list[float] = []
    update = lambda n, g, gam: _ls_solve(g, gam)  # noqa: E731
    misses = 0

    def rel(inner: float, gs) -> float:
        return math.sqrt(max(engine.norm2 - 2 * inner + engine.model_norm2(gs), 0.0)) / norm

    for it in range(1, n_iter_max + 1):
        prev = [f.clone() for f in factors] if linesearch else None
        err = rel(engine.sweep(factors, grams, update), grams)
        if linesearch and it > 2:
            step = it ** (1.0 / 3.0) / 2 ** misses
            trial = [p + step * (f - p) for p, f in zip(prev, factors)]
            tgrams = [f.T @ f for f in trial]
            terr = rel(engine.inner(trial), tgrams)
            if terr < err:
                factors, grams, err = trial, tgrams, terr
                misses = max(misses - 1, 0)
            else:
                misses = min(misses + 1, 8)
        if err < 1e-6:  # the cheap formula loses digits near an exact fit: measure directly
            err = float((x - reconstruct(factors)).norm()) / norm
        errors.append(err)
        if it % 10 == 0:  # ALS is invariant to column scaling; rebalancing only guards the range
            rebalance(factors, grams)
        if callback is not None:
            callback(it, err)
        if err < 1e-15 or (len(errors) > 1 and abs(errors[-2] - err) < tol) or (stop_at is not None and err <= stop_at):
            break
    rebalance(factors)
    return factors, errors
