"""lowrank: low-rank decomposition of conv and linear layers (pure torch).

Public contract: ``decompose``, ``factorize_layer``, ``compress_model``, ``select_rank``,
``evbmf``, ``cp_diagnostics``, ``count``. Importing this package loads neither ray, mlflow
nor pydantic.
"""
from .accounting import count, per_layer_macs
from .api import decompose, factorize_layer, relative_error
from .errors import LowRankError, RankTooLargeError, UnsupportedLayerError
from .factors import CPFactors, SpatialSVDFactors, SVDFactors, Tucker2Factors, factors_to
from .layers import FactorizedConv2d, FactorizedLinear
from .ranks import select_rank
from .registry import METHODS, get_method, list_methods, register_method
from .surgery import LayerReport, apply_factors, compress_model, plan_layers, summarize
from .vbmf import evbmf

from .registry import _register_builtins

_register_builtins()
del _register_builtins

from . import cp as _cp  # noqa: E402,F401  (the CP methods register themselves)
from .cp import cp_diagnostics  # noqa: E402

__all__ = [
    "decompose", "factorize_layer", "compress_model", "select_rank", "evbmf", "count", "cp_diagnostics",
    "per_layer_macs", "relative_error", "plan_layers", "apply_factors", "summarize", "LayerReport",
    "LowRankError", "RankTooLargeError", "UnsupportedLayerError",
    "SVDFactors", "SpatialSVDFactors", "factors_to", "Tucker2Factors", "CPFactors", "FactorizedConv2d", "FactorizedLinear",
    "METHODS", "get_method", "list_methods", "register_method",
]
