"""The built-in methods, each registered once, the same way.

Per method: the pure decomposition, the layer that runs its factors, its rank bounds and cost
model (parameters and MACs of the factorized stages), its typed options, and its capabilities
(the unfoldings VBMF/energy read, whether it is worth a GPU).
"""
from __future__ import annotations

from functools import partial

from .decompositions.cp import decompose_cp
from .decompositions.spatial_svd import decompose_spatial_svd, tai_unfoldings
from .decompositions.svd import decompose_svd, svd_unfoldings
from .decompositions.tucker2 import decompose_tucker2, tucker2_unfoldings
from .layers import build_cp, build_spatial_svd, build_svd, build_tucker2
from .options import CPEPCOptions, CPOptions, Tucker2Options
from .registry import KernelShape, Method, generic_cp_max_rank, register_method


def _only_1x1(k: KernelShape) -> str | None:
    if (k.kh, k.kw) != (1, 1):
        return (f"svd factorizes Linear layers and 1x1 convs, got a {k.kh}x{k.kw} kernel; "
                f"use spatial-svd, tucker2 or a CP method")
    return None


def _spatial_only(name: str):
    def check(k: KernelShape) -> str | None:
        if k.kh * k.kw == 1:
            return f"{name} needs a spatial kernel larger than 1x1; use 'svd' for 1x1 convs"
        return None
    return check


register_method(Method(
    name="svd",
    decompose=decompose_svd,
    build=build_svd,
    max_rank=lambda k: min(k.t_g, k.s),
    n_params=lambda k, r: k.groups * r * (k.t_g + k.s),
    stages_macs=lambda k, r, hi, wi, ho, wo: k.groups * r * (k.s + k.t_g) * ho * wo,
    unfoldings=svd_unfoldings,
    linear_ok=True,
    kernel_ok=_only_1x1,
    description="truncated SVD: Linear -> two Linears, 1x1 conv -> two 1x1 convs",
))
register_method(Method(
    name="spatial-svd",
    decompose=decompose_spatial_svd,
    build=build_spatial_svd,
    max_rank=lambda k: min(k.s * k.kh, k.t_g * k.kw),
    n_params=lambda k, r: k.groups * r * (k.s * k.kh + k.t_g * k.kw),
    # the vertical stage runs at the un-strided (padded) input width
    stages_macs=lambda k, r, hi, wi, ho, wo: k.groups * r * (k.s * k.kh * ho * wi + k.t_g * k.kw * ho * wo),
    unfoldings=tai_unfoldings,
    kernel_ok=_spatial_only("spatial-svd"),
    description="Tai et al. 2016: (kh x 1) conv -> (1 x kw) conv, exact global optimum",
))
register_method(Method(
    name="tucker2",
    decompose=decompose_tucker2,
    build=build_tucker2,
    max_rank=lambda k: (k.s, k.t_g),
    n_params=lambda k, r: k.groups * (k.s * r[0] + k.kh * k.kw * r[0] * r[1] + k.t_g * r[1]),
    stages_macs=lambda k, r, hi, wi, ho, wo: k.groups * (
        k.s * r[0] * hi * wi + k.kh * k.kw * r[0] * r[1] * ho * wo + k.t_g * r[1] * ho * wo),
    options=Tucker2Options,
    callbacks=("callback",),
    unfoldings=tucker2_unfoldings,
    pair_rank=True,
    kernel_ok=_spatial_only("tucker2"),
    description="Kim et al. 2016: 1x1 -> kh x kw core -> 1x1 (HOSVD + HOOI)",
))


def _cp_cost(order: int):
    """(max rank, parameters, MACs) of the 1x1 -> depthwise stage(s) -> 1x1 pipeline."""
    if order == 3:
        return (lambda k: generic_cp_max_rank((k.t_g, k.s, k.kh * k.kw)),
                lambda k, r: k.groups * r * (k.t_g + k.s + k.kh * k.kw),
                lambda k, r, hi, wi, ho, wo: k.groups * r * (k.s * hi * wi + k.kh * k.kw * ho * wo + k.t_g * ho * wo))
    return (lambda k: generic_cp_max_rank((k.t_g, k.s, k.kh, k.kw)),
            lambda k, r: k.groups * r * (k.t_g + k.s + k.kh + k.kw),
            lambda k, r, hi, wi, ho, wo: k.groups * r * (
                k.s * hi * wi + k.kh * ho * wi + k.kw * ho * wo + k.t_g * ho * wo))


_CP_PIPELINES = {3: "1x1 -> depthwise kh x kw -> 1x1, CP of the (T, S, kh*kw) tensor",
                 4: "1x1 -> depthwise kh x 1 -> depthwise 1 x kw -> 1x1 (Lebedev et al. 2015)"}

for _order, _pipeline in _CP_PIPELINES.items():
    _max, _params, _macs = _cp_cost(_order)
    for _epc in (False, True):
        _name = f"cp{_order}" + ("-epc" if _epc else "")
        register_method(Method(
            name=_name,
            decompose=partial(decompose_cp, order=_order, use_epc=_epc),
            build=build_cp,
            max_rank=_max,
            n_params=_params,
            stages_macs=_macs,
            options=CPEPCOptions if _epc else CPOptions,
            callbacks=("callback", "epc_callback") if _epc else ("callback",),
            gpu=True,  # ALS sweeps are GEMMs: worth the worker's GPU when it has one
            kernel_ok=_spatial_only(_name),
            description=_pipeline + (", stabilised by EPC (Phan et al. 2020)" if _epc else ""),
        ))
