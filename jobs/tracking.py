"""Everything MLflow. Only the driver calls this module: Ray tasks return plain data.

Models are logged with ``serialization_format='pt2'`` (``torch.export``): they load back as a
``GraphModule`` without unpickling anything, so a registry reader never runs code from a model
file. The input example has batch 2 so the exported batch dimension stays dynamic.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

PIP_REQUIREMENTS = ["torch==2.13.0"]
MODEL_TAGS = ("sweep", "config_hash", "model", "method", "compression_ratio", "mac_ratio", "speedup_b1", "acc_pre",
              "acc_post", "acc_ft", "degenerate_layers")
SECRET_MARKERS = ("TOKEN", "PASSWORD", "SECRET", "KEY", "CREDENTIAL", "AUTH")


def redact(obj):
    """Drop values of keys that look like secrets, and any value equal to a secret in the
    environment (so specs and params never carry tokens or passwords)."""
    secrets = {v for k, v in os.environ.items() if any(m in k.upper() for m in SECRET_MARKERS) and len(v) >= 6}
    if isinstance(obj, dict):
        return {k: ("***" if any(m in str(k).upper() for m in SECRET_MARKERS) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, "***")
    return obj


LOCK_TTL_SECONDS = float(os.environ.get("LOWRANK_LOCK_TTL", "180"))
HEARTBEAT_SECONDS = 20.0


class SweepRunningError(RuntimeError):
    """The same sweep is running elsewhere (its parent run has a fresh heartbeat)."""


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking server cannot be reached."""


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_reachable(tracking_uri: str, attempts: int = 3, timeout: float = 3.0) -> None:
    """For an http(s) tracking URI, the server must answer ``/health`` before any compute."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    url = tracking_uri.rstrip("/") + "/health"
    last = ""
    for i in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except (urllib.error.URLError, OSError) as e:
            last = str(getattr(e, "reason", e))
        time.sleep(0.5 * 2**i)
    raise TrackingUnavailableError(f"MLflow server {tracking_uri} is unreachable ({last}); nothing was started")


def with_retries(fn, *, what: str, attempts: int = 6, first_delay: float = 1.0, say=None):
    """Call ``fn`` and retry with exponential backoff (a tracking server briefly away)."""
    delay = first_delay
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - network and server errors come in many types
            if i == attempts - 1:
                raise
            if say:
                say(f"{what} failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); retrying in {delay:.0f}s")
            time.sleep(delay)
            delay *= 2


@contextlib.contextmanager
def _sqlite_init_lock(tracking_uri: str):
    """Two drivers opening one new sqlite store at once would both run MLflow's schema
    migrations and one fails (``table _alembic_tmp_... already exists``): serialise the first
    access with a lock file beside the database. Other stores handle this themselves."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(tracking_uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Tracker:
    def __init__(self, tracking_uri: str, experiment: str):
        import logging

        import mlflow
        from mlflow import MlflowClient

        for name in ("mlflow", "alembic"):  # registry chatter; the driver prints its own progress
            logging.getLogger(name).setLevel(logging.WARNING)
        self.mlflow = mlflow
        self.uri = tracking_uri
        mlflow.set_tracking_uri(tracking_uri)
        with _sqlite_init_lock(tracking_uri):  # the first access creates/migrates a sqlite store
            self.client = MlflowClient(tracking_uri)
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)

    # ---------------------------------------------------------------- registry reads
    def registered_versions(self, name: str) -> list:
        from mlflow.exceptions import MlflowException

        try:
            return list(self.client.search_model_versions(f"name='{name}'"))
        except MlflowException:
            return []

    def registered_hashes(self, name: str) -> dict[str, str]:
        return {v.tags.get("config_hash"): v.version for v in self.registered_versions(name) if v.tags.get("config_hash")}

    # ---------------------------------------------------------------- runs
    def _running_parents(self, sweep: str) -> list:
        return list(self.client.search_runs(
            [self.experiment_id], f"tags.sweep = '{sweep}' and tags.kind = 'sweep' and attributes.status = 'RUNNING'"))

    @staticmethod
    def _heartbeat_age(run) -> float:
        hb = run.data.tags.get("heartbeat")
        last = float(hb) if hb else run.info.start_time / 1000.0
        age = time.time() - last
        # a driver on this host whose process is gone is stale at once, whatever its heartbeat
        host, _, pid = run.data.tags.get("driver", "").rpartition(":")
        if host == _hostname() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            return float("inf")
        return age

    def fail_stale_parents(self, sweep: str, ttl: float = LOCK_TTL_SECONDS) -> int:
        """The sweep lock. A RUNNING parent run of this sweep with a heartbeat younger than
        ``ttl`` means the sweep is running elsewhere: refuse. Older ones were left by a killed
        driver: mark them FAILED and go on (the re-run resumes by ``config_hash``)."""
        stale = 0
        for r in self._running_parents(sweep):
            age = self._heartbeat_age(r)
            if age < ttl:
                raise SweepRunningError(
                    f"sweep {sweep!r} is already running (parent run {r.info.run_id}, "
                    f"{r.data.tags.get('driver', 'unknown driver')}, heartbeat {age:.0f}s ago); not starting a second copy")
            why = "driver process is gone" if age == float("inf") else f"no heartbeat for {age:.0f}s"
            self.client.set_tag(r.info.run_id, "failure", f"driver stopped: {why}")
            for child in self.client.search_runs([self.experiment_id],
                                                 f"tags.mlflow.parentRunId = '{r.info.run_id}' and attributes.status = 'RUNNING'"):
                self.client.set_tag(child.info.run_id, "failure", "interrupted with its sweep's driver")
                self.client.set_terminated(child.info.run_id, status="FAILED")
            self.client.set_terminated(r.info.run_id, status="FAILED")
            stale += 1
        return stale

    def start_parent(self, sweep: str, spec_dict: dict) -> str:
        run = self.client.create_run(self.experiment_id, run_name=f"{sweep}-{time.strftime('%Y%m%d-%H%M%S')}",
                                     tags={"sweep": sweep, "kind": "sweep", "heartbeat": f"{time.time():.3f}",
                                           "driver": f"{_hostname()}:{os.getpid()}"})
        rid = run.info.run_id
        # two drivers that started at the same moment: the earlier run keeps the lock
        fresh = [r for r in self._running_parents(sweep) if self._heartbeat_age(r) < LOCK_TTL_SECONDS]
        first = min(fresh, key=lambda r: (r.info.start_time, r.info.run_id))
        if first.info.run_id != rid:
            self.client.set_terminated(rid, status="KILLED")
            raise SweepRunningError(f"sweep {sweep!r} was started at the same time by "
                                    f"{first.data.tags.get('driver', 'another driver')}; not starting a second copy")
        safe = redact(spec_dict)
        self.client.log_text(rid, json.dumps(safe, indent=2, default=str), "spec.json")
        return rid

    def heartbeat(self, run_id: str) -> None:
        self.client.set_tag(run_id, "heartbeat", f"{time.time():.3f}")

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_config(self, parent_id: str, cfg: dict, base: dict, result: dict, model, input_shape) -> str:
        """One child run per configuration: params, metrics, per-layer table, the model (pt2),
        and a registered model version with the design's tags. Returns the version."""
        mlflow = self.mlflow
        run = self.client.create_run(self.experiment_id, run_name=f"{cfg['model']}-{cfg['method']}",
                                     tags={"mlflow.parentRunId": parent_id, "sweep": cfg["sweep"], "kind": "config",
                                           "config_hash": cfg["config_hash"], "model": cfg["model"],
                                           "method": cfg["method"]})
        rid = run.info.run_id
        metrics = config_metrics(base, result)
        with mlflow.start_run(run_id=rid):
            mlflow.log_params(redact({k: v for k, v in cfg.items() if k not in ("layers",)}))
            mlflow.log_metrics(metrics)
            rows = layer_rows(result["reports"], result.get("layer_status", []))
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "layers.parquet"
                write_parquet(rows, path)
                mlflow.log_artifact(str(path), artifact_path="layers")
            mlflow.log_table(data=_columns(rows), artifact_file="layers.json")
            for key, values in result.get("curves", {}).items():  # e.g. from-scratch training curves
                for step, v in enumerate(values, start=1):
                    self.client.log_metric(rid, key, float(v), step=step)
            if result.get("stages"):
                mlflow.log_dict(result["stages"], "stages.json")
            example = np.zeros((2, *input_shape), dtype=np.float32)
            info = mlflow.pytorch.log_model(model.eval(), name="model", serialization_format="pt2",
                                            input_example=example, pip_requirements=PIP_REQUIREMENTS)
        degenerate = sum(bool(r.get("diagnostics", {}).get("degenerate")) for r in result["reports"])
        tags = {"sweep": cfg["sweep"], "config_hash": cfg["config_hash"], "model": cfg["model"],
                "method": cfg["method"], "compression_ratio": f"{metrics['compression_ratio']:.4f}",
                "mac_ratio": f"{metrics['mac_ratio']:.4f}", "speedup_b1": f"{metrics['speedup_b1']:.4f}",
                "acc_pre": f"{metrics['acc_pre']:.4f}",
                "acc_post": f"{metrics['acc_post']:.4f}", "acc_ft": f"{metrics['acc_ft']:.4f}",
                "degenerate_layers": str(degenerate), "run_id": rid}
        if result.get("stages"):  # the per-stage history, on the version itself
            tags["stage_history"] = json.dumps([{k: (round(h[k], 4) if isinstance(h[k], float) else h[k])
                                                 for k in ("stage", "layers", "compression_ratio", "acc_post", "acc_ft",
                                                           "epochs")} for h in result["stages"]])
            self._log_stages(parent_id, rid, cfg, result["stages"])
        # the version is created with its tags in one call: a driver killed here never leaves a
        # version without its config_hash (which a re-run would then duplicate)
        with contextlib.redirect_stderr(io.StringIO()):  # "Created version ..." chatter; errors still raise
            mv = mlflow.register_model(info.model_uri, cfg["registered_name"], tags=tags)
        version = str(mv.version)
        self.client.set_terminated(rid, status="FINISHED")
        return version

    def _log_stages(self, parent_id: str, config_run: str, cfg: dict, stages: list[dict]) -> None:
        """One child run per stage under the configuration's run."""
        for h in stages:
            run = self.client.create_run(
                self.experiment_id, run_name=f"{cfg['model']}-{cfg['method']}-stage{h['stage']}",
                tags={"mlflow.parentRunId": config_run, "sweep": cfg["sweep"], "kind": "stage",
                      "model": cfg["model"], "config_hash": cfg["config_hash"], "stage": str(h["stage"])})
            rid = run.info.run_id
            self.client.log_param(rid, "layers", h["layers"])
            self.client.log_param(rid, "ratio", h["ratio"])
            self.client.log_param(rid, "patterns", json.dumps(h["patterns"]))
            self.client.log_param(rid, "epochs", h["epochs"])
            for k in ("compression_ratio", "mac_ratio", "params", "macs", "acc_post", "acc_ft", "acc_bn", "seconds"):
                if h.get(k) is not None:
                    self.client.log_metric(rid, k, float(h[k]))
            for step, loss in enumerate(h["losses"], start=1):
                self.client.log_metric(rid, "ft_loss", float(loss), step=step)
            self.client.set_terminated(rid, status="FINISHED")

    def set_candidate(self, name: str) -> str | None:
        """Alias ``candidate`` on the version with the best fine-tuned accuracy (then the higher
        compression ratio)."""
        versions = [v for v in self.registered_versions(name) if "acc_ft" in v.tags]
        if not versions:
            return None
        best = max(versions, key=lambda v: (float(v.tags["acc_ft"]), float(v.tags.get("compression_ratio", 0)),
                                            -int(v.version)))
        self.client.set_registered_model_alias(name, "candidate", best.version)
        return best.version

    def log_trials(self, parent_id: str, cfg: dict, records: list[dict]) -> None:
        """Ray Tune trials of one configuration: a child run each (kind ``tune-trial``) with the
        allocation, whether ASHA stopped it, and top-1 per epoch as a metric history."""
        for x in records:
            run = self.client.create_run(
                self.experiment_id, run_name=f"{cfg['model']}-tune-trial-{x['trial']}",
                tags={"mlflow.parentRunId": parent_id, "sweep": cfg["sweep"], "kind": "tune-trial",
                      "model": cfg["model"], "config_hash": cfg["config_hash"], "trial": str(x["trial"]),
                      "stopped_early": str(x["stopped_early"]).lower(), "chosen": str(x["chosen"]).lower()})
            rid = run.info.run_id
            self.client.log_param(rid, "allocation", x["allocation"][:6000])
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
            write_parquet(rows, p)
            self.client.log_artifact(parent_id, str(p))
            png = Path(tmp) / png_name
            plot(rows, png)
            self.client.log_artifact(parent_id, str(png))

    def log_pareto(self, parent_id: str, rows: list[dict]) -> list[dict]:
        """The sweep's Pareto fronts (top-1 after fine-tuning vs parameter ratio, and vs measured
        batch-1 speedup) per model, as ``pareto.parquet`` and ``pareto.png``."""
        table = pareto_table(rows)
        if table:
            self._log_rows(parent_id, table, "pareto", plot_pareto, "pareto.png")
        return table

    def log_sweep_summary(self, parent_id: str, rows: list[dict]) -> None:
        if not rows:
            return
        self._log_rows(parent_id, rows, "summary", plot_sweep, "accuracy_vs_compression.png")
        self.client.log_table(parent_id, data=_columns(rows), artifact_file="summary.json")


def config_metrics(base: dict, result: dict) -> dict:
    m = {
        "acc_pre": base["acc"]["top1"], "acc_post": result["acc_post"]["top1"], "acc_ft": result["acc_ft"]["top1"],
        "compression_ratio": base["params"] / result["params"], "mac_ratio": base["macs"] / result["macs"],
        "params": result["params"], "macs": result["macs"], "params_dense": base["params"], "macs_dense": base["macs"],
        "latency_b1_dense_ms": 1e3 * base["latency"]["b1"], "latency_b1_ms": 1e3 * result["latency"]["b1"],
        "latency_b32_dense_ms": 1e3 * base["latency"]["b32"], "latency_b32_ms": 1e3 * result["latency"]["b32"],
        "speedup_b1": base["latency"]["b1"] / result["latency"]["b1"],
        "speedup_b32": base["latency"]["b32"] / result["latency"]["b32"],
        "decompose_seconds": sum(r.get("seconds", 0.0) for r in result.get("layer_status", [])),
        "finetune_seconds": result["ft_seconds"],
    }
    if "top5" in base["acc"]:
        m.update(acc_pre_top5=base["acc"]["top5"], acc_post_top5=result["acc_post"]["top5"],
                 acc_ft_top5=result["acc_ft"]["top5"])
    if result.get("acc_bn") is not None:
        m["acc_bn"] = result["acc_bn"]["top1"]
    return m


def _flat(prefix: str, d: dict, out: dict) -> None:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            _flat(key + ".", v, out)
        elif isinstance(v, (bool, int, float)) or v is None:
            out[key] = v
        else:
            out[key] = str(v)


def layer_rows(reports: list[dict], statuses: list[dict]) -> list[dict]:
    """Per-layer table: the built layers plus layers that were skipped or failed (with reasons)."""
    rows = []
    for r in reports:
        row = {"layer": r["name"], "method": r["method"], "status": "ok", "reason": "",
               "rank": json.dumps(r["rank"]), "rel_error": r["rel_error"], "params_before": r["params_before"],
               "params_after": r["params_after"], "macs_before": r["macs_before"], "macs_after": r["macs_after"]}
        st = next((s for s in statuses if s["name"] == r["name"]), None)
        row["seconds"] = st["seconds"] if st else r["seconds"]
        _flat("diag.", r.get("diagnostics", {}), row)
        rows.append(row)
    for s in statuses:
        if s["status"] != "ok":
            rows.append({"layer": s["name"], "method": s["method"], "status": s["status"], "reason": s["reason"],
                         "seconds": s["seconds"]})
    return rows


def _columns(rows: list[dict]) -> dict:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in keys}


def write_parquet(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pydict(_columns(rows)), str(path))


def plot_sweep(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = [r for r in rows if r["model"] == model]
        for method in sorted({r["method"] for r in sub}):
            pts = [r for r in sub if r["method"] == method]
            line = ax.plot([p["compression_ratio"] for p in pts], [p["acc_ft"] for p in pts], "o", label=f"{method} ft")
            ax.plot([p["compression_ratio"] for p in pts], [p["acc_post"] for p in pts], "x",
                    color=line[0].get_color(), label=f"{method} post")
        ax.axhline(sub[0]["acc_pre"], color="gray", ls="--", lw=1, label="dense")
        ax.set(title=model, xlabel="parameter compression ratio", ylabel="top-1 accuracy")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _front(points: list[tuple[float, float]]) -> list[bool]:
    """Non-dominated flags for (x, y), both to maximise."""
    flags = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def pareto_table(rows: list[dict]) -> list[dict]:
    """Every evaluated point (configurations, Tune trials, the dense model) with its Pareto flags.
    ``pareto_ratio``: no other point of the model has both a higher ratio and a higher top-1;
    ``pareto_latency`` likewise with the measured speedup (points without one are not ranked)."""
    table = []
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model]
        pts = [{"model": model, "method": "dense", "kind": "dense", "compression_ratio": 1.0, "speedup_b1": 1.0,
                "acc_ft": sub[0]["acc_pre"]}]
        pts += [{"model": model, "method": r["method"], "kind": r.get("kind", "config"),
                 "compression_ratio": r["compression_ratio"], "speedup_b1": r.get("speedup_b1"),
                 "acc_ft": r["acc_ft"]} for r in sub]
        for p, f in zip(pts, _front([(p["compression_ratio"], p["acc_ft"]) for p in pts])):
            p["pareto_ratio"] = f
        timed = [p for p in pts if p["speedup_b1"] is not None and p["speedup_b1"] == p["speedup_b1"]]
        for p, f in zip(timed, _front([(p["speedup_b1"], p["acc_ft"]) for p in timed])):
            p["pareto_latency"] = f
        for p in pts:
            p.setdefault("pareto_latency", None)
        table += pts
    return table


def plot_pareto(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in table))
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 4 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        sub = [r for r in table if r["model"] == model]
        for ax, x, flag, label in ((row[0], "compression_ratio", "pareto_ratio", "parameter compression ratio"),
                                   (row[1], "speedup_b1", "pareto_latency", "measured speedup (batch 1)")):
            pts = [r for r in sub if r[x] is not None]
            ax.scatter([p[x] for p in pts], [p["acc_ft"] for p in pts], c="lightgray", s=18, label="evaluated")
            front = sorted((p for p in pts if p[flag]), key=lambda p: p[x])
            ax.plot([p[x] for p in front], [p["acc_ft"] for p in front], "o-", color="C3", label="Pareto front")
            for p in front:
                ax.annotate(p["method"], (p[x], p["acc_ft"]), fontsize=6)
            ax.set(title=model, xlabel=label, ylabel="top-1 after fine-tuning")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
