"""Faults survived, bad input refused, nothing lost, nothing executed (issue: reliability)."""
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from jobs.cli import main
from jobs.models import CheckpointError, SmallCNN, build_model, load_checkpoint

from .specs import write_spec

TINY = Path(__file__).resolve().parents[1] / "specs" / "tiny.yaml"
ROOT = Path(__file__).resolve().parents[2]


def _spec(tmp_path, mutate=None, name="tiny.yaml"):
    return write_spec(tmp_path, "tiny.yaml", mutate, name)


# ----------------------------------------------------------------------------- security


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_checkpoint_is_refused_and_nothing_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    state = SmallCNN(10).state_dict()
    state["payload"] = _Evil(str(marker))
    torch.save(state, ckpt)  # a pickle that creates a file when unpickled
    with pytest.raises(CheckpointError, match="refused: it holds objects other than tensors"):
        load_checkpoint(SmallCNN(10), ckpt)
    assert not marker.exists()
    spec, _ = _spec(tmp_path, lambda d: d["models"][0].update(checkpoint=str(ckpt)))
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("saved", ["ddp", "lightning", "compiled", "loop"])
def test_checkpoints_as_training_loops_save_them_are_loaded(tmp_path, saved):
    torch.manual_seed(1)
    want = SmallCNN(10).state_dict()
    state = {"ddp": lambda: {f"module.{k}": v for k, v in want.items()},
             "lightning": lambda: {"epoch": 3, "global_step": 90, "hyper_parameters": {"lr": 0.1},
                                   "state_dict": {f"model.{k}": v for k, v in want.items()}},
             "compiled": lambda: {f"_orig_mod.{k}": v for k, v in want.items()},
             "loop": lambda: {"model_state_dict": {f"module.{k}": v for k, v in want.items()},
                              "optimizer_state_dict": {"state": {}, "param_groups": []}, "epoch": 7}}[saved]()
    torch.save(state, tmp_path / "c.pt")
    torch.manual_seed(2)
    got = load_checkpoint(SmallCNN(10), tmp_path / "c.pt").state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    torch.save({"epoch": 3, "weights": want}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="not a state dict of tensors .accepted: a state_dict, or one under"):
        load_checkpoint(SmallCNN(10), tmp_path / "odd.pt")


def test_truncated_and_wrong_architecture_checkpoints(tmp_path, capsys):
    good = tmp_path / "good.pt"
    torch.save(SmallCNN(10).state_dict(), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    spec, _ = _spec(tmp_path, lambda d: d["models"][0].update(checkpoint=str(cut)))
    assert main(["run", str(spec)]) == 2
    assert "is corrupted or truncated" in capsys.readouterr().err

    other = tmp_path / "resnet.pt"
    torch.save(build_model("resnet18", 10).state_dict(), other)
    spec, _ = _spec(tmp_path, lambda d: d["models"][0].update(checkpoint=str(other)))
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "does not fit SmallCNN: missing keys: features.0.weight" in err and "unexpected keys: conv1.weight" in err


def test_fixed_ranks_out_of_range_and_unknown_layers(tmp_path, capsys):
    spec, _ = _spec(tmp_path, lambda d: d["compression"].update(rank={"strategy": "fixed", "rank": 5000}))
    assert main(["run", str(spec)]) == 2
    assert "compression.rank.rank: smallcnn features.3 (tucker2): rank 5000 is above the maximum" in \
        capsys.readouterr().err
    spec, _ = _spec(tmp_path, lambda d: d["compression"].update(
        rank={"strategy": "fixed", "rank": 4, "per_layer": {"features.99": 3}}))
    assert main(["run", str(spec)]) == 2
    assert "compression.rank.per_layer.features.99: no layer of that name in smallcnn" in capsys.readouterr().err


def test_empty_data_folder(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    spec, _ = _spec(tmp_path, lambda d: d.update(dataset={"kind": "imagefolder", "root": str(tmp_path / "images")}))
    assert main(["run", str(spec)]) == 2
    assert "has no usable images" in capsys.readouterr().err


def test_mlflow_server_unreachable_at_start(tmp_path, capsys):
    spec, _ = _spec(tmp_path)
    t0 = time.time()
    assert main(["run", str(spec), "--tracking-uri", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert "MLflow server http://127.0.0.1:9 is unreachable" in err and "nothing was started" in err
    assert time.time() - t0 < 30 and not (tmp_path / "cache").exists()


def test_local_ray_binds_loopback_and_requires_its_token(tmp_path):
    """The embedded run's own Ray: dashboard on 127.0.0.1 only, token authentication on with no
    set-up (Ray generates the token once; we keep it readable by its owner only); its workers
    start with glibc's malloc tuned (the setup hook)."""
    code = ("import os, urllib.request\nos.environ['LOWRANK_RAY_DASHBOARD'] = '1'\n"
            "from jobs.runtime import init_ray\nray = init_ray()\n"
            "url = ray._private.worker.global_worker.node.address_info['webui_url']\nprint('URL', url)\n"
            "token = open(os.path.expanduser('~/.ray/auth_token')).read().strip()\n"
            "for header in ({}, {'Authorization': 'Bearer ' + token}):\n"
            "    try:\n"
            "        print('HTTP', urllib.request.urlopen(urllib.request.Request('http://' + url + '/api/version', "
            "headers=header)).status)\n"
            "    except urllib.error.HTTPError as e:\n"
            "        print('HTTP', e.code)\n"
            "print('TASK', ray.get(ray.remote(lambda: 7).remote()))\n"
            "from lowrank.allocator import allocator_tuned\n"
            "print('TUNED', ray.get(ray.remote(allocator_tuned).remote()))\nray.shutdown()")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=180,
                         env={**env, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    url = out.stdout.split("URL ", 1)[1].split()[0]
    assert url.startswith("127.0.0.1:"), url
    assert out.stdout.count("HTTP ") == 2 and "HTTP 401" in out.stdout and "HTTP 200" in out.stdout, out.stdout
    assert "TASK 7" in out.stdout
    if platform.libc_ver()[0] == "glibc":
        assert "TUNED True" in out.stdout, out.stdout
    assert (tmp_path / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600
    assert "Token authentication is enabled" not in out.stderr  # Ray's notice is not shown to the user


# ----------------------------------------------------------------------------- faults (real Ray)


def test_failed_layer_is_recorded_and_the_rest_goes_on_and_secrets_stay_out(tmp_path, ray_start_2_cpus,
                                                                             monkeypatch, capsys):
    # a layer that cannot be decomposed is data (status + reason), not a raise: the real task function
    import lowrank
    from jobs.tasks.compress import decompose_task

    model = SmallCNN(10)
    with torch.no_grad():
        model.features[6].weight[0, 0, 0, 0] = float("nan")  # (a NaN checkpoint is refused before: test_bad_input)
    rule = lowrank.RankRule.of("ratio", ratio=2.0)
    bad = decompose_task(lowrank.LayerPlan("features.6", "tucker2", rule, {}), model.features[6], False)
    good = decompose_task(lowrank.LayerPlan("features.9", "tucker2", rule, {}), model.features[9], False)
    assert bad.status == "failed" and "non-finite" in bad.reason and bad.factors is None
    assert good.status == "ok" and good.factors is not None

    monkeypatch.setenv("DB_PASSWORD", "pw-zzz-1234567")
    spec, data = _spec(tmp_path, lambda d: (d["compression"].update(methods=["tucker2"], options={}),
                                            d["finetune"].update(epochs=0),
                                            d["mlflow"].update(experiment="exp-pw-zzz-1234567")))
    assert main(["run", str(spec)]) == 0
    capsys.readouterr()
    from mlflow import MlflowClient

    client = MlflowClient(data["mlflow"]["tracking_uri"])
    [v] = client.search_model_versions("name='lowrank-smallcnn'")
    run = client.get_run(v.tags["run_id"])
    import pyarrow.parquet as pq

    table = pq.read_table(client.download_artifacts(run.info.run_id, "layers/layers.parquet", str(tmp_path))).to_pydict()
    assert table["status"].count("ok") == 4
    # no secret in params, tags or the logged spec
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    spec_json = Path(client.download_artifacts(parent.info.run_id, "spec.json", str(tmp_path))).read_text()
    everything = json.dumps([run.data.params, run.data.tags, parent.data.params, parent.data.tags, v.tags]) + spec_json
    assert "pw-zzz-1234567" not in everything


def test_worker_killed_mid_task_is_retried(tmp_path, ray_start_2_cpus, capsys):
    from ray.util.state import list_tasks, list_workers

    spec, data = _spec(tmp_path, lambda d: d["finetune"].update(epochs=3))
    killed, done = [], threading.Event()

    def killer():  # watches until the sweep ends, however slow a loaded machine makes it get there
        while not done.is_set() and not killed:
            try:
                tasks = list_tasks(filters=[("name", "=", "evaluate_task"), ("state", "=", "RUNNING")], timeout=5)
            except Exception:  # noqa: BLE001
                tasks = []
            for t in tasks:
                workers = {w.worker_id: w.pid for w in list_workers(timeout=5)}
                pid = workers.get(t.worker_id)
                if pid:
                    time.sleep(1.0)  # let it get into fine-tuning
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    break
            time.sleep(0.3)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    try:
        assert main(["run", str(spec)]) == 0
    finally:
        done.set()
    th.join(timeout=30)
    assert killed, "no evaluate_task was caught running"
    from mlflow import MlflowClient

    versions = MlflowClient(data["mlflow"]["tracking_uri"]).search_model_versions("name='lowrank-smallcnn'")
    assert sorted(v.tags["method"] for v in versions) == ["cp3-epc", "tucker2"]  # exactly one per configuration
    assert "2 version(s) registered now" in capsys.readouterr().out


def _registered_versions(db: Path) -> list:
    import sqlite3

    if not db.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT version FROM model_versions WHERE name = 'lowrank-smallcnn'").fetchall()
        finally:
            con.close()
    except sqlite3.Error:  # not created yet, or locked by a writer
        return []


def test_driver_killed_mid_sweep_resumes_without_loss(tmp_path):
    spec, data = _spec(tmp_path, lambda d: d["compression"].update(methods=["tucker2", "cp3-epc", "spatial-svd"]))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    from mlflow import MlflowClient

    proc = subprocess.Popen([sys.executable, "-m", "jobs", "run", str(spec)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    uri = data["mlflow"]["tracking_uri"]
    end = time.time() + 600  # the first version comes at ~100 s on a quiet 2-core machine, past 300 s under load
    first = []
    while time.time() < end and proc.poll() is None:
        time.sleep(1)
        # read the store without opening it through MLflow: an MlflowClient on a sqlite store that the
        # driver is still creating would run the schema migrations a second time, concurrently
        first = _registered_versions(tmp_path / "mlflow.db")
        if first:
            break
    if not (first and proc.poll() is None):
        proc.kill()
        pytest.fail("the sweep could not be interrupted mid-way: " + (proc.stdout.read() or "")[-3000:])
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray, mid-sweep
    proc.wait(timeout=30)
    done_before = {v.tags["config_hash"] for v in MlflowClient(uri).search_model_versions("name='lowrank-smallcnn'")}

    out = subprocess.run([sys.executable, "-m", "jobs", "run", str(spec)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "marked 1 interrupted run(s)" in out.stdout
    client = MlflowClient(uri)
    versions = client.search_model_versions("name='lowrank-smallcnn'")
    hashes = [v.tags["config_hash"] for v in versions]
    assert len(hashes) == len(set(hashes)) == 3  # every configuration once, nothing duplicated
    assert done_before <= set(hashes)  # nothing already logged was lost
    parents = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], "tags.kind = 'sweep'")
    assert sorted(p.info.status for p in parents) == ["FAILED", "FINISHED"]
    assert not any(r.info.status == "RUNNING" for r in client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id], ""))


def test_node_removed_mid_sweep(tmp_path):
    spec, data = _spec(tmp_path, lambda d: d["finetune"].update(epochs=3))
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("node_loss_sweep.py")), str(spec)],
                         cwd=tmp_path, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    res = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert res["removed_at"], "the worker node was never removed"
    assert res["registered"] == 2 and not res["failed"]
    from mlflow import MlflowClient

    versions = MlflowClient(data["mlflow"]["tracking_uri"]).search_model_versions("name='lowrank-smallcnn'")
    assert sorted(v.tags["method"] for v in versions) == ["cp3-epc", "tucker2"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_mlflow_server(store: Path, port: int):
    """A real ``mlflow server`` on ``port`` over a sqlite store in ``store`` (its own process group)."""
    store.mkdir(exist_ok=True)
    return subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
                             "--artifacts-destination", str(store / "artifacts"), "--workers", "1"],
                            cwd=store, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_up(uri: str) -> None:
    import urllib.request

    for _ in range(120):
        try:
            urllib.request.urlopen(uri + "/health", timeout=1)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("mlflow server did not start")


def test_mlflow_server_away_mid_sweep(tmp_path, ray_start_2_cpus, capsys):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    store = tmp_path / "server"

    def start_server():
        return _start_mlflow_server(store, port)

    def wait_up():
        _wait_up(uri)

    server = start_server()
    wait_up()
    spec, _ = _spec(tmp_path, lambda d: d["compression"].update(methods=["tucker2", "cp3-epc", "spatial-svd"]))
    outage = []

    def outage_after_first_version():
        from mlflow import MlflowClient

        nonlocal server
        end = time.time() + 600  # as above: the first version can take minutes on a loaded machine
        while time.time() < end:
            try:
                if MlflowClient(uri).search_model_versions("name='lowrank-smallcnn'"):
                    break
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.5)
        os.killpg(server.pid, signal.SIGKILL)  # the server goes away ...
        server.wait()
        outage.append(time.time())
        time.sleep(6)
        server = start_server()  # ... and comes back on the same port and store
        outage.append(time.time())

    th = threading.Thread(target=outage_after_first_version, daemon=True)
    th.start()
    try:
        code = main(["run", str(spec), "--tracking-uri", uri])
        th.join(timeout=60)
        assert len(outage) == 2, "the outage never happened"
        assert code == 0, capsys.readouterr().out[-3000:]
        from mlflow import MlflowClient

        versions = MlflowClient(uri).search_model_versions("name='lowrank-smallcnn'")
        hashes = [v.tags["config_hash"] for v in versions]
        assert len(hashes) == len(set(hashes)) == 3
        assert not list((tmp_path / "cache" / "spool").rglob("result.json"))  # nothing left unlogged
    finally:
        os.killpg(server.pid, signal.SIGTERM)


def _one_result(tmp_path):
    """One tucker2 configuration of the tiny spec and a made-up result for it, ready for
    ``Tracker.log_config``: ``(cfg, base, result, model, spec data)``."""
    from jobs.plan import plan_sweep
    from jobs.results import EvalResult
    from jobs.spec import load_spec

    spec_path, data = _spec(tmp_path, lambda d: d["compression"].update(methods=["tucker2"], options={}))
    [cfg] = plan_sweep(load_spec(spec_path))
    model = SmallCNN(10).eval()
    params = sum(p.numel() for p in model.parameters())
    base = {"acc": {"top1": 0.9}, "params": 2 * params, "macs": 2, "latency": {"b1": 1e-3, "b32": 1e-2},
            "input_shape": (3, 16, 16), "source": "checkpoint"}
    result = EvalResult(state_dict=model.state_dict(), factors={}, acc_post={"top1": 0.5}, acc_ft={"top1": 0.8},
                        params=params, macs=1, latency={"b1": 1e-3, "b32": 1e-2}, reports=[], layer_status=[])
    return cfg, base, result, model, data


def test_a_retried_write_never_registers_a_configuration_twice(tmp_path):
    """The server can go away after it registered a version but before the answer arrived; the
    retry then finds the version by its config_hash (seen once in the suite as a duplicate)."""
    from mlflow import MlflowClient

    from jobs.tracking import Tracker

    cfg, base, result, model, data = _one_result(tmp_path)
    tracker = Tracker(data["mlflow"]["tracking_uri"], data["mlflow"]["experiment"])
    parent = tracker.start_parent(cfg.sweep, {})
    first = tracker.log_config(parent, cfg, base, result, model)
    assert tracker.log_config(parent, cfg, base, result, model) == first  # the retry
    versions = MlflowClient(data["mlflow"]["tracking_uri"]).search_model_versions("name='lowrank-smallcnn'")
    assert [str(v.version) for v in versions] == [first]


def test_copies_left_by_an_older_runner_resolve_to_the_earliest_version(tmp_path):
    """A store where an earlier runner left two versions of one configuration: the driver's
    already-registered map and the retry path both name the earliest, and the copy goes."""
    from mlflow import MlflowClient

    from jobs.tracking import Tracker

    cfg, base, result, model, data = _one_result(tmp_path)
    tracker = Tracker(data["mlflow"]["tracking_uri"], data["mlflow"]["experiment"])
    parent = tracker.start_parent(cfg.sweep, {})
    first = tracker.log_config(parent, cfg, base, result, model)
    client = MlflowClient(data["mlflow"]["tracking_uri"])
    [v1] = client.search_model_versions(f"name='{cfg.registered_name}'")
    copy = client.create_model_version(cfg.registered_name, v1.source, run_id=v1.run_id,
                                       tags={"config_hash": cfg.config_hash})
    assert str(copy.version) != first
    assert tracker.registered_hashes(cfg.registered_name) == {cfg.config_hash: first}
    assert tracker.log_config(parent, cfg, base, result, model) == first
    assert [str(v.version) for v in client.search_model_versions(f"name='{cfg.registered_name}'")] == [first]


class _AnswerLosingProxy:
    """An HTTP proxy in front of a real MLflow server that forwards the first request whose path
    ends with ``suffix`` and then hangs up instead of answering, as a server that goes away right
    after it committed does. MLflow's client before 3.18 re-sends it (urllib3 ``Retry`` on every
    method); from 3.18 the client raises and the tracker has to find what the create made."""

    def __init__(self, upstream_port: int, suffix: str):
        import http.client
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        proxy = self
        self.forwarded: list[str] = []
        self.dropped = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                proxy.forwarded.append(self.path.split("?")[0])
                if self.path.split("?")[0].endswith(suffix) and not proxy.dropped:
                    proxy.dropped += 1  # committed upstream; the answer never reaches the client
                    self.close_connection = True
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@contextlib.contextmanager
def _lossy_server(tmp_path, suffix: str):
    """A real MLflow server and an ``_AnswerLosingProxy`` in front of it: (server URI, proxy)."""
    port = _free_port()
    server = _start_mlflow_server(tmp_path / "server", port)
    proxy = None
    try:
        _wait_up(f"http://127.0.0.1:{port}")
        proxy = _AnswerLosingProxy(port, suffix)
        yield f"http://127.0.0.1:{port}", proxy
    finally:
        if proxy:
            proxy.close()
        os.killpg(server.pid, signal.SIGTERM)


def test_a_create_whose_answer_is_lost_and_resent_by_mlflow_leaves_one_version(tmp_path):
    """Seen in the suite under load: the server committed a ``model-versions/create`` and went away
    before answering. MLflow's client before 3.18 re-sent it inside the one ``register_model`` call
    (two versions: the tracker keeps the earliest and deletes the copy); from 3.18 the call raises
    and the tracker finds the version the create made instead of registering another."""
    from mlflow import MlflowClient

    from jobs.tracking import Tracker

    with _lossy_server(tmp_path, "/model-versions/create") as (uri, proxy):
        cfg, base, result, model, _ = _one_result(tmp_path)
        tracker = Tracker(f"http://127.0.0.1:{proxy.port}", "lossy")
        version = tracker.log_config(tracker.start_parent(cfg.sweep, {}), cfg, base, result, model)
        creates = [p for p in proxy.forwarded if p.endswith("/model-versions/create")]
        assert proxy.dropped == 1 and len(creates) in (1, 2), creates  # the fault happened
        client = MlflowClient(uri)
        versions = client.search_model_versions(f"name='{cfg.registered_name}'")
        assert [(str(v.version), v.tags["config_hash"]) for v in versions] == [(version, cfg.config_hash)]
        assert version == "1"  # the earliest copy is the one kept
        assert client.get_run(versions[0].run_id).info.status == "FINISHED"


def test_a_resent_parent_create_is_not_taken_for_a_second_driver(tmp_path):
    """A lost answer to ``runs/create`` for the sweep's parent run: MLflow's client before 3.18
    created it twice, and from 3.18 raises. Either way the driver goes on with one RUNNING parent
    and does not refuse its own sweep as "started at the same time" elsewhere."""
    from mlflow import MlflowClient

    from jobs.tracking import Tracker

    with _lossy_server(tmp_path, "/runs/create") as (uri, proxy):
        tracker = Tracker(f"http://127.0.0.1:{proxy.port}", "lossy")
        rid = tracker.start_parent("s", {})
        sent = proxy.forwarded.count("/api/2.0/mlflow/runs/create")
        assert proxy.dropped == 1 and sent in (1, 2), proxy.forwarded
        runs = MlflowClient(uri).search_runs([tracker.experiment_id], "tags.kind = 'sweep'")
        status = {r.info.run_id: r.info.status for r in runs}
        assert status.pop(rid) == "RUNNING"
        assert list(status.values()) == ["KILLED"] * (sent - 1)  # a re-sent copy is KILLED


def test_an_experiment_whose_create_answer_is_lost_is_found(tmp_path):
    from mlflow import MlflowClient

    from jobs.tracking import Tracker

    with _lossy_server(tmp_path, "/experiments/create") as (uri, proxy):
        tracker = Tracker(f"http://127.0.0.1:{proxy.port}", "lossy")
        assert proxy.dropped == 1
        assert [e.experiment_id for e in MlflowClient(uri).search_experiments() if e.name == "lossy"] == \
            [tracker.experiment_id]


def test_a_config_run_whose_create_answer_is_lost_is_found_not_made_twice(tmp_path):
    """The same for a configuration's own run: one FINISHED run carries the version; a re-sent
    copy (MLflow before 3.18) ends FAILED, superseded."""
    from mlflow import MlflowClient

    from jobs.tracking import Tracker

    with _lossy_server(tmp_path, "/runs/create") as (uri, proxy):
        parent = Tracker(uri, "lossy").start_parent("s", {})  # past the proxy: its first runs/create is the config's
        cfg, base, result, model, _ = _one_result(tmp_path)
        tracker = Tracker(f"http://127.0.0.1:{proxy.port}", "lossy")
        version = tracker.log_config(parent, cfg, base, result, model)
        sent = proxy.forwarded.count("/api/2.0/mlflow/runs/create")
        assert proxy.dropped == 1 and sent in (1, 2), proxy.forwarded
        client = MlflowClient(uri)
        runs = client.search_runs([tracker.experiment_id],
                                  f"tags.config_hash = '{cfg.config_hash}' and tags.kind = 'config'")
        assert sorted(r.info.status for r in runs) == ["FAILED"] * (sent - 1) + ["FINISHED"]
        [v] = client.search_model_versions(f"name='{cfg.registered_name}'")
        assert str(v.version) == version and client.get_run(v.run_id).info.status == "FINISHED"
