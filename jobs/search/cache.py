"""The screening table of one model, on disk: ``table.parquet`` (one row per layer x option, with
the sensitivity columns), ``factors.pt`` (each option's factors, loaded with ``weights_only=True``)
and ``meta.json``. A later sweep with the same model weights, layers, methods, ratios, options,
probe settings and device kind reuses it instead of screening again."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import torch

from .. import spool
from ..atomic import atomic_dir
from ..report import write_parquet

TABLE_COLUMNS = ("layer", "method", "source", "target_ratio", "rank", "rel_error", "params", "macs", "latency",
                 "speedup", "degenerate", "loss", "acc_drop")


def table_rows(rows: dict[str, list[dict]]) -> list[dict]:
    """The Parquet/MLflow view: no factors, ranks as JSON text."""
    out = []
    for rs in rows.values():
        for r in rs:
            out.append({k: (json.dumps(r.get(k)) if k == "rank" else r.get(k)) for k in TABLE_COLUMNS})
    return out


def save(path: Path, rows: dict[str, list[dict]], meta: dict) -> None:
    factors = {f"{i}": r["factors"] for i, r in enumerate(r for rs in rows.values() for r in rs) if r.get("factors")}
    tensors, fmeta = spool.pack_factors(factors)
    with atomic_dir(path) as tmp:  # a concurrent sweep never reads half a table
        write_parquet(table_rows(rows), tmp / "table.parquet")
        torch.save(tensors, tmp / "factors.pt")
        (tmp / "meta.json").write_text(json.dumps({**meta, "factors": fmeta}, default=str))


def load(path: Path) -> tuple[dict[str, list[dict]], dict] | None:
    """``(rows by layer, meta)``, or None when there is no complete table at ``path``."""
    if not (path / "meta.json").is_file():
        return None
    meta = json.loads((path / "meta.json").read_text())
    factors = spool.unpack_factors(torch.load(path / "factors.pt", map_location="cpu", weights_only=True),
                                   meta.pop("factors"))
    rows: dict[str, list[dict]] = {}
    for i, r in enumerate(pq.read_table(path / "table.parquet").to_pylist()):
        rank = json.loads(r["rank"])
        r["rank"] = tuple(rank) if isinstance(rank, list) else rank
        if r["target_ratio"] is not None and math.isnan(r["target_ratio"]):
            r["target_ratio"] = float("nan")
        if f"{i}" in factors:
            r["factors"] = factors[f"{i}"]
        r["status"] = "ok"
        rows.setdefault(r["layer"], []).append(r)
    return rows, meta
