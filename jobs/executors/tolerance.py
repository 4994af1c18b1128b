"""The ``tolerance`` strategy: per layer and method, bisect the compression ratio in
``[1, max(candidate_ratios)]`` (geometric midpoints, ``tolerance_steps`` probes) for the
smallest rank whose accuracy drop on the probe subset is <= epsilon; per layer keep the method
whose passing option has the fewest parameters. All layers of all models probe in one wave per
step."""
from __future__ import annotations

import lowrank

from ..search.strategies import bisect_step
from ..tasks.search import sensitivity_task


def tolerance(session, ms: list, search) -> dict[str, dict]:
    """``{model: {layer: chosen row or None}}`` (``ms``: the search executor's models)."""
    eps, hi0 = search.epsilon, max(search.candidate_ratios)
    state = {}  # (model, layer, method) -> {"m", "lo", "hi", "best", "next"}
    ms = list(dict.fromkeys(ms))
    for m in ms:
        for n, rs in m.rows.items():
            for method in dict.fromkeys(r["method"] for r in rs[1:]):
                state[(m.name, n, method)] = {"m": m, "lo": 1.0, "hi": hi0, "best": None, "next": hi0}
    need = [m for m in ms if m.acc0 is None]  # a cached table screened with loss 'error'
    for m, o in zip(need, session.gather([(sensitivity_task, m.env, m.base_ref, None, None, search.val_batches,
                                           search.bn_batches) for m in need])):
        if isinstance(o, Exception):
            m.fail(session, "dense probe", o)
        else:
            m.acc0 = o["acc"]
    session.say(f"tolerance: bisecting {len(state)} (layer, method) pairs, up to {search.tolerance_steps} probes "
                f"each, epsilon {eps:g}")
    for step in range(search.tolerance_steps):
        live = [(k, s) for k, s in state.items() if s["next"] is not None and not s["m"].failed]
        if not live:
            break
        calls = [(sensitivity_task, s["m"].env, s["m"].base_ref, k[1],
                  lowrank.LayerPlan(k[1], k[2], lowrank.RankRule("ratio", ratio=s["next"],
                                                                   multiple_of=s["m"].plan.multiple_of),
                                    s["m"].plan.options.get(k[2], {})),
                  search.val_batches, search.bn_batches) for k, s in live]
        for (k, s), o in zip(live, session.gather(calls)):
            ratio = s["next"]
            if isinstance(o, Exception):
                s["next"] = None  # e.g. a rank that cannot be built at this ratio: stop this pair
                continue
            drop = s["m"].acc0 - o["acc"]
            if drop <= eps:
                s["best"] = {**o, "method": k[2], "drop": drop, "ratio": ratio}
            s["lo"], s["hi"], s["next"] = bisect_step(s["lo"], s["hi"], ratio, drop <= eps)
        session.say(f"tolerance: wave {step + 1}/{search.tolerance_steps} done ({len(live)} probes)")
    picked: dict[str, dict] = {}
    for m in ms:
        if m.failed:
            continue
        choice = {}
        for n in m.rows:
            ok = [s["best"] for k, s in state.items() if k[0] == m.name and k[1] == n and s["best"]]
            best = min(ok, key=lambda b: (b["params"], b["drop"], b["method"])) if ok else None
            choice[n] = None if best is None else {
                "method": best["method"], "rank": best["rank"], "factors": best["factors"],
                "rel_error": best["rel_error"], "loss": best["drop"]}
        picked[m.name] = choice
    return picked
