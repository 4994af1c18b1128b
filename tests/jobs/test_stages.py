"""Multi-stage compression and low-rank training from scratch, end to end on a local Ray."""
import json
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from jobs.spec import SpecError, parse_spec

SPEC = Path(__file__).resolve().parents[1] / "specs" / "tiny-stages.yaml"


def test_multistage_and_from_scratch_end_to_end(make_spec, ray_start_2_cpus, capsys):
    import mlflow
    import torch
    from mlflow import MlflowClient

    spec, data = make_spec("tiny-stages.yaml")
    uri = data["mlflow"]["tracking_uri"]
    assert main(["run", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "tucker2-2stage: stage 2:" in out
    client = MlflowClient(uri)
    versions = {v.tags["method"]: v for v in client.search_model_versions("name='lowrank-smallcnn'")}
    assert set(versions) == {"tucker2-2stage", "scratch-lowrank"}  # one final version per configuration

    staged = versions["tucker2-2stage"]
    history = json.loads(staged.tags["stage_history"])
    assert [h["stage"] for h in history] == [1, 2]
    assert 1.5 < history[0]["compression_ratio"] < history[1]["compression_ratio"]
    assert history[-1]["compression_ratio"] == pytest.approx(float(staged.tags["compression_ratio"]), abs=1e-3)
    assert 2.8 <= float(staged.tags["compression_ratio"]) <= 3.2
    exp = client.get_experiment_by_name("stages").experiment_id
    stage_runs = client.search_runs([exp], "tags.kind = 'stage'")
    assert sorted(r.data.tags["stage"] for r in stage_runs) == ["1", "2"]
    assert {r.data.tags["mlflow.parentRunId"] for r in stage_runs} == {staged.tags["run_id"]}
    model = mlflow.pytorch.load_model(f"models:/lowrank-smallcnn/{staged.version}")
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 10)

    scratch = versions["scratch-lowrank"]
    run = client.get_run(scratch.tags["run_id"])
    for key in ("acc_pre", "acc_ft", "params", "params_dense", "macs", "macs_dense", "latency_b1_ms",
                "latency_b1_dense_ms"):
        assert key in run.data.metrics  # both models: accuracy, parameters, MACs, latency
    assert float(scratch.tags["compression_ratio"]) > 1.5
    assert len(client.get_metric_history(run.info.run_id, "acc_lowrank")) == 2
    assert len(client.get_metric_history(run.info.run_id, "acc_dense")) == 2
    from jobs.models import SmallCNN

    loaded = mlflow.pytorch.load_model(f"models:/lowrank-smallcnn/{scratch.version}")
    dense_bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in SmallCNN(10).modules())
    # the low-rank form adds one BN per converted conv; folded, only the model's own BNs remain
    assert sum("batch_norm" in str(n.target) for n in loaded.graph.nodes) == dense_bns


@pytest.mark.parametrize("change,expected", [
    (lambda d: d["compression"]["stages"].update(ratios=[2, 1.5]), "stages.ratios must be >= 1 and increasing"),
    (lambda d: d["compression"]["stages"].update(ratios=[1.5, 2]), "must be the final ratio compression.rank.ratio"),
    (lambda d: d["compression"]["stages"].update(ratios=[3]), "at least 2 stages"),
    (lambda d: d["compression"]["stages"].update(count=3), "stages.count is 3 but ratios lists 2 stages"),
    (lambda d: d["compression"].update(rank={"strategy": "vbmf"}), "stages by ratio need compression.rank.strategy"),
    (lambda d: d["compression"]["stages"].update(layers=[["features.3"]]), "give ratios or layers, not both"),
    (lambda d: d["from_scratch"].update(rank=4), "exactly one of ratio (>= 1) or rank"),
    (lambda d: d["from_scratch"].update(ratio=0.5), "from_scratch.ratio must be >= 1"),
    (lambda d: d.pop("compression") and d.pop("from_scratch"), "needs compression"),
])
def test_stage_settings_that_cannot_work_are_rejected(change, expected):
    data = yaml.safe_load(SPEC.read_text())
    change(data)
    with pytest.raises(SpecError) as e:
        parse_spec(data, "spec.yaml")
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("change,expected", [
    (lambda d: d["compression"]["stages"].update(ratios=None, layers=[["features.3"], ["layer4.*"]]),
     "compression.stages.layers.1: ['layer4.*'] matches none of the"),
    (lambda d: d["from_scratch"].update(ratio=None, rank=500), "from_scratch.rank: smallcnn features.3"),
    (lambda d: d["from_scratch"].update(layers={"include": ["classifier.*"]}), "from_scratch.layers: no conv"),
])
def test_stage_settings_that_do_not_fit_the_model_fail_validation(tmp_path, capsys, change, expected):
    data = yaml.safe_load(SPEC.read_text())
    change(data)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(data))
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_stages_by_layer_groups_compress_each_group_in_turn():
    """The multi-stage task itself (a plain function; Ray only schedules it) on the plan of a
    spec: stage 1 factorizes features.3, stage 2 features.6; nothing else is touched."""
    import torch

    import lowrank
    from jobs.models import SmallCNN
    from jobs.plan import plan_sweep
    from jobs.tasks.env import TaskEnv
    from jobs.tasks.staged import multistage_task

    data = yaml.safe_load(SPEC.read_text())
    data.pop("from_scratch")
    data["dataset"].update(input_size=16, limit_train=128, limit_val=64)
    data["finetune"].update(epochs=1, bn_batches=2)
    data["compression"].update(methods=["spatial-svd"], rank={"strategy": "fixed", "rank": 4}, options={},
                               stages={"layers": [["features.3"], ["features.6"]], "epochs": 1})
    spec = parse_spec(data, "spec.yaml")
    [cfg] = plan_sweep(spec)
    assert cfg.kind == "staged" and [[lp.name for lp in st.layers] for st in cfg.stages] == [["features.3"],
                                                                                            ["features.6"]]
    torch.manual_seed(0)
    base = SmallCNN(10).state_dict()
    out = multistage_task(TaskEnv(cfg.model.spec, spec.dataset, 0, False), base, spec.finetune, cfg.stages,
                          cfg.stage_epochs)
    assert [h["layers"] for h in out.stages] == [1, 1]
    assert set(out.factors) == {"features.3", "features.6"}
    assert all(f.rank == 4 for f in out.factors.values())
    assert out.stages[0]["compression_ratio"] < out.stages[1]["compression_ratio"]
    model = SmallCNN(10)
    model, _ = lowrank.apply_factors(model, out.factors)
    model.load_state_dict(out.state_dict)  # the registered model is rebuilt exactly like this
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n in ("features.3", "features.6", "features.9")}
    assert kinds == {"features.3": "FactorizedConv2d", "features.6": "FactorizedConv2d", "features.9": "Conv2d"}


def test_finetuning_curve_is_evaluated_after_every_epoch_and_leaves_the_weights_unchanged():
    """``finetune.eval_each_epoch`` (default on): the one-shot evaluation task records top-1 after
    every fine-tuning epoch (its last value is acc_ft); off, the same weights come out, with no
    curve, and the config hash is the same either way (evaluating does not change the result)."""
    import torch

    import lowrank
    from jobs.models import SmallCNN
    from jobs.plan import plan_sweep
    from jobs.tasks.compress import decompose_task, evaluate_task
    from jobs.tasks.env import TaskEnv
    from jobs.tracking import curve_tag

    outs, hashes = [], []
    for each in (True, False):
        data = yaml.safe_load(SPEC.read_text())
        data.pop("from_scratch")
        data["dataset"].update(input_size=16, limit_train=192, limit_val=64)
        data["finetune"].update(epochs=3, bn_batches=2, eval_each_epoch=each)
        data["compression"].update(methods=["spatial-svd"], rank={"strategy": "fixed", "rank": 4}, options={})
        data["compression"].pop("stages")
        spec = parse_spec(data, "spec.yaml")
        [cfg] = plan_sweep(spec)
        hashes.append(cfg.config_hash)
        torch.manual_seed(0)
        dense = SmallCNN(10)
        layers = [decompose_task(lp, dense.get_submodule(lp.name), False) for lp in cfg.layers]
        torch.manual_seed(1)
        outs.append(evaluate_task(TaskEnv(cfg.model.spec, spec.dataset, 0, False), dense.state_dict(),
                                  spec.finetune, *layers))
    on, off = outs
    assert hashes[0] == hashes[1]
    assert len(on.curves["acc_ft_epoch"]) == 3 and on.curves["acc_ft_epoch"][-1] == on.acc_ft["top1"]
    assert json.loads(curve_tag(on.curves)["ft_curve"]) == [round(v, 4) for v in on.curves["acc_ft_epoch"]]
    assert off.curves is None and curve_tag(off.curves) == {}
    assert all(torch.equal(on.state_dict[k], off.state_dict[k]) for k in on.state_dict)


def test_a_stage_layer_its_model_cannot_run_factorized_keeps_what_it_had():
    """Self-attention's out_proj (nn.MultiheadAttention reads its weight itself) in stage 2: the
    model is checked after each replacement, the layer stays dense with the reason, the rest go on."""
    import torch

    from jobs.plan import plan_sweep
    from jobs.tasks.env import TaskEnv
    from jobs.tasks.staged import multistage_task

    data = yaml.safe_load(SPEC.read_text())
    data.pop("from_scratch")
    data["models"] = [{"name": "att", "factory": "tests.jobs.factories:attention_net", "num_classes": 10}]
    data["dataset"].update(input_size=16, limit_train=128, limit_val=64)
    data["finetune"].update(epochs=1, bn_batches=2)
    data["compression"].update(methods=["tucker2"], rank={"strategy": "ratio", "ratio": 2}, options={},
                               layers={"pointwise_method": "svd"},
                               stages={"layers": [["body.2"], ["attn.out_proj", "head"]], "epochs": 1})
    spec = parse_spec(data, "spec.yaml")
    [cfg] = plan_sweep(spec)
    env = TaskEnv(cfg.model.spec, spec.dataset, 0, False)
    torch.manual_seed(0)
    out = multistage_task(env, env.build().state_dict(), spec.finetune, cfg.stages, cfg.stage_epochs)
    status = {s["name"]: s for s in out.layer_status}
    assert status["attn.out_proj"]["status"] == "skipped" and "fails with this layer" in status["attn.out_proj"]["reason"]
    assert set(out.factors) == {"body.2", "head"}
