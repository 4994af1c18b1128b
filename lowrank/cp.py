"""CP methods: ``cp3`` / ``cp4`` (CP-ALS) and ``cp3-epc`` / ``cp4-epc`` (CP-ALS, then EPC).

* ``cp3``: CP of the ``(T, S, kh*kw)`` tensor -> 1x1, depthwise kh x kw, 1x1 (the order-3
  pipeline of the CPD-EPC public code);
* ``cp4``: CP of the ``(T, S, kh, kw)`` tensor -> 1x1, depthwise kh x 1, depthwise 1 x kw, 1x1
  (Lebedev et al. 2015).

Factor containers carry diagnostics: ``{'als': {...}}`` and, for EPC methods,
``{'epc': {...}, 'epc_sweeps': n, ...}``; ``degenerate`` is the final model's flag.
"""
from __future__ import annotations

import time

import torch

from .decompositions._common import kernel_groups
from .decompositions.cp_als import cp_als
from .decompositions.epc import epc
from .diagnostics import cp_diagnostics
from .factors import CPFactors
from .layers import build_cp
from .registry import KernelShape, Method, generic_cp_max_rank, register_method


def _fit(tensors: list[torch.Tensor], rank: int, method: str, shape, *, use_epc: bool, init, seed, n_iter_max,
         tol, callback, epc_objective, epc_max_sweeps, epc_tol, epc_target, epc_callback) -> CPFactors:
    per_group, diags = [], []
    for x in tensors:
        t0 = time.perf_counter()
        factors, errors = cp_als(x, rank, init=init, seed=seed, n_iter_max=n_iter_max, tol=tol, callback=callback)
        d = {"als": cp_diagnostics(factors, x), "als_iterations": len(errors),
             "als_seconds": time.perf_counter() - t0}
        if use_epc:
            t1 = time.perf_counter()
            delta = None if epc_target is None else float(epc_target) * float(x.norm())
            factors, info = epc(x, factors, delta=delta, objective=epc_objective, max_sweeps=epc_max_sweeps,
                                tol=epc_tol, callback=epc_callback)
            d["epc"] = cp_diagnostics(factors, x)
            d.update(epc_sweeps=info["sweeps"], epc_converged=info["converged"],
                     epc_objective_start=info["objective_start"], epc_objective_end=info["objective_end"],
                     epc_seconds=time.perf_counter() - t1)
        per_group.append(factors)
        diags.append(d)
    stacked = tuple(torch.stack([fs[n] for fs in per_group]) for n in range(len(per_group[0])))
    diag = diags[0] if len(diags) == 1 else _worst(diags)
    final = diag["epc" if use_epc else "als"]
    diag["degenerate"] = bool(final["degenerate"])
    return CPFactors(factors=stacked, shape=tuple(shape), method=method, diagnostics=diag)


def _worst(diags: list[dict]) -> dict:
    out = dict(diags[0])
    for key in ("als", "epc"):
        if key in out:
            out[key] = {k: (min if k == "min_congruence" else any if k == "degenerate" else max)(
                [d[key][k] for d in diags]) for k in out[key] if out[key][k] is not None}
    return out


def _make(order: int, use_epc: bool):
    name = f"cp{order}" + ("-epc" if use_epc else "")

    def decompose_cp(weight: torch.Tensor, rank: int, *, groups: int = 1, init="svd", seed: int = 0,
                     n_iter_max: int = 500, tol: float = 1e-8, callback=None, epc_objective: str = "norm",
                     epc_max_sweeps: int = 3000, epc_tol: float = 1e-7, epc_target: float | None = None,
                     epc_callback=None) -> CPFactors:
        t, s, kh, kw = weight.shape
        wg = kernel_groups(weight, groups)  # (g, T_g, S, kh, kw)
        if order == 3:
            tensors = [wg[i].reshape(t // groups, s, kh * kw) for i in range(groups)]
        else:
            tensors = [wg[i] for i in range(groups)]
        return _fit(tensors, rank, name, weight.shape, use_epc=use_epc, init=init, seed=seed,
                    n_iter_max=n_iter_max, tol=tol, callback=callback, epc_objective=epc_objective,
                    epc_max_sweeps=epc_max_sweeps, epc_tol=epc_tol, epc_target=epc_target,
                    epc_callback=epc_callback)

    decompose_cp.__name__ = f"decompose_{name.replace('-', '_')}"
    if not use_epc:  # EPC options only exist on the EPC methods
        def decompose_plain(weight, rank, *, groups=1, init="svd", seed=0, n_iter_max=500, tol=1e-8, callback=None):
            return decompose_cp(weight, rank, groups=groups, init=init, seed=seed, n_iter_max=n_iter_max, tol=tol,
                                callback=callback)
        decompose_plain.__name__ = decompose_cp.__name__
        return name, decompose_plain
    return name, decompose_cp


def _spatial(k: KernelShape) -> str | None:
    if k.kh * k.kw == 1:
        return "CP methods need a spatial kernel larger than 1x1; use 'svd' for 1x1 convs"
    return None


for _order in (3, 4):
    for _epc in (False, True):
        _name, _fn = _make(_order, _epc)
        if _order == 3:
            _max = lambda k: generic_cp_max_rank((k.t_g, k.s, k.kh * k.kw))  # noqa: E731
            _params = lambda k, r: k.groups * r * (k.t_g + k.s + k.kh * k.kw)  # noqa: E731
            _macs = lambda k, r, hi, wi, ho, wo: k.groups * r * (  # noqa: E731
                k.s * hi * wi + k.kh * k.kw * ho * wo + k.t_g * ho * wo)
            _desc = "1x1 -> depthwise kh x kw -> 1x1, CP of the (T, S, kh*kw) tensor"
        else:
            _max = lambda k: generic_cp_max_rank((k.t_g, k.s, k.kh, k.kw))  # noqa: E731
            _params = lambda k, r: k.groups * r * (k.t_g + k.s + k.kh + k.kw)  # noqa: E731
            _macs = lambda k, r, hi, wi, ho, wo: k.groups * r * (  # noqa: E731
                k.s * hi * wi + k.kh * ho * wi + k.kw * ho * wo + k.t_g * ho * wo)
            _desc = "1x1 -> depthwise kh x 1 -> depthwise 1 x kw -> 1x1 (Lebedev et al. 2015)"
        register_method(Method(
            name=_name, decompose=_fn, build=build_cp, max_rank=_max, n_params=_params, stages_macs=_macs,
            kernel_ok=_spatial, description=_desc + (", stabilised by EPC (Phan et al. 2020)" if _epc else ""),
        ))

__all__ = ["cp_diagnostics"]
