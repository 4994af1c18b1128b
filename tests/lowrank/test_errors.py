import pytest
import torch
from torch import nn

import lowrank
from lowrank import LowRankError, RankTooLargeError, UnsupportedLayerError


@pytest.fixture
def conv():
    return nn.Conv2d(8, 16, 3, padding=1)


@pytest.mark.parametrize("rank,match", [(0, "must be >= 1, got 0"), (-3, "must be >= 1, got -3"),
                                        (1000, "above the maximum"), (2.5, "must be an integer, got 2.5"),
                                        ("seven", "unknown rank strategy 'seven'")])
def test_bad_rank(conv, rank, match):
    with pytest.raises(LowRankError, match=match):
        lowrank.factorize_layer(conv, "spatial-svd", rank)


def test_rank_above_maximum_names_accepted_range(conv):
    with pytest.raises(LowRankError, match=r"accepted: 1\.\.24"):
        lowrank.decompose(conv.weight, "spatial-svd", 25)


def test_rank_that_grows_the_layer_is_refused_unless_allowed(conv):
    with pytest.raises(RankTooLargeError, match="more than the dense layer's 1152"):
        lowrank.factorize_layer(conv, "spatial-svd", 20)
    layer = lowrank.factorize_layer(conv, "spatial-svd", 20, allow_larger=True)
    assert sum(p.numel() for p in layer.parameters()) > sum(p.numel() for p in conv.parameters())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(conv, bad):
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = bad
    with pytest.raises(LowRankError, match="non-finite"):
        lowrank.factorize_layer(conv, "tucker2", 4)


def test_unknown_method(conv):
    with pytest.raises(LowRankError, match=r"unknown method 'tuker2'; accepted: cp3, .*tucker2"):
        lowrank.factorize_layer(conv, "tuker2", 4)


@pytest.mark.parametrize("module", [nn.Conv1d(4, 4, 3), nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 4, 3)])
def test_unsupported_module_type(module):
    with pytest.raises(UnsupportedLayerError, match=f"unsupported module type {type(module).__name__}"):
        lowrank.factorize_layer(module, "tucker2", 2)


def test_method_layer_mismatch():
    with pytest.raises(UnsupportedLayerError, match="svd factorizes Linear layers and 1x1 convs"):
        lowrank.factorize_layer(nn.Conv2d(4, 4, 3), "svd", 2)
    with pytest.raises(UnsupportedLayerError, match="does not apply to nn.Linear"):
        lowrank.factorize_layer(nn.Linear(4, 4), "tucker2", 2)


def test_unknown_option(conv):
    with pytest.raises(LowRankError, match=r"unknown option\(s\) \['n_iters'\] for method 'tucker2'"):
        lowrank.factorize_layer(conv, "tucker2", 2, n_iters=3)


def test_strategy_errors(conv):
    with pytest.raises(LowRankError, match="needs ratio >= 1"):
        lowrank.select_rank(conv, "tucker2", "ratio", ratio=0.5)
    with pytest.raises(LowRankError, match="needs 0 < energy <= 1"):
        lowrank.select_rank(conv, "tucker2", "energy", energy=1.5)
    with pytest.raises(LowRankError, match="weakening must be in"):
        lowrank.select_rank(conv, "tucker2", "vbmf", weakening=2)
    with pytest.raises(LowRankError, match="not reachable"):
        lowrank.select_rank(conv, "tucker2", "ratio", ratio=1000)
    with pytest.raises(LowRankError, match="target='macs' needs the conv module"):
        lowrank.select_rank(conv.weight, "tucker2", "ratio", ratio=2, target="macs")


def test_cuda_requested_without_cuda(conv):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(LowRankError, match="CUDA is not available"):
        lowrank.decompose(conv.weight, "cp3", 4, device="cuda")


def test_plan_errors():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    with pytest.raises(LowRankError, match="no layer named 'conv9'"):
        lowrank.compress_model(model, {"conv9": ("tucker2", 2)})
    with pytest.raises(LowRankError, match="must be \\(method, rank\\)"):
        lowrank.compress_model(model, {"2": "tucker2"})
