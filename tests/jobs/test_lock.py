"""The sweep lock: a sweep whose parent run has a fresh heartbeat is not started twice; a stale
one (driver killed) is marked FAILED and the sweep resumes."""
from pathlib import Path

import pytest
import yaml

from jobs.cli import main

from .specs import write_spec
from jobs.tracking import SweepRunningError, Tracker

TINY = Path(__file__).resolve().parents[1] / "specs" / "tiny.yaml"


def _spec(tmp_path, **mlflow):
    return write_spec(tmp_path, mutate=lambda d: d["mlflow"].update(mlflow))


def test_running_sweep_is_refused_with_exit_3_before_any_work(tmp_path, capsys):
    spec, data = _spec(tmp_path)
    tracker = Tracker(data["mlflow"]["tracking_uri"], data["mlflow"]["experiment"])
    other = tracker.start_parent("tiny", {"name": "tiny"})  # another driver, alive
    assert main(["run", str(spec)]) == 3
    err = capsys.readouterr().err
    assert "sweep 'tiny' is already running" in err and other in err
    assert not (tmp_path / ".cache").exists()
    with pytest.raises(SweepRunningError):
        tracker.fail_stale_parents("tiny")


def test_runs_carry_no_idempotency_key_once_created(tmp_path):
    """``attempt`` finds a run whose create lost its answer; once the run exists it is deleted, so
    that the MLflow UI shows only the runs' own tags."""
    spec, data = _spec(tmp_path)
    tracker = Tracker(data["mlflow"]["tracking_uri"], data["mlflow"]["experiment"])
    rid = tracker.start_parent("tiny", {"name": "tiny"})
    child = tracker.create_run("child", {"sweep": "tiny"}).info.run_id
    for run_id in (rid, child):
        tags = tracker.client.get_run(run_id).data.tags
        assert "attempt" not in tags and tags["sweep"] == "tiny"


def test_stale_parent_is_marked_failed(tmp_path):
    spec, data = _spec(tmp_path)
    tracker = Tracker(data["mlflow"]["tracking_uri"], data["mlflow"]["experiment"])
    dead = tracker.start_parent("tiny", {"name": "tiny"})
    assert tracker.fail_stale_parents("tiny", ttl=0.0) == 1
    run = tracker.client.get_run(dead)
    assert run.info.status == "FAILED" and "no heartbeat" in run.data.tags["failure"]


def test_secrets_are_redacted_from_logged_specs(monkeypatch):
    from jobs.store import redact

    monkeypatch.setenv("MY_API_TOKEN", "s3cr3t-value-123")
    out = redact({"mlflow": {"tracking_uri": "http://u:s3cr3t-value-123@host"}, "aws_secret_key": "x"})
    assert "s3cr3t-value-123" not in str(out) and out["aws_secret_key"] == "***"


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    spec, data = _spec(tmp_path)
    data["models"][0]["checkpoint"] = str(tmp_path / "nope.pt")
    spec.write_text(yaml.safe_dump(data))
    assert main(["run", str(spec)]) == 2
    assert "models.0.checkpoint: checkpoint file" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_two_drivers_creating_one_sqlite_store_at_once(tmp_path):
    """Both create/migrate the same new sqlite store; the init lock lets both through."""
    import subprocess
    import sys

    code = ("import sys; from jobs.tracking import Tracker; "
            "t = Tracker(f'sqlite:///{sys.argv[1]}/mlflow.db', 'race'); print(t.experiment_id)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    assert len({o[0].strip() for o in outs}) == 1  # one experiment, not three
