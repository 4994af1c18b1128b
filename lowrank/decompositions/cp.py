"""The CP methods' decomposition: ``cp3`` / ``cp4`` (CP-ALS) and ``cp3-epc`` / ``cp4-epc``
(CP-ALS, then EPC); registered in ``lowrank.methods``.

* ``cp3``: CP of the ``(T, S, kh*kw)`` tensor -> 1x1, depthwise kh x kw, 1x1 (the order-3
  pipeline of the CPD-EPC public code);
* ``cp4``: CP of the ``(T, S, kh, kw)`` tensor -> 1x1, depthwise kh x 1, depthwise 1 x kw, 1x1
  (Lebedev et al. 2015).

Factor containers carry diagnostics: ``{'als': {...}}`` and, for EPC methods,
``{'epc': {...}, 'epc_sweeps': n, 'epc_scale': a, ...}``; ``degenerate`` is the final model's flag.

EPC returns the smallest-norm model on the sphere ``||X - M|| = delta``: like a ridge estimate it
is shrunk towards zero. ``epc_scale`` reports by how much: the least-squares scalar
``<X, M> / ||M||^2`` of the corrected model (exactly 1 for a least-squares fit, 1.05-1.11 on
trained kernels; docs/algorithms.md, section 1.5). ``epc_rescale: true`` multiplies the model by
it (the error drops below ``delta``; congruences are unchanged); off by default, because on our
networks it helped one and hurt the other before BatchNorm recalibration (bench/epc_shrinkage.py).
"""
from __future__ import annotations

import math
import time

import torch

from .diagnostics import cp_diagnostics
from ..factors import CPFactors
from ._common import kernel_groups
from .cp_als import cp_als, reconstruct
from .cp_batched import cp_als_batched
from .epc import epc


def ls_scale(x: torch.Tensor, factors: list[torch.Tensor]) -> float:
    """``a = <X, M> / ||M||^2``, the scalar that minimises ``||X - a M||`` (1 for a least-squares fit)."""
    m = reconstruct(factors)
    mm = float((m * m).sum())
    return float((x * m).sum()) / mm if mm > 0 else 1.0


def rescale(factors: list[torch.Tensor], a: float) -> None:
    """Multiply the model by ``a > 0``, spread evenly over the factors (in place)."""
    step = a ** (1.0 / len(factors))
    for n in range(len(factors)):
        factors[n] = factors[n] * step


def _fit(tensors: list[torch.Tensor], rank: int, method: str, shape, *, use_epc: bool, init, seed, n_iter_max,
         tol, callback, linesearch, als_dtype, epc_objective, epc_max_sweeps, epc_tol, epc_target, epc_rescale,
         epc_extrapolate, epc_callback) -> CPFactors:
    per_group, diags = [], []
    fits = als_fits(tensors, rank, init=init, seed=seed, n_iter_max=n_iter_max, tol=tol, callback=callback,
                    linesearch=linesearch, als_dtype=als_dtype)
    for x, (factors, errors, seconds) in zip(tensors, fits):
        factors = [f.to(x.dtype) for f in factors]
        d = {"als": cp_diagnostics(factors, x), "als_iterations": len(errors), "als_seconds": seconds}
        if use_epc:
            t1 = time.perf_counter()
            delta = None if epc_target is None else float(epc_target) * float(x.norm())
            factors, info = epc(x, factors, delta=delta, objective=epc_objective, max_sweeps=epc_max_sweeps,
                                tol=epc_tol, extrapolate=epc_extrapolate, callback=epc_callback)
            d["epc_rel_error_at_bound"] = info["rel_error"]
            d["epc_scale"] = ls_scale(x, factors)
            if epc_rescale and d["epc_scale"] > 0:
                rescale(factors, d["epc_scale"])
            d["epc"] = cp_diagnostics(factors, x)
            d.update(epc_sweeps=info["sweeps"], epc_converged=info["converged"],
                     epc_objective_start=info["objective_start"], epc_objective_end=info["objective_end"],
                     epc_extrapolated=info["extrapolated"], epc_seconds=time.perf_counter() - t1)
        per_group.append(factors)
        diags.append(d)
    stacked = tuple(torch.stack([fs[n] for fs in per_group]) for n in range(len(per_group[0])))
    diag = diags[0] if len(diags) == 1 else _worst(diags)
    final = diag["epc" if use_epc else "als"]
    diag["degenerate"] = bool(final["degenerate"])
    return CPFactors(factors=stacked, shape=tuple(shape), method=method, diagnostics=diag)


BATCH_BELOW = 1 << 24  # multiply-adds of one problem's large GEMM under which problems are fitted as a batch


def batched(shape, rank: int) -> bool:
    """Whether same-shaped problems of this size gain from one batched ALS: small ones are bound by
    per-operation overhead, which batching shares (``bench/cp_equal_error.py --batched``)."""
    return math.prod(shape) * rank < BATCH_BELOW


def als_fits(tensors: list[torch.Tensor], rank: int, *, init, seed, n_iter_max, tol, callback, linesearch,
             als_dtype) -> list[tuple[list[torch.Tensor], list[float], float]]:
    """CP-ALS of each tensor: ``(factors, errors, seconds)``, in ``als_dtype``. Several small
    same-shaped tensors (a grouped conv's groups) are fitted at once by ``cp_als_batched`` (the
    same result to rounding); a ``callback`` asks for one problem at a time."""
    low = getattr(torch, als_dtype)
    xs = [x.to(low) if low != x.dtype else x for x in tensors]
    t0 = time.perf_counter()
    if len(xs) > 1 and callback is None and len({x.shape for x in xs}) == 1 and batched(xs[0].shape, rank) \
            and not isinstance(init, (list, tuple)):
        factors, errors = cp_als_batched(torch.stack(xs), rank, init=init, seed=seed, n_iter_max=n_iter_max, tol=tol,
                                         linesearch=linesearch)
        each = (time.perf_counter() - t0) / len(xs)
        return [(f, e, each) for f, e in zip(factors, errors)]
    out = []
    for x in xs:
        t0 = time.perf_counter()
        factors, errors = cp_als(x, rank, init=init, seed=seed, n_iter_max=n_iter_max, tol=tol, callback=callback,
                                 linesearch=linesearch)
        out.append((factors, errors, time.perf_counter() - t0))
    return out


def _worst(diags: list[dict]) -> dict:
    out = dict(diags[0])
    for key in ("als", "epc"):
        if key in out:
            out[key] = {k: (min if k == "min_congruence" else any if k == "degenerate" else max)(
                [d[key][k] for d in diags]) for k in out[key] if out[key][k] is not None}
    return out


def decompose_cp(weight: torch.Tensor, rank: int, *, order: int, use_epc: bool, groups: int = 1, init="svd",
                 seed: int = 0, n_iter_max: int = 500, tol: float = 1e-8, callback=None, linesearch: bool = False,
                 als_dtype: str = "float64", epc_objective: str = "norm",
                 epc_max_sweeps: int = 1000, epc_tol: float = 1e-7, epc_target: float | None = None,
                 epc_rescale: bool = False, epc_extrapolate: bool = True, epc_callback=None) -> CPFactors:
    """CP of each group's kernel as an order-3 ``(T_g, S, kh*kw)`` (``order=3``) or order-4
    ``(T_g, S, kh, kw)`` tensor, by ALS and, with ``use_epc``, Error Preserving Correction.
    ``als_dtype='float32'`` runs ALS in single precision (twice the GEMM rate); the diagnostics and
    EPC are computed in the kernel's precision (float64 by default) from the widened factors."""
    t, s, kh, kw = weight.shape
    wg = kernel_groups(weight, groups)  # (g, T_g, S, kh, kw)
    tensors = [wg[i].reshape(t // groups, s, kh * kw) if order == 3 else wg[i] for i in range(groups)]
    name = f"cp{order}" + ("-epc" if use_epc else "")
    return _fit(tensors, rank, name, weight.shape, use_epc=use_epc, init=init, seed=seed, n_iter_max=n_iter_max,
                tol=tol, callback=callback, linesearch=linesearch, als_dtype=als_dtype, epc_objective=epc_objective,
                epc_max_sweeps=epc_max_sweeps, epc_tol=epc_tol, epc_target=epc_target, epc_rescale=epc_rescale,
                epc_extrapolate=epc_extrapolate, epc_callback=epc_callback)
