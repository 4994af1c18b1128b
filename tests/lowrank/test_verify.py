"""Surgery verifies every replaced layer against the module it replaces: subclasses of nn.Conv2d
with their own forward (TF-style "same" padding computed from the input size, as
efficientnet-lite-pytorch does) are reproduced exactly or left dense with the reason."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowrank


class Conv2dSame(nn.Conv2d):
    """TF/Keras "same" padding, computed in forward from the input size; padding=0 stored."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ScaledConv(nn.Conv2d):
    """A forward no padding reproduces."""

    def forward(self, x):
        return 2 * super().forward(x)


class PlainSubclass(nn.Conv2d):
    """Its own forward, but the plain computation."""

    def forward(self, x):
        return super().forward(x)


def _two_layers(first):
    torch.manual_seed(0)
    return nn.Sequential(first, nn.ReLU(), nn.Conv2d(32, 48, 3, padding=1))


def test_the_bug_a_same_padding_conv_keeps_its_output_size():
    model = _two_layers(Conv2dSame(3, 32, 3, stride=2, bias=False)).eval()
    x = torch.randn(1, 3, 224, 224)
    assert model[0](x).shape == (1, 32, 112, 112)
    for method in ("spatial-svd", "tucker2", "cp4"):
        plan = {"0": (method, "ratio", {"ratio": 1.5, "allow_larger": True}), "2": (method, "ratio", {"ratio": 2.0})}
        if method == "cp4":
            for v in plan.values():
                v[2]["n_iter_max"] = 20
        new, reports = lowrank.compress_model(model, plan, input_shape=(3, 224, 224), on_error="record")
        assert reports[0].status == "ok", reports[0].reason
        assert isinstance(new[0], nn.Sequential) and isinstance(new[0][0], nn.ZeroPad2d)
        assert new(x).shape == model(x).shape == (1, 48, 112, 112)


@pytest.mark.parametrize("method,rank", [("spatial-svd", 9), ("tucker2", (3, 32))])
def test_at_full_rank_the_replaced_same_padding_layer_gives_the_same_values(method, rank):
    conv = Conv2dSame(3, 32, 3, stride=2, bias=True)
    model = nn.Sequential(conv).eval()
    for size in (224, 223):  # odd sizes pad asymmetrically
        new, [rep] = lowrank.compress_model(model, {"0": (method, rank, {"allow_larger": True})},
                                            input_shape=(3, size, size))
        x = torch.randn(2, 3, size, size)
        assert rep.status == "ok"
        torch.testing.assert_close(new(x), model(x), rtol=1e-4, atol=1e-4)


def test_apply_factors_verifies_too():
    model = _two_layers(Conv2dSame(3, 32, 3, stride=2)).eval()
    _, f = lowrank.factorize_with_factors(model[0], "tucker2", (3, 16), allow_larger=True)
    new, [rep] = lowrank.apply_factors(model, {"0": f}, input_shape=(3, 64, 64))
    assert rep.status == "ok" and new(torch.randn(1, 3, 64, 64)).shape == (1, 48, 32, 32)
    same, [rep] = lowrank.apply_factors(model, {"0": f})  # no input size: cannot be verified, left dense
    assert rep.status == "skipped" and "give input_shape" in rep.reason and same[0].__class__ is Conv2dSame


def test_a_forward_nothing_reproduces_is_left_dense_with_the_reason():
    model = _two_layers(ScaledConv(3, 32, 3, padding=1)).eval()
    new, reports = lowrank.compress_model(model, {"0": ("tucker2", (3, 16), {"allow_larger": True}), "2": ("tucker2", (16, 16))},
                                          input_shape=(3, 32, 32))
    assert reports[0].status == "skipped"
    assert "ScaledConv (a Conv2d with its own forward) does not compute a plain Conv2d" in reports[0].reason
    assert reports[0].params_after == reports[0].params_before
    assert type(new[0]) is ScaledConv and reports[1].status == "ok"
    x = torch.randn(1, 3, 32, 32)
    assert new(x).shape == model(x).shape


def test_a_subclass_that_computes_the_plain_layer_is_replaced_as_is():
    model = _two_layers(PlainSubclass(3, 32, 3, padding=1)).eval()
    new, [rep] = lowrank.compress_model(model, {"0": ("spatial-svd", 9, {"allow_larger": True})},
                                        input_shape=(3, 20, 20))
    assert rep.status == "ok" and isinstance(new[0], lowrank.FactorizedConv2d)
    x = torch.randn(1, 3, 20, 20)
    torch.testing.assert_close(new(x), model(x), rtol=1e-4, atol=1e-4)


def test_a_same_padding_kernel_larger_than_its_unpadded_input_is_verified_not_raised():
    """At 2x2 maps (EfficientNet's 5x5 depthwise convs at 64 px) the plain layer cannot even run
    without the padding: the probe must say so, not raise, and the padding stage reproduces it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, stride=8, padding=1), nn.ReLU(), Conv2dSame(16, 24, 5)).eval()
    x = torch.randn(2, 3, 16, 16)
    assert model(x).shape == (2, 24, 2, 2)
    new, [rep] = lowrank.compress_model(model, {"2": ("tucker2", (16, 24), {"allow_larger": True})},
                                        input_shape=(3, 16, 16), on_error="record")
    assert rep.status == "ok", rep.reason
    assert isinstance(new[2][0], nn.ZeroPad2d)
    torch.testing.assert_close(new(x), model(x), rtol=1e-4, atol=1e-5)
    odd = nn.Sequential(nn.Conv2d(3, 16, 3, stride=8, padding=1), nn.ReLU(), ScaledConv(16, 24, 5, padding=2)).eval()
    _, [rep] = lowrank.compress_model(odd, {"2": ("tucker2", (8, 8))}, input_shape=(3, 16, 16), on_error="record")
    assert rep.status == "skipped" and "no padding reproduces it" in rep.reason
