"""The search stage of a sweep: screening -> sensitivity -> strategies -> evaluate/fine-tune.

Every stage runs for all models of the sweep at once (one wave of Ray tasks per stage):

1. baselines (one task per model);
2. screening: one task per layer (every method x candidate ratio, plus VBMF ranks when the
   ``vbmf`` strategy is asked for), factors kept. The table (with the sensitivity columns) is
   cached on disk per model and logged to the parent run as ``screening/<model>.parquet``;
3. sensitivity: one task per screened option (accuracy drop on a validation subset with only
   that layer compressed, BN recalibrated);
4. strategies: ``budget``, ``uniform`` and ``vbmf`` are decided in the driver from the table;
   ``tolerance`` bisects each layer's rank in waves of probe tasks; ``tune`` runs Ray Tune with
   ASHA over configurations near the budget solution (trials become MLflow child runs);
5. one evaluation/fine-tuning task per (model, strategy), registered as ``search-<strategy>``.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import lowrank
from lowrank.accounting import layer_input_shapes

from . import cache
from .allocate import InfeasibleTarget, Option, allocate_budget


def _cost(row: dict, target: str) -> float:
    return float(row["latency"] if target == "latency" else row[target])


@dataclass(eq=False)
class _Model:
    name: str
    spec: object
    cfgs: list
    base: dict | None = None
    base_ref: object = None
    module_names: list = field(default_factory=list)
    rows: dict = field(default_factory=dict)  # layer -> [dense row, option rows...]
    acc0: float | None = None  # the dense model on the probe subset
    cache_path: Path | None = None
    cached: bool = False
    failed: str | None = None

    @property
    def json(self) -> str:
        return self.spec.model_dump_json()


class _Ctx:
    """Ray remotes and a heartbeat-keeping gather for one sweep."""

    def __init__(self, spec, tracker, parent, result, say):
        from .. import tasks
        from ..driver import init_ray, task_options

        self.spec, self.tracker, self.parent, self.result, self.say = spec, tracker, parent, result, say
        self.ray = ray = init_ray()
        search = spec.compression.search
        self.opts, self.want_gpu = task_options(spec, ray)
        if search.latency_device == "cuda" and not self.want_gpu:
            from ..spec import SpecError

            raise SpecError("compression.search.latency_device: 'cuda' requested but the Ray cluster has no GPU; "
                            "accepted here: 'cpu'")
        self.r = {n: ray.remote(getattr(tasks, n)).options(**self.opts) for n in (
            "baseline_task", "screen_task", "sensitivity_task", "evaluate_task")}
        self.ds_json, self.ft_json = spec.dataset.model_dump_json(), spec.finetune.model_dump_json()
        self.last_beat = time.perf_counter()

    def beat(self) -> None:
        from ..tracking import HEARTBEAT_SECONDS

        if time.perf_counter() - self.last_beat >= HEARTBEAT_SECONDS:
            self.tracker.heartbeat(self.parent)  # the sweep lock stays fresh through long stages
            self.last_beat = time.perf_counter()

    def gather(self, refs: list) -> list:
        """Results in order; a task that failed (after Ray's retries) gives its exception."""
        pending = list(refs)
        while pending:
            _, pending = self.ray.wait(pending, num_returns=len(pending), timeout=5.0, fetch_local=False)
            self.beat()
        out = []
        for ref in refs:
            try:
                out.append(self.ray.get(ref))
            except Exception as e:  # noqa: BLE001 - recorded per model, the sweep goes on
                out.append(e)
        for o in out:
            if isinstance(o, dict):
                self.result.timings["task_seconds"] += o.get("task_seconds", 0.0)
                self.result.nodes.add(o.get("node", "?"))
        return out

    def fail(self, m: _Model, what: str, err: Exception) -> None:
        from ..driver import task_error

        m.failed = f"{m.name}: {what}: {task_error(err)}"
        self.result.failed.append(m.failed)
        self.say(f"FAILED {m.failed}")


def run_search(spec, configs, tracker, parent, result, say) -> None:
    from ..driver import task_error
    from ..models import build_model

    ctx = _Ctx(spec, tracker, parent, result, say)
    search = spec.compression.search
    specs = {m.name: m for m in spec.models}
    models: dict[str, _Model] = {}
    for c in configs:
        models.setdefault(c["model"], _Model(c["model"], specs[c["model"]], [])).cfgs.append(c)
    ms = list(models.values())

    # 1. baselines, all models at once
    from ..driver import model_key

    outs = ctx.gather([ctx.r["baseline_task"].remote(m.json, ctx.ds_json, spec.pretrain.model_dump_json(), spec.seed,
                                                     model_key(spec, m.spec), ctx.want_gpu) for m in ms])
    for m, base in zip(ms, outs):
        if isinstance(base, Exception):
            ctx.fail(m, "baseline", base)
            continue
        m.base, m.base_ref = base, ctx.ray.put(base["state_dict"])
    ms = [m for m in ms if not m.failed]

    # 2-3. screening + sensitivity (or the cached table)
    _screen_all(ctx, ms, build_model)
    ms = [m for m in ms if not m.failed]

    # 4. strategies
    choices: list[tuple[_Model, dict, dict]] = []  # (model, cfg, layer -> row | None)
    tolerance = [(m, c) for m in ms for c in m.cfgs if c["strategy"] == "tolerance"]
    if tolerance:
        picked = _tolerance(ctx, [m for m, _ in tolerance])
        choices += [(m, c, picked[m.name]) for m, c in tolerance if m.name in picked]
    for m in ms:
        options, fixed = _options(m, search.target)
        for cfg in m.cfgs:
            if cfg["strategy"] == "tolerance":
                continue
            try:
                if cfg["strategy"] == "tune":
                    from .tune import tune_search

                    choice = tune_search(ctx, m, cfg, options, fixed)
                else:
                    choice = _decide(cfg["strategy"], m, options, fixed, search)
            except InfeasibleTarget as e:
                total = sum(o.cost for os_ in options.values() for o in os_ if o.method is None) + fixed
                hint = (f" ({fixed / total:.0%} of the model's {search.target} lie outside the searched layers: "
                        f"widen the layer selection)") if fixed > 0.2 * total else ""
                result.failed.append(f"{m.name}/{cfg['method']}: {e}{hint}")
                say(f"FAILED {result.failed[-1]}")
                continue
            except Exception as e:  # noqa: BLE001 - e.g. Ray Tune failing: the other strategies still run
                result.failed.append(f"{m.name}/{cfg['method']}: {task_error(e)}")
                say(f"FAILED {result.failed[-1]}")
                continue
            choices.append((m, cfg, choice))

    # 5. evaluate + fine-tune every chosen configuration at once; log as they finish
    _evaluate_all(ctx, choices)


def _screen_all(ctx: _Ctx, ms: list[_Model], build_model) -> None:
    from ..driver import model_key, spool_root
    from ..spec import stable_hash

    spec, search, say = ctx.spec, ctx.spec.compression.search, ctx.say
    vbmf = search.vbmf_weakening if "vbmf" in search.strategies else None
    jobs = []  # (model, layer name) per screening task
    refs = []
    for m in ms:
        model = build_model(m.name, m.spec.num_classes)
        model.load_state_dict(m.base["state_dict"])
        sel = m.cfgs[0]["layers"]
        names: dict[str, None] = {}
        for method in spec.compression.methods:
            names.update(dict.fromkeys(lowrank.plan_layers(
                model, method, 1, include=sel["include"] or None, exclude=sel["exclude"] or None,
                skip_first=sel["skip_first"], pointwise_method=sel["pointwise_method"])))
        m.module_names = list(names)
        key = stable_hash({"model_key": model_key(spec, m.spec), "layers": m.module_names,
                           "methods": spec.compression.methods, "ratios": search.candidate_ratios, "vbmf": vbmf,
                           "options": spec.compression.options, "loss": search.loss, "val": search.val_batches,
                           "bn": search.bn_batches, "device": "cuda" if ctx.want_gpu else "cpu",
                           "batch": spec.dataset.batch_size})
        m.cache_path = spool_root(spec) / "screening" / f"{m.name}-{key}"
        hit = cache.load(m.cache_path)
        if hit is not None:
            m.rows, meta = hit
            m.acc0, m.cached = meta.get("acc0"), True
            say(f"{m.name}: screening table reused from {m.cache_path} ({sum(map(len, m.rows.values()))} rows)")
            continue
        shapes = layer_input_shapes(model, names, m.base["input_shape"])
        mods = dict(model.named_modules())
        say(f"{m.name}: screening {len(names)} layers x {len(spec.compression.methods)} methods x "
            f"{len(search.candidate_ratios)} ratios{' + VBMF ranks' if vbmf is not None else ''}")
        for n in names:
            jobs.append((m, n))
            refs.append(ctx.r["screen_task"].remote(n, copy.deepcopy(mods[n]), shapes[n], spec.compression.methods,
                                                    search.candidate_ratios, spec.compression.options, ctx.want_gpu,
                                                    vbmf))
    for (m, n), s in zip(jobs, ctx.gather(refs)):
        if isinstance(s, Exception):
            if not m.failed:
                ctx.fail(m, f"screening {n}", s)
            continue
        m.rows[n] = [r for r in s["rows"] if r["status"] == "ok"]
    todo = [m for m in ms if not m.cached and not m.failed]

    # sensitivity: every option of every model in one wave
    probes, refs = [], []
    for m in todo:
        for n, rs in m.rows.items():
            for i, r in enumerate(rs):
                if r["method"] is None:
                    r["loss"], r["acc_drop"] = 0.0, 0.0
                elif search.loss == "error":
                    r["loss"], r["acc_drop"] = r["rel_error"] ** 2, None
                else:
                    probes.append((m, n, i))
        if search.loss == "sensitivity" or "tolerance" in search.strategies:
            probes.append((m, None, None))
    if probes:
        say(f"{len(probes)} sensitivity probes for {len(todo)} model(s)")
    for m, n, i in probes:
        factors = m.rows[n][i]["factors"] if n is not None else None
        refs.append(ctx.r["sensitivity_task"].remote(m.json, m.base_ref, ctx.ds_json, spec.seed, n, factors,
                                                     search.val_batches, search.bn_batches, ctx.want_gpu))
    outs = ctx.gather(refs)
    for (m, n, i), o in zip(probes, outs):
        if isinstance(o, Exception):
            if not m.failed:
                ctx.fail(m, f"sensitivity {n or 'dense'}", o)
        elif n is None:
            m.acc0 = o["acc"]
    for (m, n, i), o in zip(probes, outs):
        if n is not None and not m.failed:
            r = m.rows[n][i]
            r["acc_drop"] = m.acc0 - o["acc"]
            # a probe resolves 1/len(subset); the squared weight error breaks its ties
            r["loss"] = max(0.0, r["acc_drop"]) + 0.01 * r["rel_error"] ** 2
    for m in ms:
        if m.failed:
            continue
        if not m.cached:
            cache.save(m.cache_path, m.rows, {"model": m.name, "acc0": m.acc0})
        _log_table(ctx, m)


def _log_table(ctx: _Ctx, m: _Model) -> None:
    import tempfile

    from ..tracking import with_retries, write_parquet

    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / f"{m.name}.parquet"
        write_parquet(cache.table_rows(m.rows), p)
        with_retries(lambda: ctx.tracker.client.log_artifact(ctx.parent, str(p), artifact_path="screening"),
                     what=f"logging the screening table of {m.name}", say=ctx.say)


def _options(m: _Model, target: str) -> tuple[dict, float]:
    """Allocation options per layer (dense first) and the cost of what is not searched."""
    total = {"params": m.base["params"], "macs": m.base["macs"], "latency": m.base["latency"]["b1"]}[target]
    dense_sum = sum(_cost(rs[0], target) for rs in m.rows.values())
    options = {n: [Option(None, None, _cost(rs[0], target), 0.0)]
               + [Option(r["method"], r["rank"], _cost(r, target), r["loss"]) for r in rs[1:]]
               for n, rs in m.rows.items()}
    return options, max(0.0, total - dense_sum)


def _row(m: _Model, layer: str, o: Option) -> dict | None:
    if o.method is None:
        return None
    return next(r for r in m.rows[layer][1:] if r["method"] == o.method and r["rank"] == o.rank)


def _decide(strategy: str, m: _Model, options: dict, fixed: float, search) -> dict:
    """budget / uniform / vbmf: layer -> chosen row (None = dense)."""
    if strategy == "budget":
        alloc = allocate_budget(options, ratio=search.ratio, fixed_cost=fixed).choice
        return {n: _row(m, n, o) for n, o in alloc.items()}
    choice = {}
    for n, rs in m.rows.items():
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


def _tolerance(ctx: _Ctx, ms: list[_Model]) -> dict[str, dict]:
    """Per layer and method, bisect the compression ratio in [1, max(candidate_ratios)] (geometric
    midpoints, ``tolerance_steps`` probes) for the smallest rank whose accuracy drop on the probe
    subset is <= epsilon; per layer keep the method whose passing option has the fewest
    parameters. All layers of all models probe in the same waves."""
    spec, search, say = ctx.spec, ctx.spec.compression.search, ctx.say
    eps, hi0 = search.epsilon, max(search.candidate_ratios)
    state = {}  # (model, layer, method) -> {"lo", "hi", "best", "next"}
    for m in dict.fromkeys(ms):
        for n, rs in m.rows.items():
            for method in dict.fromkeys(r["method"] for r in rs[1:]):
                state[(m.name, n, method)] = {"m": m, "lo": 1.0, "hi": hi0, "best": None, "next": hi0}
    need = [m for m in dict.fromkeys(ms) if m.acc0 is None]  # a cached table screened with loss 'error'
    for m, o in zip(need, ctx.gather([ctx.r["sensitivity_task"].remote(
            m.json, m.base_ref, ctx.ds_json, spec.seed, None, None, search.val_batches, search.bn_batches,
            ctx.want_gpu) for m in need])):
        if isinstance(o, Exception):
            ctx.fail(m, "dense probe", o)
        else:
            m.acc0 = o["acc"]
    say(f"tolerance: bisecting {len(state)} (layer, method) pairs, up to {search.tolerance_steps} probes each, "
        f"epsilon {eps:g}")
    for step in range(search.tolerance_steps):
        live = [(k, s) for k, s in state.items() if s["next"] is not None and not s["m"].failed]
        if not live:
            break
        refs = [ctx.r["sensitivity_task"].remote(
            s["m"].json, s["m"].base_ref, ctx.ds_json, spec.seed, k[1],
            {"method": k[2], "ratio": s["next"], "options": spec.compression.options.get(k[2], {})},
            search.val_batches, search.bn_batches, ctx.want_gpu) for k, s in live]
        for (k, s), o in zip(live, ctx.gather(refs)):
            ratio = s["next"]
            if isinstance(o, Exception):
                s["next"] = None  # e.g. a rank that cannot be built at this ratio: stop this pair
                continue
            drop = s["m"].acc0 - o["acc"]
            if drop <= eps:
                s["best"] = {**o, "method": k[2], "drop": drop, "ratio": ratio}
            s["lo"], s["hi"], s["next"] = bisect_step(s["lo"], s["hi"], ratio, drop <= eps)
        say(f"tolerance: wave {step + 1}/{search.tolerance_steps} done ({len(live)} probes)")
    picked: dict[str, dict] = {}
    for m in dict.fromkeys(ms):
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


def _evaluate_all(ctx: _Ctx, choices: list) -> None:
    from ..driver import log_result, task_error

    refs, keys = [], []
    for m, cfg, choice in choices:
        chosen = [{"name": n, "method": r["method"], "status": "ok", "reason": "", "factors": r["factors"],
                   "rank": r["rank"], "rel_error": r["rel_error"], "diagnostics": {}, "seconds": 0.0,
                   "node": "screen"} for n, r in choice.items() if r is not None]
        cfg = {**cfg, "allocation": ", ".join(f"{n}={r['method']}:{r['rank']}" if r else f"{n}=dense"
                                              for n, r in choice.items())}
        ctx.say(f"{m.name}/{cfg['method']}: {cfg['allocation'][:200]}")
        refs.append(ctx.r["evaluate_task"].remote(m.json, m.base_ref, ctx.ds_json, ctx.ft_json, ctx.spec.seed,
                                                  ctx.want_gpu, *chosen))
        keys.append((m, cfg))
    pending = dict(zip(refs, keys))
    while pending:
        ready, _ = ctx.ray.wait(list(pending), num_returns=1, timeout=5.0, fetch_local=False)
        ctx.beat()
        for ref in ready:
            m, cfg = pending.pop(ref)
            [out] = ctx.gather([ref])
            if isinstance(out, Exception):
                ctx.result.failed.append(f"{m.name}/{cfg['method']}: {task_error(out)}")
                ctx.say(f"FAILED {ctx.result.failed[-1]}")
                continue
            public = {k: m.base[k] for k in ("acc", "params", "macs", "latency", "input_shape", "source")}
            log_result(ctx.tracker, ctx.parent, cfg, public, out, ctx.spec, ctx.result, ctx.say)
