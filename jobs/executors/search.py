"""The search executor: screening -> sensitivity -> strategies -> evaluate/fine-tune.

Every stage runs for all models of the sweep at once (one wave of Ray tasks per stage):

1. baselines (one task per model);
2. screening: one task per layer (every method x candidate ratio, plus VBMF ranks when the
   ``vbmf`` strategy is asked for), factors kept. The table (with the sensitivity columns) is
   cached on disk per model and logged to the parent run as ``screening/<model>.parquet``;
3. sensitivity: one task per screened option (accuracy drop on a validation subset with only
   that layer compressed, BN recalibrated);
4. strategies: ``budget``, ``uniform`` and ``vbmf`` are decided from the table
   (``search.strategies``); ``tolerance`` bisects each layer's rank in waves of probe tasks;
   ``tune`` runs Ray Tune with ASHA over configurations near the budget solution;
5. one evaluation/fine-tuning task per (model, strategy), registered as ``search-<strategy>``.
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import lowrank

from .. import deploy
from ..report import write_parquet
from ..results import LayerResult
from ..search import cache, calibrate
from ..search.allocate import InfeasibleTarget
from ..search.strategies import allocation_options, decide, estimate
from ..spec import SpecError, stable_hash
from ..store import with_retries
from ..tasks.compress import baseline_task, evaluate_task
from ..tasks.search import calibrate_task, screen_task, sensitivity_task
from .tolerance import tolerance
from .tune import tune_search


@dataclass(eq=False)
class SearchedModel:
    """One model's state through the stages."""

    cfgs: list
    base: object = None  # Baseline
    base_ref: object = None
    env: object = None  # TaskEnv
    rows: dict = field(default_factory=dict)  # layer -> [dense row, option rows...]
    acc0: float | None = None  # the dense model on the probe subset
    cache_path: Path | None = None
    cached: bool = False
    calibration: dict | None = None  # the latency model against the whole graph (search.calibrate)
    failed: str | None = None

    @property
    def name(self) -> str:
        return self.cfgs[0].model.name

    @property
    def plan(self):
        return self.cfgs[0]

    def fail(self, session, what: str, err: Exception) -> None:
        """Record this model's failure (its other stages are skipped; other models go on)."""
        session.fail(f"{self.name}: {what}", err)
        self.failed = session.result.failed[-1]


def run_search(session, configs: list) -> None:
    models: dict[str, SearchedModel] = {}
    for c in configs:
        models.setdefault(c.model.name, SearchedModel([])).cfgs.append(c)
    ms = list(models.values())
    search = ms[0].plan.search
    if search.latency_device == "cuda" and not (session.ray and session.gpu):
        raise SpecError("compression.search.latency_device: 'cuda' requested but the Ray cluster has no GPU; "
                         "accepted here: 'cpu'")
    # 1. baselines, all models at once
    for m in ms:
        m.env = session.env(m.plan)
    outs = session.gather([(baseline_task, m.env, session.spec.pretrain, m.plan.model.key) for m in ms])
    for m, base in zip(ms, outs):
        if isinstance(base, Exception):
            m.fail(session, "baseline", base)
            continue
        m.base, m.base_ref = base, session.put(base.state_dict)
    ms = [m for m in ms if not m.failed]
    # 2-3. screening + sensitivity (or the cached table)
    _screen_all(session, ms, search)
    ms = [m for m in ms if not m.failed]
    if search.target == "latency":
        _calibrate_all(session, ms)
    # 4. strategies
    choices: list[tuple] = []  # (model, cfg, layer -> row | None, the predicted ratio | None)
    tol = [(m, c) for m in ms for c in m.cfgs if c.strategy == "tolerance"]
    if tol:
        picked = tolerance(session, [m for m, _ in tol], search)
        choices += [(m, c, picked[m.name], None) for m, c in tol if m.name in picked]
    for m in ms:
        options, fixed = allocation_options(m.rows, m.base, search.target, m.calibration)
        for cfg in m.cfgs:
            if cfg.strategy == "tolerance":
                continue
            try:
                choice = (tune_search(session, m, cfg, options, fixed) if cfg.strategy == "tune"
                          else decide(cfg.strategy, m.rows, options, fixed, search))
            except InfeasibleTarget as e:
                total = sum(o.cost for os_ in options.values() for o in os_ if o.method is None) + fixed
                session.fail(cfg.label, f"{e}{_outside_hint(m, fixed, total, search.target)}")
                continue
            except Exception as e:  # noqa: BLE001 - e.g. Ray Tune failing: the other strategies still run
                session.fail(cfg.label, e)
                continue
            choices.append((m, cfg, choice, estimate(options, fixed, choice)))
    # 5. evaluate + fine-tune every chosen configuration at once; log as they finish
    _evaluate_all(session, choices)


def _outside_hint(m: SearchedModel, fixed: float, total: float, target: str) -> str:
    """Why an unreachable target is so, where most of the cost lies outside the searched layers:
    the layers the spec's selection left out that a method could take, with their share of the
    model's MACs (where it is large, widening helps), or that there are none: the rest is what no
    method factorizes (depthwise convs, activations, pooling), and only a lower ratio is reachable."""
    if fixed <= 0.2 * total:
        return ""
    share = f"{fixed / total:.0%} of the model's {target} lie outside the searched layers"
    model = m.env.build()
    widest = set()
    for method in m.plan.methods:
        widest |= set(lowrank.select_layers(model, method, skip_first=False, pointwise_method="svd"))
    more = sorted(widest - set(m.plan.candidates))
    if not more:
        return (f" ({share}, in what none of the methods factorizes: depthwise convs, activations, pooling; "
                f"no wider layer selection reaches further)")
    macs = lowrank.per_layer_macs(model, m.env.input_shape)
    left = sum(macs.get(n, 0) for n in more) / max(1, sum(macs.values()))
    largest = max(more, key=lambda n: macs.get(n, 0))
    return (f" ({share}; compression.layers leaves out {len(more)} layer(s) a method could take, "
            f"{left:.0%} of the model's MACs, the most in {largest}" + (": widen the layer selection)" if left >= 0.1 else
                                                                   "; the rest no method factorizes)"))


def _screen_all(session, ms: list[SearchedModel], search) -> None:
    say = session.say
    vbmf = search.vbmf_weakening if "vbmf" in search.strategies else None
    # a latency target is timed on the deployment runtime; otherwise latency is only reported (eager)
    runtime = session.spec.latency.runtime if search.target == "latency" and not session.gpu else "torch"
    # ... and at the size it is deployed at (latency.input_size), like the baseline's latency it is set against
    size = session.spec.latency.input_size if search.target == "latency" else None
    jobs = []  # (model, layer name) per screening task
    for m in ms:
        cfg = m.plan
        key = stable_hash({"model_key": cfg.model.key, "layers": list(cfg.candidates), "methods": list(cfg.methods),
                           "ratios": search.candidate_ratios, "vbmf": vbmf, "options": cfg.options,
                           "loss": search.loss, "val": search.val_batches, "bn": search.bn_batches,
                           "device": "cuda" if session.gpu else "cpu", "batch": session.spec.dataset.batch_size,
                           **({"runtime": runtime} if runtime != "torch" else {}),
                           **({"multiple_of": cfg.multiple_of} if cfg.multiple_of != 1 else {}),
                           **({"size": size} if size is not None else {}),
                           # a latency target's tables time each layer's options interleaved (screen.LayerTimer)
                           **({"timing": "interleaved"} if search.target == "latency" else {})})
        m.cache_path = session.spool_root() / "screening" / f"{m.name}-{key}"
        hit = cache.load(m.cache_path)
        if hit is not None:
            m.rows, meta = hit
            m.acc0, m.cached = meta.get("acc0"), True
            say(f"{m.name}: screening table reused from {m.cache_path} ({sum(map(len, m.rows.values()))} rows)")
            continue
        model = m.env.build(m.base.state_dict)
        shapes = lowrank.layer_input_shapes(model, list(cfg.candidates), deploy.timed_shape(m.base.input_shape, size))
        say(f"{m.name}: screening {len(cfg.candidates)} layers x {len(cfg.methods)} methods x "
            f"{len(search.candidate_ratios)} ratios{' + VBMF ranks' if vbmf is not None else ''}")
        jobs += [(m, (screen_task, n, copy.deepcopy(model.get_submodule(n)), shapes[n], cfg.methods,
                      search.candidate_ratios, cfg.options, session.gpu, vbmf, runtime, cfg.multiple_of))
                 for n in cfg.candidates]
    for (m, call), s in zip(jobs, session.gather([call for _, call in jobs])):
        if isinstance(s, Exception):
            if not m.failed:
                m.fail(session, f"screening {call[1]}", s)
            continue
        m.rows[call[1]] = [r for r in s["rows"] if r["status"] == "ok"]
    todo = [m for m in ms if not m.cached and not m.failed]
    # sensitivity: every option of every model in one wave
    probes = []
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
    outs = session.gather([(sensitivity_task, m.env, m.base_ref, n, m.rows[n][i]["factors"] if n else None,
                            search.val_batches, search.bn_batches) for m, n, i in probes])
    for (m, n, i), o in zip(probes, outs):
        if isinstance(o, Exception):
            if not m.failed:
                m.fail(session, f"sensitivity {n or 'dense'}", o)
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
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / f"{m.name}.parquet"
            write_parquet(cache.table_rows(m.rows), p)
            with_retries(lambda: session.tracker.log_artifact(session.parent, p, "screening"),
                         what=f"logging the screening table of {m.name}", say=say)


def _calibrate_all(session, ms: list[SearchedModel]) -> None:
    """Per model, the latency outside the searched layers, measured on the screening's runtime in a
    task of its own (``latency.exclusive``: the whole node; on a GPU, a GPU task like the screening's)
    and logged as ``screening/<model>.calibration.json``; a model whose calibration fails keeps the
    additive model."""
    runtime = session.spec.latency.runtime if not session.gpu else "torch"
    size = session.spec.latency.input_size
    outs = session.gather([(calibrate_task, m.env.build(m.base.state_dict), list(m.rows),
                            deploy.timed_shape(m.base.input_shape, size), runtime, session.gpu,
                            {n: [r["factors"] for r in rs[1:]] for n, rs in m.rows.items()}) for m in ms],
                          options=None if session.gpu else session.timing_options())  # on a GPU: where it screened
    for m, out in zip(ms, outs):
        if isinstance(out, Exception):
            session.say(f"{m.name}: latency calibration failed ({str(out).splitlines()[0][:160]}); the layers' "
                        "times are added up as screened")
            continue
        costs, k = calibrate.scaled_costs(m.rows, out)
        dense = sum(cs[0] for cs in costs.values())
        m.calibration = {**out, "layers_alone": dense, "scale": k}
        session.say(f"{m.name}: latency on {out['runtime']}: whole {out['whole'] * 1e3:.2f} ms, outside the searched "
                    f"layers {out['fixed'] * 1e3:.2f} ms ({out['fixed'] / out['whole']:.0%}); the layers timed alone "
                    f"add up to {dense * 1e3:.2f} ms" + (f", scaled x{k:.2f}" if k else ", not calibrated"))
        with_retries(lambda: session.tracker.log_dict(session.parent, m.calibration,
                                                      f"screening/{m.name}.calibration.json"),
                     what=f"logging the latency calibration of {m.name}", say=session.say)


def _evaluate_all(session, choices: list) -> None:
    spec = session.spec
    for m, cfg, choice, predicted in choices:
        chosen = [LayerResult(n, r["method"], factors=r["factors"], rank=r["rank"], rel_error=r["rel_error"],
                              node="screen") for n, r in choice.items() if r is not None]
        allocation = ", ".join(f"{n}={r['method']}:{r['rank']}" if r else f"{n}=dense" for n, r in choice.items())
        said = f" (predicted {predicted:.2f}x {cfg.search.target})" if predicted else ""
        session.say(f"{cfg.label}{said}: {allocation[:200]}")
        session.submit(evaluate_task, m.env, m.base_ref, spec.finetune, *chosen,
                       key=(m, cfg, allocation, predicted))
    for (m, cfg, allocation, predicted), out in session.completed():
        if isinstance(out, Exception):
            session.fail(cfg.label, out)
            continue
        out.allocation, out.predicted = allocation, predicted
        session.log(cfg, m.base, out)
