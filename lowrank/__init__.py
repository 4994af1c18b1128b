"""lowrank: low-rank decomposition of conv and linear layers (pure torch).

Public contract: ``decompose``, ``factorize_layer``, ``compress_model``, ``select_rank``,
``evbmf``, ``cp_diagnostics``, ``count``. What a runner needs beyond it is public too:
``factorize_with_factors``, ``apply_factors``, ``select_layers``, ``replace_submodule``,
``LayerPlan``, ``RankRule`` and the method registry (``get_method``: typed options and
capabilities); ``fuse_pointwise`` merges 1x1 convs with nothing non-linear between them, for
deployment; ``tune_allocator`` keeps glibc's malloc from faulting a sweep's temporaries in
again. Importing this package loads neither ray, mlflow nor pydantic.
"""
from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .accounting import count, layer_input_shapes, per_layer_macs
from .allocator import tune_allocator
from .api import decompose, factorize_layer, factorize_with_factors, relative_error
from .decompositions.diagnostics import cp_diagnostics
from .errors import LeftDense, LowRankError, NoStructureError, RankTooLargeError, UnsupportedLayerError
from .factors import CPFactors, SpatialSVDFactors, SVDFactors, Tucker2Factors, factors_to
from .fuse import fuse_pointwise
from .layers import FactorizedConv2d, FactorizedLinear
from .ranks import RankRule, select_rank
from .registry import METHODS, KernelShape, get_method, list_methods, register_method
from .surgery import (LayerPlan, LayerReport, apply_factors, compress_model, first_conv, plan_layers,
                      replace_submodule, select_layers, summarize)
from .vbmf import evbmf
from .verify import check_replacement, model_fails, own_forward, replacement_prefix

__all__ = [
    "decompose", "factorize_layer", "compress_model", "select_rank", "evbmf", "count", "cp_diagnostics",
    "factorize_with_factors", "apply_factors", "select_layers", "first_conv", "replace_submodule", "LayerPlan", "RankRule",
    "per_layer_macs", "layer_input_shapes", "relative_error", "plan_layers", "summarize", "LayerReport",
    "LowRankError", "RankTooLargeError", "LeftDense", "NoStructureError", "UnsupportedLayerError", "KernelShape",
    "SVDFactors", "SpatialSVDFactors", "factors_to", "Tucker2Factors", "CPFactors", "FactorizedConv2d",
    "FactorizedLinear", "METHODS", "get_method", "list_methods", "register_method",
    "replacement_prefix", "check_replacement", "model_fails", "own_forward", "tune_allocator", "fuse_pointwise",
]
