"""Screening: for one layer, every (method, candidate rank) with its relative error, CP
diagnostics, parameters, MACs and the measured latency of the factorized layer against the
dense one (on the sweep's ``latency.runtime``, or eagerly on the worker's GPU), at the layer's
real input shape. A latency target never picks an option slower than its dense layer: the dense
option costs less and loses nothing."""
from __future__ import annotations

import statistics
import tempfile
import time

import torch

import lowrank
from lowrank.errors import LowRankError

from .. import deploy


class _Timer:
    """Median batch time of a layer on ``runtime`` (``jobs.deploy``; one thread) or, on a GPU,
    eagerly there."""

    def __init__(self, runtime: str, device, workdir: str):
        self.runtime, self.device, self.workdir = runtime, str(device), workdir

    @torch.no_grad()
    def __call__(self, module, x, repeats: int = 7) -> float:
        module.eval()
        if self.device.startswith("cuda") or self.runtime == "torch":
            run, arg = module, x
        else:
            run = deploy.RUNTIMES[self.runtime].prepare(module.cpu(), tuple(x.shape[1:]), 1, self.workdir)
            arg = x.cpu().numpy()
        run(arg)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(arg)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def screen_layer(name: str, module: torch.nn.Module, input_shape, methods, ratios=(1.5, 2, 3, 4, 6, 8),
                 *, options: dict | None = None, batch: int = 1, device="cpu", keep_factors: bool = False,
                 vbmf_weakening: float | None = None, runtime: str = "torch", multiple_of: int = 1) -> list[dict]:
    """One row per (method, ratio) that applies, plus the dense row (``method=None``), plus one
    row per VBMF-capable method at its VBMF rank when ``vbmf_weakening`` is given (``source``
    says which). ``keep_factors`` adds each option's factors (``row['factors']``, CPU). Latency
    is timed on ``runtime`` (``latency.runtime``; eagerly on a GPU). ``multiple_of`` rounds every
    rank (``rank.multiple_of``), so that the table holds the ranks the runtime will run."""
    with tempfile.TemporaryDirectory() as tmp:
        return _screen(name, module, input_shape, methods, ratios, options, batch, device, keep_factors,
                       vbmf_weakening, _Timer(runtime, device, tmp), multiple_of)


def _screen(name, module, input_shape, methods, ratios, options, batch, device, keep_factors, vbmf_weakening,
            _latency, multiple_of: int = 1) -> list[dict]:
    align = {"multiple_of": multiple_of} if multiple_of != 1 else {}
    module = module.to(device).eval()
    x = torch.randn(batch, *input_shape[1:], device=device)
    params_dense, macs_dense = lowrank.count(module, input_shape)
    lat_dense = _latency(module, x)
    rows = [{"layer": name, "method": None, "rank": None, "target_ratio": 1.0, "source": "dense", "rel_error": 0.0,
             "params": params_dense, "macs": macs_dense, "latency": lat_dense, "speedup": 1.0, "status": "ok"}]
    for method in methods:
        if lowrank.get_method(method).unsupported_reason(module):
            continue
        plans = [("ratio", float(r), {"ratio": float(r), **align}) for r in ratios]
        if vbmf_weakening is not None and lowrank.get_method(method).unfoldings is not None:  # VBMF can rank it
            plans.append(("vbmf", float("nan"), {"weakening": float(vbmf_weakening), **align}))
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
