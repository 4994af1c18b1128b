"""The search strategies' decisions, pure: from a model's screening table (layer -> rows, the
dense row first) to a choice per layer (the chosen row, or None = dense).

``budget``: the least predicted loss under the target (``allocate_budget``); ``uniform``: every
layer at the target ratio, best method per layer; ``vbmf``: each capable method at its VBMF rank,
best per layer; ``tolerance``: bisection steps (``bisect_step``); ``tune``: neighbours of the
budget solution under perturbed losses (``neighbours``).
"""
from __future__ import annotations

import math

import numpy as np

from . import calibrate
from .allocate import Option, allocate_budget


def cost(row: dict, target: str) -> float:
    return float(row["latency"] if target == "latency" else row[target])


def allocation_options(rows: dict[str, list[dict]], base, target: str,
                       calibration: dict | None = None) -> tuple[dict, float]:
    """Allocation options per layer (dense first) and the cost of what is not searched
    (``base``: the model's ``Baseline``). Under a latency target with a ``calibration``
    (``calibrate.measure``) the fixed cost is the measured one, every option costs what the
    calibration task timed (``calibrate.option_costs``), and all are scaled so that the dense layers
    add up to their share of the whole graph (``calibrate.scale``)."""
    total = {"params": base.params, "macs": base.macs, "latency": base.latency["b1"]}[target]
    measured, k = calibrate.scaled_costs(rows, calibration) if target == "latency" and calibration else ({}, None)
    if k is None:  # additive: the costs as screened
        options = {n: [Option(r["method"], r["rank"], cost(r, target), r["loss"] if r["method"] else 0.0) for r in rs]
                   for n, rs in rows.items()}
        return options, max(0.0, total - sum(os_[0].cost for os_ in options.values()))
    options = {n: [Option(r["method"], r["rank"], k * c, r["loss"] if r["method"] else 0.0)
                   for r, c in zip(rs, measured[n])]
               for n, rs in rows.items()}
    return options, calibration["fixed"]


def estimate(options: dict, fixed: float, choice: dict) -> float | None:
    """The ratio (dense cost / cost) the search predicts for ``choice`` (layer -> row or None);
    None where a chosen row is not among the options (a bisected rank)."""
    dense = chosen = fixed
    for n, r in choice.items():
        o = next((o for o in options[n] if _same(o, r)), None)
        if o is None:
            return None
        dense, chosen = dense + options[n][0].cost, chosen + o.cost
    return dense / chosen if chosen > 0 else None


def _same(o: Option, r: dict | None) -> bool:
    """Whether allocation option ``o`` stands for screening row ``r`` (None = dense)."""
    return o.method is None if r is None else (o.method == r["method"] and o.rank == r["rank"])


def row_for(rows: dict[str, list[dict]], layer: str, o: Option) -> dict | None:
    """The screening row an allocation option stands for (None = dense)."""
    return None if o.method is None else next(r for r in rows[layer][1:] if _same(o, r))


def decide(strategy: str, rows: dict[str, list[dict]], options: dict, fixed: float, search) -> dict:
    """budget / uniform / vbmf: layer -> chosen row (None = dense)."""
    if strategy == "budget":
        alloc = allocate_budget(options, ratio=search.ratio, fixed_cost=fixed).choice
        return {n: row_for(rows, n, o) for n, o in alloc.items()}
    choice = {}
    for n, rs in rows.items():
        if strategy == "uniform":
            pool = [r for r in rs[1:] if r["source"] == "ratio" and r["target_ratio"] == search.ratio]
        else:  # vbmf: the VBMF rank of each capable method; the methods compete on predicted loss
            pool = [r for r in rs[1:] if r["source"] == "vbmf"]
        choice[n] = min(pool, key=lambda r: (r["loss"], -r["params"], r["method"])) if pool else None
    return choice


def bisect_step(lo: float, hi: float, probed: float, passed: bool, *, resolution: float = 1.02):
    """One bisection step on the compression ratio: ``lo`` passes (1 = dense always does), ``hi``
    is the upper end (failing once probed). Returns ``(lo, hi, next ratio or None when done)``;
    midpoints are geometric, and the search stops once ``hi / lo <= resolution``."""
    if passed:
        lo = probed
        if probed >= hi:
            return lo, hi, None  # the most compressed end passes
    else:
        hi = probed
    return lo, hi, (math.sqrt(lo * hi) if hi / lo > resolution else None)


def neighbours(options: dict, *, ratio: float, fixed: float, trials: int, noise: float, seed: int) -> list[dict]:
    """Up to ``trials`` distinct allocations (layer -> Option); the first is the budget solution,
    the others budget solutions under per-layer losses perturbed by log-normal noise."""
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    for attempt in range(trials * 20):
        if len(out) == trials:
            break
        sigma = 0.0 if attempt == 0 else noise
        pert = {n: [o if o.method is None else
                    Option(o.method, o.rank, o.cost, o.loss * float(np.exp(sigma * rng.standard_normal())))
                    for o in os_] for n, os_ in options.items()}
        alloc = allocate_budget(pert, ratio=ratio, fixed_cost=fixed).choice
        key = tuple((n, o.method, str(o.rank)) for n, o in alloc.items())
        if key not in seen:
            seen.add(key)
            out.append({n: next(x for x in options[n] if x.method == o.method and x.rank == o.rank)
                        for n, o in alloc.items()})
    return out
