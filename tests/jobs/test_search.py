"""The search stage end to end (screening -> sensitivity -> allocation -> fine-tune -> registry)."""
import json
import re
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from jobs.spec import SpecError, parse_spec

SPEC = Path(__file__).resolve().parents[1] / "specs" / "tiny-search.yaml"


def test_budget_and_uniform_search_end_to_end(make_spec, ray_start_2_cpus, capsys):
    spec, data = make_spec("tiny-search.yaml")
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


def test_vbmf_tolerance_and_tune_end_to_end_with_cached_screening(tmp_path, make_spec, ray_start_2_cpus, capsys):
    import pyarrow.parquet as pq
    from mlflow import MlflowClient

    spec, data = make_spec("tiny-search.yaml", lambda d: (
        d["compression"]["search"].update(strategies=["vbmf", "tolerance", "tune"], epsilon=0.0, tolerance_steps=3,
                                          tune={"trials": 3, "grace_epochs": 1}),
        d["compression"].update(rank={"strategy": "ratio", "ratio": 2, "multiple_of": 8}),  # every screened rank
        d["finetune"].update(epochs=2)), name="search.yaml")
    uri = data["mlflow"]["tracking_uri"]
    assert main(["run", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "+ VBMF ranks" in out and "tolerance: wave 1/3 done" in out and "3 trials near the budget solution" in out
    client = MlflowClient(uri)
    versions = {v.tags["method"]: v for v in client.search_model_versions("name='lowrank-smallcnn'")}
    assert set(versions) == {"search-vbmf", "search-tolerance", "search-tune"}
    for v in versions.values():
        assert float(v.tags["compression_ratio"]) > 1.0 and "speedup_b1" in v.tags
    tune_ratio = float(versions["search-tune"].tags["compression_ratio"])
    assert 2.0 <= tune_ratio <= 2.1 * 1.5  # every trial is a budget allocation at ratio 2 (within the table's steps)

    exp = client.get_experiment_by_name("search").experiment_id
    trials = client.search_runs([exp], "tags.kind = 'tune-trial'")
    assert len(trials) == 3 and sum(t.data.tags["chosen"] == "true" for t in trials) == 1
    assert {t.info.status for t in trials} <= {"FINISHED", "KILLED"}
    assert {t.data.params["torch_threads"] for t in trials} == {"1"}  # the trial's 1 CPU, not the node's 2
    chosen = next(t for t in trials if t.data.tags["chosen"] == "true")
    assert chosen.info.status == "FINISHED" and len(client.get_metric_history(chosen.info.run_id, "acc")) == 2
    for t in trials:  # ASHA stopped ones ran fewer epochs than the chosen one
        n = len(client.get_metric_history(t.info.run_id, "acc"))
        assert n == (1 if t.data.tags["stopped_early"] == "true" else 2)

    parent = client.search_runs([exp], "tags.kind = 'sweep'")[0].info.run_id
    table = pq.read_table(client.download_artifacts(parent, "screening/smallcnn.parquet", str(tmp_path))).to_pylist()
    assert {r["source"] for r in table} == {"dense", "ratio", "vbmf"}
    ranks = [int(v) for r in table if r["source"] != "dense" for v in re.findall(r"\d+", str(r["rank"]))]
    assert ranks and all(v % 8 == 0 for v in ranks), ranks  # rank.multiple_of reaches the screening
    assert all(r["latency"] > 0 and r["acc_drop"] is not None for r in table)
    pareto = pq.read_table(client.download_artifacts(parent, "pareto.parquet", str(tmp_path))).to_pylist()
    assert {"dense", "search-vbmf", "search-tolerance", "search-tune"} <= {r["method"] for r in pareto}
    assert sum(r["kind"] == "trial" for r in pareto) == 3
    front = [r for r in pareto if r["pareto_ratio"]]
    assert front and not any(a is not b and a["compression_ratio"] >= b["compression_ratio"] and a["acc_ft"] >= b["acc_ft"]
                             and (a["compression_ratio"], a["acc_ft"]) != (b["compression_ratio"], b["acc_ft"])
                             for a in pareto for b in front)  # nothing dominates a front point
    assert "pareto.png" in [a.path for a in client.list_artifacts(parent)]

    # a later sweep on the same weights, layers and probes reuses the screening table
    data["name"] = "tiny-search-again"
    data["mlflow"]["registered_model_prefix"] = "again-"
    data["compression"]["search"]["strategies"] = ["vbmf"]
    spec.write_text(yaml.safe_dump(data))
    assert main(["run", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "screening table reused" in out and "sensitivity probes" not in out
    again = client.search_model_versions("name='again-smallcnn'")
    assert len(again) == 1 and again[0].tags["config_hash"] == versions["search-vbmf"].tags["config_hash"]


@pytest.mark.parametrize("search,expected", [
    ({"strategies": ["tolerance"], "epsilon": -0.1}, "epsilon must be an accuracy drop in [0, 1)"),
    ({"strategies": ["tolerance"]}, "strategy 'tolerance' needs epsilon"),
    ({"strategies": ["budget"]}, "strategy 'budget' needs a target ratio"),
    ({"strategies": ["budget", "budget"], "ratio": 2}, "strategies are listed twice"),
    ({"strategies": ["vbmf"], "target": "latency"}, "target 'latency' is not used by strategy 'vbmf'"),
    ({"strategies": ["vbmf"], "vbmf_weakening": 1.5}, "compression.search.vbmf_weakening"),
    ({"strategies": ["tune"], "ratio": 2, "tune": {"trials": 1}}, "compression.search.tune.trials"),
    ({"strategies": ["budget"], "ratio": 0.5}, "search ratio must be >= 1"),
    ({"strategies": ["uniform"], "ratio": 5}, "needs the ratio 5 among candidate_ratios"),
    ({"strategies": ["budget"], "ratio": 2, "candidate_ratios": [0.5, 2]}, "candidate_ratios must be"),
    ({"strategies": ["greedy"], "ratio": 2}, "compression.search.strategies.0: Input should be 'budget', 'uniform', 'vbmf', 'tolerance' or 'tune'"),
    ({"strategies": ["budget"], "ratio": 2, "target": "flops"}, "compression.search.target"),
])
def test_contradictory_search_targets_are_rejected(search, expected):
    data = yaml.safe_load(SPEC.read_text())
    data["compression"]["search"] = search
    with pytest.raises(SpecError) as e:
        parse_spec(data, "spec.yaml")
    assert expected in str(e.value)


def test_tune_needs_finetuning_epochs():
    data = yaml.safe_load(SPEC.read_text())
    data["compression"]["search"]["strategies"] = ["tune"]
    data["finetune"]["epochs"] = 0
    with pytest.raises(SpecError, match="strategy 'tune' needs finetune.epochs >= 1"):
        parse_spec(data, "spec.yaml")


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


def test_a_latency_target_is_screened_at_the_deployed_input_size(tmp_path, make_spec, ray_start_2_cpus, capsys):
    """``latency.input_size`` is the size the tags are timed at; a latency target's screening and
    baseline are timed there too (not at the data's 16 px), so the target means what the tags say."""
    import pyarrow.parquet as pq
    from mlflow import MlflowClient

    import lowrank
    from jobs.models import SmallCNN

    spec, data = make_spec("tiny-search.yaml", lambda d: (
        d["compression"].update(methods=["tucker2"]),
        d["compression"]["search"].update(strategies=["budget"], target="latency", ratio=1.05, candidate_ratios=[3, 8],
                                          loss="error"),
        d.update(latency={"batches": [1], "threads": [1], "repeats": 3, "input_size": 40}),
        d["pretrain"].update(epochs=0), d["finetune"].update(epochs=0)), name="latency-search.yaml")  # timing only
    assert main(["run", str(spec)]) == 0
    client = MlflowClient(data["mlflow"]["tracking_uri"])
    exp = client.get_experiment_by_name("search").experiment_id
    parent = client.search_runs([exp], "tags.kind = 'sweep'")[0].info.run_id
    table = pq.read_table(client.download_artifacts(parent, "screening/smallcnn.parquet", str(tmp_path))).to_pylist()
    model = SmallCNN(10)
    names = sorted({r["layer"] for r in table})
    at = {16: lowrank.layer_input_shapes(model, names, (3, 16, 16)), 40: lowrank.layer_input_shapes(model, names, (3, 40, 40))}
    for r in (r for r in table if r["source"] == "dense"):
        layer = model.get_submodule(r["layer"])
        assert r["macs"] == lowrank.count(layer, at[40][r["layer"]])[1] != lowrank.count(layer, at[16][r["layer"]])[1]
    (v,) = client.search_model_versions("name='lowrank-smallcnn'")
    assert float(v.tags["speedup_b1"]) > 0 and "40" in v.tags["latency_input"], v.tags
    # the MAC reduction at the timed size, and the share of it the runtime realises
    assert float(v.tags["speedup_per_mac_b1"]) == pytest.approx(
        float(v.tags["speedup_b1"]) / float(v.tags["mac_ratio_timed"]), rel=1e-3), v.tags  # tags: 4 decimals
    assert float(v.tags["mac_ratio_timed"]) > 1, v.tags
    # the latency model, calibrated against the whole graph at the same size, and what it predicted
    cal = json.loads(Path(client.download_artifacts(parent, "screening/smallcnn.calibration.json", str(tmp_path)))
                     .read_text())
    assert cal["runtime"] == "onnxruntime" and 0 < cal["fixed"] < cal["whole"] and cal["scale"] > 0, cal
    assert float(v.tags["search_predicted_ratio"]) >= 1.05, v.tags
    assert "outside the searched layers" in capsys.readouterr().out


@pytest.mark.parametrize("spec_file,search", [("tiny-search.yaml", True), ("tiny.yaml", False)])
def test_a_latency_size_the_model_cannot_take_is_refused_before_ray(make_spec, capsys, spec_file, search):
    """Every version is timed at ``latency.input_size`` (a latency search also screens at it): a
    model that cannot run there is refused up front, not found out after the sweep's work."""
    def edit(d):
        d["models"][0] = {"name": "vgg11", "num_classes": 10}
        d.update(latency={"input_size": 16})
        d["dataset"].update(input_size=32)
        if search:
            d["compression"]["search"].update(strategies=["budget"], target="latency", ratio=1.2)

    spec, _ = make_spec(spec_file, edit, name="latency-size.yaml")
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "latency.input_size: models.0: VGG cannot run at the size it is timed at 16x16" \
        in err[0] and "accepted: a latency.input_size the model can take, or none (the data's input size, 32 px)" \
        in err[0], err


def test_an_also_at_size_the_model_cannot_take_is_refused_before_ray(make_spec, capsys):
    def edit(d):
        d["models"][0] = {"name": "vgg11", "num_classes": 10}
        d.update(latency={"also_at": [16, 64]})
        d["dataset"].update(input_size=32)

    spec, _ = make_spec("tiny.yaml", edit, name="also-at.yaml")
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "latency.also_at: models.0: VGG cannot run at a size it is also timed at 16x16" in err[0] \
        and "accepted: latency.also_at sizes the model can take, or [] (none)" in err[0], err


@pytest.mark.parametrize("layers,expected", [
    ({"include": ["features.3"]}, r"compression.layers leaves out 5 layer\(s\) a method could take, \d+% of the "
                                  r"model's MACs, the most in features\.(6|9|12): widen the layer selection\)$"),
    ({"skip_first": False, "pointwise_method": "svd"}, r"in what none of the methods factorizes: depthwise convs, "
                                                       r"activations, pooling; no wider layer selection reaches further\)$"),
])
def test_an_unreachable_target_says_whether_a_wider_layer_selection_would_help(make_spec, layers, expected):
    """Most of the latency outside the searched layers: either the spec left layers out that a
    method could take (widen), or the rest is what no method factorizes (a mobile network's
    depthwise convs: widening cannot help, and saying so saves a user a useless re-run)."""
    from jobs.executors.search import SearchedModel, _outside_hint
    from jobs.plan import plan_sweep
    from jobs.spec import load_spec
    from jobs.tasks.env import TaskEnv

    path, _ = make_spec("tiny-search.yaml", lambda d: d["compression"].update(layers=layers))
    spec = load_spec(path)
    cfg = next(c for c in plan_sweep(spec) if c.strategy)
    m = SearchedModel(cfgs=[cfg], env=TaskEnv(cfg.model.spec, spec.dataset, spec.seed, False))
    assert _outside_hint(m, 0.1, 1.0, "latency") == ""  # little outside: nothing to explain
    hint = _outside_hint(m, 0.7, 1.0, "latency")
    assert hint.startswith(" (70% of the model's latency lie outside the searched layers")
    assert re.search(expected, hint), hint
