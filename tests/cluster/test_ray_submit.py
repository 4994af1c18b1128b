"""End to end with real processes on this machine: `ray start --head` (dashboard on 127.0.0.1)
plus a second worker node with its own --temp-dir, an `mlflow server` on 127.0.0.1, then
`ray job submit --working-dir . -- python -m jobs run tests/specs/tiny.yaml` and the project's own
`python -m jobs submit` / `status`. Everything started here is stopped here.

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


def _env():
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _wait_http(url, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def _wait_job_agent(address, timeout=120):
    """The dashboard answers before the head's job agent is ready: wait until a trivial job runs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from jobs.submit import submit_with_retry

    client = JobSubmissionClient(address)
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
    env = _env()
    tmp = Path(tempfile.mkdtemp(prefix="lr-", dir="/tmp"))  # short: Ray's socket paths are length-limited
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
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlf),
             "--backend-store-uri", BACKEND or f"sqlite:///{tmp}/mlflow/mlflow.db",
             "--artifacts-destination", str(tmp / "mlflow" / "artifacts"), "--workers", "1"],
            env=env, cwd=tmp / "mlflow", stdout=open(tmp / "mlflow.log", "w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        procs.append(server)
        _wait_http(f"http://127.0.0.1:{mlf}/health")
        _wait_http(f"http://127.0.0.1:{dash}/api/version")
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


def test_ray_job_submit_end_to_end(cluster):
    out = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--working-dir", ".", "--",
         "python", "-m", "jobs", "run", "tests/specs/tiny.yaml", "--tracking-uri", cluster["mlflow"]],
        cwd=ROOT, env=cluster["env"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout + out.stderr
    assert "2 version(s) registered now" in out.stdout

    import mlflow
    from mlflow import MlflowClient

    from jobs.tracking import MODEL_TAGS

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


def test_jobs_submit_wrapper_and_status(cluster):
    env = cluster["env"]
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
