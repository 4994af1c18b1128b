"""The sweep driver, the Ray job entrypoint's work and the only MLflow writer: plan the sweep,
skip what is registered, log what an earlier run left on disk, run every kind of configuration
through its executor, then set the ``candidate`` aliases and log the summary and Pareto table."""
from __future__ import annotations

import time

from . import spool
from .executors import EXECUTORS
from .plan import Config, plan_sweep
from .runtime import Progress, Session, SweepResult
from .spec import SweepSpec
from .tracking import Tracker

KIND_ORDER = ("scratch", "staged", "oneshot", "search")  # cheap-and-whole first, the search last


def run_sweep(spec: SweepSpec, *, configs: list[Config] | None = None, out=print) -> SweepResult:
    """Run ``spec``; ``configs``: its plan when the caller already has it (pre-flight made it)."""
    say = Progress(out)
    t_start = time.perf_counter()
    tracker = Tracker(spec.mlflow.tracking_uri, spec.mlflow.experiment)  # creates the store once, before fan-out
    configs = list(configs) if configs is not None else plan_sweep(spec)
    registered = {name: tracker.registered_hashes(name) for name in dict.fromkeys(c.registered_name for c in configs)}
    todo = [c for c in configs if c.config_hash not in registered[c.registered_name]]
    result = SweepResult(skipped=len(configs) - len(todo))
    stale = tracker.fail_stale_parents(spec.name)
    if stale:
        say(f"marked {stale} interrupted run(s) of sweep {spec.name!r} as FAILED")
    say(f"sweep {spec.name!r}: {len(configs)} configurations, {result.skipped} already registered, {len(todo)} to run")
    session = Session(spec, tracker, None, result, say)
    if todo:
        _ = session.ray  # starts Ray and refuses a request no node can serve, before anything is logged
    result.parent_run_id = parent = session.parent = tracker.start_parent(spec.name, spec.model_dump(mode="json"))
    status = "FAILED"
    try:
        spooled = spool.pending(session.spool_root(), spec.name)
        for cfg in [c for c in todo if c.config_hash in spooled]:
            say(f"{cfg.label}: logging the result kept on disk by an earlier run")
            if session.log(cfg, *spool.load(spooled[cfg.config_hash])):
                todo.remove(cfg)
        for kind in KIND_ORDER:
            batch = [c for c in todo if c.kind == kind]
            if batch:
                EXECUTORS[kind](session, batch)
        for _ in session.completed():  # what is still timing is registered before the summary
            pass
        result.rows = tracker.summary_rows(configs)
        for name in registered:
            v = tracker.set_candidate(name)
            if v:
                result.candidates[name] = v
                say(f"alias 'candidate' -> {name} version {v}")
        tracker.log_sweep_summary(parent, result.rows)
        if result.rows:
            result.pareto = tracker.log_pareto(parent, result.rows + result.points)
        if result.nodes:
            tracker.mark_nodes(parent, result.nodes)
        status = "FINISHED" if not result.failed else "FAILED"
    finally:
        tracker.finish(parent, status)
        _close_timings(result.timings, t_start, time.perf_counter())
    return result


def _close_timings(t: dict, t_start: float, end: float) -> None:
    t["wall"] = end - t_start
    if "first_submit" in t:
        t["startup"] = t.pop("first_submit") - t_start
        t["tail"] = end - t.pop("last_result", end)
