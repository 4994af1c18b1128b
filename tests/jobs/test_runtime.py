"""The sweep's Ray tasks run with the threads Ray gave them."""
import os

import torch

from jobs.runtime import Session, SweepResult
from jobs.spec import load_spec
from jobs.tasks.env import TaskEnv
from jobs.tracking import Tracker


def torch_threads() -> int:
    return torch.get_num_threads()


def loader_workers(env: TaskEnv) -> int:
    return env.workers


def _session(make_spec):
    path, data = make_spec()
    tracker = Tracker(data["mlflow"]["tracking_uri"], data["mlflow"]["experiment"])  # the wait loop's heartbeat
    parent = tracker.start_parent("tiny", {"name": "tiny"})
    spec = load_spec(path)
    return spec, Session(spec, tracker=tracker, parent=parent, result=SweepResult(), say=lambda line: None)


def test_tasks_use_as_many_torch_threads_as_cpus_they_were_given(make_spec, ray_start_2_cpus):
    """Ray sets ``OMP_NUM_THREADS`` to a task's CPUs only when the task starts, after the workers'
    setup hook has imported torch, so torch used all the node's cores in every task: two 1-CPU
    tasks side by side on 2 cores ran their CP fits about 10 times slower than one alone (the
    embedded default took 7 minutes instead of 2)."""
    _, session = _session(make_spec)
    assert session.gather([(torch_threads,)] * 3) == [1, 1, 1]
    assert session.options["num_cpus"] == 1  # the tiny spec's cpus_per_task
    assert session.gather([(torch_threads,)], options={"num_cpus": 2, "num_gpus": 0}) == [2]


def test_image_folder_loaders_start_as_many_workers_as_the_task_has_cpus_to_spare(make_spec, ray_start_2_cpus,
                                                                                   tmp_path):
    """Sized from the node's cores, a 1-CPU task on a 16-core node started 4 decoding processes
    beside its training loop (the thread bug's kin); now one CPU is left to the loop, of the task's."""
    spec, session = _session(make_spec)
    folder = spec.dataset.model_copy(update={"kind": "imagefolder", "root": tmp_path, "workers": None})
    env = TaskEnv(model=spec.models[0], dataset=folder, seed=0, gpu=False)
    assert session.gather([(loader_workers, env)]) == [0]  # 1 CPU: decoded inline
    assert session.gather([(loader_workers, env)], options={"num_cpus": 2, "num_gpus": 0}) == [1]
    assert env.workers == min(4, os.cpu_count() - 1)  # outside a task (the driver): the machine's
    fixed = TaskEnv(model=spec.models[0], dataset=folder.model_copy(update={"workers": 3}), seed=0, gpu=False)
    assert session.gather([(loader_workers, fixed)]) == [3]  # dataset.workers, as given
