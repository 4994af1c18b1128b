"""Degeneracy diagnostics of a CP model (docs/algorithms.md, section 2).

``lambda_r = prod_n ||u_r^(n)||``; the terms' Gram matrix is ``C = hadamard_n Ubar_n^T Ubar_n``
(normalised columns), whose off-diagonal entries are the CP congruences (cosines between the
vectorised rank-1 terms).
"""
from __future__ import annotations

import math

import torch

from .cp_als import reconstruct

# Thresholds (docs/algorithms.md, section 2): any one flags the model.
CANCELLATION_DEGENERATE = 2.0  # sqrt(sum lambda^2) / ||X_hat||
MAX_TERM_DEGENERATE = 1.0  # max lambda / ||X||
MIN_CONGRUENCE_DEGENERATE = -0.8  # min_{r != s} C_rs
GRAM_CONDITION_DEGENERATE = 100.0  # kappa(C)
_COND_CAP = 1e16


def _as_factor_groups(factors) -> list[list[torch.Tensor]]:
    fs = getattr(factors, "factors", factors)
    fs = [torch.as_tensor(f) for f in fs]
    if fs[0].dim() == 3:  # (g, I_n, R): one model per group
        return [[f[i] for f in fs] for i in range(fs[0].shape[0])]
    return [fs]


def _single(fs: list[torch.Tensor], x: torch.Tensor | None) -> dict:

    fs = [f.detach().to(torch.float64) for f in fs]
    n_modes, r = len(fs), fs[0].shape[1]
    norms = torch.stack([f.norm(dim=0) for f in fs])
    lam = norms.prod(0)
    xhat = reconstruct(fs)
    xhat_norm = float(xhat.norm())
    if x is not None:
        x = x.detach().to(torch.float64).reshape(xhat.shape)
        x_norm = float(x.norm())
        rel_error = float((x - xhat).norm()) / x_norm if x_norm > 0 else float((x - xhat).norm())
    else:
        x_norm, rel_error = xhat_norm, None
    ref = x_norm if x_norm > 0 else 1.0
    bar = [f / f.norm(dim=0).clamp_min(1e-300) for f in fs]
    c = torch.ones(r, r, dtype=torch.float64, device=fs[0].device)
    for f in bar:
        c = c * (f.T @ f)
    off = c[~torch.eye(r, dtype=torch.bool, device=c.device)]
    eig = torch.linalg.eigvalsh(c)
    cond = float(eig[-1] / eig[0]) if float(eig[0]) > eig[-1] / _COND_CAP else _COND_CAP
    sizes = [f.shape[0] for f in fs]
    # scale-free sensitivity at the optimal scaling of each component (section 1.2):
    # N (prod I_n)^(1/N) sum_r (lambda_r / ||X||)^(2(N-1)/N)
    sens = n_modes * math.prod(sizes) ** (1.0 / n_modes) * float(
        ((lam / ref) ** (2.0 * (n_modes - 1) / n_modes)).sum())
    d = {
        "rel_error": rel_error,
        "cancellation_ratio": float(lam.pow(2).sum().sqrt()) / xhat_norm if xhat_norm > 0 else float("inf"),
        "norm_ratio": float(lam.sum()) / ref,
        "max_term_ratio": float(lam.max()) / ref,
        "min_congruence": float(off.min()) if off.numel() else 0.0,
        "gram_condition": cond,
        "sensitivity": sens,
    }
    d["degenerate"] = bool(
        d["cancellation_ratio"] > CANCELLATION_DEGENERATE
        or d["max_term_ratio"] > MAX_TERM_DEGENERATE
        or d["min_congruence"] < MIN_CONGRUENCE_DEGENERATE
        or d["gram_condition"] > GRAM_CONDITION_DEGENERATE
    )
    return d


def cp_diagnostics(factors, tensor: torch.Tensor | None = None) -> dict:
    """Diagnostics of a CP model: ``rel_error`` (None without ``tensor``), ``cancellation_ratio``,
    ``norm_ratio``, ``max_term_ratio``, ``min_congruence``, ``gram_condition``, ``sensitivity``
    (scale-free) and ``degenerate``.

    ``factors``: a ``CPFactors``, or a list of ``(I_n, R)`` matrices (or ``(g, I_n, R)`` per
    group, in which case the worst group is reported). ``tensor``: the fitted tensor (its
    shape may be the kernel's; it is reshaped to the factors' sizes).
    """
    groups = _as_factor_groups(factors)
    if tensor is not None and len(groups) > 1:
        xs = tensor.reshape(len(groups), -1)
    else:
        xs = [tensor] * len(groups)
    per = [_single(fs, x) for fs, x in zip(groups, xs)]
    if len(per) == 1:
        return per[0]
    worst = {}
    for key in per[0]:
        vals = [p[key] for p in per]
        if key == "degenerate":
            worst[key] = any(vals)
        elif key == "rel_error":
            worst[key] = None if vals[0] is None else max(vals)
        elif key == "min_congruence":
            worst[key] = min(vals)
        else:
            worst[key] = max(vals)
    return worst
