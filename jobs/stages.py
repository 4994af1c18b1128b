"""Configurations that are not one-shot: multi-stage compression (``compression.stages``) and
low-rank training from scratch (``from_scratch``). Each is one Ray task per configuration (the
stages of one configuration depend on each other), all configurations in flight at once."""
from __future__ import annotations

import json
import time


def run_special(spec, configs, tracker, parent, result, say) -> None:
    from . import tasks
    from .driver import init_ray, log_result, model_key, task_error, task_options
    from .tracking import HEARTBEAT_SECONDS

    ray = init_ray()
    opts, want_gpu = task_options(spec, ray)
    r_base, r_scratch, r_stage = (ray.remote(f).options(**opts) for f in (
        tasks.baseline_task, tasks.scratch_task, tasks.multistage_task))
    models = {m.name: m for m in spec.models}
    ds_json, ft_json = spec.dataset.model_dump_json(), spec.finetune.model_dump_json()
    inflight: dict = {}  # ref -> (kind, key)
    scratch: dict = {}  # model -> {"dense": out, "lowrank": out}
    bases: dict = {}
    staged: dict = {}
    for cfg in configs:
        m = models[cfg["model"]]
        if cfg["method"] == "scratch-lowrank":
            fs_json = spec.from_scratch.model_dump_json()
            for low in (False, True):
                inflight[r_scratch.remote(m.model_dump_json(), ds_json, fs_json, spec.seed, want_gpu, low)] = (
                    "scratch", (cfg, "lowrank" if low else "dense"))
            say(f"{m.name}: dense and low-rank (Tai et al.) models training from scratch, "
                f"{spec.from_scratch.epochs} epoch(s) each")
        else:
            staged.setdefault(m.name, []).append(cfg)
    for name in staged:
        m = models[name]
        inflight[r_base.remote(m.model_dump_json(), ds_json, spec.pretrain.model_dump_json(), spec.seed,
                               model_key(spec, m), want_gpu)] = ("base", name)
    last_beat = time.perf_counter()
    while inflight:
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=5.0, fetch_local=False)
        if time.perf_counter() - last_beat >= HEARTBEAT_SECONDS:
            tracker.heartbeat(parent)
            last_beat = time.perf_counter()
        for ref in ready:
            kind, key = inflight.pop(ref)
            try:
                out = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - one configuration failing does not stop the sweep
                what = key if isinstance(key, str) else f"{key[0]['model']}/{key[0]['method']}" if kind == "scratch" \
                    else f"{key['model']}/{key['method']}"
                result.failed.append(f"{what}: {task_error(e)}")
                say(f"FAILED {result.failed[-1]}")
                continue
            result.timings["task_seconds"] += out.get("task_seconds", 0.0)
            result.nodes.add(out.get("node", "?"))
            if kind == "base":
                bases[key] = out
                say(f"{key}: baseline ready ({out['source']}) top-1 {out['acc']['top1']:.3f}")
                base_ref = ray.put(out["state_dict"])
                c = spec.compression
                for cfg in staged[key]:
                    sched = json.loads(cfg["stage_schedule"])
                    method = cfg["base_method"]
                    inflight[r_stage.remote(models[key].model_dump_json(), base_ref, ds_json, ft_json, spec.seed,
                                            want_gpu, method, c.rank.model_dump_json(), c.options.get(method, {}),
                                            cfg["layers"], sched, cfg["stage_epochs"])] = ("stage", cfg)
                    say(f"{key}/{cfg['method']}: {len(sched)} stages queued")
            elif kind == "stage":
                cfg, base = key, bases[key["model"]]
                for h in out["stages"]:
                    say(f"{cfg['model']}/{cfg['method']}: stage {h['stage']}: {h['compression_ratio']:.2f}x params, "
                        f"post {h['acc_post']:.3f} ft {h['acc_ft']:.3f}")
                public = {k: base[k] for k in ("acc", "params", "macs", "latency", "input_shape", "source")}
                log_result(tracker, parent, cfg, public, out, spec, result, say)
            else:  # scratch
                cfg, which = key
                pair = scratch.setdefault(cfg["config_hash"], {})
                pair[which] = out
                if len(pair) == 2:
                    log_result(tracker, parent, cfg, *scratch_result(pair["dense"], pair["lowrank"]), spec, result, say)


def scratch_result(dense: dict, low: dict) -> tuple[dict, dict]:
    """The dense model is the reference (``acc_pre``, dense params/MACs/latency); the low-rank
    model trained from scratch is both ``acc_post`` and ``acc_ft`` (there is no fine-tuning)."""
    base = {"acc": dense["acc"], "params": dense["params"], "macs": dense["macs"], "latency": dense["latency"],
            "input_shape": dense["input_shape"], "source": "scratch"}
    out = {"state_dict": low["state_dict"], "acc_post": low["acc"], "acc_bn": None, "acc_ft": low["acc"],
           "params": low["params"], "macs": low["macs"], "latency": low["latency"], "reports": low["reports"],
           "ft_losses": low["losses"], "ft_seconds": low["train_seconds"], "device": low["device"],
           "factors": low["factors"], "node": low["node"], "task_seconds": 0.0,
           "layer_status": [{"name": r["name"], "method": r["method"], "status": "ok", "reason": "",
                             "seconds": 0.0} for r in low["reports"]],
           "curves": {"acc_dense": dense["curve"], "acc_lowrank": low["curve"], "loss_dense": dense["losses"],
                      "loss_lowrank": low["losses"]},
           "train_seconds_dense": dense["train_seconds"]}
    return base, out
