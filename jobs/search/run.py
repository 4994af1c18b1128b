"""The search stage of a sweep: screening -> sensitivity -> allocation -> evaluate/fine-tune.

Per model: one screening task per layer (every method x candidate ratio, factors kept), then one
sensitivity task per screened option (accuracy drop on a validation subset with only that layer
compressed, BN recalibrated), then the allocation of each strategy in the driver, then the usual
evaluation/fine-tuning task and registration (method tag ``search-<strategy>``).
"""
from __future__ import annotations

import copy

import lowrank
from lowrank.accounting import layer_input_shapes

from .allocate import InfeasibleTarget, Option, allocate_budget


def _cost(row: dict, target: str) -> float:
    return float(row["latency"] if target == "latency" else row[target])


def run_search(spec, configs, tracker, parent, result, say) -> None:
    from .. import tasks
    from ..driver import init_ray, log_result, model_key
    from ..models import build_model

    ray = init_ray()
    res, search = spec.resources, spec.compression.search
    want_gpu = res.gpus_per_task > 0 and ray.cluster_resources().get("GPU", 0) > 0
    if search.latency_device == "cuda" and not want_gpu:
        from ..spec import SpecError

        raise SpecError("compression.search.latency_device: 'cuda' requested but the Ray cluster has no GPU; "
                        "accepted here: 'cpu'")
    opts = {"num_cpus": res.cpus_per_task, "num_gpus": res.gpus_per_task if want_gpu else 0, "max_retries": 3}
    r_base, r_screen, r_sens, r_eval = (ray.remote(f).options(**opts) for f in (
        tasks.baseline_task, tasks.screen_task, tasks.sensitivity_task, tasks.evaluate_task))
    ds_json, ft_json = spec.dataset.model_dump_json(), spec.finetune.model_dump_json()
    models = {m.name: m for m in spec.models}
    by_model: dict[str, list[dict]] = {}
    for c in configs:
        by_model.setdefault(c["model"], []).append(c)

    for name, cfgs in by_model.items():
        m = models[name]
        mjson = m.model_dump_json()
        base = ray.get(r_base.remote(mjson, ds_json, spec.pretrain.model_dump_json(), spec.seed,
                                     model_key(spec, m), want_gpu))
        result.timings["task_seconds"] += base["task_seconds"]
        model = build_model(name, m.num_classes)
        model.load_state_dict(base["state_dict"])
        base_ref = ray.put(base["state_dict"])
        sel = cfgs[0]["layers"]
        names: dict[str, None] = {}
        for method in spec.compression.methods:
            names.update(dict.fromkeys(lowrank.plan_layers(
                model, method, 1, include=sel["include"] or None, exclude=sel["exclude"] or None,
                skip_first=sel["skip_first"], pointwise_method=sel["pointwise_method"])))
        shapes = layer_input_shapes(model, names, base["input_shape"])
        mods = dict(model.named_modules())
        say(f"{name}: screening {len(names)} layers x {len(spec.compression.methods)} methods x "
            f"{len(search.candidate_ratios)} ratios")
        screens = ray.get([r_screen.remote(n, copy.deepcopy(mods[n]), shapes[n], spec.compression.methods,
                                           search.candidate_ratios, spec.compression.options, want_gpu)
                           for n in names])
        rows = {s["name"]: [r for r in s["rows"] if r["status"] == "ok"] for s in screens}
        probes = [(n, i) for n, rs in rows.items() for i, r in enumerate(rs) if r["method"] is not None]
        if search.loss == "sensitivity":
            say(f"{name}: {len(probes)} sensitivity probes")
            refs = [r_sens.remote(mjson, base_ref, ds_json, spec.seed, None, None, search.val_batches,
                                  search.bn_batches, want_gpu)]
            refs += [r_sens.remote(mjson, base_ref, ds_json, spec.seed, n, rows[n][i]["factors"], search.val_batches,
                                   search.bn_batches, want_gpu) for n, i in probes]
            outs = ray.get(refs)
            acc0 = outs[0]["acc"]
            for (n, i), o in zip(probes, outs[1:]):
                # a probe resolves 1/len(subset); the squared weight error breaks its ties
                rows[n][i]["loss"] = max(0.0, acc0 - o["acc"]) + 0.01 * rows[n][i]["rel_error"] ** 2
        else:
            for n, i in probes:
                rows[n][i]["loss"] = rows[n][i]["rel_error"] ** 2
        total = {"params": base["params"], "macs": base["macs"], "latency": base["latency"]["b1"]}[search.target]
        dense_sum = sum(_cost(rs[0], search.target) for rs in rows.values())
        fixed = max(0.0, total - dense_sum)
        options = {n: [Option(None, None, _cost(rs[0], search.target), 0.0)]
                   + [Option(r["method"], r["rank"], _cost(r, search.target), r["loss"]) for r in rs[1:]]
                   for n, rs in rows.items()}
        for cfg in cfgs:
            try:
                if cfg["strategy"] == "budget":
                    choice = allocate_budget(options, ratio=search.ratio, fixed_cost=fixed).choice
                else:
                    choice = {}
                    for n, rs in rows.items():
                        same = [r for r in rs[1:] if r["target_ratio"] == search.ratio]
                        best = min(same, key=lambda r: (r["loss"], r["method"])) if same else None
                        choice[n] = Option(best["method"], best["rank"], 0, best["loss"]) if best else options[n][0]
            except InfeasibleTarget as e:
                result.failed.append(f"{name}/{cfg['method']}: {e}")
                say(f"FAILED {result.failed[-1]}")
                continue
            chosen = []
            for n, o in choice.items():
                if o.method is None:
                    continue
                r = next(r for r in rows[n][1:] if r["method"] == o.method and r["rank"] == o.rank)
                chosen.append({"name": n, "method": o.method, "status": "ok", "reason": "", "factors": r["factors"],
                               "rank": r["rank"], "rel_error": r["rel_error"], "diagnostics": {}, "seconds": 0.0,
                               "node": "screen"})
            cfg = {**cfg, "allocation": ", ".join(f"{n}={o.method or 'dense'}:{o.rank}" for n, o in choice.items())}
            say(f"{name}/{cfg['method']}: {cfg['allocation'][:200]}")
            out = ray.get(r_eval.remote(mjson, base_ref, ds_json, ft_json, spec.seed, want_gpu, *chosen))
            result.timings["task_seconds"] += out.get("task_seconds", 0.0)
            public = {k: base[k] for k in ("acc", "params", "macs", "latency", "input_shape", "source")}
            log_result(tracker, parent, cfg, public, out, spec, result, say)
