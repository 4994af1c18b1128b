"""``python -m jobs submit SPEC --address URL`` and ``python -m jobs status``: thin wrappers over
Ray's job submission client. The submission id is deterministic (sweep name + spec hash), so
submitting the same spec twice while it runs is refused instead of starting a duplicate."""
from __future__ import annotations

import os
import time
from pathlib import Path

from lowrank.allocator import WORKER_SETUP_HOOK

from .spec import SpecError, load_spec, stable_hash

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
EXCLUDES = [".venv", ".git", ".cache", "mlflow.db", "mlruns", "mlartifacts", "**/__pycache__", ".pytest_cache"]


class SubmitError(RuntimeError):
    pass


class RayAuthError(ValueError):
    """The cluster refused the token (or none was given): exit 2, one line."""


def ray_token() -> str | None:
    """The cluster token as Ray itself looks for it: ``RAY_AUTH_TOKEN``, the file named by
    ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if path and Path(path).is_file():
            return Path(path).read_text().strip() or None
    return None


def _client(address: str):
    from ray.job_submission import JobSubmissionClient  # deferred: Ray is heavy; `validate` never needs it

    token = ray_token()
    try:
        return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"} if token else None)
    except Exception as e:  # noqa: BLE001 - connection errors come in many types
        if type(e).__name__ == "AuthenticationError":
            why = "the token was refused" if token else "no token was given"
            raise RayAuthError(f"the Ray dashboard at {address!r} requires token authentication and {why}; set "
                               f"RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) to the cluster's "
                               f"token") from None
        raise SubmitError(f"cannot reach the Ray dashboard at {address!r}: {str(e).splitlines()[0]}") from None


def submit_with_retry(client, *, attempts: int = 8, **kwargs) -> str:
    """Right after `ray start` the dashboard answers before the job agent has registered
    ("No available agent to submit job"): that is retried with backoff, other errors are not."""
    delay = 1.0
    for i in range(attempts):
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e) or i == attempts - 1:
                raise SubmitError(f"job submission failed: {str(e).splitlines()[0]}") from None
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
    raise AssertionError("unreachable")


def submission_id(spec) -> str:
    return f"lowrank-{spec.name}-{stable_hash(spec.model_dump(mode='json'), 8)}"


def submit(spec_path: str, address: str, *, working_dir: str = ".", tracking_uri: str | None = None,
           wait: bool = False, out=print) -> tuple[str, str]:
    spec = load_spec(spec_path)
    wd = Path(working_dir).resolve()
    sp = Path(spec_path).resolve()
    try:
        rel = sp.relative_to(wd)
    except ValueError:
        raise SpecError(f"spec {spec_path!r} must be inside the working dir {str(wd)!r} (it is uploaded with it)") from None
    client = _client(address)
    base = submission_id(spec)
    sid, n = base, 1
    while True:
        try:
            info = client.get_job_info(sid)
        except Exception:  # noqa: BLE001 - not found: the id is free
            break
        if str(info.status) not in TERMINAL and getattr(info.status, "value", None) not in TERMINAL:
            raise SubmitError(f"sweep {spec.name!r} is already submitted as {sid} and is {info.status}; "
                              f"follow it with: ray job logs --follow {sid} --address {address}")
        n += 1
        sid = f"{base}-r{n}"
    entry = f"python -m jobs run {rel.as_posix()}" + (f" --tracking-uri {tracking_uri}" if tracking_uri else "")
    # no secret travels in the job's runtime_env (the dashboard shows it): the cluster's nodes hold
    # the Ray token and the MLflow credentials in their own environment (Kubernetes Secrets)
    runtime_env = {"working_dir": str(wd), "excludes": EXCLUDES, "env_vars": {"PYTHONUNBUFFERED": "1"},
                   "worker_process_setup_hook": WORKER_SETUP_HOOK}  # glibc malloc tuned in every worker
    submit_with_retry(client, entrypoint=entry, submission_id=sid, runtime_env=runtime_env)
    out(f"submitted {sid}: {entry}")
    out(f"follow: ray job logs --follow {sid} --address {address}")
    status = "PENDING"
    if wait:
        while True:
            status = str(client.get_job_status(sid).value)
            if status in TERMINAL:
                break
            time.sleep(2)
        out(client.get_job_logs(sid)[-4000:])
        out(f"{sid}: {status}")
    return sid, status


def status(address: str, sid: str | None = None, out=print) -> list[dict]:
    client = _client(address)
    jobs = [client.get_job_info(sid)] if sid else client.list_jobs()
    rows = []
    for j in jobs:
        st = getattr(j.status, "value", str(j.status))
        rows.append({"id": j.submission_id or j.job_id, "status": st, "entrypoint": j.entrypoint,
                     "start": j.start_time, "end": j.end_time})
    for r in sorted(rows, key=lambda r: r["start"] or 0):
        out(f"{r['id']:<48} {r['status']:<10} {r['entrypoint']}")
    return rows
