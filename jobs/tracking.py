"""Everything MLflow; only the driver's side calls it (Ray tasks return plain data).

Models are logged with ``serialization_format='pt2'`` (``torch.export``): they load back as a
``GraphModule`` without unpickling anything, so a registry reader never runs code from a model
file. The input example has batch 2 so the exported batch dimension stays dynamic.

The sweep lock (``sweep_lock.SweepLock``) is part of the ``Tracker``.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from . import deploy, report
from .store import create_once, redact, sqlite_init_lock
from .sweep_lock import HEARTBEAT_SECONDS, LOCK_TTL_SECONDS, SweepLock, SweepRunningError  # noqa: F401 - re-exported

PIP_REQUIREMENTS = ["torch==2.13.0"]
MODEL_TAGS = ("sweep", "config_hash", "model", "method", "compression_ratio", "mac_ratio", "speedup_b1", "acc_pre",
              "acc_post", "acc_ft", "degenerate_layers")


def version_tags(cfg, metrics: dict, degenerate: int, run_id: str) -> dict:
    """The tags every registered version carries: ``MODEL_TAGS`` plus the run id (under evaluation
    by agreement ``agree_*`` in place of ``acc_*``, and ``kl_post``, ``kl_ft``)."""
    q = "agree" if "agree_ft" in metrics else "acc"  # config_metrics named them
    keys = [report.metric_name(k, q) for k in MODEL_TAGS] + (["kl_post", "kl_ft"] if q == "agree" else [])
    values = {"sweep": cfg.sweep, "config_hash": cfg.config_hash, "model": cfg.model.name, "method": cfg.method,
              "degenerate_layers": str(degenerate)}
    values.update({k: f"{metrics[k]:.4f}" for k in keys if k not in values})
    timed = {k: f"{metrics[k]:.4f}" for k in ("speedup_per_mac_b1", "mac_ratio_timed", "search_predicted_ratio")
             if k in metrics}
    return {**{k: values[k] for k in keys}, **timed, "run_id": run_id}


def curve_tag(curves: dict | None) -> dict:
    """``ft_curve``: the top-1 (or agreement) after each fine-tuning epoch, as a JSON list on the
    version, so that the registry alone shows how fine-tuning went."""
    key = next((k for k in (curves or {}) if k.endswith("_ft_epoch") and not k.startswith("kl")), None)
    return {"ft_curve": json.dumps([round(float(v), 4) for v in curves[key]])} if key else {}


def candidate_key(version) -> tuple:
    """What ``set_candidate`` maximises over a registered model's versions (their tags)."""
    t = version.tags
    speedup = float(t.get("speedup_b1", "nan"))
    return (float(t.get("acc_ft", t.get("agree_ft"))), float(t.get("compression_ratio", 0)),
            float(t.get("mac_ratio", 0)), -int(t.get("degenerate_layers", 0)),
            speedup if math.isfinite(speedup) else 0.0, t.get("config_hash", ""))


class Tracker(SweepLock):
    def __init__(self, tracking_uri: str, experiment: str):
        import mlflow  # deferred: MLflow is heavy and only the driver's side needs it
        from mlflow import MlflowClient

        for name in ("mlflow", "alembic"):  # registry chatter; the driver prints its own progress
            logging.getLogger(name).setLevel(logging.WARNING)
        self.mlflow = mlflow
        self.uri = tracking_uri
        mlflow.set_tracking_uri(tracking_uri)
        with sqlite_init_lock(tracking_uri):  # the first access creates/migrates a sqlite store
            self.client = MlflowClient(tracking_uri)
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = exp.experiment_id if exp else create_once(
                lambda: self.client.create_experiment(experiment),
                lambda: getattr(self.client.get_experiment_by_name(experiment), "experiment_id", None))

    # ---------------------------------------------------------------- registry reads
    def registered_versions(self, name: str) -> list:
        try:
            return list(self.client.search_model_versions(f"name='{name}'"))
        except self.mlflow.exceptions.MlflowException:
            return []

    def keep_one_version(self, cfg):
        """The registered version of ``cfg`` (by ``config_hash``), or None. Where a lost answer
        and a re-sent request left several, the earliest is kept and the others are deleted: each
        copy points at the same run's model, so nothing is lost."""
        same = sorted((v for v in self.registered_versions(cfg.registered_name)
                       if v.tags.get("config_hash") == cfg.config_hash), key=lambda v: int(v.version))
        for extra in same[1:]:
            self.client.delete_model_version(cfg.registered_name, extra.version)
        return same[0] if same else None

    def registered_hashes(self, name: str) -> dict[str, str]:
        """config_hash -> version; where copies exist, the earliest (the one ``keep_one_version`` keeps)."""
        found = {}
        for v in sorted(self.registered_versions(name), key=lambda v: -int(v.version)):
            if v.tags.get("config_hash"):
                found[v.tags["config_hash"]] = str(v.version)
        return found

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_config(self, parent_id: str, cfg, base: dict, result, model) -> str:
        """One child run per configuration (``cfg``: a ``plan.Config``; ``base``: the dense
        reference; ``result``: an ``EvalResult``): params, metrics, per-layer table, the model
        (pt2), and a registered model version with the design's tags. Returns the version."""
        kept = self.keep_one_version(cfg)
        if kept is not None:
            # an earlier attempt registered it and lost the answer (the server went away mid-call):
            # a retry finishes that attempt's run instead of registering the configuration twice
            if kept.run_id:
                self.client.set_terminated(kept.run_id, status="FINISHED")
            return str(kept.version)
        mlflow = self.mlflow
        from mlflow.entities import Metric  # deferred with MLflow itself

        run = self.create_run(f"{cfg.model.name}-{cfg.method}",
                              {"mlflow.parentRunId": parent_id, "sweep": cfg.sweep, "kind": "config",
                               "config_hash": cfg.config_hash, "model": cfg.model.name, "method": cfg.method})
        rid = run.info.run_id
        self._supersede(parent_id, cfg.config_hash, rid)
        metrics = report.config_metrics(base, result)
        params = {**cfg.params, **({"allocation": result.allocation} if result.allocation else {}),
                  **{f"preprocess.{k}": v for k, v in (base.get("preprocess") or {}).items()}}
        with mlflow.start_run(run_id=rid):
            mlflow.log_params(redact({"sweep": cfg.sweep, "model": cfg.model.name, "method": cfg.method,
                                      "registered_name": cfg.registered_name, "config_hash": cfg.config_hash,
                                      "seed": cfg.seed, **params}))
            rows = report.layer_rows(result.reports, result.layer_status, result.latency.get("layers"))
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "layers.parquet"
                report.write_parquet(rows, path)
                mlflow.log_artifact(str(path), artifact_path="layers")
            mlflow.log_table(data=report.columns(rows), artifact_file="layers.json")
            if result.stages:
                mlflow.log_dict(result.stages, "stages.json")
            # the models before the metrics: MLflow's log_model fetches the history of every metric
            # already in the run (one request each, each one password-checked by an authenticated
            # server: 0.3 s apiece here); metrics logged afterwards name the model themselves
            example = np.zeros((2, *base["input_shape"]), dtype=np.float32)
            info = mlflow.pytorch.log_model(model.eval(), name="model", serialization_format="pt2",
                                            input_example=example, pip_requirements=PIP_REQUIREMENTS)
            onnx_note = self._log_onnx(model, tuple(base["input_shape"]), rid)
            now = int(time.time() * 1000)
            self.client.log_batch(rid, metrics=[
                *(Metric(k, float(v), now, 0, model_id=info.model_id) for k, v in metrics.items()),
                *(Metric(k, float(v), now, step, model_id=info.model_id)  # curves, e.g. acc_ft_epoch by epoch
                  for k, values in (result.curves or {}).items() for step, v in enumerate(values, start=1))])
        degenerate = sum(bool(r.get("diagnostics", {}).get("degenerate")) for r in result.reports)
        tags = {**version_tags(cfg, metrics, degenerate, rid), **report.latency_tags(result.latency),
                "onnx": onnx_note, **curve_tag(result.curves)}
        if result.stages:  # the per-stage history, on the version itself
            tags["stage_history"] = json.dumps([{k: (round(h[k], 4) if isinstance(h[k], float) else h[k])
                                                 for k in ("stage", "layers", "compression_ratio", "acc_post", "acc_ft",
                                                           "epochs")} for h in result.stages])
            self._log_stages(rid, cfg, result.stages, report.quality(result.acc_post))
        # the version is created with its tags in one call: a driver killed here never leaves a
        # version without its config_hash (which a re-run would then duplicate)
        with contextlib.redirect_stderr(io.StringIO()):  # "Created version ..." chatter; errors still raise
            mv = create_once(lambda: mlflow.register_model(info.model_uri, cfg.registered_name, tags=tags),
                             lambda: self.keep_one_version(cfg))
        # MLflow's HTTP client before 3.18 re-sent any request whose answer was lost (urllib3 Retry
        # on every method), so a create that reached the server just before it went away could land
        # twice inside this one call; the earliest version stays, later copies are deleted
        kept = self.keep_one_version(cfg)
        version = str(kept.version if kept is not None else mv.version)
        self.client.set_terminated(rid, status="FINISHED")
        return version

    def _supersede(self, parent_id: str, config_hash: str, rid: str) -> None:
        """Earlier RUNNING runs of this configuration in this sweep (an attempt that failed part-way,
        or a create MLflow's client re-sent after a lost answer) end FAILED, pointing at ``rid``."""
        query = (f"tags.mlflow.parentRunId = '{parent_id}' and tags.config_hash = '{config_hash}' "
                 "and tags.kind = 'config' and attributes.status = 'RUNNING'")
        for r in self.client.search_runs([self.experiment_id], query):
            if r.info.run_id != rid:
                self.client.set_tag(r.info.run_id, "failure", f"superseded by run {rid}")
                self.client.set_terminated(r.info.run_id, status="FAILED")

    def _log_onnx(self, model, input_shape: tuple, rid: str) -> str:
        """The same model as ONNX (``runs:/<run>/onnx``, loadable by ``mlflow.onnx.load_model``),
        checked against PyTorch's output; what happened, for the version's ``onnx`` tag."""
        import mlflow.onnx  # noqa: F401 - deferred: MLflow's ONNX flavour, only on the driver's side
        import onnx  # deferred: only the driver's logging needs the ONNX package

        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = deploy.export_onnx(copy.deepcopy(model).float(), input_shape, Path(tmp) / "model.onnx")
            except Exception as e:  # noqa: BLE001 - a user's model the exporter cannot take: pt2 only
                return f"not exported ({deploy.failure(e)})"
            import onnxruntime  # the runtime a user loads it with; named so MLflow need not infer it

            self.mlflow.onnx.log_model(onnx.load(str(path)), name="onnx", pip_requirements=[
                f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"])
        return f"runs:/{rid}/onnx"

    def _log_stages(self, config_run: str, cfg, stages: list[dict], q: str = "acc") -> None:
        """One child run per stage under the configuration's run."""
        for h in stages:
            run = self.create_run(
                f"{cfg.model.name}-{cfg.method}-stage{h['stage']}",
                {"mlflow.parentRunId": config_run, "sweep": cfg.sweep, "kind": "stage",
                 "model": cfg.model.name, "config_hash": cfg.config_hash, "stage": str(h["stage"])})
            rid = run.info.run_id
            self.client.log_param(rid, "layers", h["layers"])
            self.client.log_param(rid, "ratio", h["ratio"])
            self.client.log_param(rid, "patterns", json.dumps(h["patterns"]))
            self.client.log_param(rid, "epochs", h["epochs"])
            for k in ("compression_ratio", "mac_ratio", "params", "macs", "acc_post", "acc_ft", "acc_bn", "seconds"):
                if h.get(k) is not None:
                    self.client.log_metric(rid, report.metric_name(k, q), float(h[k]))
            for step, loss in enumerate(h["losses"], start=1):
                self.client.log_metric(rid, "ft_loss", float(loss), step=step)
            self.client.set_terminated(rid, status="FINISHED")

    def set_candidate(self, name: str) -> str | None:
        """Alias ``candidate`` on the version with the best fine-tuned accuracy; among equals (a
        few hundred validation images tie often) the smaller, then the one with fewer MACs, fewer
        degenerate layers, the faster (``speedup_b1``), and last the configuration hash, so that
        the choice never depends on which version finished first."""
        versions = [v for v in self.registered_versions(name) if "acc_ft" in v.tags or "agree_ft" in v.tags]
        if not versions:
            return None
        best = max(versions, key=candidate_key)
        self.client.set_registered_model_alias(name, "candidate", best.version)
        return best.version

    def log_trials(self, parent_id: str, cfg, records: list[dict]) -> None:
        """Ray Tune trials of one configuration: a child run each (kind ``tune-trial``) with the
        allocation, whether ASHA stopped it, and top-1 per epoch as a metric history."""
        for x in records:
            run = self.create_run(
                f"{cfg.model.name}-tune-trial-{x['trial']}",
                {"mlflow.parentRunId": parent_id, "sweep": cfg.sweep, "kind": "tune-trial",
                 "model": cfg.model.name, "config_hash": cfg.config_hash, "trial": str(x["trial"]),
                 "stopped_early": str(x["stopped_early"]).lower(), "chosen": str(x["chosen"]).lower()})
            rid = run.info.run_id
            self.client.log_param(rid, "allocation", x["allocation"][:6000])
            if x.get("threads") is not None:  # torch's threads in the trial: the CPUs Tune gave it
                self.client.log_param(rid, "torch_threads", int(x["threads"]))
            for h in x["history"]:
                self.client.log_metric(rid, "acc", h["acc"], step=h["epoch"])
                self.client.log_metric(rid, "loss", h["loss"], step=h["epoch"])
            if not np.isnan(x["params"]):
                self.client.log_metric(rid, "params", x["params"])
            if x["error"]:
                self.client.set_tag(rid, "error", x["error"])
            self.client.set_terminated(rid, status="FAILED" if x["error"] else
                                       ("KILLED" if x["stopped_early"] else "FINISHED"))

    def _log_rows(self, parent_id: str, rows: list[dict], stem: str, plot, png_name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / f"{stem}.parquet"
            report.write_parquet(rows, p)
            self.client.log_artifact(parent_id, str(p))
            png = Path(tmp) / png_name
            plot(rows, png)
            self.client.log_artifact(parent_id, str(png))

    def log_pareto(self, parent_id: str, rows: list[dict]) -> list[dict]:
        """The sweep's Pareto fronts (top-1 after fine-tuning vs parameter ratio, and vs measured
        batch-1 speedup) per model, as ``pareto.parquet`` and ``pareto.png``."""
        table = report.pareto_table(rows)
        if table:
            self._log_rows(parent_id, table, "pareto", report.plot_pareto, "pareto.png")
        return table

    def log_sweep_summary(self, parent_id: str, rows: list[dict]) -> None:
        if not rows:
            return
        self._log_rows(parent_id, rows, "summary", report.plot_sweep, "accuracy_vs_compression.png")
        self.client.log_table(parent_id, data=report.columns(rows), artifact_file="summary.json")

    def log_artifact(self, parent_id: str, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(parent_id, str(path), artifact_path=folder)

    def log_dict(self, parent_id: str, data: dict, artifact_file: str) -> None:
        self.client.log_dict(parent_id, data, artifact_file)

    def mark_nodes(self, parent_id: str, nodes: set) -> None:
        self.client.set_tag(parent_id, "ray_nodes", ",".join(sorted(nodes)))
        self.client.log_metric(parent_id, "ray_nodes", len(nodes))

    def summary_rows(self, configs: list) -> list[dict]:
        """One row per configuration of the plan that has a registered version (its tags)."""
        rows = []
        for name in dict.fromkeys(c.registered_name for c in configs):
            versions = {v.tags.get("config_hash"): v for v in self.registered_versions(name)}
            for c in (c for c in configs if c.registered_name == name):
                v = versions.get(c.config_hash)
                if v is not None:
                    rows.append(report.summary_row(c.model.name, c.method, name, v.version, v.tags, c.config_hash))
        return rows


