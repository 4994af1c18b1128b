"""The sweep's Ray tasks run with the threads Ray gave them."""
import torch

from jobs.runtime import Session, SweepResult
from jobs.spec import load_spec
from jobs.tracking import Tracker


def torch_threads() -> int:
    return torch.get_num_threads()


def test_tasks_use_as_many_torch_threads_as_cpus_they_were_given(make_spec, ray_start_2_cpus):
    """Ray sets ``OMP_NUM_THREADS`` to a task's CPUs only when the task starts, after the workers'
    setup hook has imported torch, so torch used all the node's cores in every task: two 1-CPU
    tasks side by side on 2 cores ran their CP fits about 10 times slower than one alone (the
    embedded default took 7 minutes instead of 2)."""
    path, data = make_spec()
    tracker = Tracker(data["mlflow"]["tracking_uri"], data["mlflow"]["experiment"])  # the wait loop's heartbeat
    parent = tracker.start_parent("tiny", {"name": "tiny"})
    session = Session(load_spec(path), tracker=tracker, parent=parent, result=SweepResult(), say=lambda line: None)
    assert session.gather([(torch_threads,)] * 3) == [1, 1, 1]
    assert session.options["num_cpus"] == 1  # the tiny spec's cpus_per_task
    assert session.gather([(torch_threads,)], options={"num_cpus": 2, "num_gpus": 0}) == [2]
