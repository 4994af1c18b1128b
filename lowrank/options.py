"""Typed decomposition options, one frozen dataclass per family of methods.

Each field carries its accepted range in ``metadata`` (``min``/``max``/``choices``/``optional``);
``parse_options`` checks a plain mapping (from a sweep spec or a keyword call) against the
dataclass and says what is wrong in one line: the option, what was received, what is accepted.
Callbacks are not options: they are runtime hooks and are passed to ``decompose`` separately.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import LowRankError


def _opt(default, **rules):
    return field(default=default, metadata=rules)


@dataclass(frozen=True)
class NoOptions:
    """Closed-form methods (``svd``, ``spatial-svd``) take no options."""


@dataclass(frozen=True)
class Tucker2Options:
    n_iter_max: int = _opt(50, min=0)  # HOOI sweeps after the HOSVD start (0 = HOSVD only)
    tol: float = _opt(1e-4, min=0.0)  # relative error change that stops HOOI


@dataclass(frozen=True)
class CPOptions:
    init: str = _opt("svd", choices=("svd", "random", "slices"))  # lowrank.decompositions.cp_init.INITS
    seed: int = _opt(0, min=0)
    n_iter_max: int = _opt(500, min=1)  # ALS sweeps
    tol: float = _opt(1e-8, min=0.0)  # change of the relative error that stops ALS
    linesearch: bool = _opt(False)  # extrapolate after each sweep (Bro 1998): fewer sweeps to an error
    als_dtype: str = _opt("float64", choices=("float64", "float32"))  # ALS precision (EPC stays float64)


@dataclass(frozen=True)
class CPEPCOptions(CPOptions):
    epc_objective: str = _opt("norm", choices=("norm", "sens"))
    epc_max_sweeps: int = _opt(1000, min=1)  # extrapolated, J below what 3000 plain sweeps reach (bench/epc_extrapolate.py)
    epc_tol: float = _opt(1e-7, min=0.0)
    epc_target: float | None = _opt(None, min=0.0, max=1.0, optional=True)  # relative error bound; None = ALS's
    epc_rescale: bool = _opt(False)  # multiply by the least-squares scalar after EPC (lowrank.decompositions.cp)
    epc_extrapolate: bool = _opt(True)  # a step along each EPC sweep's move, scaled onto the bound (epc.py)


def option_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _check_value(method: str, f: dataclasses.Field, value):
    rules, where = f.metadata, f"option {f.name!r} of method {method!r}"
    if value is None and rules.get("optional"):
        return None
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if kind == "bool":
        if not isinstance(value, bool):
            raise LowRankError(f"{where} must be true or false, got {value!r}")
        return value
    if "choices" in rules:
        if value not in rules["choices"]:
            raise LowRankError(f"{where} must be one of {', '.join(map(repr, rules['choices']))}, got {value!r}")
        return value
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise LowRankError(f"{where} must be an integer >= {rules.get('min', 0)}, got {value!r}")
    elif kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise LowRankError(f"{where} must be a finite number, got {value!r}")
        value = float(value)
    if "min" in rules and value < rules["min"]:
        raise LowRankError(f"{where} must be >= {rules['min']}, got {value!r}")
    if "max" in rules and value > rules["max"]:
        raise LowRankError(f"{where} must be <= {rules['max']}, got {value!r}")
    return value


def parse_options(method: str, cls, given: dict):
    """``given`` (a plain mapping) -> an instance of ``cls``; unknown names and values of the
    wrong type or range raise ``LowRankError`` naming the option and what is accepted."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise LowRankError(f"unknown option(s) {unknown} for method {method!r}; accepted: {sorted(fields) or 'none'}")
    return cls(**{k: _check_value(method, fields[k], v) for k, v in given.items()})
