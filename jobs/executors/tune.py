"""The ``tune`` strategy: Ray Tune over whole configurations near the budget solution.

Trial 0 is the budget allocation itself; the others are budget allocations under per-layer
losses perturbed by log-normal noise (``search.tune.noise``), so every trial meets the same
target while trading layers differently. Each trial recalibrates BN and fine-tunes, reporting
validation top-1 after every epoch; ASHA stops the weak ones at its rungs. The driver logs every
trial as an MLflow child run (kind ``tune-trial``) and registers the best trial that ran all
epochs (the evaluation task re-runs it with the sweep's seed, like every configuration).
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from ..search.strategies import neighbours, row_for
from ..tasks.env import with_task_threads
from ..tasks.search import tune_trial


def tune_search(session, m, cfg, options: dict, fixed: float) -> dict:
    """The chosen trial's allocation (layer -> row or None); ``m``: the search executor's model."""
    # the driver prints its own progress: no Tune tables, no TensorBoard logger (not installed);
    # the CSV logger stays, the per-epoch history is read back from it
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    from ray import tune  # deferred: Ray Tune is heavy, and only this strategy uses it
    from ray.tune.logger import CSVLoggerCallback
    from ray.tune.schedulers import ASHAScheduler

    spec, search = session.spec, cfg.search
    ts, epochs = search.tune, spec.finetune.epochs
    allocs = neighbours(options, ratio=search.ratio, fixed=fixed, trials=ts.trials, noise=ts.noise, seed=spec.seed)
    choices = [{n: row_for(m.rows, n, o) for n, o in a.items()} for a in allocs]
    session.say(f"{cfg.label}: {len(choices)} trials near the budget solution, ASHA over {epochs} epoch(s)")
    trainable = tune.with_parameters(
        with_task_threads(tune_trial), env=m.env, base_state=m.base.state_dict, finetune=spec.finetune,
        allocations=[{n: r["factors"] for n, r in c.items() if r is not None} for c in choices])
    trainable = tune.with_resources(trainable, {"cpu": session.options["num_cpus"], "gpu": session.options["num_gpus"]})
    scheduler = ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=min(ts.grace_epochs, epochs),
                              reduction_factor=ts.reduction_factor)
    storage = (Path(session.spool_root()) / "tune" / spec.name).resolve()
    tuner = tune.Tuner(trainable, param_space={"trial": tune.grid_search(list(range(len(choices))))},
                       tune_config=tune.TuneConfig(metric="acc", mode="max", scheduler=scheduler),
                       run_config=tune.RunConfig(name=f"{m.name}-{cfg.config_hash}-{time.strftime('%Y%m%d-%H%M%S')}",
                                                 storage_path=str(storage), verbose=0,
                                                 callbacks=[CSVLoggerCallback()]))
    done = threading.Event()

    def beat():  # tuner.fit() blocks; the sweep lock must stay fresh meanwhile
        while not done.wait(5.0):
            try:
                session.beat()
            except Exception:  # noqa: BLE001 - a missed heartbeat is retried on the next tick
                pass

    th = threading.Thread(target=beat, daemon=True)
    th.start()
    try:
        grid = tuner.fit()
    finally:
        done.set()
        th.join()
    records = [_record(r, allocs, epochs) for r in grid]
    records.sort(key=lambda x: x["trial"])
    finished = [x for x in records if x["epochs"] == epochs and x["error"] is None]
    # the best top-1 after all epochs, then the smaller model, then the earlier trial
    best = max(finished, key=lambda x: (x["acc"], -x["params"], -x["trial"]))["trial"] if finished else 0
    for x in records:
        x["chosen"] = x["trial"] == best
    session.tracker.log_trials(session.parent, cfg, records)
    session.result.points += [{"model": m.name, "method": f"tune-trial-{x['trial']}", "kind": "trial",
                               "compression_ratio": m.base.params / x["params"], "acc_ft": x["acc"],
                               "speedup_b1": None, "acc_pre": m.base.acc["top1"]}
                              for x in records if x["acc"] is not None]
    stopped = sum(x["stopped_early"] for x in records)
    session.say(f"{cfg.label}: {stopped}/{len(records)} trials stopped early by ASHA; best trial {best} "
                f"(top-1 {next(x['acc'] for x in records if x['trial'] == best) or float('nan'):.3f})")
    return choices[best]


def _record(r, allocs: list, epochs: int) -> dict:
    """One trial's outcome, read back from Tune's result (its per-epoch history from the CSV)."""
    i = r.config["trial"]
    hist = r.metrics_dataframe
    history = [] if hist is None or hist.empty else \
        [{"epoch": int(e), "acc": float(a), "loss": float(lo)} for e, a, lo in zip(hist["epoch"], hist["acc"],
                                                                                   hist["loss"])]
    ran = history[-1]["epoch"] if history else 0
    return {"trial": i, "allocation": ", ".join(f"{n}={o.method or 'dense'}:{o.rank}" for n, o in allocs[i].items()),
            "epochs": ran, "stopped_early": r.error is None and ran < epochs,
            "error": None if r.error is None else str(r.error).splitlines()[0][:300],
            "acc": history[-1]["acc"] if history else None,
            "params": float(r.metrics.get("params", float("nan"))) if r.metrics else float("nan"),
            "threads": r.metrics.get("threads") if r.metrics else None, "history": history}
