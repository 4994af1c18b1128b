"""CP-ALS over many same-shaped tensors at once (the groups of a grouped conv, same-shaped layers of
one network): the sweep of ``cp_als`` with a leading batch dimension, so that each operation runs
once for the whole batch (batched GEMMs and Cholesky solves) instead of once per problem. Small
layers are bound by per-operation overhead, and that is what batching removes.

Each problem stops by ``cp_als``'s own rules (``tol``, ``stop_at``, ``n_iter_max``) and leaves the
batch when it does; line search (Bro's extrapolation) is accepted or refused per problem. Results
equal ``cp_als`` run one problem at a time, to rounding.
"""
from __future__ import annotations

import torch

from .cp_als import init_factors, reconstruct
from .cp_sweep import LS_FIRST_POWER, Sweep, ls_schedule, model_norm2, rebalance


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
    engine = Sweep(x)
    grams = [f.transpose(1, 2) @ f for f in factors]
    norm = engine.norm2.sqrt().clamp_min(1e-300)
    active = torch.arange(batch, device=x.device)
    done: dict[int, list[torch.Tensor]] = {}
    errors: list[list[float]] = [[] for _ in range(batch)]
    power = torch.full((batch,), LS_FIRST_POWER, dtype=x.dtype, device=x.device)  # per problem
    refused = torch.zeros(batch, dtype=x.dtype, device=x.device)
    started = None  # the next sweep's first GEMM, where every problem took its line-search step

    def rel(inner, gs):
        return (engine.norm2 - 2 * inner + model_norm2(gs)).clamp_min(0).sqrt() / norm

    for it in range(1, n_iter_max + 1):
        prev = list(factors) if linesearch else None  # a sweep replaces factors, never writes into them
        err = rel(engine.sweep(factors, grams, None, started), grams)
        started = None
        if linesearch and it > 2:
            step = (it ** (1.0 / power)).view(-1, 1, 1)
            trial = [torch.lerp(p, f, step) for p, f in zip(prev, factors)]  # p + step (f - p)
            tgrams = [f.transpose(1, 2) @ f for f in trial]
            tstart = engine.start(trial)
            terr = rel((tstart[1] * trial[0]).sum((1, 2)), tgrams)
            better = terr < err
            if bool(better.all()):
                started = tstart
            sel = better.view(-1, 1, 1)
            factors = [torch.where(sel, t, f) for t, f in zip(trial, factors)]
            grams = [torch.where(sel, t, g) for t, g in zip(tgrams, grams)]
            err = torch.where(better, terr, err)
            power, refused = ls_schedule(better.to(x.dtype), power, refused)
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
            rebalance(factors, grams)
            started = None  # made for the factors before rescaling
        if bool(stop.any()):
            for i in torch.nonzero(stop).flatten().tolist():
                done[int(active[i])] = [f[i].clone() for f in factors]
            keep = ~stop
            if not bool(keep.any()):
                break
            active, norm, power, refused = active[keep], norm[keep], power[keep], refused[keep]
            factors, grams = [f[keep] for f in factors], [g[keep] for g in grams]
            engine.keep(keep)
            started = None if started is None else (started[0][keep], started[1][keep])
    return [_balanced(done[b]) for b in range(batch)], errors


def _balanced(fs: list[torch.Tensor]) -> list[torch.Tensor]:
    """One problem's factors with equal column norms across modes (``cp_als``'s final step)."""
    stacked = [f.unsqueeze(0) for f in fs]
    rebalance(stacked)
    return [f[0] for f in stacked]
