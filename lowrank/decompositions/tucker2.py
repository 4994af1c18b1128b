"""Tucker-2 of a conv kernel over its channel modes (Kim et al., ICLR 2016).

HOSVD initialisation, then HOOI (alternating leading-subspace updates). With orthonormal
factors the reconstruction error is ``||W||^2 - ||G||^2``, which HOOI never increases.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..factors import Tucker2Factors
from ._common import kernel_groups, leading_left_singular_vectors


def _unfold(w: torch.Tensor, mode: int) -> torch.Tensor:
    return w.movedim(mode, 0).reshape(w.shape[mode], -1)


def _tucker2_group(w, r3, r4, *, n_iter_max, tol, callback, group):
    """``w``: ``(T, S, kh, kw)``. Returns ``(U_S (S, r3), core (r4, r3, kh, kw), U_T (T, r4))``."""
    norm2 = float((w * w).sum())
    u_s = leading_left_singular_vectors(_unfold(w, 1), r3)
    u_t = leading_left_singular_vectors(_unfold(w, 0), r4)

    def core_and_error(z, u_t):
        # z = W x_S U_S^T, so the core is one more small contraction; with orthonormal
        # factors ||W - W_hat||^2 = ||W||^2 - ||G||^2
        core = torch.einsum("tqij,tp->pqij", z, u_t)
        err2 = max(norm2 - float((core * core).sum()), 0.0)
        return core, (err2 / norm2) ** 0.5 if norm2 > 0 else 0.0

    def project_s(u_s):
        return torch.einsum("tsij,sq->tqij", w, u_s)

    z = project_s(u_s)
    core, err = core_and_error(z, u_t)
    if callback is not None:
        callback(0, err) if group is None else callback(0, err, group)
    for it in range(1, n_iter_max + 1):
        if err == 0.0:
            break
        u_s = leading_left_singular_vectors(_unfold(torch.einsum("tsij,tp->psij", w, u_t), 1), r3)
        z = project_s(u_s)
        u_t = leading_left_singular_vectors(_unfold(z, 0), r4)
        prev = err
        core, err = core_and_error(z, u_t)
        if callback is not None:
            callback(it, err) if group is None else callback(it, err, group)
        if prev - err <= tol * max(prev, 1e-300):
            break
    return u_s, core, u_t


def decompose_tucker2(
    weight: torch.Tensor,
    rank: tuple[int, int],
    *,
    groups: int = 1,
    n_iter_max: int = 50,
    tol: float = 1e-4,
    callback: Callable | None = None,
) -> Tucker2Factors:
    """``weight``: ``(T, S_g, kh, kw)``; ``rank = (R3, R4)`` = (input-channel rank, output-channel rank).

    ``callback(iteration, rel_error)`` is called after HOSVD (iteration 0) and after each HOOI
    sweep (for grouped kernels: ``callback(iteration, rel_error, group)``).
    """
    r3, r4 = rank
    w = kernel_groups(weight, groups)
    parts = [
        _tucker2_group(w[i], r3, r4, n_iter_max=n_iter_max, tol=tol, callback=callback,
                       group=None if groups == 1 else i)
        for i in range(groups)
    ]
    return Tucker2Factors(
        in_factor=torch.stack([p[0] for p in parts]),
        core=torch.stack([p[1] for p in parts]),
        out_factor=torch.stack([p[2] for p in parts]),
        shape=tuple(weight.shape),
    )


def tucker2_unfoldings(weight: torch.Tensor, groups: int = 1) -> list[list[torch.Tensor]]:
    """The two rank components of ``tucker2`` (Kim et al. look at the mode unfoldings): the
    input-channel unfolding sets R3, the output-channel unfolding sets R4, per group."""
    wg = kernel_groups(weight, groups)  # (g, T_g, S, kh, kw)
    return [[_unfold(wg[i], 1) for i in range(groups)], [_unfold(wg[i], 0) for i in range(groups)]]
