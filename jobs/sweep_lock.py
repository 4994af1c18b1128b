"""The sweep lock, on MLflow runs: a RUNNING parent run with a fresh ``heartbeat`` tag means the
sweep runs elsewhere. ``SweepLock`` is mixed into ``tracking.Tracker`` (it uses its ``client`` and
``experiment_id``); only the driver's side calls it."""
from __future__ import annotations

import json
import os
import socket
import time
import uuid

from .store import create_once, redact

LOCK_TTL_SECONDS = float(os.environ.get("LOWRANK_LOCK_TTL", "180"))
HEARTBEAT_SECONDS = 20.0


class SweepRunningError(RuntimeError):
    """The same sweep is running elsewhere (its parent run has a fresh heartbeat)."""


def _hostname() -> str:
    return socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SweepLock:
    """The lock's half of ``tracking.Tracker``: needs ``self.client`` (an ``MlflowClient``) and
    ``self.experiment_id``."""

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
        run = self.create_run(f"{sweep}-{time.strftime('%Y%m%d-%H%M%S')}",
                              {"sweep": sweep, "kind": "sweep", "heartbeat": f"{time.time():.3f}",
                               "driver": f"{_hostname()}:{os.getpid()}"})
        rid = run.info.run_id
        me = run.data.tags["driver"]
        fresh = [r for r in self._running_parents(sweep) if self._heartbeat_age(r) < LOCK_TTL_SECONDS]
        for r in [r for r in fresh if r.info.run_id != rid and r.data.tags.get("driver") == me]:
            # our own create, re-sent by MLflow's client (before 3.18) after its answer was lost
            self.client.set_tag(r.info.run_id, "failure", f"duplicate of {rid} (a re-sent create)")
            self.client.set_terminated(r.info.run_id, status="KILLED")
            fresh.remove(r)
        # two drivers that started at the same moment: the earlier run keeps the lock
        first = min(fresh, key=lambda r: (r.info.start_time, r.info.run_id))
        if first.info.run_id != rid:
            self.client.set_terminated(rid, status="KILLED")
            raise SweepRunningError(f"sweep {sweep!r} was started at the same time by "
                                    f"{first.data.tags.get('driver', 'another driver')}; not starting a second copy")
        safe = redact(spec_dict)
        self.client.log_text(rid, json.dumps(safe, indent=2, default=str), "spec.json")
        return rid

    def create_run(self, run_name: str, tags: dict):
        """``MlflowClient.create_run`` that makes one run even where the server's answer is lost:
        the run is created with a unique ``attempt`` tag, by which ``create_once`` finds what it
        made; the tag is then deleted, so that the runs users browse carry only their own tags
        (where that delete fails, the tag stays: harmless)."""
        tags = {**tags, "attempt": uuid.uuid4().hex}

        def made():
            runs = self.client.search_runs([self.experiment_id], f"tags.attempt = '{tags['attempt']}'")
            return runs[0] if runs else None

        run = create_once(lambda: self.client.create_run(self.experiment_id, run_name=run_name, tags=tags), made)
        try:
            self.client.delete_tag(run.info.run_id, "attempt")
        except Exception:  # noqa: BLE001 - the key has done its work; one left behind changes nothing
            pass
        return run

    def heartbeat(self, run_id: str) -> None:
        self.client.set_tag(run_id, "heartbeat", f"{time.time():.3f}")

