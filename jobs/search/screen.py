"""Screening: for one layer, every (method, candidate rank) with its relative error, CP
diagnostics, parameters, MACs and the measured latency of the factorized layer against the
dense one (on the sweep's ``latency.runtime``, or eagerly on the worker's GPU), at the layer's
real input shape. A latency target never picks an option slower than its dense layer: the dense
option costs less and loses nothing."""
from __future__ import annotations

import tempfile

import torch

import lowrank
from lowrank.errors import LowRankError

from .. import deploy


class LayerTimer:
    """Median batch times of layers on ``runtime`` (``jobs.deploy``; one thread) or, on a GPU,
    eagerly there (synchronised). ``many`` times the options of one layer interleaved: every round
    runs each of them once, in an order that alternates, after a warm-up of each; a layer's options
    are then compared under the same conditions of a shared machine, not each at its own moment
    (an allocation over timings taken apart picks the options whose timing was lucky;
    ``bench/latency_model.py`` measures the spread)."""

    def __init__(self, runtime: str, device, workdir: str, repeats: int = 25, warmup: int = 3):
        self.runtime, self.device, self.workdir = runtime, str(device), workdir
        self.repeats, self.warmup = repeats, warmup

    @torch.no_grad()
    def many(self, modules: list, x, repeats: int | None = None) -> list[float]:
        """``x``: one input for all ``modules``, or one per module."""
        xs = x if isinstance(x, (list, tuple)) else [x] * len(modules)
        if self.device.startswith("cuda") or self.runtime == "torch":
            runs, args = [m.eval() for m in modules], xs
        else:
            runs = [deploy.RUNTIMES[self.runtime].prepare(m.eval().cpu(), tuple(a.shape[1:]), 1, self.workdir)
                    for m, a in zip(modules, xs)]
            args = [a.cpu().numpy() for a in xs]
        return deploy.interleaved(runs, args, repeats=repeats or self.repeats, warmup=self.warmup,
                                  sync=torch.cuda.synchronize if self.device.startswith("cuda") else None)

    def __call__(self, module, x, repeats: int | None = None) -> float:
        return self.many([module], x, repeats)[0]


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
                       vbmf_weakening, LayerTimer(runtime, device, tmp), multiple_of)


def _screen(name, module, input_shape, methods, ratios, options, batch, device, keep_factors, vbmf_weakening,
            _latency, multiple_of: int = 1) -> list[dict]:
    align = {"multiple_of": multiple_of} if multiple_of != 1 else {}
    module = module.to(device).eval()
    x = torch.randn(batch, *input_shape[1:], device=device)
    params_dense, macs_dense = lowrank.count(module, input_shape)
    rows = [{"layer": name, "method": None, "rank": None, "target_ratio": 1.0, "source": "dense", "rel_error": 0.0,
             "params": params_dense, "macs": macs_dense, "status": "ok"}]
    timed = [(rows[0], module)]  # (row, layer): timed together at the end
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
            diag = getattr(factors, "diagnostics", {}) or {}
            rows.append({**row, "rank": factors.rank, "rel_error": lowrank.relative_error(module.weight, factors),
                         "params": params, "macs": macs,
                         "degenerate": bool(diag.get("degenerate", False)), "status": "ok",
                         **({"factors": lowrank.factors_to(factors, "cpu")} if keep_factors else {})})
            timed.append((rows[-1], layer))
    times = _latency.many([m for _, m in timed], x)
    for (row, _), t in zip(timed, times):
        row.update(latency=t, speedup=times[0] / t)
    return rows
