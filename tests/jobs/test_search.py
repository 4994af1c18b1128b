"""The search stage end to end (screening -> sensitivity -> allocation -> fine-tune -> registry)."""
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from jobs.spec import SpecError, parse_spec

SPEC = Path(__file__).resolve().parents[1] / "specs" / "tiny-search.yaml"


def test_budget_and_uniform_search_end_to_end(tmp_path, ray_start_2_cpus, capsys):
    data = yaml.safe_load(SPEC.read_text())
    data["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    data["pretrain"]["cache_dir"] = str(tmp_path / "cache")
    spec = tmp_path / "search.yaml"
    spec.write_text(yaml.safe_dump(data))
    assert main(["run", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "sensitivity probes" in out
    from mlflow import MlflowClient

    versions = {v.tags["method"]: v for v in
                MlflowClient(data["mlflow"]["tracking_uri"]).search_model_versions("name='lowrank-smallcnn'")}
    assert set(versions) == {"search-budget", "search-uniform"}
    budget, uniform = versions["search-budget"].tags, versions["search-uniform"].tags
    assert 2.0 <= float(budget["compression_ratio"]) <= 2.1  # the target, within 5 %
    assert float(budget["acc_post"]) >= float(uniform["acc_post"])  # at the same parameter ratio


@pytest.mark.parametrize("search,expected", [
    ({"strategies": ["budget"], "ratio": 0.5}, "search ratio must be >= 1"),
    ({"strategies": ["uniform"], "ratio": 5}, "needs the ratio 5 among candidate_ratios"),
    ({"strategies": ["budget"], "ratio": 2, "candidate_ratios": [0.5, 2]}, "candidate_ratios must be"),
    ({"strategies": ["greedy"], "ratio": 2}, "compression.search.strategies.0: Input should be 'budget' or 'uniform'"),
    ({"strategies": ["budget"], "ratio": 2, "target": "flops"}, "compression.search.target"),
])
def test_contradictory_search_targets_are_rejected(search, expected):
    data = yaml.safe_load(SPEC.read_text())
    data["compression"]["search"] = search
    with pytest.raises(SpecError) as e:
        parse_spec(data, "spec.yaml")
    assert expected in str(e.value)


def test_latency_target_on_a_device_that_does_not_exist(tmp_path, capsys):
    import torch

    data = yaml.safe_load(SPEC.read_text())
    data["compression"]["search"].update(target="latency", latency_device="cuda")
    with pytest.raises(SpecError, match="latency_device 'cuda' needs resources.gpus_per_task > 0"):
        parse_spec(data, "spec.yaml")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    data["resources"] = {"gpus_per_task": 1}
    data["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(data))
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "latency_device: 'cuda' requested but this machine has no CUDA device" in err
    assert err.count("\n") == 1 and not (tmp_path / "mlflow.db").exists()
