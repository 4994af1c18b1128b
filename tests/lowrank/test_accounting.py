import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import lowrank
from lowrank.geometry import ConvGeometry
from lowrank.ranks import _layer_cost
from lowrank.registry import KernelShape


def _flop_counter_macs(model, shape):
    model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.zeros(shape))
    return fc.get_total_flops() // 2  # FLOPs = 2 x MACs


@pytest.mark.parametrize("method", lowrank.list_methods())
@pytest.mark.parametrize("geom", [dict(stride=1, padding=1), dict(stride=2, padding=1), dict(stride=1, padding="same")])
def test_count_matches_flop_counter_and_cost_model_on_factorized_layers(method, geom):
    k = 1 if method == "svd" else 3
    if geom.get("padding") == "same" and k == 1:
        geom = dict(stride=1, padding=0)
    conv = nn.Conv2d(16, 24, k, **geom)
    layer = lowrank.factorize_layer(conv, method, 4, **({"n_iter_max": 5} if method.startswith("cp") else {}))
    shape = (1, 16, 15, 13)
    params, macs = lowrank.count(layer, shape)
    assert macs == _flop_counter_macs(layer, shape)
    # the closed-form cost model used by rank selection agrees with the hooks
    m = lowrank.METHODS[method]
    rank = layer.rank
    kshape = KernelShape.of(conv)
    model_macs, dense = _layer_cost(m, kshape, rank, "macs", ConvGeometry.from_conv(conv), (15, 13))
    assert model_macs == macs
    assert dense == lowrank.count(conv, shape)[1]
    assert params == m.n_params(kshape, rank) + 24  # + bias


def test_spatial_svd_macs_formula_from_the_paper():
    # Tai et al.: d K (C H' W + N H' W') for stride s (vertical stage runs at the un-strided width)
    conv = nn.Conv2d(16, 24, 3, stride=2, padding=1)
    layer = lowrank.factorize_layer(conv, "spatial-svd", 5)
    _, macs = lowrank.count(layer, (16, 15, 13))
    h_out, w_out = 8, 7
    assert macs == 3 * 5 * (16 * h_out * 13 + 24 * h_out * w_out)
