"""End to end with real processes on this machine, secured as on a cluster: `ray start --head`
(dashboard on 127.0.0.1) plus a second worker node with its own --temp-dir, both with Ray token
authentication; an `mlflow server --app-name basic-auth` on 127.0.0.1 whose accounts (a runner
that writes, a reader that browses) are made by `jobs.accounts`; then `ray job submit
--working-dir . -- python -m jobs run tests/specs/tiny.yaml` and the project's own `python -m jobs
submit` / `status`, with the token and without. The nodes hold the runner's MLflow credentials in
their environment, as the pods do from a Secret. Everything started here is stopped here.

These tests run before tests/jobs (whose session Ray starts lazily): teardown uses `ray stop`.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# .ci/run starts Debian's PostgreSQL where available and passes its URI; sqlite otherwise
BACKEND = os.environ.get("LOWRANK_TEST_PG_URI")


def _free_port(lo=20000, hi=29999):
    """A free port outside Ray's default worker-port range (10002-19999)."""
    for port in range(lo + os.getpid() % 5000, hi):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


TOKEN = "lowrank-test-" + os.urandom(12).hex()
ADMIN, RUNNER, READER = ("admin", "admin-pw-" + os.urandom(6).hex()), ("runner", "run-pw-" + os.urandom(6).hex()), \
    ("reader", "read-pw-" + os.urandom(6).hex())


def _env(**extra):
    """The environment of whoever holds the cluster's token (the nodes, a submitter)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_TRACKING_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1", **extra})
    return env


def _wait_http(url, timeout=60, headers=None):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def _wait_job_agent(address, timeout=120):
    """The dashboard answers before the head's job agent is ready: wait until a trivial job runs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from jobs.submit import submit_with_retry

    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {TOKEN}"})
    sid = submit_with_retry(client, entrypoint="python -c pass", attempts=12)
    end = time.time() + timeout
    while time.time() < end:
        if client.get_job_status(sid) in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            assert client.get_job_status(sid) == JobStatus.SUCCEEDED, client.get_job_logs(sid)
            return
        time.sleep(1)
    raise TimeoutError("the warm-up job did not finish")


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("ray CLI not installed in this environment")
    tmp = Path(tempfile.mkdtemp(prefix="lr-", dir="/tmp"))
    # the nodes' environment: the Ray token and the runner's MLflow service account
    env = _env(MLFLOW_TRACKING_USERNAME=RUNNER[0], MLFLOW_TRACKING_PASSWORD=RUNNER[1], HOME=str(tmp))  # short: Ray's socket paths are length-limited
    gcs, dash, client = _free_port(), _free_port(21000), _free_port(22000)
    mlf = _free_port(23000)
    procs = []
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                        "--num-cpus=1", f"--temp-dir={tmp}/h", "--include-dashboard=true", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1",
                        "--num-cpus=1", f"--temp-dir={tmp}/w", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, timeout=120)
        (tmp / "mlflow").mkdir()
        ini = tmp / "mlflow" / "basic_auth.ini"
        ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp}/mlflow/auth.db\n"
                       f"admin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        server_env = {**_env(), "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex(),
                      "MLFLOW_BACKEND_STORE_URI": BACKEND or f"sqlite:///{tmp}/mlflow/mlflow.db"}  # no secret in argv
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(mlf),
             "--artifacts-destination", str(tmp / "mlflow" / "artifacts"), "--workers", "1"],
            env=server_env, cwd=tmp / "mlflow", stdout=open(tmp / "mlflow.log", "w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        procs.append(server)
        _wait_http(f"http://127.0.0.1:{mlf}/health")
        from jobs.accounts import ensure_accounts

        assert ensure_accounts(f"http://127.0.0.1:{mlf}", ADMIN, dict([RUNNER, READER])) == \
            ["created runner", "created reader"]
        _wait_http(f"http://127.0.0.1:{dash}/api/version", headers={"Authorization": f"Bearer {TOKEN}"})
        _wait_job_agent(f"http://127.0.0.1:{dash}")
        yield {"dashboard": f"http://127.0.0.1:{dash}", "mlflow": f"http://127.0.0.1:{mlf}", "env": env, "tmp": tmp}
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)


def test_ray_job_submit_end_to_end(cluster, monkeypatch):
    out = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--working-dir", ".", "--",
         "python", "-m", "jobs", "run", "tests/specs/tiny.yaml", "--tracking-uri", cluster["mlflow"]],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout + out.stderr
    assert "2 version(s) registered now" in out.stdout

    import mlflow
    from mlflow import MlflowClient

    from jobs.tracking import MODEL_TAGS

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", READER[0])  # people browse with read-only accounts
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", READER[1])
    client = MlflowClient(cluster["mlflow"])
    versions = client.search_model_versions("name='lowrank-smallcnn'")
    assert sorted(v.tags["method"] for v in versions) == ["cp3-epc", "tucker2"]
    assert all(set(MODEL_TAGS) <= set(v.tags) for v in versions)
    parent = client.search_runs([versions[0].tags and client.get_run(versions[0].tags["run_id"]).info.experiment_id],
                                "tags.kind = 'sweep'")[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["ray_nodes"] == 2  # tasks ran on both nodes
    print(f"MLflow backend: {'PostgreSQL' if BACKEND else 'sqlite'}")
    # artifacts are readable through the server (proxied), and the model runs
    run_id = versions[0].tags["run_id"]
    local = client.download_artifacts(run_id, "layers/layers.parquet", str(cluster["tmp"]))
    assert Path(local).stat().st_size > 0
    mlflow.set_tracking_uri(cluster["mlflow"])
    import torch

    model = mlflow.pytorch.load_model("models:/lowrank-smallcnn@candidate")
    assert model(torch.zeros(3, 3, 16, 16)).shape == (3, 10)
    with pytest.raises(mlflow.exceptions.MlflowException, match="Permission denied|PERMISSION_DENIED|403"):
        client.delete_model_version("lowrank-smallcnn", versions[0].version)  # a reader cannot delete
    assert len(client.search_model_versions("name='lowrank-smallcnn'")) == 2
    # the runner owns what it registered; the versions record who wrote them
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(mlflow.exceptions.MlflowException):
        MlflowClient(cluster["mlflow"]).search_model_versions("name='lowrank-smallcnn'")  # no anonymous reads


def test_jobs_submit_wrapper_and_status(cluster):
    env = _env()
    out = subprocess.run([sys.executable, "-m", "jobs", "submit", "tests/specs/tiny.yaml", "--address",
                          cluster["dashboard"], "--tracking-uri", cluster["mlflow"], "--wait"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "SUCCEEDED" in out.stdout
    assert "0 version(s) registered now, 2 already registered" in out.stdout  # idempotent re-run
    sid = out.stdout.split("submitted ", 1)[1].split(":", 1)[0]
    assert sid.startswith("lowrank-tiny-")
    st = subprocess.run([sys.executable, "-m", "jobs", "status", "--address", cluster["dashboard"]],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert st.returncode == 0 and sid in st.stdout and "SUCCEEDED" in st.stdout
    # the same spec submitted again while nothing runs gets the next deterministic id
    again = subprocess.run([sys.executable, "-m", "jobs", "submit", "tests/specs/tiny.yaml", "--address",
                            cluster["dashboard"], "--tracking-uri", cluster["mlflow"]],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"submitted {sid}-r2" in again.stdout, again.stdout + again.stderr


def test_submit_and_status_without_the_token_are_refused_in_one_line(cluster):
    no_token = {k: v for k, v in _env(HOME=str(cluster["tmp"] / "nohome")).items() if k != "RAY_AUTH_TOKEN"}
    for env, argv, why in ((no_token, ["submit", "tests/specs/tiny.yaml"], "no token was given"),
                           (_env(RAY_AUTH_TOKEN="not-the-token"), ["status"], "the token was refused")):
        out = subprocess.run([sys.executable, "-m", "jobs", *argv, "--address", cluster["dashboard"]], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stdout + out.stderr
        assert out.stderr.count("\n") == 1 and f"requires token authentication and {why}" in out.stderr, out.stderr
    st = subprocess.run([sys.executable, "-m", "jobs", "status", "--address", cluster["dashboard"]], cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=120)
    assert st.returncode == 0 and "SUCCEEDED" in st.stdout  # with it: answered (the warm-up job at least)


def test_runner_with_wrong_mlflow_credentials_stops_before_any_compute(cluster, tmp_path, monkeypatch):
    spec = tmp_path / "tiny.yaml"
    spec.write_text((ROOT / "tests" / "specs" / "tiny.yaml").read_text().replace(
        ".cache/pretrained", str(tmp_path / "cache")))
    out = subprocess.run([sys.executable, "-m", "jobs", "run", str(spec), "--tracking-uri", cluster["mlflow"]],
                         cwd=ROOT, env={**_env(), "MLFLOW_TRACKING_USERNAME": RUNNER[0],
                                        "MLFLOW_TRACKING_PASSWORD": "wrong"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.count("\n") == 1 and "HTTP 401: the credentials given were refused" in out.stderr, out.stderr
    assert not (tmp_path / "cache").exists()  # nothing was computed
    from jobs.store import TrackingAuthError, check_reachable

    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(TrackingAuthError, match="HTTP 401: no credentials were given"):
        check_reachable(cluster["mlflow"])
