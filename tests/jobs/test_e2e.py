"""End to end on a real local Ray (2 CPUs) and a real sqlite MLflow in a temp dir."""
import json
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from jobs.tracking import MODEL_TAGS, candidate_key

TINY = Path(__file__).resolve().parents[1] / "specs" / "tiny.yaml"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, ray_start_2_cpus):
    tmp = tmp_path_factory.mktemp("sweep")
    data = yaml.safe_load(TINY.read_text())
    data["mlflow"]["tracking_uri"] = f"sqlite:///{tmp}/mlflow.db"
    data["pretrain"]["cache_dir"] = str(tmp / "cache")
    data["latency"]["also_at"] = [24]  # every version also timed at another size (auto: 224 for ImageNet-style nets)
    spec = tmp / "tiny.yaml"
    spec.write_text(yaml.safe_dump(data))
    return tmp, spec, data


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def test_sweep_registers_versions_with_tags_aliases_and_loadable_models(sweep, capsys):
    tmp, spec, data = sweep
    assert main(["run", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "smallcnn" in out and "mlflow ui --backend-store-uri" in out
    assert list((tmp / "cache").glob("smallcnn-*.pt"))  # pre-training cached by content hash

    uri = data["mlflow"]["tracking_uri"]
    client = _client(uri)
    versions = client.search_model_versions("name='lowrank-smallcnn'")
    assert sorted(v.tags["method"] for v in versions) == ["cp3-epc", "tucker2"]
    for v in versions:
        assert set(MODEL_TAGS) <= set(v.tags), set(MODEL_TAGS) - set(v.tags)
        assert float(v.tags["compression_ratio"]) > 1.2
        assert 0 <= float(v.tags["acc_ft"]) <= 1
        assert json.loads(v.tags["ft_curve"]) == [pytest.approx(float(v.tags["acc_ft"]), abs=1e-4)]  # one epoch
    best = max(versions, key=candidate_key)  # the best fine-tuned accuracy; ties: tests/jobs/test_candidate.py
    assert float(best.tags["acc_ft"]) == max(float(v.tags["acc_ft"]) for v in versions)
    alias = client.get_model_version_by_alias("lowrank-smallcnn", "candidate")
    assert alias.version == best.version
    assert "candidate" in client.get_model_version("lowrank-smallcnn", best.version).aliases

    # the logged model (pt2, no pickle) loads back and reproduces the logged fine-tuned accuracy
    import mlflow

    from jobs.data import load_dataset
    from jobs.spec import load_spec
    from jobs.train import evaluate, loader

    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(f"models:/lowrank-smallcnn/{best.version}")
    s = load_spec(spec)
    _, val, _ = load_dataset(s.dataset, s.seed)
    acc = evaluate(model, loader(val, 64, shuffle=False))["top1"]
    assert acc == pytest.approx(float(best.tags["acc_ft"]), abs=1e-4)

    # the same version as ONNX, loadable through MLflow, gives the pt2 model's outputs in ONNX Runtime;
    # its speedup was taken there, beside the dense model, at the data's size
    import mlflow.onnx
    import onnxruntime as ort
    import torch

    onnx_model = mlflow.onnx.load_model(best.tags["onnx"])
    sess = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = model(x).numpy()
    assert abs(sess.run(None, {"input": x.numpy()})[0] - want).max() < 1e-4
    assert best.tags["latency_runtime"] == "onnxruntime" and best.tags["latency_input"] == "3x16x16"
    assert best.tags["latency_threads"] == "1" and best.tags["latency_big_batch"] == "8"

    # the child run holds metrics, the per-layer Parquet table and the parent holds the plot
    run = client.get_run(best.tags["run_id"])
    assert {"acc_pre", "acc_post", "acc_ft", "acc_pre_top5", "mac_ratio", "speedup_b1"} <= set(run.data.metrics)
    assert {"speedup_b1_t1", "speedup_b8_t1", "speedup_b1_t2", "latency_b8_t2_dense_ms"} <= set(run.data.metrics)
    assert {"speedup_b8", "latency_b8_ms"} <= set(run.data.metrics)  # named by the batch they were taken at
    assert not any("b32" in k for k in run.data.metrics)
    assert {"speedup_b1_t1_24px", "latency_b1_t2_24px_dense_ms"} <= set(run.data.metrics)
    assert float(best.tags["speedup_b1_24px"]) == pytest.approx(run.data.metrics["speedup_b1_t1_24px"], rel=1e-3)
    assert float(best.tags["speedup_b1"]) == pytest.approx(run.data.metrics["speedup_b1_t1"], rel=1e-3)
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "layers")}
    assert "layers/layers.parquet" in arts
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"
    assert "accuracy_vs_compression.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    import pyarrow.parquet as pq

    local = client.download_artifacts(run.info.run_id, "layers/layers.parquet", str(tmp))
    table = pq.read_table(local).to_pydict()
    assert len(table["layer"]) == 4 and all(0 < e < 1 for e in table["rel_error"])
    # each factorized layer timed alone against its dense layer on the deployment runtime
    assert all(s > 0 for s in table["speedup_b1"])
    assert table["slower_than_dense"] == [s < 1 for s in table["speedup_b1"]]


def test_rerun_is_idempotent_and_restores_a_deleted_version(sweep, capsys):
    tmp, spec, data = sweep
    client = _client(data["mlflow"]["tracking_uri"])
    before = {v.version: v.tags["config_hash"] for v in client.search_model_versions("name='lowrank-smallcnn'")}
    assert main(["run", str(spec)]) == 0
    assert "0 version(s) registered now, 2 already registered" in capsys.readouterr().out
    after = {v.version: v.tags["config_hash"] for v in client.search_model_versions("name='lowrank-smallcnn'")}
    assert after == before

    gone_version, gone_hash = sorted(before.items())[0]
    client.delete_model_version("lowrank-smallcnn", gone_version)
    assert main(["run", str(spec)]) == 0
    assert "1 version(s) registered now, 1 already registered" in capsys.readouterr().out
    final = {v.version: v.tags["config_hash"] for v in client.search_model_versions("name='lowrank-smallcnn'")}
    assert sorted(final.values()) == sorted(before.values())
    assert len(final) == 2


def test_one_shot_sweep_with_a_mac_target_registers_a_model_that_many_times_cheaper(make_spec, ray_start_2_cpus):
    """``rank: {strategy: ratio, ratio: 2, target: macs}`` on the one-shot path (it once left
    every layer dense and registered a MAC ratio of 1.00)."""
    spec, data = make_spec(mutate=lambda d: (d["compression"].update(
        methods=["spatial-svd"], options={}, rank={"strategy": "ratio", "ratio": 2, "target": "macs"}),
        d["finetune"].update(epochs=0), d["pretrain"].update(epochs=1)))
    assert main(["run", str(spec)]) == 0
    [v] = _client(data["mlflow"]["tracking_uri"]).search_model_versions("name='lowrank-smallcnn'")
    assert float(v.tags["mac_ratio"]) >= 1.5
