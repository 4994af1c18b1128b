"""Every YAML under cluster/ parses, names the right kinds/apiVersions, uses the image the
Dockerfile builds, runs an entrypoint that exists, and every sweep spec validates."""
import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from jobs.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KINDS = {"RayCluster": "ray.io/v1", "RayJob": "ray.io/v1", "RayCronJob": "ray.io/v1", "CronJob": "batch/v1",
         "Deployment": "apps/v1", "StatefulSet": "apps/v1", "Service": "v1", "Secret": "v1", "ConfigMap": "v1"}


def _docs():
    for p in sorted(CLUSTER.glob("*.yaml")):
        for doc in yaml.safe_load_all(p.read_text()):
            if doc:
                yield p.name, doc


def _walk(obj, key):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v, key)


def _dockerfile_image():
    m = re.search(r'org\.opencontainers\.image\.ref\.name="([^"]+)"', (ROOT / "Dockerfile").read_text())
    return m.group(1)


def test_every_manifest_parses_with_known_kind_and_api_version():
    docs = list(_docs())
    kinds = {d["kind"] for _, d in docs if "kind" in d}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "Deployment", "Service"} <= kinds
    for name, d in docs:
        if "kind" in d:  # the launcher config is not a Kubernetes object
            assert d["apiVersion"] == KINDS[d["kind"]], (name, d["kind"])
            assert d["metadata"]["name"]


def test_images_agree_with_the_dockerfile_and_pyproject_version():
    image = _dockerfile_image()
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert image.endswith(":" + version)
    launcher = yaml.safe_load((CLUSTER / "ray-cluster.launcher.yaml").read_text())
    images = [launcher["docker"]["image"]]
    for name, d in _docs():
        images += [c for c in _walk(d, "image") if isinstance(c, str) and "postgres" not in c]
    assert images and set(images) == {image}


def test_ray_versions_and_gpu_worker_group():
    import ray

    rc = yaml.safe_load((CLUSTER / "ray-cluster.kuberay.yaml").read_text())
    assert rc["spec"]["rayVersion"] == ray.__version__
    gpu = rc["spec"]["workerGroupSpecs"][0]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def _entrypoints():
    for name, d in _docs():
        for e in _walk(d, "entrypoint"):
            yield name, shlex.split(e)
        for c in _walk(d, "command"):
            if isinstance(c, list) and "jobs" in c:
                yield name, c[c.index("python"):]


def test_entrypoints_import_and_name_existing_sweeps():
    eps = list(_entrypoints())
    assert len(eps) >= 3
    for name, argv in eps:
        assert argv[:4] == ["python", "-m", "jobs", "run"], (name, argv)
        importlib.import_module(argv[2])
        spec = argv[4]
        assert spec.startswith("/specs/") and (CLUSTER / "sweeps" / spec.removeprefix("/specs/")).is_file()


def test_scheduled_sweeps_never_overlap():
    for name, d in _docs():
        if d.get("kind") in ("RayCronJob", "CronJob"):
            assert d["spec"]["concurrencyPolicy"] == "Forbid"
            assert len(d["spec"]["schedule"].split()) == 5


@pytest.mark.parametrize("spec", sorted((CLUSTER / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_cluster_sweeps_validate(spec):
    s = load_spec(spec)
    assert s.mlflow.tracking_uri.startswith("http://mlflow.")


def test_dockerfile_installs_from_the_same_constraints_as_non_root():
    text = (ROOT / "Dockerfile").read_text()
    assert "-c constraints.txt" in text and "USER lowrank" in text
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["torch"] == "2.13.0" and pins["torchvision"] == "0.28.0"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in pyproject and '"torchvision==0.28.0"' in pyproject
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignore and "mlflow.db" in ignore
