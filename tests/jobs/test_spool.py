"""Results kept on disk until MLflow has them: what is saved loads back whole, including an
entry written by the version before the typed results (spooled, then the runner upgraded)."""
import json

import torch

import lowrank
from jobs import spool
from jobs.results import EvalResult


def _result():
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    _, f = lowrank.factorize_with_factors(conv, "tucker2", (2, 3))
    return EvalResult(state_dict={"w": torch.ones(2)}, factors={"conv": f}, acc_post={"top1": 0.5},
                      acc_ft={"top1": 0.9}, params=10, macs=100, latency={"b1": 1e-3, "b32": 1e-2}, reports=[],
                      layer_status=[{"name": "conv", "method": "tucker2", "status": "ok", "reason": "", "seconds": 0.1}],
                      allocation="conv=tucker2:(2, 3)")


def test_a_spooled_result_loads_back_whole(tmp_path):
    base = {"acc": {"top1": 0.95}, "params": 20, "macs": 200, "latency": {"b1": 2e-3}, "input_shape": (3, 8, 8),
            "source": "cache"}
    saved = _result()
    spool.save(tmp_path / "entry", base, saved)
    base2, got = spool.load(tmp_path / "entry")
    assert base2 == base and got.allocation == "conv=tucker2:(2, 3)" and got.acc_ft == {"top1": 0.9}
    assert torch.equal(got.factors["conv"].core, saved.factors["conv"].core)
    assert got.layer_status == saved.layer_status and torch.equal(got.state_dict["w"], saved.state_dict["w"])
    assert list(spool.pending(tmp_path.parent, tmp_path.name)) == []  # pending() lists sweeps' entries only


def test_an_entry_spooled_by_the_previous_version_still_loads(tmp_path):
    spool.save(tmp_path / "entry", {"input_shape": [3, 8, 8]}, _result())
    payload = json.loads((tmp_path / "entry" / "result.json").read_text())
    old = {"cfg": {"model": "smallcnn"}, "base": payload["base"], "factors": payload["factors"],
           "state_keys": payload["state_keys"], "out": {**payload["result"], "train_seconds_dense": 3.0}}
    (tmp_path / "entry" / "result.json").write_text(json.dumps(old))
    base, got = spool.load(tmp_path / "entry")
    assert base["input_shape"] == (3, 8, 8) and got.params == 10 and set(got.factors) == {"conv"}
