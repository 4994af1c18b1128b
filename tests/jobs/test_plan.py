"""The plan, without Ray or MLflow: the spec in lowrank's terms, stable config hashes."""
import json
import re
from pathlib import Path

import pytest
import yaml

import lowrank
from jobs.models import build_model
from jobs.plan import mlflow_params, plan_sweep
from jobs.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
PINNED = json.loads((ROOT / "tests" / "fixtures" / "config_hashes.json").read_text())


def _tiny(**compression):
    data = yaml.safe_load((ROOT / "tests" / "specs" / "tiny.yaml").read_text())
    data["compression"].update(compression)
    return parse_spec(data, "spec.yaml")


@pytest.mark.parametrize("path", sorted(PINNED), ids=str)
def test_config_hashes_of_every_shipped_spec_are_pinned(path):
    """A registry filled by an earlier version is never re-run after an upgrade (regenerated once, on
    purpose, when what determines a result changed: plan.PREPROCESSING)."""
    spec = load_spec(None if path == "default" else ROOT / path)
    assert {c.label: c.config_hash for c in plan_sweep(spec)} == PINNED[path]


@pytest.mark.parametrize("rank,expect", [
    ({"strategy": "ratio", "ratio": 2}, lowrank.RankRule("ratio", ratio=2.0, target="params")),
    ({"strategy": "ratio", "ratio": 3, "target": "macs"}, lowrank.RankRule("ratio", ratio=3.0, target="macs")),
    ({"strategy": "fixed", "rank": 4}, lowrank.RankRule("fixed", rank=4)),
    ({"strategy": "fixed", "rank": [3, 5]}, lowrank.RankRule("fixed", rank=(3, 5))),
    ({"strategy": "energy", "energy": 0.9, "min_rank": 2}, lowrank.RankRule("energy", energy=0.9, min_rank=2)),
    ({"strategy": "vbmf", "weakening": 0.5}, lowrank.RankRule("vbmf", weakening=0.5)),
    ({"strategy": "vbmf", "zero": "dense"}, lowrank.RankRule("vbmf", zero="dense")),
    ({"strategy": "ratio", "ratio": 2, "multiple_of": 8}, lowrank.RankRule("ratio", ratio=2.0, multiple_of=8)),
    ({"strategy": "energy", "energy": 0.9, "multiple_of": 4}, lowrank.RankRule("energy", energy=0.9, multiple_of=4)),
])
def test_every_rank_strategy_becomes_a_rank_rule_per_layer(rank, expect):
    cfg = next(c for c in plan_sweep(_tiny(rank=rank, methods=["tucker2"], options={})) if c.kind == "oneshot")
    assert [lp.name for lp in cfg.layers] == ["features.3", "features.6", "features.9", "features.12"]
    for lp in cfg.layers:
        rule = lp.rank
        size = rule.input_size
        assert rule.__class__ is lowrank.RankRule and lp.method == "tucker2"
        # ratio rules carry each layer's own input size (16 px in, two stride-2 convs)
        assert (size in {(16, 16), (8, 8), (4, 4)}) if rule.strategy == "ratio" else size is None
        assert lowrank.RankRule.of(rule, input_size=None) == lowrank.RankRule.of(expect, input_size=None)


def test_vbmf_zero_enters_the_config_hash_only_when_set_and_only_with_vbmf():
    from jobs.spec import SpecError

    plain, zero_default, dense = (next(iter(plan_sweep(_tiny(rank={"strategy": "vbmf", **z}, methods=["tucker2"],
                                                                options={})))).config_hash
                                  for z in ({}, {"zero": "min_rank"}, {"zero": "dense"}))
    assert plain == zero_default != dense
    with pytest.raises(SpecError, match="rank.zero .* applies to strategy 'vbmf', not 'ratio'"):
        _tiny(rank={"strategy": "ratio", "ratio": 2, "zero": "dense"})


def test_multiple_of_enters_the_config_hash_only_when_set_and_rounds_every_layer_rank(tmp_path):
    from jobs.spec import SpecError

    plain, one, eight = (next(iter(plan_sweep(_tiny(rank={"strategy": "ratio", "ratio": 2, **z}, methods=["tucker2"],
                                                    options={})))) for z in ({}, {"multiple_of": 1}, {"multiple_of": 8}))
    assert plain.config_hash == one.config_hash != eight.config_hash
    assert eight.params["rank.multiple_of"] == 8 and "rank.multiple_of" not in plain.params
    model = build_model("smallcnn", 10)
    for lp_plain, lp in zip(plain.layers, eight.layers):
        r_plain = lp_plain.rank.resolve(model.get_submodule(lp.name), "tucker2")
        r = lp.rank.resolve(model.get_submodule(lp.name), "tucker2")
        assert all(v % 8 == 0 and abs(v - v0) <= 4 for v, v0 in zip(r, r_plain)), (r, r_plain)
    with pytest.raises(SpecError, match="multiple_of rounds the ranks a strategy chooses"):
        _tiny(rank={"strategy": "fixed", "rank": 4, "multiple_of": 8})
    searched = [next(iter(plan_sweep(_tiny(rank={"strategy": "ratio", "ratio": 2, **z},
                                           search={"strategies": ["uniform"], "ratio": 2})))) for z in ({}, {"multiple_of": 8})]
    assert [c.multiple_of for c in searched] == [1, 8] and searched[0].config_hash != searched[1].config_hash


def test_macs_target_on_the_one_shot_path_reaches_the_ratio():
    """The bug this plan fixed: target 'macs' left every layer dense on the one-shot path."""
    cfg = next(iter(plan_sweep(_tiny(rank={"strategy": "ratio", "ratio": 2, "target": "macs"}))))
    model = build_model("smallcnn", 10)
    _, dense_macs = lowrank.count(model, (3, 16, 16))
    before = lowrank.per_layer_macs(model, (3, 16, 16))
    for lp in cfg.layers:  # as the decompose task does: the plan alone, no input shape given
        layer, _ = lp.factorize(model.get_submodule(lp.name))
        lowrank.replace_submodule(model, lp.name, layer)
    after = lowrank.per_layer_macs(model, (3, 16, 16))
    for lp in cfg.layers:  # a factorized layer's MACs are those of its stages
        stages = sum(v for k, v in after.items() if k.startswith(lp.name + "."))
        assert before[lp.name] / stages >= 2.0, lp.name
    assert dense_macs / lowrank.count(model, (3, 16, 16))[1] >= 1.5


def test_method_options_stay_with_their_method_and_pointwise_layers_take_none():
    spec = _tiny(methods=["cp3-epc"], options={"cp3-epc": {"n_iter_max": 30, "epc_max_sweeps": 20}},
                 layers={"pointwise_method": "svd", "skip_first": True})
    [cfg] = plan_sweep(spec)
    by = {lp.name: lp for lp in cfg.layers}
    assert by["features.3"].options == {"n_iter_max": 30, "epc_max_sweeps": 20}
    assert by["fc"].method == "svd" and by["fc"].options == {}


def test_params_are_derived_from_the_plan():
    [tucker, epc] = plan_sweep(_tiny())
    p = mlflow_params(epc)
    assert p["method"] == "cp3-epc" and p["config_hash"] == epc.config_hash and p["rank.ratio"] == 2.0
    assert p["option.epc_max_sweeps"] == 20 and "option.n_iter_max" not in mlflow_params(tucker)


@pytest.mark.parametrize("options,expected", [
    ({"cp3-epc": {"n_iter_max": -5}}, "option 'n_iter_max' of method 'cp3-epc' must be >= 1, got -5"),
    ({"cp3-epc": {"tol": "tight"}}, "option 'tol' of method 'cp3-epc' must be a finite number, got 'tight'"),
    ({"cp3-epc": {"epc_objective": "size"}}, "must be one of 'norm', 'sens'"),
    ({"tucker2": {"n_iter_max": 2.5}}, "option 'n_iter_max' of method 'tucker2' must be an integer"),
])
def test_method_options_are_typed_and_range_checked_at_validation(options, expected):
    from jobs.spec import SpecError

    with pytest.raises(SpecError, match=re.escape(expected)):
        _tiny(options=options)
