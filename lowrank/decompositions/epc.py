"""Error Preserving Correction (Phan, Tichavsky, Cichocki, IEEE TSP 2019; used by Phan et al.,
ECCV 2020 for stable CP of conv kernels).

Given a CP model with error ``delta``, find a model of the same rank with error ``delta`` and the
smallest ``J``: the sum of squared rank-1 norms ``sum_r lambda_r^2`` (``objective='norm'``) or the
sensitivity (``objective='sens'``). One factor at a time, the subproblem
``min tr(U W U^T)  s.t.  ||X - [[U, ...]]||^2 <= delta^2`` has the closed form
``U = G (Gamma + rho W)^{-1}`` (a generalised ridge step), where ``rho`` is the root of the
secular equation ``sum_r c_r (e_r + 2 rho)/(e_r + rho)^2 = ||X||^2 - delta^2`` in the eigenbasis
of ``W^{-1/2} Gamma W^{-1/2}`` (docs/algorithms.md, section 1.4). Each block step is monotone in ``J``
and keeps the error pinned at ``delta``. By default (``ridge='cholesky'``) ``rho`` is found without
the eigendecomposition, by Halley steps from the previous sweep's root, one Cholesky factorisation
each (``_ridge_by_cholesky``; ``bench/epc_ridge.py``).

``extrapolate``: after each sweep, the point ``F_prev + s (F - F_prev)`` along the sweep's move,
scaled back onto the error bound (``_on_bound``: one scalar, from ``<X, M>`` at the next sweep's
first GEMM, which that sweep reuses, and ``||M||^2`` from the Gram matrices), is kept where its
``J`` is lower; ``s`` triples after a kept step and falls by 4 (not below 2) after a refused one
(docs/algorithms.md, section 1.4; ``bench/epc_extrapolate.py``).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ._lapack import cholesky_solve_right_factor
from .cp_als import SweepEngine, rebalance, reconstruct
from .cp_sweep import model_norm2

_W_FLOOR = 1e-300
RIDGE_STEPS, RIDGE_TOL = 3, 1e-5  # the Cholesky path's Halley steps on 1/phi, and the relative step in rho it stops at
STEP_FIRST, STEP_GROW, STEP_SHRINK, STEP_MAX = 2.0, 3.0, 4.0, 1e4  # extrapolation's step, see ``epc``


def _secular_root(c: np.ndarray, e: np.ndarray, tau: float) -> float:
    """Root ``rho >= 0`` of ``phi(rho) = sum c (e + 2 rho)/(e + rho)^2 = tau`` (phi decreasing).

    Returns 0 when even least squares (rho = 0) cannot reach the bound."""
    def phi(rho):
        return float(np.sum(c * (e + 2 * rho) / (e + rho) ** 2))

    pos = e > 1e-14 * max(float(e.max()), 1e-300)
    if np.all(pos) and phi(0.0) <= tau:
        return 0.0
    lo, hi = 0.0, 2.0 * float(c.sum()) / tau
    rho = hi
    for _ in range(200):
        f = phi(rho) - tau
        if abs(f) <= 1e-15 * tau:
            break
        if f > 0:
            lo = rho
        else:
            hi = rho
        d = -2.0 * rho * float(np.sum(c / (e + rho) ** 3))
        step = rho - f / d if d < 0 else None
        rho = step if step is not None and lo < step < hi else 0.5 * (lo + hi)
        if hi - lo <= 1e-16 * hi:
            break
    return rho


def _ridge_by_cholesky(gt: torch.Tensor, a: torch.Tensor, tau: float, rho: float):
    """The block step without an eigendecomposition: ``(Y, rho)`` with ``Y = Gt (A + rho I)^{-1}``
    on the error bound, by Halley steps on ``1/phi(rho) = 1/tau`` from ``rho`` (the same mode's
    root one sweep before), one Cholesky factorisation each. With ``A + rho I = C^T C`` and
    ``mu_k = sum_r c_r / (e_r + rho)^k``: ``mu_1 = <Y, Gt>``, ``mu_2 = ||Y||^2``,
    ``mu_3 = ||Y C^{-1}||^2``, ``mu_4 = ||Y C^{-1} C^{-T}||^2``, so ``phi = mu_1 + rho mu_2``,
    ``phi' = -2 rho mu_3`` and ``phi'' = 6 rho mu_4 - 2 mu_3``. Stops where the step is below
    ``RIDGE_TOL * rho``, or one factorisation after a step below ``RIDGE_TOL^(1/3) * rho`` (Halley
    converges cubically); ``Y`` is then scaled onto the bound exactly (the smaller root of
    ``m s^2 - 2 i s + tau = 0``, ``i = <Y, Gt>``, ``m = i - rho ||Y||^2``: the model's
    ``<X, X_hat>`` and ``||X_hat||^2``), which leaves ``J`` above the exact step's by about the
    square of ``rho``'s relative error. ``None`` where the eigen path must decide (no previous
    root, the bound out of reach, a step that leaves a factor of 10 of ``rho``)."""
    if not rho > 0:
        return None
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    last = False
    for step in range(RIDGE_STEPS + 1):
        y, failed, c = cholesky_solve_right_factor(gt.unsqueeze(0), torch.add(a, eye, alpha=rho).unsqueeze(0))
        if failed:
            return None
        y, c = y[0], c[0]
        i, yy = float(torch.vdot(y.flatten(), gt.flatten())), float(torch.vdot(y.flatten(), y.flatten()))
        if last:
            break
        v = torch.linalg.solve_triangular(c, y, upper=True, left=False)  # Y C^{-1}
        w = torch.linalg.solve_triangular(c.mT, v, upper=False, left=False)  # Y (A + rho I)^{-1}
        mu3, mu4 = float(torch.vdot(v.flatten(), v.flatten())), float(torch.vdot(w.flatten(), w.flatten()))
        phi, d1, d2 = i + rho * yy, -2.0 * rho * mu3, 6.0 * rho * mu4 - 2.0 * mu3
        h, h1 = 1.0 / phi - 1.0 / tau, -d1 / (phi * phi)  # h = 1/phi - 1/tau and its derivatives
        h2 = -d2 / (phi * phi) + 2.0 * d1 * d1 / phi ** 3
        if not h1 > 0:
            return None
        newton = h / h1
        damp = 1.0 - newton * h2 / (2.0 * h1)
        move = newton / damp if damp > 0.5 else newton  # Halley, or Newton where the curvature term is large
        if abs(move) <= RIDGE_TOL * rho:
            break
        if step == RIDGE_STEPS or not -9 * rho < move < 0.9 * rho:
            return None
        last = abs(move) <= RIDGE_TOL ** (1 / 3) * rho  # the next point is within the tolerance
        rho -= move
    m = i - rho * yy
    disc = i * i - m * tau
    if disc < 0:
        return None
    return y * (tau / (i + math.sqrt(disc))), rho


def _on_bound(factors, engine, tau: float, normalise):
    """An extrapolated point moved onto the error bound by scaling the model: ``(factors, grams,
    started)`` for ``a M``, ``a`` the smaller root of ``||X - a M||^2 = delta^2`` (``tau = ||X||^2 -
    delta^2``), or ``None`` where no scale reaches the bound. ``<X, M>`` comes from the next sweep's
    first GEMM (``started``, reused when the point is kept) and ``||M||^2`` from the Gram matrices."""
    normalise(factors)
    inner, grams, (p, g0) = engine.inner(factors)
    m2 = float(model_norm2(grams))
    disc = inner * inner - m2 * tau
    if m2 <= 0 or disc < 0:
        return None
    a = tau / (inner + math.sqrt(disc))  # = (inner - sqrt(disc)) / m2, without the cancellation
    if not a > 0:
        return None
    s, n = a ** (1.0 / len(factors)), len(factors)
    return [f * s for f in factors], [g * (s * s) for g in grams], (p * s, g0 * s ** (n - 1))


def _weights(factors, n: int, objective: str) -> torch.Tensor:
    sq = torch.stack([f.pow(2).sum(0) for f in factors])  # (N, R) squared column norms
    others = [m for m in range(len(factors)) if m != n]
    if objective == "norm":
        return sq[others].prod(0)
    sizes = [f.shape[0] for f in factors]
    w = torch.zeros_like(sq[0])
    for m in others:
        rest = [k for k in others if k != m]
        w = w + sizes[m] * (sq[rest].prod(0) if rest else torch.ones_like(w))
    return w


def objective_value(factors, objective: str) -> float:
    sq = torch.stack([f.pow(2).sum(0) for f in factors])
    if objective == "norm":
        return float(sq.prod(0).sum())
    sizes = [f.shape[0] for f in factors]
    return float(sum(sizes[n] * sq[[m for m in range(len(factors)) if m != n]].prod(0).sum()
                     for n in range(len(factors))))


def _optimal_sensitivity_scaling(factors) -> None:
    """``||u_r^(n)|| = sqrt(I_n) lambda_r^(1/N) / (prod I)^(1/2N)`` minimises ss over the
    scaling ambiguity (docs/algorithms.md, section 1.2); the tensor is unchanged."""
    n_modes = len(factors)
    sizes = [f.shape[0] for f in factors]
    norms = torch.stack([f.norm(dim=0) for f in factors])
    lam = norms.prod(0)
    base = lam ** (1.0 / n_modes) / math.prod(sizes) ** (1.0 / (2 * n_modes))
    for n, f in enumerate(factors):
        target = math.sqrt(sizes[n]) * base
        factors[n] = f * torch.where(norms[n] > 0, target / norms[n], torch.zeros_like(target))


def epc(x: torch.Tensor, factors: list[torch.Tensor], *, delta: float | None = None, objective: str = "norm",
        max_sweeps: int = 5000, tol: float = 1e-8, extrapolate: bool = True,
        callback: Callable | None = None, ridge: str = "cholesky") -> tuple[list[torch.Tensor], dict]:
    """Correct ``factors`` (a CP model of ``x``) at error bound ``delta`` (absolute Frobenius
    norm; default: the model's current error).

    Stops when ``J`` changes by at most ``tol`` relatively, or after ``max_sweeps``.
    ``extrapolate``: try a step along each sweep's move (module docstring); the same error, a lower
    ``J`` after as many sweeps. ``ridge``: how each block step finds its ``rho``: ``'cholesky'``
    (Halley steps from the previous sweep's root, ``_ridge_by_cholesky``; the eigen path where
    that declines) or ``'eigh'`` (an eigendecomposition every step). ``callback(sweep, J)`` is
    called after every sweep. Returns
    ``(factors, info)`` with ``info = {'sweeps', 'objective_start', 'objective_end', 'delta',
    'rel_error', 'converged', 'extrapolated', 'eigen_steps'}`` (``extrapolated``: the steps kept;
    ``eigen_steps``: the block steps that took an eigendecomposition).
    """
    if objective not in ("norm", "sens"):
        raise ValueError(f"unknown EPC objective {objective!r}; accepted: 'norm', 'sens'")
    if ridge not in ("cholesky", "eigh"):
        raise ValueError(f"unknown EPC ridge solver {ridge!r}; accepted: 'cholesky', 'eigh'")
    factors = [f.clone() for f in factors]
    engine = SweepEngine(x)

    if delta is None:
        delta = float((x - reconstruct(factors)).norm())
    tau = engine.norm2 - delta * delta
    norm = engine.norm
    if delta < 1e-7 * norm:
        # The secular equation works on squared norms, so it pins the error to about
        # sqrt(eps) * ||X||; a fit already exact to that level is returned unchanged.
        j = objective_value(factors, objective)
        return factors, {"sweeps": 0, "objective_start": j, "objective_end": j, "delta": delta,
                         "rel_error": delta / norm, "converged": True, "extrapolated": 0, "eigen_steps": 0,
                         "skipped": "fit exact to rounding"}

    def normalise(fs):  # the scaling J is measured in (the tensor unchanged)
        rebalance(fs)
        if objective == "sens":
            _optimal_sensitivity_scaling(fs)

    normalise(factors)
    grams = [f.T @ f for f in factors]
    j_start = j_prev = objective_value(factors, objective)
    converged = False

    roots = [0.0] * len(factors)  # each mode's rho of the sweep before (0: none yet)
    eigen_steps = 0

    def update(n, g, gamma):
        nonlocal eigen_steps
        if tau <= 0:
            return torch.zeros_like(g)
        w = _weights(factors, n, objective).clamp_min(_W_FLOOR)
        wis = w.rsqrt()
        a = wis[:, None] * gamma * wis[None, :]
        if ridge == "cholesky" and (found := _ridge_by_cholesky(g * wis, a, tau, roots[n])) is not None:
            y, roots[n] = found
            return y * wis
        eigen_steps += 1
        e, qmat = torch.linalg.eigh(a)
        # null directions of Gamma: G has no component there in exact arithmetic (G = X K and
        # K q = 0), so what the rounding leaves is dropped (the minimum-J solution)
        null = e <= 1e-13 * e.max().clamp_min(1e-300)
        e = torch.where(null, torch.ones_like(e), e)
        gt = torch.where(null, torch.zeros_like(g[:1]), (g * wis) @ qmat)  # G W^{-1/2} Q
        c = gt.pow(2).sum(0)
        rho = roots[n] = _secular_root(c.cpu().numpy(), e.cpu().numpy(), tau)
        return ((gt / (e + rho)) @ qmat.T) * wis

    sweep, kept, step, started = 0, 0, STEP_FIRST, None
    for sweep in range(1, max_sweeps + 1):
        prev = list(factors)  # a sweep replaces factors, never writes into them
        engine.sweep(factors, grams, update, started)
        normalise(factors)
        grams = [f.T @ f for f in factors]
        j = objective_value(factors, objective)
        started = None
        if extrapolate and sweep > 1 and tau > 0:
            trial = _on_bound([torch.lerp(p, f, step) for p, f in zip(prev, factors)], engine, tau, normalise)
            if trial is not None and (tj := objective_value(trial[0], objective)) < j:
                (factors, grams, started), j, kept = trial, tj, kept + 1
                step = min(step * STEP_GROW, STEP_MAX)
            else:
                step = max(STEP_FIRST, step / STEP_SHRINK)
        done = abs(j_prev - j) <= tol * j_prev
        if callback is not None:
            callback(sweep, j)
        j_prev = j
        if done:
            converged = True
            break
    err = float((x - reconstruct(factors)).norm())
    return factors, {
        "sweeps": sweep, "objective_start": j_start, "objective_end": j_prev, "delta": delta,
        "rel_error": err / norm, "converged": converged, "extrapolated": kept, "eigen_steps": eigen_steps,
    }
