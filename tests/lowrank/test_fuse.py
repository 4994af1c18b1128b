"""Merging chains of 1x1 convs for deployment (lowrank.fuse_pointwise)."""
import pytest
import torch
from torch import nn

import lowrank


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c).double()
    with torch.no_grad():  # statistics and affine far from the identity
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn.eval()


class Chain(nn.Module):
    def __init__(self, *mods, act=None, reuse=False):
        super().__init__()
        self.head = nn.Conv2d(3, 16, 3, padding=1).double()
        self.body = nn.Sequential(*mods)
        self.act, self.reuse = act, reuse

    def forward(self, x):
        h = self.head(x)
        y = self.body(h)
        return y + h.mean(1, keepdim=True) if self.reuse else y


def _pw(cin, cout, stride=1, bias=True):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=bias).double()


def _check_exact(model, merged_count, shape=(2, 3, 13, 11)):
    model = model.eval()
    fused, n = lowrank.fuse_pointwise(model)
    assert n == merged_count
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)
    return fused


@pytest.mark.parametrize("strides", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_a_pair_with_batchnorm_between_merges_exactly_with_strides_multiplied(strides, bias):
    """16 -> 4 -> 16 is a bottleneck (kept); 16 -> 32 -> 8 costs 16*32 + 32*8 = 768 per pixel
    against 16*8 = 128 merged."""
    model = Chain(_pw(16, 32, strides[0], bias), _bn(32), _pw(32, 8, strides[1], bias))
    fused = _check_exact(model, 1)
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 and convs[1].stride == (strides[0] * strides[1],) * 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert lowrank.count(fused, (3, 13, 11))[1] < lowrank.count(model, (3, 13, 11))[1]


def test_a_chain_of_three_merges_into_one():
    _check_exact(Chain(_pw(16, 40), _pw(40, 40), _bn(40), _pw(40, 8)), 2)


@pytest.mark.parametrize("body,why", [
    ((_pw(16, 32), nn.ReLU(), _pw(32, 8)), "a non-linearity between"),
    ((_pw(16, 4), _pw(4, 16)), "a bottleneck: merging would cost more"),
    ((nn.Conv2d(16, 32, 3, padding=1).double(), _pw(32, 8)), "not 1x1"),
    ((nn.Conv2d(16, 32, 1, groups=4).double(), _pw(32, 8)), "grouped"),
    ((nn.Conv2d(16, 32, 1, padding=1).double(), _pw(32, 8)), "padded"),
])
def test_pairs_that_are_not_one_linear_map_or_not_worth_merging_are_left(body, why):
    assert lowrank.fuse_pointwise(Chain(*body).eval())[1] == 0, why


def test_an_intermediate_map_read_twice_is_not_merged_away():
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _pw(3, 32), _pw(32, 8)

        def forward(self, x):
            h = self.a(x)
            return self.b(h), h.sum(1)

    assert lowrank.fuse_pointwise(Both().eval())[1] == 0


def test_a_conv_subclass_with_its_own_forward_is_not_taken_for_a_plain_conv():
    class Doubled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = Chain(Doubled(16, 32, 1).double(), _pw(32, 8))
    _check_exact(model, 0)


def test_a_model_that_does_not_trace_is_returned_as_it_is():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _pw(3, 32), _pw(32, 8)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = -x
            return self.b(self.a(x))

    model = Branchy().eval()
    assert lowrank.fuse_pointwise(model) == (model, 0)


def test_neighbouring_svd_factorized_pointwise_convs_merge_across_the_layers():
    """The last stage of one SVD-factorized 1x1 conv and the first of the next (the pattern of
    EfficientNet's project conv, BatchNorm, next block's expand conv) are one cheap 16 -> 16 map,
    which then merges into the first stage too (64 -> 16 -> 16); the 16 -> 64 stage after it
    stays (64 -> 16 -> 64 is the factorization's bottleneck)."""
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 1), nn.BatchNorm2d(64),
                          nn.Conv2d(64, 64, 1), nn.ReLU()).double()
    with torch.no_grad():
        model[3].running_var.uniform_(0.5, 2)
    model.eval()
    small, reports = lowrank.compress_model(model, {"2": ("svd", 16, {}), "4": ("svd", 16, {})},
                                            input_shape=(3, 8, 8))
    assert [r.status for r in reports] == ["ok", "ok"]
    fused = _check_exact(small.double(), 2, shape=(2, 3, 8, 8))
    assert sorted(m.weight.shape[:2] for m in fused.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
                  ) == [(16, 64), (64, 16)]
    assert lowrank.count(fused, (3, 8, 8))[1] < lowrank.count(small, (3, 8, 8))[1]


def test_batchnorm_without_affine_merges_and_without_running_statistics_is_left():
    plain = nn.BatchNorm2d(32, affine=False).double()
    with torch.no_grad():
        plain.running_var.uniform_(0.5, 2)
    _check_exact(Chain(_pw(16, 32), plain, _pw(32, 8)), 1)
    batch_stats = nn.BatchNorm2d(32, track_running_stats=False).double()  # normalises by each batch: not linear
    assert lowrank.fuse_pointwise(Chain(_pw(16, 32), batch_stats, _pw(32, 8)).eval())[1] == 0
