"""CP-ALS over many same-shaped tensors at once (the groups of a grouped conv, same-shaped layers of
one network): the sweep of ``cp_als`` with a leading batch dimension, so that each operation runs
once for the whole batch (batched GEMMs and Cholesky solves) instead of once per problem. Small
layers are bound by per-operation overhead, and that is what batching removes.

Each problem stops by ``cp_als``'s own rules (``tol``, ``stop_at``, ``n_iter_max``) and leaves the
batch when it does; line search (Bro's extrapolation) is accepted or refused per problem. Results
equal ``cp_als`` run one problem at a time, to rounding.
"""
from __future__ import annotations

import math

import torch

from .cp_als import gram_product, init_factors, reconstruct


def _khatri_rao(mats: list[torch.Tensor]) -> torch.Tensor:
    """Batched column-wise Kronecker product: ``(B, I_m, R)`` each -> ``(B, prod I_m, R)``."""
    out = mats[0]
    for m in mats[1:]:
        out = (out.unsqueeze(2) * m.unsqueeze(1)).reshape(out.shape[0], -1, out.shape[-1])
    return out


def _solve(g: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``G Gamma^{-1}`` per problem: Cholesky, the pseudo-inverse where ``Gamma`` is singular."""
    chol, info = torch.linalg.cholesky_ex(gamma)
    out = torch.cholesky_solve(g.transpose(1, 2), chol).transpose(1, 2)
    bad = info != 0
    if bool(bad.any()):
        out[bad] = g[bad] @ torch.linalg.pinv(gamma[bad], hermitian=True)
    return out


class BatchedEngine:
    """The batch's reshaped tensors and one block-coordinate sweep (the order of ``SweepEngine``)."""

    def __init__(self, x: torch.Tensor):
        b, i0, i1, *small = x.shape
        self.i0, self.i1, self.small = i0, i1, tuple(small)
        self.k = math.prod(small)
        x4 = x.reshape(b, i0, i1, self.k)
        self.x_for_b = x4.permute(0, 1, 3, 2).reshape(b, i0 * self.k, i1)  # (B, I0*K, I1)
        self.x_for_a = x4.reshape(b, i0, i1 * self.k)  # (B, I0, I1*K)
        self.norm2 = (x * x).flatten(1).sum(1)  # (B,)

    def keep(self, mask: torch.Tensor) -> None:
        self.x_for_b, self.x_for_a, self.norm2 = self.x_for_b[mask], self.x_for_a[mask], self.norm2[mask]

    def _small_mttkrp(self, q, smalls, m):
        letters = "abcdefgh"[: len(smalls)]
        ins = ["z" + letters + "r"] + ["z" + letters[j] + "r" for j in range(len(smalls)) if j != m]
        ops = [q] + [smalls[j] for j in range(len(smalls)) if j != m]
        return torch.einsum(",".join(ins) + "->z" + letters[m] + "r", *ops)

    def sweep(self, factors, grams) -> torch.Tensor:
        """One sweep in place; returns ``<X, X_hat>`` per problem."""
        n_modes, r, b = len(factors), factors[0].shape[-1], factors[0].shape[0]

        def gamma(n):
            return gram_product(grams, n)

        p = (self.x_for_b @ factors[1]).reshape(b, self.i0, self.k, r)
        ks = _khatri_rao(factors[2:])  # (B, K, R)
        factors[0] = _solve((p * ks.unsqueeze(1)).sum(2), gamma(0))
        grams[0] = factors[0].transpose(1, 2) @ factors[0]
        q = (p * factors[0].unsqueeze(2)).sum(1).reshape(b, *self.small, r)
        for m in range(n_modes - 2):
            n = 2 + m
            factors[n] = _solve(self._small_mttkrp(q, factors[2:], m), gamma(n))
            grams[n] = factors[n].transpose(1, 2) @ factors[n]
        g1 = self._mode1(factors)
        factors[1] = _solve(g1, gamma(1))
        grams[1] = factors[1].transpose(1, 2) @ factors[1]
        return (g1 * factors[1]).sum((1, 2))

    def _mode1(self, factors) -> torch.Tensor:
        b, r = factors[0].shape[0], factors[0].shape[-1]
        pa = (factors[0].transpose(1, 2) @ self.x_for_a).reshape(b, r, self.i1, self.k)
        return (pa * _khatri_rao(factors[2:]).transpose(1, 2).unsqueeze(2)).sum(3).transpose(1, 2)

    def inner(self, factors) -> torch.Tensor:
        return (self._mode1(factors) * factors[1]).sum((1, 2))


def _model_norm2(grams) -> torch.Tensor:
    g = grams[0]
    for m in grams[1:]:
        g = g * m
    return g.sum((1, 2))


def _rebalance(factors, grams=None) -> None:
    norms = torch.stack([f.norm(dim=1) for f in factors])  # (N, B, R)
    target = norms.prod(0).clamp_min(0) ** (1.0 / len(factors))
    for n, f in enumerate(factors):
        scale = torch.where(norms[n] > 0, target / norms[n], torch.zeros_like(target))  # (B, R)
        factors[n] = f * scale.unsqueeze(1)
        if grams is not None:
            grams[n] = grams[n] * scale.unsqueeze(2) * scale.unsqueeze(1)


def cp_als_batched(x: torch.Tensor, rank: int, *, init="svd", seed: int = 0, n_iter_max: int = 500,
                   tol: float = 1e-8, linesearch: bool = False,
                   stop_at: float | None = None) -> tuple[list[list[torch.Tensor]], list[list[float]]]:
    """``cp_als`` on each ``x[b]`` of ``x`` (``(B, I0, I1, K_1, ...)``) at once. ``init``: ``'svd'``,
    ``'random'`` (each problem initialised as ``cp_als`` would) or per-problem factor lists.
    Returns ``(factors, errors)``: one factor list and one error curve per problem."""
    if x.dim() < 4:
        raise ValueError(f"batched CP needs a (B, I0, I1, K...) tensor, got shape {tuple(x.shape)}")
    batch = x.shape[0]
    inits = init if isinstance(init, (list, tuple)) else [init_factors(x[i], rank, init, seed) for i in range(batch)]
    factors = [torch.stack([fs[n].to(device=x.device, dtype=x.dtype) for fs in inits]) for n in range(x.dim() - 1)]
    engine = BatchedEngine(x)
    grams = [f.transpose(1, 2) @ f for f in factors]
    norm = engine.norm2.sqrt().clamp_min(1e-300)
    active = torch.arange(batch, device=x.device)
    done: dict[int, list[torch.Tensor]] = {}
    errors: list[list[float]] = [[] for _ in range(batch)]
    misses = torch.zeros(batch, dtype=x.dtype, device=x.device)

    def rel(inner, gs):
        return (engine.norm2 - 2 * inner + _model_norm2(gs)).clamp_min(0).sqrt() / norm

    for it in range(1, n_iter_max + 1):
        prev = [f.clone() for f in factors] if linesearch else None
        err = rel(engine.sweep(factors, grams), grams)
        if linesearch and it > 2:
            step = (it ** (1.0 / 3.0) / 2 ** misses).view(-1, 1, 1)
            trial = [p + step * (f - p) for p, f in zip(prev, factors)]
            tgrams = [f.transpose(1, 2) @ f for f in trial]
            terr = rel(engine.inner(trial), tgrams)
            better = terr < err
            sel = better.view(-1, 1, 1)
            factors = [torch.where(sel, t, f) for t, f in zip(trial, factors)]
            grams = [torch.where(sel, t, g) for t, g in zip(tgrams, grams)]
            err = torch.where(better, terr, err)
            misses = torch.where(better, (misses - 1).clamp_min(0), (misses + 1).clamp_max(8))
        if bool((err < 1e-6).any()):  # the cheap formula loses digits near an exact fit: measure directly
            exact = [float((x[active[i]] - reconstruct([f[i] for f in factors])).norm() / norm[i])
                     if err[i] < 1e-6 else float(err[i]) for i in range(len(active))]
            err = torch.tensor(exact, dtype=x.dtype, device=x.device)
        stop = torch.zeros(len(active), dtype=torch.bool, device=x.device)
        for i, (b, e) in enumerate(zip(active.tolist(), err.tolist())):
            errors[b].append(e)
            curve = errors[b]
            stop[i] = (e < 1e-15 or (len(curve) > 1 and abs(curve[-2] - e) < tol)
                       or (stop_at is not None and e <= stop_at) or it == n_iter_max)
        if it % 10 == 0:
            _rebalance(factors, grams)
        if bool(stop.any()):
            for i in torch.nonzero(stop).flatten().tolist():
                done[int(active[i])] = [f[i].clone() for f in factors]
            keep = ~stop
            if not bool(keep.any()):
                break
            active, norm, misses = active[keep], norm[keep], misses[keep]
            factors, grams = [f[keep] for f in factors], [g[keep] for g in grams]
            engine.keep(keep)
    return [_balanced(done[b]) for b in range(batch)], errors


def _balanced(fs: list[torch.Tensor]) -> list[torch.Tensor]:
    """One problem's factors with equal column norms across modes (``cp_als``'s final step)."""
    stacked = [f.unsqueeze(0) for f in fs]
    _rebalance(stacked)
    return [f[0] for f in stacked]
