"""The vertical-BN-horizontal parametrisation (Tai et al.), BN folding, and factorized layers
back to dense convs."""
import pytest
import torch
from torch import nn

import lowrank
from lowrank.errors import LowRankError
from lowrank.reparam import (
    LowRankBNConv2d,
    factors_of,
    fold_bn,
    to_dense,
    to_lowrank_bn,
)

GEOMETRIES = [
    dict(in_channels=8, out_channels=12, kernel_size=3, padding=1),
    dict(in_channels=8, out_channels=12, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), bias=False),
    dict(in_channels=8, out_channels=12, kernel_size=4, padding="same", dilation=1),  # asymmetric
    dict(in_channels=8, out_channels=12, kernel_size=3, padding=2, dilation=2, groups=2),
    dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, padding_mode="reflect"),
]


def _net(conv_kw):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(**conv_kw), nn.BatchNorm2d(12),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5)).double()


@pytest.mark.parametrize("conv_kw", GEOMETRIES)
def test_folded_form_computes_the_same_function(conv_kw):
    net, _ = to_lowrank_bn(_net(conv_kw), ratio=1.5, init="random")
    lr = [m for m in net.modules() if isinstance(m, LowRankBNConv2d)]
    assert len(lr) == 2 and all(any(isinstance(s, nn.BatchNorm2d) for s in m) for m in lr)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x = torch.randn(16, 3, 11, 13, dtype=torch.float64)
    for _ in range(5):  # a few steps: BN statistics and affine parameters move away from identity
        net.train()
        loss = net(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    folded, factors = fold_bn(net)
    assert not any(isinstance(m, LowRankBNConv2d) for m in folded.modules())
    assert not any(isinstance(s, nn.BatchNorm2d) for m in folded.modules() if isinstance(m, lowrank.FactorizedConv2d)
                   for s in m)
    assert set(factors) == {"0", "2"} and all(f.vertical_bias is not None for f in factors.values())
    y = torch.randn(4, 3, 11, 13, dtype=torch.float64)
    torch.testing.assert_close(folded(y), net(y), rtol=1e-10, atol=1e-12)
    # the folded factors rebuild the same layers on the dense model (how the runner re-creates it)
    rebuilt, _ = lowrank.apply_factors(_net(conv_kw), factors)
    rebuilt.load_state_dict(folded.state_dict())
    torch.testing.assert_close(rebuilt.eval()(y), net(y), rtol=1e-10, atol=1e-12)
    assert lowrank.count(folded, (3, 11, 13))[0] < lowrank.count(_net(conv_kw), (3, 11, 13))[0]


def test_svd_init_is_the_spatial_svd_in_eval_mode():
    net = _net(GEOMETRIES[0]).eval()
    lr, reports = to_lowrank_bn(net, rank=4, init="svd")
    ref, _ = lowrank.compress_model(net, {"0": ("spatial-svd", 4), "2": ("spatial-svd", 4)})
    assert [r.rank for r in reports] == [4, 4]
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(lr.eval()(x), ref.eval()(x), rtol=1e-10, atol=1e-12)


def test_bad_requests_are_refused():
    net = _net(GEOMETRIES[0])
    with pytest.raises(LowRankError, match="exactly one of rank"):
        to_lowrank_bn(net, rank=2, ratio=2)
    with pytest.raises(LowRankError, match="no conv with a spatial kernel"):
        to_lowrank_bn(net, rank=2, include=["7"])
    with pytest.raises(LowRankError, match="unknown init 'zeros'"):
        to_lowrank_bn(net, rank=2, init="zeros")


@pytest.mark.parametrize("method", ["svd", "spatial-svd", "tucker2", "cp3", "cp4"])
@pytest.mark.parametrize("conv_kw", GEOMETRIES[:4])
def test_factorized_layers_back_to_dense(method, conv_kw):
    conv = nn.Conv2d(**conv_kw).double()
    if method == "svd":
        conv = nn.Conv2d(8, 12, 1, stride=conv.stride, bias=conv.bias is not None, groups=conv.groups).double()
    rank = {"svd": 2, "spatial-svd": 5, "tucker2": (3, 5), "cp3": 6, "cp4": 6}[method]
    layer = lowrank.factorize_layer(conv, method, rank, **({"n_iter_max": 5} if method.startswith("cp") else {}))
    with torch.no_grad():  # "fine-tuning": the factors move; the dense conv must follow
        for p in layer.parameters():
            p.add_(0.01 * torch.randn_like(p))
    dense = to_dense(layer)
    assert type(dense) is nn.Conv2d and dense.weight.shape == conv.weight.shape
    x = torch.randn(2, 8, 10, 11, dtype=torch.float64)
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-10, atol=1e-10)
    assert type(factors_of(layer)).__name__.endswith("Factors")
