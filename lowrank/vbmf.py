"""Analytic empirical variational Bayesian matrix factorization (Nakajima et al., JMLR 2013).

Used by Kim et al. (ICLR 2016) to choose Tucker-2 ranks. For ``V`` of size ``L x M`` (``L <= M``,
``alpha = L/M``) with singular values ``gamma_h``, the EVB estimate keeps the components with
``gamma_h > sigma * sqrt(M * x_bar)``, where ``x_bar = (1 + tau)(1 + alpha/tau)`` and ``tau`` is
the unique zero of ``Phi(tau) + Phi(tau/alpha)``, ``Phi(z) = log(1+z)/z - 1/2``. The noise
variance ``sigma^2`` is the minimiser of the free energy over a bounded interval.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import brentq, minimize_scalar

from ._checks import check_finite
from .errors import LowRankError


def evb_tau(alpha: float) -> float:
    """Exact root of ``Phi(t) + Phi(t/alpha) = 0`` (decreasing in ``t``); ``evb_tau(1) = 2.51286``."""

    def phi(z):
        return math.log1p(z) / z - 0.5

    def xi(t):
        return phi(t) + phi(t / alpha)

    lo, hi = 1e-12, 1.0
    while xi(hi) > 0:
        hi *= 2.0
    return float(brentq(xi, lo, hi, xtol=1e-14, rtol=1e-14, maxiter=500))


def _free_energy(sigma2, gamma2, L, M, x_bar):
    """Free energy (up to constants) as a function of the noise variance, full SVD (H = L)."""
    alpha = L / M
    x = gamma2 / (M * sigma2)
    above = x > x_bar
    psi0 = x - np.log(x)
    xa = x[above]
    d = xa - (1 + alpha)
    tau = 0.5 * (d + np.sqrt(np.maximum(d * d - 4 * alpha, 0.0)))
    psi1 = np.log(tau + 1) + alpha * np.log(tau / alpha + 1) - tau
    return float(psi0.sum() + psi1.sum())


def evbmf(matrix: torch.Tensor, sigma2: float | None = None) -> tuple[int, float]:
    """EVB rank and noise variance of ``matrix`` (2-D): returns ``(rank, sigma2)``.

    ``sigma2`` given: only the threshold is applied. Unknown (the usual case for conv kernels):
    estimated by a coarse log-grid followed by bounded Brent refinement, because the free energy
    is non-smooth where some ``x_h`` crosses ``x_bar``.
    """

    if not torch.is_tensor(matrix) or matrix.dim() != 2:
        raise LowRankError(f"evbmf expects a 2-D tensor, got {getattr(matrix, 'shape', type(matrix).__name__)}")
    check_finite(matrix, "matrix")
    v = matrix.detach().to(torch.float64)
    if v.shape[0] > v.shape[1]:
        v = v.T
    L, M = v.shape
    alpha = L / M
    gamma = torch.linalg.svdvals(v).cpu().numpy()
    gamma2 = gamma**2
    if gamma2.sum() == 0:
        return 0, 0.0
    tau = evb_tau(alpha)
    x_bar = (1 + tau) * (1 + alpha / tau)

    if sigma2 is None:
        h_bar = min(int(math.ceil(L / (1 + alpha))) - 1, L)
        upper = gamma2.sum() / (L * M)
        tail = gamma2[h_bar:]
        lower = max(gamma2[h_bar] / (M * x_bar) if h_bar < L else 0.0,
                    tail.sum() / (M * (L - h_bar)) if L > h_bar else 0.0)
        lower = max(lower, upper * 1e-12)
        if lower >= upper:
            sigma2 = upper
        else:
            grid = np.geomspace(lower, upper, 200)
            vals = np.array([_free_energy(s, gamma2, L, M, x_bar) for s in grid])
            i = int(np.argmin(vals))
            a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
            res = minimize_scalar(lambda s: _free_energy(s, gamma2, L, M, x_bar), bounds=(a, b),
                                  method="bounded", options={"xatol": 1e-12 * b})
            sigma2 = float(res.x) if res.fun <= vals[i] else float(grid[i])
    threshold = math.sqrt(sigma2 * M * x_bar)
    return int((gamma > threshold).sum()), float(sigma2)
