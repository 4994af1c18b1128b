"""The sweep session every executor runs in: Ray (started on first use), the task options, the
one wait loop (heartbeat and throttling included), progress lines, and logging a result
through the spool so that a tracking server that is away costs a retry, not the computation."""
from __future__ import annotations

import logging
import os
import textwrap
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch

import lowrank
from lowrank.allocator import WORKER_SETUP_HOOK

from . import report, spool
from .errors import SchedulingTimeoutError
from .plan import Config
from .results import Baseline, EvalResult
from .spec import SpecError, SweepSpec
from .store import with_retries
from .tasks.env import TaskEnv, with_task_threads
from .tasks.timing import timing_task
from .tracking import HEARTBEAT_SECONDS, Tracker

POLL_SECONDS = 5.0
_TIMING = object()  # the key of the session's own timing tasks (never yielded to an executor)


class Progress:
    """``[  12.3s] message`` lines, timed from the start of the sweep."""

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
                                                   "decompose_seconds": 0.0, "timing_seconds": 0.0, "slots": 1,
                                                   "wall": 0.0, "startup": 0.0, "tail": 0.0})


def init_ray():
    """The local Ray (nothing listens beyond 127.0.0.1, token authentication on: Ray writes a
    token to ``~/.ray/auth_token`` the first time), or the cluster at ``RAY_ADDRESS``, whose
    authentication mode and token come from the environment, as Ray reads them."""
    if ray.is_initialized():
        return ray
    # every worker starts with glibc's malloc tuned (lowrank.allocator): inside a submitted job the
    # job's runtime_env carries the hook (jobs.submit), and Ray refuses a second one from here
    hook = {"worker_process_setup_hook": WORKER_SETUP_HOOK}
    if os.environ.get("RAY_ADDRESS"):
        in_job = bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, runtime_env=None if in_job else hook)
    else:  # Ray's own default for a new local cluster: token authentication, the token generated once
        # the workers import what the driver can from here (a factory's module in the current folder)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address="local",  # always our own, never another Ray found running on this machine
                 include_dashboard=bool(os.environ.get("LOWRANK_RAY_DASHBOARD")), dashboard_host="127.0.0.1",
                 log_to_driver=False, configure_logging=True, logging_level="warning", runtime_env=hook)
        token = Path.home() / ".ray" / "auth_token"
        if token.is_file() and token.stat().st_uid == os.getuid() and token.stat().st_mode & 0o077:
            token.chmod(0o600)  # Ray writes it world-readable; the token is a key to run code here
    return ray


def _largest(nodes: list[dict]) -> str:
    def most(k, scale=1.0):
        return max((n.get(k, 0) / scale for n in nodes), default=0)
    return f"{most('CPU'):g} CPUs, {most('GPU'):g} GPUs, {most('memory', 2**30):.1f} GiB memory"


def wait_for_a_node(ray_mod, options: dict, res, say, poll: float = 5.0) -> None:
    """A task's request must fit on one node. On a fixed cluster a request no node can serve is
    bad input (``SpecError``, exit 2) instead of a driver waiting forever; with
    ``resources.autoscaling`` the driver asks the autoscaler for such a node and waits at most
    ``resources.schedule_timeout_s`` (then ``SchedulingTimeoutError``, exit 1)."""
    need = {"CPU": options["num_cpus"], "GPU": options.get("num_gpus", 0), "memory": options.get("memory", 0)}
    need = {k: v for k, v in need.items() if v}
    asked = ", ".join(f"{v / 2**30:.1f} GiB memory" if k == "memory" else f"{v:g} {k}s" for k, v in need.items())

    def alive():
        return [n.get("Resources", {}) for n in ray_mod.nodes() if n.get("Alive")]

    def fits(nodes):
        return any(all(n.get(k, 0) >= v for k, v in need.items()) for n in nodes)

    nodes = alive()
    if fits(nodes):
        return
    if not res.autoscaling:
        raise SpecError(f"resources: a task asks for {asked} but no node of the Ray cluster has that (the largest: "
                        f"{_largest(nodes)}); accepted: at most one node's resources, or resources.autoscaling: true "
                        f"on a cluster that adds nodes")
    from ray.autoscaler.sdk import request_resources  # deferred: only an autoscaling cluster needs it

    request_resources(bundles=[need])
    say(f"no node can run a task asking for {asked} yet (largest: {_largest(nodes)}); waiting up to "
        f"{res.schedule_timeout_s:g}s for the autoscaler to add one")
    end = time.monotonic() + res.schedule_timeout_s
    while time.monotonic() < end:
        time.sleep(min(poll, max(end - time.monotonic(), 0)))
        if fits(alive()):
            say("a node that can run the tasks has joined")
            return
    raise SchedulingTimeoutError(f"no node able to run a task asking for {asked} joined within "
                                 f"{res.schedule_timeout_s:g}s (resources.schedule_timeout_s); nothing was computed")


def task_error(e: Exception) -> str:
    """One line for a task that failed after Ray's retries: the task's own exception."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).splitlines()[0] if str(cause) else ""
    return f"{type(cause).__name__}: {text}"


def _nonfinite_outputs(model, input_shape) -> str | None:
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)))
    return None if torch.isfinite(out).all() else "the compressed model's outputs are not finite (NaN or inf)"


class Session:
    """One sweep's Ray work and its logging. ``submit`` queues a task (at most
    ``resources.max_concurrent`` in flight), ``start`` submits at once and returns the ref (with
    ``fetch=False`` for tasks whose refs are arguments of others: their completion is reported
    with ``None``, the data stays in the object store), ``completed`` yields ``(key, result or
    exception)`` as tasks finish, keeping the sweep lock's heartbeat fresh meanwhile."""

    def __init__(self, spec: SweepSpec, tracker: Tracker, parent: str, result: SweepResult, say: Progress):
        self.spec, self.tracker, self.parent, self.result, self.say = spec, tracker, parent, result, say
        self._ray = None
        self._queue: deque = deque()
        self._inflight: dict = {}  # ref -> (key, fetch): unfetched results feed other tasks; only counted
        self._last_beat = time.perf_counter()

    # ------------------------------------------------------------------ Ray
    @property
    def ray(self):
        if self._ray is None:
            t0 = time.perf_counter()
            self._ray = init_ray()
            self.result.timings["ray_init"] = time.perf_counter() - t0
            res = self.spec.resources
            self.result.timings["slots"] = max(1, int(self._ray.cluster_resources().get("CPU", 1) // res.cpus_per_task))
            self.gpu = res.gpus_per_task > 0 and self._ray.cluster_resources().get("GPU", 0) > 0
            if res.gpus_per_task > 0 and not self.gpu:
                self.say("the spec asks for GPUs but the Ray cluster has none: running on CPU")
            self.options = {"num_cpus": res.cpus_per_task, "num_gpus": res.gpus_per_task if self.gpu else 0,
                            "max_retries": 3}
            if res.memory_per_task_gb:
                self.options["memory"] = int(res.memory_per_task_gb * 2**30)
            wait_for_a_node(self._ray, self.options, res, self.say)
        return self._ray

    def env(self, cfg: Config) -> TaskEnv:
        """What the tasks of ``cfg``'s model start from (starts Ray: the GPU flag depends on it)."""
        _ = self.ray
        return TaskEnv(cfg.model.spec, self.spec.dataset, self.spec.seed, self.gpu, cfg.model.prep,
                       self.spec.evaluation == "agreement", self.spec.latency.runtime, self.spec.latency.input_size)

    def remote(self, fn, options: dict | None = None):
        """``fn`` as a Ray task with the tasks' resources (or ``options``), run with as many torch
        threads as it is given CPUs (``with_task_threads``)."""
        return self.ray.remote(with_task_threads(fn)).options(**(options or self.options))

    def put(self, value):
        return self.ray.put(value)

    # ------------------------------------------------------------------ the wait loop
    def start(self, fn, *args, key, fetch: bool = True, options: dict | None = None):
        ref = self.remote(fn, options).remote(*args)
        self._inflight[ref] = (key, fetch)
        self.result.timings.setdefault("first_submit", time.perf_counter())
        return ref

    def submit(self, fn, *args, key, options: dict | None = None) -> None:
        self._queue.append((fn, args, key, options))
        self._pump()

    def _pump(self) -> None:
        limit = self.spec.resources.max_concurrent or 10**9
        while self._queue and len(self._inflight) < limit:
            fn, args, key, options = self._queue.popleft()
            self.start(fn, *args, key=key, options=options)

    def beat(self) -> None:
        if time.perf_counter() - self._last_beat >= HEARTBEAT_SECONDS:
            self.tracker.heartbeat(self.parent)  # the sweep lock: others see this sweep is alive
            self._last_beat = time.perf_counter()

    def completed(self):
        """``(key, result)`` per finished task, in completion order; ``result`` is the task's
        exception when it failed after Ray's retries. New work may be submitted meanwhile."""
        while self._inflight or self._queue:
            self._pump()
            ready, _ = self.ray.wait(list(self._inflight), num_returns=1, timeout=POLL_SECONDS, fetch_local=False)
            self.beat()
            for ref in ready:
                key, fetch = self._inflight.pop(ref)
                if not fetch:
                    yield key, None
                    continue
                self.result.timings["last_result"] = time.perf_counter()
                try:
                    out = self.ray.get(ref)
                except Exception as e:  # noqa: BLE001 - one task failing does not stop the sweep
                    out = e
                if isinstance(key, tuple) and key and key[0] is _TIMING:  # the session's own step
                    self._timed(*key[1:], out)
                    continue
                if not isinstance(out, Exception):
                    self._account(out)
                yield key, out

    def gather(self, calls: list[tuple], options: dict | None = None) -> list:
        """Run ``[(fn, *args), ...]`` as one wave (``options``: Ray's, in place of the tasks'
        own, e.g. ``timing_options()``); results (or exceptions) in order."""
        for i, (fn, *args) in enumerate(calls):
            self.submit(fn, *args, key=("wave", i), options=options)
        out = [None] * len(calls)
        for (_, i), value in self.completed():
            out[i] = value
        return out

    def _account(self, out) -> None:
        get = out.get if isinstance(out, dict) else lambda k, d=None: getattr(out, k, d)
        self.result.timings["task_seconds"] += get("task_seconds", 0.0) or 0.0
        self.result.nodes.add(get("node", "?") or "?")
        if isinstance(out, EvalResult):
            dec = out.decompose_seconds()
            self.result.timings["decompose_seconds"] += dec
            self.result.timings["task_seconds"] += dec
            self.result.nodes.update(s.get("node") for s in out.layer_status if s.get("node"))

    def fail(self, what: str, err: Exception | str) -> None:
        self.result.failed.append(f"{what}: {err if isinstance(err, str) else task_error(err)}")
        self.say(f"FAILED {self.result.failed[-1]}")

    # ------------------------------------------------------------------ results
    def timing_options(self) -> dict:
        """The timing task's request: a whole node's CPUs (the largest node's) with
        ``latency.exclusive``, else the other tasks' CPUs; never a GPU (CPU runtimes)."""
        cpus = self.options["num_cpus"]
        if self.spec.latency.exclusive:
            cpus = max([n["Resources"].get("CPU", 0) for n in self.ray.nodes() if n.get("Alive")] or [cpus])
        return {"num_cpus": cpus, "num_gpus": 0, "max_retries": 1}

    def _time(self, pending: tuple, dense_state: dict) -> None:
        """Queue the dedicated timing step (``tasks.timing``) of a spooled result; the wait loop
        registers the result when it ends (``_timed``)."""
        cfg, base, result, model, _ = pending
        dense = TaskEnv(cfg.model.spec, self.spec.dataset, self.spec.seed, False).build(dense_state)
        layers = [s["name"] for s in result.layer_status if s["status"] == "ok"]
        options = self.timing_options()
        shape = tuple(base["input_shape"])
        also = self.spec.latency.extra_sizes(cfg.model.spec, self.spec.latency.input_size or shape[-1])
        ref = self.remote(timing_task, options).remote(dense, model, shape, self.spec.latency, layers, also)
        self._inflight[ref] = ((_TIMING, pending, options["num_cpus"] / self.options["num_cpus"]), True)

    def _timed(self, pending: tuple, slots_held: float, out) -> None:
        cfg, base, result, model, path = pending
        if isinstance(out, Exception):  # the version is still registered, with the in-task figures
            self.say(f"{cfg.label}: timing failed ({task_error(out)}); tagged with the in-task figures")
            out = {**result.latency, "note": f"timing failed: {task_error(out)}"}
        else:  # work in slot-seconds: the step held slots_held tasks' CPUs
            work = out.get("task_seconds", 0.0) * slots_held
            self.result.timings["timing_seconds"] += work
            self.result.timings["task_seconds"] += work
        result.latency = out
        spool.save(path, base, result)
        self._register(cfg, base, result, model, path)

    def spool_root(self):
        return self.spec.pretrain.cache_dir.parent

    def log(self, cfg: Config, base: Baseline | dict, result: EvalResult, dense_state: dict | None = None) -> bool:
        """Spool the result, time it beside the dense model (``dense_state``: the weights of the
        dense model when ``base`` is not a ``Baseline``; the timing task runs in the wait loop,
        which registers the result when it ends), log it with retries, then drop the spool entry.
        False if MLflow stayed away: the result stays on disk and the next run logs it without
        recomputing (or re-timing)."""
        dense_state = base.state_dict if isinstance(base, Baseline) else dense_state
        base = base.reference() if isinstance(base, Baseline) else base
        path = spool.spool_dir(self.spool_root(), self.spec.name, cfg.config_hash)
        model = TaskEnv(cfg.model.spec, self.spec.dataset, self.spec.seed, False).build()
        model, _ = lowrank.apply_factors(model, result.factors, input_shape=base["input_shape"])
        model.load_state_dict(result.state_dict)
        why = result.refusal(base["params"]) or _nonfinite_outputs(model, base["input_shape"])
        if why:  # a sweep never registers what it did not really compress
            spool.remove(path)
            self.fail(cfg.label, f"not registered: {why}")
            return False
        if not path.exists():
            spool.save(path, base, result)
            if isinstance(dense_state, dict):  # a live result (a replayed one keeps the figures it was spooled with)
                self._time((cfg, base, result, model, path), dense_state)
                return True  # registered when its timing ends
        return self._register(cfg, base, result, model, path)

    def _register(self, cfg: Config, base: dict, result: EvalResult, model, path) -> bool:
        t_log = time.perf_counter()
        try:
            version = with_retries(lambda: self.tracker.log_config(self.parent, cfg, base, result, model),
                                   what=f"logging {cfg.label}", say=self.say)
        except Exception as e:  # noqa: BLE001
            self.fail(cfg.label, f"not logged ({type(e).__name__}); kept in {path}")
            return False
        finally:
            self.result.timings["mlflow"] += time.perf_counter() - t_log
        spool.remove(path)
        self.result.registered += 1
        bad = [s for s in result.layer_status if s["status"] != "ok"]
        slower = [n for n, t in result.latency.get("layers", {}).items() if t["speedup"] < 1]
        if slower:
            self.say(f"{cfg.label}: {len(slower)} factorized layer(s) slower than dense on "
                     f"{result.latency['runtime']} (batch 1, one thread), first {slower[0]}")
        if note := report.finetune_note(result.acc_post, result.acc_bn, result.acc_ft, self.spec.finetune.epochs):
            self.say(f"{cfg.label}: {note}")
        q = report.quality(result.acc_post)
        self.say(f"{cfg.label}: {q} post {result.acc_post['top1']:.3f} ft {result.acc_ft['top1']:.3f}, "
                 f"{base['params'] / result.params:.2f}x params -> {cfg.registered_name} v{version}"
                 + (f" ({len(bad)} layer(s) left dense, first {bad[0]['name']}: "
                    f"{textwrap.shorten(bad[0]['reason'], 100, placeholder='...')})" if bad else ""))
        return True
