"""Reaching the tracking store safely: secrets kept out of what is logged, the server's health
checked before any compute, calls retried while a server is briefly away, and the first access
to a new sqlite store serialised."""
from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import requests  # MLflow's HTTP client library: its errors tell a lost answer (answer_lost)

from .spec import SpecError

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


class TrackingAuthError(ValueError):
    """The MLflow tracking server refused the credentials (bad input: exit 2)."""


SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql")


def check_tracking_uri(uri: str) -> None:
    """The URI's scheme is one MLflow can track to, and a local store's folder can be created."""
    where = f"mlflow.tracking_uri {uri[:120]!r}"
    scheme = urllib.parse.urlsplit(uri).scheme.split("+")[0].lower() if "://" in uri or uri.startswith("file:") else ""
    if scheme and scheme not in SCHEMES:
        raise SpecError(f"{where}: unknown scheme {scheme!r}; accepted: {', '.join(SCHEMES)} or a local folder path")
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///"):
            raise SpecError(f"{where}: a sqlite URI names a file: sqlite:///relative.db or sqlite:////absolute.db")
        folder = Path(uri[len("sqlite:///"):]).parent
    elif scheme in ("", "file"):
        folder = Path(urllib.parse.urlsplit(uri).path if scheme else uri)
    else:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError("not writable")
    except (OSError, ValueError) as e:
        raise SpecError(f"{where}: the local store's folder {str(folder)[:120]!r} cannot be created or written "
                        f"({getattr(e, 'strerror', None) or e})") from None


def _auth_header() -> dict:
    """What MLflow's client sends: basic auth from MLFLOW_TRACKING_USERNAME/PASSWORD, or a bearer token."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    return {}


def check_reachable(tracking_uri: str, attempts: int = 3, timeout: float = 3.0) -> None:
    """For an http(s) tracking URI, the server must answer ``/health`` and accept this process's
    credentials (an authenticated read) before any compute."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    base = tracking_uri.rstrip("/")
    last = ""
    for i in range(attempts):
        try:
            with urllib.request.urlopen(base + "/health", timeout=timeout) as r:
                if r.status == 200:
                    break
                last = f"HTTP {r.status}"
        except (urllib.error.URLError, OSError) as e:
            last = str(getattr(e, "reason", e))
        time.sleep(0.5 * 2**i)
    else:
        raise TrackingUnavailableError(f"MLflow server {tracking_uri} is unreachable ({last}); nothing was started")
    req = urllib.request.Request(base + "/api/2.0/mlflow/experiments/search?max_results=1", headers=_auth_header())
    try:
        urllib.request.urlopen(req, timeout=timeout).close()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            given = "the credentials given were refused" if _auth_header() else "no credentials were given"
            raise TrackingAuthError(
                f"MLflow server {tracking_uri} answered HTTP {e.code}: {given}; set MLFLOW_TRACKING_USERNAME and "
                f"MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN); nothing was started") from None
    except (urllib.error.URLError, OSError):
        pass  # reachable a moment ago: the run's own retries take it from here


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


_LOST = re.compile(r"API request to \S+ failed with (timeout )?exception")


def answer_lost(e: BaseException) -> bool:
    """The request may have reached the server but no answer came back (the connection dropped
    or timed out), as opposed to the server answering with an error: MLflow raises a plain
    ``MlflowException`` for it, raised while handling the ``requests`` error (or, by its wording,
    where that is not kept)."""
    if type(e).__name__ != "MlflowException":
        return False
    inner = e.__cause__ or e.__context__
    return isinstance(inner, (requests.ConnectionError, requests.Timeout)) or bool(_LOST.search(str(e)))


def create_once(create, find, *, attempts: int = 3):
    """``create()`` for a write that must not happen twice. Where the answer was lost (MLflow 3.18
    and later raise; before 3.18 the client re-sent the create, which could land twice or come back
    ``RESOURCE_ALREADY_EXISTS``), or another driver created the same thing first, ``find()`` looks
    for what was made (None: nothing reached the server), and only then is the create sent again."""
    for i in range(attempts):
        try:
            return create()
        except Exception as e:
            exists = getattr(e, "error_code", None) == "RESOURCE_ALREADY_EXISTS"
            if not (exists or answer_lost(e)):
                raise
            found = find()
            if found is not None:
                return found
            if exists or i == attempts - 1:
                raise
            time.sleep(0.5 * 2**i)


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
