"""The ``tune`` strategy: Ray Tune over whole configurations near the budget solution.

Trial 0 is the budget allocation itself; the others are budget allocations under per-layer
losses perturbed by log-normal noise (``search.tune.noise``), so every trial meets the same
target while trading layers differently. Each trial recalibrates BN and fine-tunes, reporting
validation top-1 after every epoch; ASHA stops the weak ones at its rungs. The driver logs every
trial as an MLflow child run (kind ``tune-trial``) and registers the best trial that ran all
epochs (the evaluation task re-runs it with the sweep's seed, like every configuration).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from .allocate import Option, allocate_budget


def neighbours(options: dict, *, ratio: float, fixed: float, trials: int, noise: float, seed: int) -> list[dict]:
    """Up to ``trials`` distinct allocations (layer -> Option); the first is the budget solution."""
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


def tune_search(ctx, m, cfg: dict, options: dict, fixed: float) -> dict:
    import os

    # the driver prints its own progress: no Tune tables, no TensorBoard logger (not installed);
    # the CSV logger stays, the per-epoch history is read back from it
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback
    from ray.tune.schedulers import ASHAScheduler

    from .. import tasks
    from ..driver import spool_root
    from .run import _row

    spec, search = ctx.spec, ctx.spec.compression.search
    ts, epochs = search.tune, spec.finetune.epochs
    allocs = neighbours(options, ratio=search.ratio, fixed=fixed, trials=ts.trials, noise=ts.noise, seed=spec.seed)
    choices = [{n: _row(m, n, o) for n, o in a.items()} for a in allocs]
    ctx.say(f"{m.name}/search-tune: {len(choices)} trials near the budget solution, ASHA over {epochs} epoch(s)")
    trainable = tune.with_parameters(
        tasks.tune_trial, model_json=m.json, base_state=m.base["state_dict"], dataset_json=ctx.ds_json,
        finetune_json=ctx.ft_json, seed=spec.seed, want_gpu=ctx.want_gpu,
        allocations=[{n: r["factors"] for n, r in c.items() if r is not None} for c in choices])
    trainable = tune.with_resources(trainable, {"cpu": ctx.opts["num_cpus"], "gpu": ctx.opts["num_gpus"]})
    scheduler = ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=min(ts.grace_epochs, epochs),
                              reduction_factor=ts.reduction_factor)
    storage = (Path(spool_root(spec)) / "tune" / spec.name).resolve()
    tuner = tune.Tuner(trainable, param_space={"trial": tune.grid_search(list(range(len(choices))))},
                       tune_config=tune.TuneConfig(metric="acc", mode="max", scheduler=scheduler),
                       run_config=tune.RunConfig(name=f"{m.name}-{cfg['config_hash']}-{time.strftime('%Y%m%d-%H%M%S')}",
                                                 storage_path=str(storage),
                                                 verbose=0, callbacks=[CSVLoggerCallback()]))
    done = threading.Event()

    def beat():  # tuner.fit() blocks; the sweep lock must stay fresh meanwhile
        while not done.wait(5.0):
            try:
                ctx.beat()
            except Exception:  # noqa: BLE001 - a missed heartbeat is retried on the next tick
                pass

    th = threading.Thread(target=beat, daemon=True)
    th.start()
    try:
        grid = tuner.fit()
    finally:
        done.set()
        th.join()
    records = []
    for r in grid:
        i = r.config["trial"]
        hist = r.metrics_dataframe
        history = [] if hist is None or hist.empty else \
            [{"epoch": int(e), "acc": float(a), "loss": float(lo)} for e, a, lo in zip(hist["epoch"], hist["acc"],
                                                                                       hist["loss"])]
        ran = history[-1]["epoch"] if history else 0
        records.append({"trial": i, "allocation": ", ".join(f"{n}={o.method or 'dense'}:{o.rank}"
                                                            for n, o in allocs[i].items()),
                        "epochs": ran, "stopped_early": r.error is None and ran < epochs,
                        "error": None if r.error is None else str(r.error).splitlines()[0][:300],
                        "acc": history[-1]["acc"] if history else None,
                        "params": float(r.metrics.get("params", float("nan"))) if r.metrics else float("nan"),
                        "history": history})
    records.sort(key=lambda x: x["trial"])
    finished = [x for x in records if x["epochs"] == epochs and x["error"] is None]
    # the best top-1 after all epochs, then the smaller model, then the earlier trial
    best = max(finished, key=lambda x: (x["acc"], -x["params"], -x["trial"]))["trial"] if finished else 0
    for x in records:
        x["chosen"] = x["trial"] == best
    ctx.tracker.log_trials(ctx.parent, cfg, records)
    dense_params = m.base["params"]
    ctx.result.points += [{"model": m.name, "method": f"tune-trial-{x['trial']}", "kind": "trial",
                           "compression_ratio": dense_params / x["params"], "acc_ft": x["acc"], "speedup_b1": None,
                           "acc_pre": m.base["acc"]["top1"]} for x in records if x["acc"] is not None]
    stopped = sum(x["stopped_early"] for x in records)
    ctx.say(f"{m.name}/search-tune: {stopped}/{len(records)} trials stopped early by ASHA; best trial {best} "
            f"(top-1 {next(x['acc'] for x in records if x['trial'] == best) or float('nan'):.3f})")
    return choices[best]
