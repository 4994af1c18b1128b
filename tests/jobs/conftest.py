import os
import pytest

from .specs import write_spec

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

@pytest.fixture(scope="session")
def ray_start_2_cpus():
    """One local Ray for the whole test session (ray.init takes seconds)."""
    import ray

    from lowrank.allocator import WORKER_SETUP_HOOK

    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False, configure_logging=True,
             logging_level="warning", runtime_env={"worker_process_setup_hook": WORKER_SETUP_HOOK})  # as init_ray
    yield ray
    ray.shutdown()


@pytest.fixture
def make_spec(tmp_path):
    """``make_spec(base='tiny.yaml', mutate=None, name=None) -> (path, data)``: a spec from
    tests/specs with its MLflow store and caches in this test's temporary folder."""
    return lambda base="tiny.yaml", mutate=None, name=None: write_spec(tmp_path, base, mutate, name)
