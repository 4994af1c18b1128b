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
         "Deployment": "apps/v1", "StatefulSet": "apps/v1", "Service": "v1", "Secret": "v1", "ConfigMap": "v1",
         "NetworkPolicy": "networking.k8s.io/v1", "Job": "batch/v1"}


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


# ----------------------------------------------------------------------------- secure by default


def _ray_cluster_specs():
    """Every RayCluster spec a manifest creates (standing, per RayJob, per RayCronJob tick)."""
    for name, d in _docs():
        kind = d.get("kind")
        if kind == "RayCluster":
            yield name, d["spec"]
        elif kind == "RayJob":
            yield name, d["spec"]["rayClusterSpec"]
        elif kind == "RayCronJob":
            yield name, d["spec"]["jobTemplate"]["rayClusterSpec"]


def test_token_authentication_in_every_ray_manifest_and_the_image():
    specs = list(_ray_cluster_specs())
    assert len(specs) == 3
    for name, spec in specs:
        assert spec["authOptions"]["mode"] == "token", name
    standing = yaml.safe_load((CLUSTER / "ray-cluster.kuberay.yaml").read_text())["spec"]["authOptions"]
    assert standing["secretName"] == "lowrank-ray-token"  # the submitters' CronJob reads the same Secret
    cron = yaml.safe_load((CLUSTER / "cronjob.submit.yaml").read_text())
    env = {e["name"]: e for e in cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "lowrank-ray-token", "key": "auth_token"}
    launcher = (CLUSTER / "ray-cluster.launcher.yaml").read_text()
    assert "RAY_AUTH_MODE=token" in launcher and "RAY_AUTH_TOKEN_PATH" in launcher
    assert re.search(r"^ENV .*RAY_AUTH_MODE=token", (ROOT / "Dockerfile").read_text(), re.M)


def test_security_is_never_turned_off_where_a_cluster_runs():
    for p in [*CLUSTER.rglob("*.yaml"), ROOT / "Dockerfile", *(ROOT / "jobs").rglob("*.py")]:
        text = p.read_text()
        assert not re.search(r"RAY_AUTH_MODE\W{0,4}disabled", text), p
        assert "change-me" not in text, p


def test_no_secret_on_a_command_line_or_in_a_manifest():
    for name, d in _docs():
        if d.get("kind") == "Secret":
            raise AssertionError(f"{name}: Secrets are created from a secret manager, not committed")
        for key in ("command", "args"):
            for c in _walk(d, key):
                text = " ".join(c) if isinstance(c, list) else str(c)
                assert not re.search(r"PASSWORD|://[^/\s:]+:[^@\s]+@", text), (name, text)
        for env in _walk(d, "env"):
            for e in env:
                if re.search(r"PASSWORD|TOKEN|SECRET", e["name"]):
                    assert "valueFrom" in e and "value" not in e, (name, e["name"])


def test_mlflow_server_authenticates_and_the_runner_writes_as_its_service_account():
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in _docs() if "metadata" in d}
    server = docs["Deployment", "mlflow"]["spec"]["template"]["spec"]["containers"][0]
    assert server["command"][:4] == ["mlflow", "server", "--app-name", "basic-auth"]
    env = {e["name"]: e for e in server["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    assert "MLFLOW_AUTH_CONFIG_PATH" in env and "MLFLOW_FLASK_SERVER_SECRET_KEY" in env
    for name, spec in _ray_cluster_specs():
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            refs = [r["secretRef"]["name"] for r in pod["spec"]["containers"][0].get("envFrom", [])]
            assert "mlflow-runner" in refs, name
    accounts = docs["Job", "mlflow-accounts"]["spec"]["template"]["spec"]["containers"][0]
    assert accounts["command"] == ["python", "-m", "jobs.accounts"]
    importlib.import_module("jobs.accounts")


def test_network_policies_parse_and_close_the_dashboard_gcs_and_mlflow():
    pols = {d["metadata"]["name"]: d for _, d in _docs() if d.get("kind") == "NetworkPolicy"}
    assert pols["lowrank-default-deny"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    for p in pols.values():
        assert p["spec"]["policyTypes"] == ["Ingress"]
        for rule in p["spec"].get("ingress", []):
            assert rule["from"], p["metadata"]["name"]  # never "from anywhere"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"} and peer["podSelector"]["matchLabels"]
    dash = pols["lowrank-ray-dashboard"]["spec"]
    assert dash["ingress"][0]["ports"] == [{"port": 8265, "protocol": "TCP"}]
    assert {"lowrank.io/role": "submitter"} in [f["podSelector"]["matchLabels"] for f in dash["ingress"][0]["from"]]
    assert pols["lowrank-postgres"]["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {"app": "mlflow"}}}]
    cron = yaml.safe_load((CLUSTER / "cronjob.submit.yaml").read_text())
    assert cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]["lowrank.io/role"] == "submitter"
