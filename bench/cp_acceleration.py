"""Sweeps to tensorly's error: Bro's line search against exact line search, Anderson acceleration,
Nesterov momentum, and line search from the ``slices`` start.

The question behind it: can an acceleration of the ALS map reach a given error in fewer sweeps than
the line search ``cp_als(linesearch=True)`` uses? For ResNet-18's 64- and 128-channel 3x3 convs as
the order-3 ``(T, S, 9)`` tensor of ``cp3`` (He-initialised random), at 2x and 4x, the target is
tensorly's error after its sweeps of ``bench/cp_equal_error.py``, from the same SVD start; float64.

* ``ls``: ours, Bro's extrapolation (the option the runner offers);
* ``nesterov``: ``A + beta (A - A_prev)`` after every sweep, ``beta = k / (k + 3)``, restarted
  (``k = 0``) when the step would raise the error (Mitchell, Ye, De Sterck 2020, in spirit);
* ``anderson m``: type-II Anderson acceleration of the sweep map over the last ``m`` iterates
  (Tikhonov-regularised least squares), the mixed point kept only when it lowers the error;
* ``els``: exact line search along the sweep's direction (Rajih, Comon, Harshman 2008): the squared
  error at ``A_prev + t (A - A_prev)`` (every factor) is a polynomial of degree 6 in ``t``,
  interpolated here from 13 exact evaluations, and ``t`` is its global minimiser (``t = 1`` is
  the sweep's own point, so the step never does worse than plain ALS);
* ``ls slices``: ``ls`` from the ``slices`` start (``lowrank.decompositions.cp_init``) instead of
  the shared SVD start.

Every trial point is checked as line search checks its own (``SweepEngine.evaluate``: the next
sweep's first GEMM gives ``<X, X_hat>``, reused when the point is taken). Sweeps counted, not seconds.

    .venv/bin/python bench/cp_acceleration.py [--out bench/cp_acceleration.out.txt]   # ~3 min
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cp_speed import tensorly_fit  # noqa: E402
from lowrank.allocator import tune_allocator  # noqa: E402
from lowrank.decompositions.cp_als import SweepEngine, cp_als, init_factors, reconstruct  # noqa: E402

ITERS = {64: 200, 128: 100}


class Fit:
    """Sweeps of one problem, with a guarded trial point (taken only if it lowers the error)."""

    def __init__(self, x, init):
        self.engine = SweepEngine(x)
        self.factors = [f.clone() for f in init]
        self.grams = [f.T @ f for f in self.factors]
        self.started = None

    def sweep(self) -> float:
        err = self.engine.rel_error(self.engine.sweep(self.factors, self.grams, None, self.started), self.grams)
        self.started = None
        return err

    def try_point(self, trial, err: float) -> tuple[float, bool]:
        terr, grams, start = self.engine.evaluate(trial)
        if terr < err:
            self.factors, self.grams, self.started = trial, grams, start
            return terr, True
        return err, False


def line_search(x, init, target, cap) -> int:
    _, errs = cp_als(x, init[0].shape[1], init=init, n_iter_max=cap, tol=-1.0, stop_at=target, linesearch=True)
    return len(errs)


def nesterov(x, init, target, cap) -> int:
    fit, k = Fit(x, init), 0
    for it in range(1, cap + 1):
        before = [f.clone() for f in fit.factors]
        err = fit.sweep()
        if it > 1:
            k += 1
            beta = k / (k + 3)
            err, taken = fit.try_point([a + beta * (a - b) for a, b in zip(fit.factors, before)], err)
            k = k if taken else 0
        if err <= target:
            return it
    return cap


def anderson(x, init, target, cap, m: int, reg: float = 1e-10) -> int:
    fit = Fit(x, init)
    shapes = [f.shape for f in fit.factors]
    xs, gs = [], []  # iterates and their images under the sweep map, flattened

    def unflat(v):
        return [t.view(s) for t, s in zip(v.split([a * b for a, b in shapes]), shapes)]

    for it in range(1, cap + 1):
        xs.append(torch.cat([f.reshape(-1) for f in fit.factors]))
        err = fit.sweep()
        gs.append(torch.cat([f.reshape(-1) for f in fit.factors]))
        del xs[:-(m + 1)], gs[:-(m + 1)]
        if len(xs) >= 2:
            res = torch.stack([g - v for v, g in zip(xs, gs)], 1)
            d_res, d_g = res.diff(dim=1), torch.stack(gs, 1).diff(dim=1)
            a = d_res.T @ d_res
            a += reg * a.diagonal().mean() * torch.eye(a.shape[0], dtype=a.dtype)
            gamma = torch.linalg.solve(a, d_res.T @ res[:, -1])
            err, taken = fit.try_point(unflat(gs[-1] - d_g @ gamma), err)
            if not taken:
                del xs[:-1], gs[:-1]
        if err <= target:
            return it
    return cap


def exact_line_search(x, init, target, cap) -> int:
    fit, ts = Fit(x, init), np.linspace(-2.0, 6.0, 13)
    for it in range(1, cap + 1):
        before = [f.clone() for f in fit.factors]
        err = fit.sweep()
        if it > 1:
            d = [a - b for a, b in zip(fit.factors, before)]
            vals = [float(((x - reconstruct([b + t * e for b, e in zip(before, d)])) ** 2).sum()) for t in ts]
            poly = np.polyfit(ts, vals, 6)
            crit = [r.real for r in np.roots(np.polyder(poly)) if abs(r.imag) < 1e-9] + [1.0]
            t = min(crit, key=lambda c: np.polyval(poly, c))
            err, _ = fit.try_point([b + t * e for b, e in zip(before, d)], err)
        if err <= target:
            return it
    return cap


def line_search_from_slices(x, init, target, cap) -> int:
    return line_search(x, init_factors(x, init[0].shape[1], "slices"), target, cap)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    tune_allocator()
    methods = {"ls": line_search, "nesterov": nesterov, **{f"anderson {m}": (lambda *a, m=m: anderson(*a, m=m))
                                                             for m in (3, 5, 10)},
               "els": exact_line_search, "ls slices": line_search_from_slices}
    lines = ["# bench/cp_acceleration.py: sweeps to reach tensorly's error from the same start (float64, cap 4x "
             "tensorly's sweeps)",
             f"{'tensor':<10} {'ratio':>5} {'rank':>5} {'tl it':>5} {'tl err':>8} " + " ".join(f"{k:>11}" for k in methods)]
    print("\n".join(lines), flush=True)
    for c in ITERS:
        g = torch.Generator().manual_seed(c)
        x = torch.randn(c, c, 9, generator=g, dtype=torch.float64) * math.sqrt(2 / (c * 9))
        for ratio in (2, 4):
            r = (c * c * 9) // (ratio * (2 * c + 9))
            init = init_factors(x, r, "svd", seed=0)
            _, target, _ = tensorly_fit(x, init, ITERS[c], "pytorch")
            its = [fn(x, init, target, 4 * ITERS[c]) for fn in methods.values()]
            lines.append(f"{f'{c}x{c}x9':<10} {ratio:>4}x {r:>5} {ITERS[c]:>5} {target:>8.5f} "
                         + " ".join(f"{i:>11}" for i in its))
            print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
