"""Reaching the tracking store safely: secrets kept out of what is logged, the server's health
checked before any compute, calls retried while a server is briefly away, and the first access
to a new sqlite store serialised."""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

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


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking server cannot be reached."""


def check_reachable(tracking_uri: str, attempts: int = 3, timeout: float = 3.0) -> None:
    """For an http(s) tracking URI, the server must answer ``/health`` before any compute."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
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
def sqlite_init_lock(tracking_uri: str):
    """Two drivers opening one new sqlite store at once would both run MLflow's schema
    migrations and one fails (``table _alembic_tmp_... already exists``): serialise the first
    access with a lock file beside the database. Other stores handle this themselves."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    db = Path(tracking_uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
