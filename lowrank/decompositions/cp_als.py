"""CP-ALS in torch (float64 by default, CPU or CUDA): the sweep is ``cp_sweep.Sweep``'s (two
large GEMMs per sweep on a dimension tree), here for one tensor at a time.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .cp_init import init_factors
from .cp_sweep import LS_FIRST_POWER, Sweep, gram_product, khatri_rao, ls_schedule, model_norm2, rebalance

__all__ = ["SweepEngine", "cp_als", "gram_product", "init_factors", "khatri_rao", "rebalance", "reconstruct"]


def reconstruct(factors: list[torch.Tensor]) -> torch.Tensor:
    shape = [f.shape[0] for f in factors]
    return (factors[0] @ khatri_rao(factors[1:]).T).reshape(shape)


class SweepEngine:
    """One tensor's sweep: ``Sweep`` with a batch of one, and unbatched factors, Grams and update."""

    def __init__(self, x: torch.Tensor):
        if x.dim() < 3:
            raise ValueError(f"CP needs a tensor of order >= 3, got shape {tuple(x.shape)}")
        self.shape = tuple(x.shape)
        self._sweep = Sweep(x.unsqueeze(0))
        self.norm2 = float(self._sweep.norm2[0])
        self.norm = math.sqrt(self.norm2) or 1.0

    def start(self, factors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``Sweep.start``: the first GEMM of a sweep from ``factors``, reusable by ``sweep``."""
        return self._sweep.start([f.unsqueeze(0) for f in factors])

    def rel_error(self, inner: float, grams: list[torch.Tensor]) -> float:
        """``||X - X_hat|| / ||X||`` from ``<X, X_hat>`` and the model's Gram matrices (no
        reconstruction: ``||X||^2 - 2<X, X_hat> + ||X_hat||^2``)."""
        return math.sqrt(max(self.norm2 - 2 * inner + float(model_norm2(grams)), 0.0)) / self.norm

    def inner(self, factors: list[torch.Tensor]):
        """``(<X, X_hat>, grams, started)`` of a candidate point at one large GEMM, the next sweep's
        first (``<X, X_hat> = sum(G_0 * U_0)`` from ``start``'s mode-0 MTTKRP); ``grams`` and
        ``started`` for ``sweep`` to reuse if the point is taken."""
        grams = [f.T @ f for f in factors]
        started = self.start(factors)
        return float(torch.vdot(started[1][0].flatten(), factors[0].flatten())), grams, started

    def evaluate(self, factors: list[torch.Tensor]):
        """The error of a candidate point (line search's extrapolation): ``(rel_error, grams,
        started)``, as ``inner``."""
        inner, grams, started = self.inner(factors)
        return self.rel_error(inner, grams), grams, started

    def sweep(self, factors: list[torch.Tensor], grams: list[torch.Tensor], update: Callable | None = None,
              started: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
        """One sweep; ``update(n, G, gamma)`` returns the new factor of mode ``n`` (``None``: ALS's
        own, ``G gamma^{-1}``, run on the batch of one as it lies); ``started``: ``start(factors)``'s
        result, if at hand. Updates ``factors`` and ``grams`` in place (each factor as soon as it is
        updated, so that ``update`` reading ``factors`` sees the sweep's current point, as EPC's
        weights must) and returns ``<X, X_hat>`` for the final model."""
        fb, gb = [f.unsqueeze(0) for f in factors], [g.unsqueeze(0) for g in grams]

        def batched(n, g, gam):  # ``factors[n]`` replaced at once: an update that reads the others sees them current
            factors[n] = update(n, g[0], gam[0])
            return factors[n].unsqueeze(0)
        inner = self._sweep.sweep(fb, gb, None if update is None else batched, started)
        factors[:], grams[:] = [f[0] for f in fb], [g[0] for g in gb]
        return float(inner[0])


def cp_als(x: torch.Tensor, rank: int, *, init="svd", seed: int = 0, n_iter_max: int = 500, tol: float = 1e-8,
           callback: Callable | None = None, linesearch: bool = False,
           stop_at: float | None = None) -> tuple[list[torch.Tensor], list[float]]:
    """Fit a rank-``rank`` CP model to ``x`` by ALS.

    ``init``: ``'svd'``, ``'random'``, ``'slices'`` (``cp_init.INITS``) or a list of initial factors. Stops when the relative
    error changes by less than ``tol`` (absolute difference, as tensorly), falls to ``stop_at``,
    or after ``n_iter_max`` sweeps. ``linesearch``: after each sweep, try the extrapolation
    ``A_prev + s (A - A_prev)`` (Bro 1998; ``s = it^(1/p)``, ``p`` from 2 and one more after
    every 4 refusals in a row, ``cp_sweep.ls_schedule``) and keep it when its error is lower.
    Checking it costs the next sweep's first GEMM, which that sweep then reuses: one more large
    GEMM per refused step, none per accepted one.
    ``callback(iteration, rel_error)`` is called after every sweep. Returns ``(factors, errors)``.
    """
    if isinstance(init, (list, tuple)):
        factors = [f.to(device=x.device, dtype=x.dtype).clone() for f in init]
    else:
        factors = init_factors(x, rank, init, seed)
    engine = SweepEngine(x)
    grams = [f.T @ f for f in factors]
    errors: list[float] = []
    power, refused = LS_FIRST_POWER, 0
    started = None  # the next sweep's first GEMM, where the line search already made it

    for it in range(1, n_iter_max + 1):
        prev = list(factors) if linesearch else None  # a sweep replaces factors, never writes into them
        err = engine.rel_error(engine.sweep(factors, grams, None, started), grams)
        started = None
        if linesearch and it > 2:
            step = it ** (1.0 / power)
            trial = [torch.lerp(p, f, step) for p, f in zip(prev, factors)]  # p + step (f - p)
            terr, tgrams, tstart = engine.evaluate(trial)
            accepted = terr < err
            if accepted:
                factors, grams, err, started = trial, tgrams, terr, tstart
            power, refused = ls_schedule(accepted, power, refused)
        if err < 1e-6:  # the cheap formula loses digits near an exact fit: measure directly
            err = float((x - reconstruct(factors)).norm()) / engine.norm
        errors.append(err)
        if it % 10 == 0:  # ALS is invariant to column scaling; rebalancing only guards the range
            rebalance(factors, grams)
            started = None  # made for the factors before rescaling
        if callback is not None:
            callback(it, err)
        if err < 1e-15 or (len(errors) > 1 and abs(errors[-2] - err) < tol) or (stop_at is not None and err <= stop_at):
            break
    rebalance(factors)
    return factors, errors
