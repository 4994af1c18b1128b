"""Which registered version gets the ``candidate`` alias, in a real MLflow registry (sqlite)."""
import pytest

from jobs.tracking import Tracker


def _tags(cfg, acc, ratio=2.0, macs=1.5, degenerate=0, speedup=1.2):
    return {"config_hash": cfg, "acc_ft": str(acc), "compression_ratio": str(ratio), "mac_ratio": str(macs),
            "degenerate_layers": str(degenerate), "speedup_b1": str(speedup)}


@pytest.mark.parametrize("order", [1, -1])
def test_candidate_is_the_best_and_ties_never_depend_on_which_version_came_first(tmp_path, order):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "candidates")
    client = tracker.client
    versions = [  # equal accuracy and size: the tie goes to fewer MACs, no degenerate layer, then speed
        _tags("a-cp3", 0.958, degenerate=4, speedup=1.43),
        _tags("b-cp3-epc", 0.958, degenerate=0, speedup=1.31),
        _tags("c-tucker2", 0.958, macs=1.4, speedup=1.9),
        _tags("d-spatial", 0.950, ratio=3.0, speedup=2.5),  # smaller and faster, less accurate
    ][::order]
    client.create_registered_model("lowrank-m")
    for tags in versions:
        client.create_model_version("lowrank-m", str(tmp_path / tags["config_hash"]), tags=tags)

    number = tracker.set_candidate("lowrank-m")
    chosen = client.get_model_version_by_alias("lowrank-m", "candidate")
    assert chosen.version == number and chosen.tags["config_hash"] == "b-cp3-epc"

    client.set_model_version_tag("lowrank-m", number, "speedup_b1", "nan")  # not timed: no claim on speed
    client.create_model_version("lowrank-m", str(tmp_path / "e"), tags=_tags("e-cp3-epc", 0.958, speedup=1.0))
    assert client.get_model_version("lowrank-m", tracker.set_candidate("lowrank-m")).tags["config_hash"] == "e-cp3-epc"
