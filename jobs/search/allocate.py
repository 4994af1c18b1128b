"""Global allocation of (method, rank) per layer under a budget: a multiple-choice knapsack.

Each layer has options (the dense layer is always one of them, with loss 0). Choose one option
per layer so that the model's total cost (parameters, MACs or measured latency, plus the cost of
the layers that are not searched) is at most ``dense_total / ratio``, with the least predicted
accuracy loss (the sum of the per-layer losses from the sensitivity stage).

Solved by dynamic programming over the cost, discretised into ``resolution`` buckets (costs
rounded down; the exact cost of the result is checked and the capacity tightened until it meets
the budget, so a returned allocation always does, and is optimal to within one bucket).
Ties are broken deterministically: lower loss, then higher cost (less compression), then method
name, then rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class InfeasibleTarget(ValueError):
    """No choice of options reaches the target (one line: the target and the best reachable)."""


@dataclass(frozen=True)
class Option:
    method: str | None  # None = leave the layer dense
    rank: object
    cost: float
    loss: float

    def key(self):
        # equal loss: prefer the larger (less compressed) option; compression beyond the target
        # buys nothing the objective can see
        return (self.loss, -self.cost, self.method or "", str(self.rank))


@dataclass(frozen=True)
class Allocation:
    choice: dict  # layer -> Option
    cost: float
    loss: float
    dense_cost: float

    @property
    def ratio(self) -> float:
        return self.dense_cost / self.cost


def allocate_budget(layers: dict[str, list[Option]], *, ratio: float, fixed_cost: float = 0.0,
                    resolution: int = 4000) -> Allocation:
    """``layers``: name -> options (a dense option is added if missing, with the layer's dense
    cost taken from the largest-cost option marked ``method=None``). ``ratio`` >= 1."""
    if not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 1:
        raise InfeasibleTarget(f"target ratio must be >= 1, got {ratio!r}")
    names = list(layers)
    opts = []
    for n in names:
        dense = [o for o in layers[n] if o.method is None]
        if len(dense) != 1:
            raise ValueError(f"layer {n!r} needs exactly one dense option (method=None), got {len(dense)}")
        opts.append(sorted(layers[n], key=Option.key))
    dense_total = fixed_cost + sum(next(o.cost for o in os_ if o.method is None) for os_ in opts)
    budget = dense_total / ratio - fixed_cost
    cheapest = fixed_cost + sum(min(o.cost for o in os_) for os_ in opts)
    if budget <= 0 or cheapest > dense_total / ratio * (1 + 1e-12):
        raise InfeasibleTarget(f"ratio {ratio:g} is not reachable: the most these options reach is "
                               f"{dense_total / cheapest:.3g}x")
    unit = budget / resolution
    slack = 0
    for _ in range(len(opts) + 3):
        choice = _dp(names, opts, unit, resolution - slack)
        if choice is None:
            break
        cost = fixed_cost + sum(o.cost for o in choice.values())
        if cost <= fixed_cost + budget * (1 + 1e-12):
            return Allocation(choice=choice, cost=cost, loss=sum(o.loss for o in choice.values()),
                              dense_cost=dense_total)
        slack += max(1, int(math.ceil((cost - fixed_cost - budget) / unit)))
    raise InfeasibleTarget(f"ratio {ratio:g} is not reachable at this resolution; "
                           f"the most these options reach is {dense_total / cheapest:.3g}x")


def _dp(names, opts, unit, capacity):
    """Least-loss choice with sum(floor(cost / unit)) <= capacity, or None. Costs are rounded
    down (optimistic); the caller checks the exact cost and tightens the capacity if needed."""
    if capacity < 0:
        return None
    inf = float("inf")
    dp = np.zeros(capacity + 1)  # dp[b]: least loss with rounded cost <= b over the layers so far
    back = []
    for os_ in opts:
        new = np.full(capacity + 1, inf)
        arg = np.full(capacity + 1, -1, dtype=np.int64)
        for j, o in enumerate(os_):
            w = int(math.floor(o.cost / unit + 1e-9))
            if w > capacity:
                continue
            cand = np.full(capacity + 1, inf)
            cand[w:] = dp[: capacity + 1 - w] + o.loss
            better = cand < new - 1e-15  # options are sorted by the tie-break key: first wins ties
            new[better] = cand[better]
            arg[better] = j
        dp = new
        back.append(arg)
    if not math.isfinite(dp[capacity]):
        return None
    b, choice = capacity, {}
    for i in range(len(opts) - 1, -1, -1):
        o = opts[i][int(back[i][b])]
        choice[names[i]] = o
        b -= int(math.floor(o.cost / unit + 1e-9))
    return dict(reversed(list(choice.items())))
