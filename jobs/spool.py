"""Results kept on disk until MLflow has them.

A configuration's result (fine-tuned weights, factors, metrics) is written here before it is
logged and deleted once logged, so a tracking server that is away, or a driver that dies between
fine-tuning and logging, costs a retry, not the computation. Tensors go to ``tensors.pt`` (loaded
back with ``weights_only=True``), everything else to ``result.json``.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

import lowrank

from .atomic import atomic_dir
from .results import EvalResult

_FACTOR_TYPES = {c.__name__: c for c in (lowrank.SVDFactors, lowrank.SpatialSVDFactors, lowrank.Tucker2Factors,
                                        lowrank.CPFactors)}


def spool_dir(root: Path, sweep: str, config_hash: str) -> Path:
    return Path(root) / "spool" / sweep / config_hash


def pack_factors(factors: dict, prefix: str = "factors/") -> tuple[dict, dict]:
    """``{key: Factors}`` -> (tensors for ``torch.save``, JSON-able metadata). The pair loads
    back with ``unpack_factors`` from a ``weights_only=True`` load: no pickled classes."""
    tensors, meta_all = {}, {}
    for key, f in factors.items():
        meta = {"type": type(f).__name__, "fields": {}}
        for fld in dataclasses.fields(f):
            v = getattr(f, fld.name)
            if torch.is_tensor(v):
                tensors[f"{prefix}{key}/{fld.name}"] = v
                meta["fields"][fld.name] = "tensor"
            elif isinstance(v, tuple) and v and torch.is_tensor(v[0]):
                for i, t in enumerate(v):
                    tensors[f"{prefix}{key}/{fld.name}/{i}"] = t
                meta["fields"][fld.name] = ["tensors", len(v)]
            else:
                meta["fields"][fld.name] = ["value", v]
        meta_all[key] = meta
    return tensors, meta_all


def unpack_factors(tensors: dict, meta_all: dict, prefix: str = "factors/") -> dict:
    factors = {}
    for key, meta in meta_all.items():
        kw = {}
        for name, how in meta["fields"].items():
            if how == "tensor":
                kw[name] = tensors[f"{prefix}{key}/{name}"]
            elif how[0] == "tensors":
                kw[name] = tuple(tensors[f"{prefix}{key}/{name}/{i}"] for i in range(how[1]))
            else:
                kw[name] = tuple(how[1]) if name == "shape" else how[1]
        factors[key] = _FACTOR_TYPES[meta["type"]](**kw)
    return factors


def save(path: Path, base: dict, result: EvalResult) -> None:
    """Write a configuration's dense reference and its result (weights and factors as tensors)."""
    tensors: dict[str, torch.Tensor] = {f"state/{k}": v for k, v in result.state_dict.items()}
    packed, factors_meta = pack_factors(result.factors)
    tensors.update(packed)
    rest = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)
            if f.name not in ("state_dict", "factors")}
    payload = {"base": base, "result": rest, "factors": factors_meta, "state_keys": list(result.state_dict)}
    with atomic_dir(path) as tmp:  # a half-written spool entry is never read
        torch.save(tensors, tmp / "tensors.pt")
        (tmp / "result.json").write_text(json.dumps(payload, default=_json_default))


def _json_default(o):
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    return float(o) if hasattr(o, "__float__") else str(o)


def load(path: Path) -> tuple[dict, EvalResult]:
    """``(dense reference, result)`` as ``save`` wrote them (tensors loaded with weights_only)."""
    payload = json.loads((path / "result.json").read_text())
    tensors = torch.load(path / "tensors.pt", map_location="cpu", weights_only=True)
    state = {k: tensors[f"state/{k}"] for k in payload["state_keys"]}
    # "out" is what versions before the typed results wrote: an entry spooled before an upgrade
    # is still logged (fields it had that EvalResult has not are dropped)
    rest = payload["result"] if "result" in payload else payload["out"]
    known = {f.name for f in dataclasses.fields(EvalResult)}
    result = EvalResult(state_dict=state, factors=unpack_factors(tensors, payload["factors"]),
                        **{k: v for k, v in rest.items() if k in known})
    base = payload["base"]
    base["input_shape"] = tuple(base["input_shape"])
    return base, result


def pending(root: Path, sweep: str) -> dict[str, Path]:
    d = Path(root) / "spool" / sweep
    return {p.name: p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")} if d.is_dir() else {}


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
