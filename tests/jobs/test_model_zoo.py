"""lowrank on the runner's model zoo: torchvision architectures (imported through
``jobs.tv``) counted, walked and compressed. The library's own tests (tests/lowrank) need no
part of the runner."""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import lowrank
from jobs.tv import import_torchvision


def _flop_counter_macs(model, shape):
    model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.zeros(shape))
    return fc.get_total_flops() // 2  # FLOPs = 2 x MACs


def _check_reports_add_up(model, new, reports, shape):
    p0, m0 = lowrank.count(model, shape)
    p1, m1 = lowrank.count(new, shape)
    s = lowrank.summarize(reports)
    assert p0 - s["params_saved"] == p1
    assert m0 - s["macs_saved"] == m1
    return p0 / p1, m0 / m1


def test_count_matches_flop_counter_on_resnet18():
    tv = import_torchvision()
    model = tv.models.resnet18(num_classes=10)
    params, macs = lowrank.count(model, (3, 224, 224))
    assert params == sum(p.numel() for p in model.parameters()) == 11181642
    assert macs == _flop_counter_macs(model, (1, 3, 224, 224))
    assert 1.7e9 < macs < 1.9e9  # the well-known 1.8 GMACs


def test_resnet18_tucker2_vbmf_and_spatial_svd_ratio2():
    tv = import_torchvision()
    model = tv.models.resnet18(num_classes=10).eval()
    shape = (3, 64, 64)
    plan = lowrank.plan_layers(model, "tucker2", "vbmf", options={"weakening": 0.6})
    assert "conv1" not in plan and "layer1.0.conv1" in plan and "fc" not in plan
    new, reports = lowrank.compress_model(model, plan, input_shape=shape)
    assert {r.status for r in reports} <= {"ok", "skipped"}
    assert sum(r.status == "ok" for r in reports) >= 10
    pr, mr = _check_reports_add_up(model, new, reports, shape)
    assert pr > 1 and mr > 1
    x = torch.randn(2, *shape)
    assert new(x).shape == (2, 10)

    plan = lowrank.plan_layers(model, "spatial-svd", "ratio", options={"ratio": 2})
    new, reports = lowrank.compress_model(model, plan, input_shape=shape)
    assert all(r.status == "ok" for r in reports)
    for r in reports:  # each layer at least 2x smaller in parameters, and close to 2x
        assert 2.0 <= (r.params_before - 0) / r.params_after < 2.2
    _check_reports_add_up(model, new, reports, shape)
    assert new(x).shape == (2, 10)


@pytest.mark.parametrize("arch", ["vgg11", "alexnet", "densenet121", "shufflenet_v2_x0_5", "mobilenet_v2"])
def test_walks_torchvision_architectures(arch):
    tv = import_torchvision()
    model = tv.models.get_model(arch, num_classes=7).eval()
    shape = (3, 64, 64)
    plan = lowrank.plan_layers(model, "tucker2", "ratio", options={"ratio": 2}, pointwise_method="svd")
    names = list(plan)[:2] + list(plan)[-1:]  # a few layers, first and last, keep it quick
    new, reports = lowrank.compress_model(model, {n: plan[n] for n in names}, input_shape=shape, on_error="record")
    assert {r.status for r in reports} <= {"ok", "skipped"}, [r.reason for r in reports]
    _check_reports_add_up(model, new, reports, shape)
    assert new(torch.randn(1, *shape)).shape == (1, 7)


def test_grouped_and_depthwise_layers_in_shufflenet_are_exact_or_reported():
    tv = import_torchvision()
    model = tv.models.shufflenet_v2_x0_5(num_classes=5).eval().double()
    dw = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1][:2]
    new, reports = lowrank.compress_model(model, {n: ("tucker2", 1) for n in dw}, on_error="record")
    # a depthwise conv has one channel per group: tucker2 at rank 1 per group is its full rank
    # and is bigger than the dense layer: skipped with the reason, never a wrong layer
    assert all(r.status == "skipped" and "more than the dense layer" in r.reason for r in reports)
    new, reports = lowrank.compress_model(model, {n: ("spatial-svd", 3, {"allow_larger": True}) for n in dw})
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    assert torch.allclose(new(x), model(x), atol=1e-10)
