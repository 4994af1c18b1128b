"""The sweep driver: the Ray job entrypoint's work. It is the only MLflow writer.

Per model: one baseline task (pre-train or load, evaluate), then one task per (layer, method,
rank) decomposition, then one task per configuration (model x method) that assembles,
evaluates, recalibrates and fine-tunes. All models are in flight at once; the driver logs each
configuration as it completes and registers the model version.
"""
from __future__ import annotations

import copy
import json
import os
import time
from collections import deque
from dataclasses import dataclass, field

import lowrank

from . import spool
from .spec import SweepSpec, file_digest, stable_hash
from .tracking import Tracker


class Progress:
    def __init__(self, out=print):
        self.t0 = time.perf_counter()
        self.out = out

    def __call__(self, msg: str) -> None:
        self.out(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)


@dataclass
class SweepResult:
    rows: list[dict] = field(default_factory=list)
    registered: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    parent_run_id: str | None = None
    nodes: set = field(default_factory=set)
    candidates: dict = field(default_factory=dict)  # registered name -> version with alias 'candidate'
    points: list = field(default_factory=list)  # extra Pareto points (Ray Tune trials)
    pareto: list = field(default_factory=list)  # the Pareto table logged to the parent run
    timings: dict = field(default_factory=lambda: {"ray_init": 0.0, "mlflow": 0.0, "task_seconds": 0.0,
                                                   "decompose_seconds": 0.0, "slots": 1, "wall": 0.0,
                                                   "startup": 0.0, "tail": 0.0})


def model_key(spec: SweepSpec, m) -> str:
    """Content hash of what determines a model's trained weights (the pre-training cache key)."""
    return stable_hash({"model": m.name, "num_classes": m.num_classes, "dataset": spec.dataset.model_dump(mode="json"),
                        "pretrain": spec.pretrain.model_dump(mode="json", exclude={"cache_dir"}),
                        "checkpoint": file_digest(m.checkpoint) if m.checkpoint else None, "seed": spec.seed})


def plan_configs(spec: SweepSpec) -> list[dict]:
    """One configuration per (model, method), with its content hash (``config_hash``)."""
    configs = []
    for m in spec.models:
        if spec.from_scratch is not None:  # the low-rank model trained from scratch next to the dense one
            fs = spec.from_scratch
            content = {"model": m.name, "num_classes": m.num_classes, "dataset": spec.dataset.model_dump(mode="json"),
                       "from_scratch": fs.model_dump(mode="json"), "seed": spec.seed}
            configs.append({"sweep": spec.name, "model": m.name, "method": "scratch-lowrank",
                            "rank_strategy": "from_scratch", "registered_name": spec.mlflow.registered_name(m.name),
                            "config_hash": stable_hash(content), "layers": fs.layers.model_dump(mode="json"),
                            **{f"from_scratch.{k}": v for k, v in fs.model_dump(mode="json").items()
                               if v is not None and k != "layers"}, "seed": spec.seed})
        if spec.compression is None:
            continue
        search = spec.compression.search
        layers = (m.layers or spec.compression.layers).model_dump(mode="json")
        if search is not None:  # the methods compete per layer: one configuration per strategy
            for strategy in search.strategies:
                content = {"model_key": model_key(spec, m), "search": search.content(strategy),
                           "strategy": strategy, "methods": spec.compression.methods, "layers": layers,
                           "options": spec.compression.options, "finetune": spec.finetune.model_dump(mode="json")}
                configs.append({"sweep": spec.name, "model": m.name, "method": f"search-{strategy}",
                                "strategy": strategy, "rank_strategy": "search",
                                "registered_name": spec.mlflow.registered_name(m.name),
                                "config_hash": stable_hash(content), "layers": layers,
                                **{f"search.{k}": v for k, v in search.content(strategy).items()
                                   if not isinstance(v, (list, dict))}, "search.methods": ",".join(spec.compression.methods),
                                "finetune_epochs": spec.finetune.epochs, "seed": spec.seed})
            continue
        stages = spec.compression.stages
        for method in spec.compression.methods:
            content = {"model_key": model_key(spec, m), "method": method,
                       "rank": spec.compression.rank.model_dump(mode="json"), "layers": layers,
                       "options": spec.compression.options.get(method, {}),
                       "finetune": spec.finetune.model_dump(mode="json")}
            staged = {}
            if stages is not None:
                content["stages"] = stages.model_dump(mode="json")
                plan = stages.schedule(spec.compression.rank)
                staged = {"base_method": method, "stages": len(plan), "stage_epochs": stages.epochs,
                          "stage_schedule": json.dumps(plan)}
            configs.append({"sweep": spec.name, "model": m.name,
                            "method": f"{method}-{len(plan)}stage" if staged else method, **staged,
                            "rank_strategy": spec.compression.rank.strategy,
                            "registered_name": spec.mlflow.registered_name(m.name),
                            "config_hash": stable_hash(content), "layers": layers, **{
                                f"rank.{k}": v for k, v in spec.compression.rank.model_dump(mode="json").items()
                                if v not in (None, {}, [])},
                            **{f"option.{k}": v for k, v in content["options"].items()},
                            "finetune_epochs": spec.finetune.epochs, "seed": spec.seed})
    return configs


def task_options(spec: SweepSpec, ray) -> tuple[dict, bool]:
    """Ray options for every task of a sweep, and whether tasks get a GPU (asked for and present)."""
    res = spec.resources
    want_gpu = res.gpus_per_task > 0 and ray.cluster_resources().get("GPU", 0) > 0
    return {"num_cpus": res.cpus_per_task, "num_gpus": res.gpus_per_task if want_gpu else 0, "max_retries": 3}, want_gpu


def task_error(e: Exception) -> str:
    """One line for a task that failed after Ray's retries: the task's own exception."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).splitlines()[0] if str(cause) else ""
    return f"{type(cause).__name__}: {text}"


def init_ray():
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:  # local mode: nothing listens beyond 127.0.0.1
        ray.init(include_dashboard=bool(os.environ.get("LOWRANK_RAY_DASHBOARD")), dashboard_host="127.0.0.1",
                 log_to_driver=False, configure_logging=True, logging_level="warning")
    return ray


def _layer_plan(model, selection: dict, method: str) -> list[str]:
    plan = lowrank.plan_layers(model, method, 1, include=selection["include"] or None,
                               exclude=selection["exclude"] or None, skip_first=selection["skip_first"],
                               pointwise_method=selection["pointwise_method"])
    return list(plan.items())


def run_sweep(spec: SweepSpec, *, out=print) -> SweepResult:
    from . import tasks
    from .models import build_model

    say = Progress(out)
    t_start = time.perf_counter()
    tracker = Tracker(spec.mlflow.tracking_uri, spec.mlflow.experiment)  # creates the store once, before fan-out
    configs = plan_configs(spec)
    registered = {c["registered_name"]: None for c in configs}
    for name in registered:
        registered[name] = tracker.registered_hashes(name)
    todo = [c for c in configs if c["config_hash"] not in registered[c["registered_name"]]]
    result = SweepResult(skipped=len(configs) - len(todo))
    stale = tracker.fail_stale_parents(spec.name)
    if stale:
        say(f"marked {stale} interrupted run(s) of sweep {spec.name!r} as FAILED")
    say(f"sweep {spec.name!r}: {len(configs)} configurations, {result.skipped} already registered, {len(todo)} to run")
    parent = tracker.start_parent(spec.name, spec.model_dump(mode="json"))
    result.parent_run_id = parent
    status = "FAILED"
    try:
        spooled = spool.pending(spool_root(spec), spec.name)
        for cfg in [c for c in todo if c["config_hash"] in spooled]:
            say(f"{cfg['model']}/{cfg['method']}: logging the result kept on disk by an earlier run")
            _, base, out = spool.load(spooled[cfg["config_hash"]])
            if log_result(tracker, parent, cfg, base, out, spec, result, say):
                todo.remove(cfg)
        searched = [c for c in todo if c["method"].startswith("search-")]
        special = [c for c in todo if "stages" in c or c["method"] == "scratch-lowrank"]
        todo = [c for c in todo if c not in searched and c not in special]
        if special:
            from .stages import run_special

            run_special(spec, special, tracker, parent, result, say)
        if todo:
            _run_todo(spec, todo, tracker, parent, result, say, tasks, build_model)
        if searched:
            from .search.run import run_search

            run_search(spec, searched, tracker, parent, result, say)
        result.rows = _summary_rows(tracker, configs)
        for name in registered:
            v = tracker.set_candidate(name)
            if v:
                result.candidates[name] = v
                say(f"alias 'candidate' -> {name} version {v}")
        tracker.log_sweep_summary(parent, result.rows)
        if result.rows:
            result.pareto = tracker.log_pareto(parent, result.rows + result.points)
        if result.nodes:
            tracker.client.set_tag(parent, "ray_nodes", ",".join(sorted(result.nodes)))
            tracker.client.log_metric(parent, "ray_nodes", len(result.nodes))
        status = "FINISHED" if not result.failed else "FAILED"
    finally:
        tracker.finish(parent, status)
        end = time.perf_counter()
        result.timings["wall"] = end - t_start
        t = result.timings
        if "first_submit" in t:
            t["startup"] = t.pop("first_submit") - t_start
            t["tail"] = end - t.pop("last_result")
    return result


def _run_todo(spec, todo, tracker, parent, result, say, tasks, build_model):
    t0 = time.perf_counter()
    ray = init_ray()
    result.timings["ray_init"] = time.perf_counter() - t0
    result.timings["slots"] = max(1, int(ray.cluster_resources().get("CPU", 1) // spec.resources.cpus_per_task))
    res = spec.resources
    opts, want_gpu = task_options(spec, ray)
    if res.gpus_per_task > 0 and not want_gpu:
        say("the spec asks for GPUs but the Ray cluster has none: running on CPU")
    r_base = ray.remote(tasks.baseline_task).options(**opts)
    r_dec = ray.remote(tasks.decompose_task).options(**opts)
    r_eval = ray.remote(tasks.evaluate_task).options(**opts)
    limit = res.max_concurrent or 10**9

    models = {m.name: m for m in spec.models}
    by_model: dict[str, list[dict]] = {}
    for c in todo:
        by_model.setdefault(c["model"], []).append(c)

    queue: deque = deque()
    inflight: dict = {}  # ref -> (kind, key)
    dec_total: dict[str, int] = {}
    dec_done: dict[str, int] = {}
    bases: dict[str, dict] = {}

    def submit(remote, args, kind, key):
        queue.append((remote, args, kind, key))

    def pump():
        while queue and len(inflight) < limit:
            remote, args, kind, key = queue.popleft()
            inflight[remote.remote(*args)] = (kind, key)

    ds_json, ft_json = spec.dataset.model_dump_json(), spec.finetune.model_dump_json()
    for name in by_model:
        m = models[name]
        submit(r_base, (m.model_dump_json(), ds_json, spec.pretrain.model_dump_json(), spec.seed,
                        model_key(spec, m), want_gpu), "base", name)
        say(f"{name}: baseline queued ({'checkpoint' if m.checkpoint else 'pre-train or cache'})")
    result.timings["first_submit"] = time.perf_counter()
    pump()
    from .tracking import HEARTBEAT_SECONDS

    last_beat = time.perf_counter()
    while inflight or queue:
        ready, _ = ray.wait(list(inflight), num_returns=1, fetch_local=False, timeout=HEARTBEAT_SECONDS)
        if time.perf_counter() - last_beat >= HEARTBEAT_SECONDS:
            tracker.heartbeat(parent)  # the sweep lock: others see this sweep is alive
            last_beat = time.perf_counter()
        if not ready:
            continue
        kind, key = inflight.pop(ready[0])
        if kind == "dec":
            dec_done[key] = dec_done.get(key, 0) + 1
            if dec_done[key] == dec_total[key] or dec_done[key] % 5 == 0:
                say(f"{key}: decomposed {dec_done[key]}/{dec_total[key]} layer tasks")
            pump()
            continue
        result.timings["last_result"] = time.perf_counter()
        try:
            out = ray.get(ready[0])
        except Exception as e:  # noqa: BLE001 - one model or config failing does not stop the sweep
            result.failed.append(f"{key if isinstance(key, str) else key['model'] + '/' + key['method']}: "
                                 f"{task_error(e)}")
            say(f"FAILED {result.failed[-1]}")
            pump()
            continue
        result.timings["task_seconds"] += out.get("task_seconds", 0.0)
        result.nodes.add(out.get("node", "?"))
        result.nodes.update(st.get("node", "?") for st in out.get("layer_status", []))
        if kind == "base":
            bases[key] = out
            acc = out["acc"]["top1"]
            say(f"{key}: baseline ready ({out['source']}, {out['train_seconds']:.1f}s) top-1 {acc:.3f}, "
                f"{out['params'] / 1e6:.2f}M params, {out['macs'] / 1e6:.1f}M MACs")
            model = build_model(key, models[key].num_classes)
            model.load_state_dict(out["state_dict"])
            base_ref = ray.put(out["state_dict"])
            mods = dict(model.named_modules())
            dec_total[key] = 0
            for cfg in by_model[key]:
                layer_refs = []
                for lname, (method, _, _) in _layer_plan(model, cfg["layers"], cfg["method"]):
                    rank, strat = spec.compression.rank.for_layer(lname)
                    options = {**strat, **spec.compression.options.get(cfg["method"], {})}
                    if method != cfg["method"]:  # pointwise layers use their own method
                        options = dict(strat)
                    ref = r_dec.remote(lname, copy.deepcopy(mods[lname]), method, rank, options, want_gpu)
                    inflight[ref] = ("dec", key)
                    layer_refs.append(ref)
                dec_total[key] += len(layer_refs)
                submit(r_eval, (models[key].model_dump_json(), base_ref, ds_json, ft_json, spec.seed, want_gpu,
                                *layer_refs), "eval", cfg)
            say(f"{key}: {dec_total[key]} layer decompositions for {len(by_model[key])} method(s) in flight")
        else:  # eval
            cfg, base = key, bases[key["model"]]
            dec = sum(s["seconds"] for s in out["layer_status"])
            result.timings["decompose_seconds"] += dec
            result.timings["task_seconds"] += dec
            public = {k: base[k] for k in ("acc", "params", "macs", "latency", "input_shape", "source")}
            log_result(tracker, parent, cfg, public, out, spec, result, say)
        pump()


def spool_root(spec: SweepSpec):
    return spec.pretrain.cache_dir.parent


def log_result(tracker, parent, cfg, base, out, spec, result, say) -> bool:
    """Spool the result, log it with retries, then drop the spool entry. False if MLflow stayed
    away: the result stays on disk and the next run logs it without recomputing."""
    from .models import build_model
    from .tracking import with_retries

    path = spool.spool_dir(spool_root(spec), spec.name, cfg["config_hash"])
    if not path.exists():
        spool.save(path, cfg, base, out)
    model = build_model(cfg["model"], next(m.num_classes for m in spec.models if m.name == cfg["model"]))
    model, _ = lowrank.apply_factors(model, out["factors"])
    model.load_state_dict(out["state_dict"])
    t_log = time.perf_counter()
    try:
        version = with_retries(lambda: tracker.log_config(parent, cfg, base, out, model, base["input_shape"]),
                               what=f"logging {cfg['model']}/{cfg['method']}", say=say)
    except Exception as e:  # noqa: BLE001
        result.failed.append(f"{cfg['model']}/{cfg['method']}: not logged ({type(e).__name__}); kept in {path}")
        say(f"FAILED {result.failed[-1]}")
        return False
    finally:
        result.timings["mlflow"] += time.perf_counter() - t_log
    spool.remove(path)
    result.registered += 1
    bad = [s for s in out["layer_status"] if s["status"] != "ok"]
    say(f"{cfg['model']}/{cfg['method']}: post {out['acc_post']['top1']:.3f} ft {out['acc_ft']['top1']:.3f}, "
        f"{base['params'] / out['params']:.2f}x params -> {cfg['registered_name']} v{version}"
        + (f" ({len(bad)} layer(s) left dense: {bad[0]['reason'][:80]})" if bad else ""))
    return True


def _summary_rows(tracker: Tracker, configs: list[dict]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(c["registered_name"] for c in configs):
        versions = {v.tags.get("config_hash"): v for v in tracker.registered_versions(name)}
        for c in (c for c in configs if c["registered_name"] == name):
            v = versions.get(c["config_hash"])
            if v is None:
                continue
            t = v.tags
            rows.append({"model": c["model"], "method": c["method"], "registered_name": name, "version": v.version,
                         "compression_ratio": float(t["compression_ratio"]), "mac_ratio": float(t["mac_ratio"]),
                         "speedup_b1": float(t.get("speedup_b1", "nan")),
                         "acc_pre": float(t["acc_pre"]), "acc_post": float(t["acc_post"]),
                         "acc_ft": float(t["acc_ft"]), "degenerate_layers": int(t["degenerate_layers"]),
                         "config_hash": c["config_hash"]})
    return rows


def format_summary(rows: list[dict], candidates: dict[str, str] | None = None) -> str:
    head = f"{'model':<20} {'method':<16} {'params x':>8} {'MACs x':>7} {'acc_pre':>7} {'acc_post':>8} " \
           f"{'acc_ft':>7} {'degen':>5}  registered"
    lines = [head, "-" * len(head)]
    for r in rows:
        star = " *candidate" if candidates and candidates.get(r["registered_name"]) == r["version"] else ""
        lines.append(f"{r['model']:<20} {r['method']:<16} {r['compression_ratio']:>8.2f} {r['mac_ratio']:>7.2f} "
                     f"{r['acc_pre']:>7.3f} {r['acc_post']:>8.3f} {r['acc_ft']:>7.3f} {r['degenerate_layers']:>5}  "
                     f"{r['registered_name']} v{r['version']}{star}")
    return "\n".join(lines)
