"""Screening: for one layer, every (method, candidate rank) with its relative error, CP
diagnostics, parameters, MACs and the measured latency of the factorized layer against the
dense one on this device, at the layer's real input shape."""
from __future__ import annotations

import statistics
import time

import torch

import lowrank
from lowrank.errors import LowRankError


@torch.no_grad()
def _latency(module, x, repeats: int = 7) -> float:
    module.eval()
    module(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        module(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def screen_layer(name: str, module: torch.nn.Module, input_shape, methods, ratios=(1.5, 2, 3, 4, 6, 8),
                 *, options: dict | None = None, batch: int = 1, device="cpu", keep_factors: bool = False,
                 vbmf_weakening: float | None = None) -> list[dict]:
    """One row per (method, ratio) that applies, plus the dense row (``method=None``), plus one
    row per VBMF-capable method at its VBMF rank when ``vbmf_weakening`` is given (``source``
    says which). ``keep_factors`` adds each option's factors (``row['factors']``, CPU)."""
    module = module.to(device).eval()
    x = torch.randn(batch, *input_shape[1:], device=device)
    params_dense, macs_dense = lowrank.count(module, input_shape)
    lat_dense = _latency(module, x)
    rows = [{"layer": name, "method": None, "rank": None, "target_ratio": 1.0, "source": "dense", "rel_error": 0.0,
             "params": params_dense, "macs": macs_dense, "latency": lat_dense, "speedup": 1.0, "status": "ok"}]
    for method in methods:
        if lowrank.get_method(method).unsupported_reason(module):
            continue
        plans = [("ratio", float(r), {"ratio": float(r)}) for r in ratios]
        if vbmf_weakening is not None and lowrank.get_method(method).unfoldings is not None:  # VBMF can rank it
            plans.append(("vbmf", float("nan"), {"weakening": float(vbmf_weakening)}))
        for source, ratio, how in plans:
            row = {"layer": name, "method": method, "target_ratio": ratio, "source": source}
            try:
                layer, factors = lowrank.factorize_with_factors(
                    module, method, source, **how, **(options or {}).get(method, {}))
            except LowRankError as e:
                rows.append({**row, "rank": None, "status": "skipped", "reason": str(e)})
                continue
            layer = layer.to(device)
            params, macs = lowrank.count(layer, input_shape)
            lat = _latency(layer, x)
            diag = getattr(factors, "diagnostics", {}) or {}
            rows.append({**row, "rank": factors.rank, "rel_error": lowrank.relative_error(module.weight, factors),
                         "params": params, "macs": macs, "latency": lat, "speedup": lat_dense / lat,
                         "degenerate": bool(diag.get("degenerate", False)), "status": "ok",
                         **({"factors": lowrank.factors_to(factors, "cpu")} if keep_factors else {})})
    return rows
