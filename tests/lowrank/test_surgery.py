import subprocess
import sys

import torch
from torch import nn

import lowrank


def test_compress_model_does_not_touch_the_input_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.LazyLinear(4))
    model(torch.zeros(1, 3, 10, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new, reports = lowrank.compress_model(model, {"2": ("tucker2", (2, 3)), "4": ("svd", 2)}, input_shape=(3, 10, 10))
    assert isinstance(model[2], nn.Conv2d) and isinstance(new[2], lowrank.FactorizedConv2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [r.rank for r in reports] == [(2, 3), 2]
    assert all(0 < r.rel_error < 1 for r in reports)
    assert reports[0].to_dict()["rank"] == [2, 3]


def test_import_lowrank_loads_no_job_stack():
    code = ("import sys, lowrank; bad = [m for m in ('ray', 'mlflow', 'pydantic', 'yaml', 'torchvision') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_strategy_rank_that_would_grow_the_layer_is_skipped_in_every_spelling():
    """A rank chosen by a strategy (by name or as a RankRule, in a LayerPlan) that cannot make the
    layer smaller leaves it dense with the reason; only a fixed rank the caller gave raises."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    rule = lowrank.RankRule("ratio", ratio=50)
    for entry in (("cp3", "ratio", {"ratio": 50}), lowrank.LayerPlan("1", "cp3", rule), ("cp3", rule)):
        _, [rep] = lowrank.compress_model(model, {"1": entry}, input_shape=(3, 12, 12))
        assert rep.status == "skipped" and "not reachable" in rep.reason


def test_the_pointwise_layers_of_a_plan_get_the_rank_settings_but_not_the_methods_own_options():
    """``plan_layers(..., 'cp3', 'ratio', pointwise_method='svd', options={'ratio': 2, 'n_iter_max': 30})``:
    the classifier is compressed by SVD at 2x (it used to fail on ``n_iter_max`` and stay dense)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 12))
    plan = lowrank.plan_layers(model, "cp3", "ratio", pointwise_method="svd",
                               options={"ratio": 2, "n_iter_max": 30, "allow_larger": False})
    assert plan["2"] == ("cp3", "ratio", {"ratio": 2, "n_iter_max": 30, "allow_larger": False})
    assert plan["6"] == ("svd", "ratio", {"ratio": 2, "allow_larger": False})
    _, reports = lowrank.compress_model(model, plan, input_shape=(3, 10, 10), on_error="record")
    assert [(r.name, r.method, r.status) for r in reports] == [("2", "cp3", "ok"), ("6", "svd", "ok")]
    assert reports[1].params_before / reports[1].params_after >= 1.9


class _Tied(nn.Module):
    """One conv held under two names and called twice: a tied layer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.again = self.conv

    def forward(self, x):
        return self.again(torch.relu(self.conv(torch.relu(self.stem(x)))))


def test_a_layer_held_under_two_names_is_replaced_under_both_and_stays_shared():
    torch.manual_seed(0)
    model = _Tied().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    plan = lowrank.plan_layers(model, "tucker2", (16, 16), options={"allow_larger": True})  # full rank: exact
    assert list(plan) == ["conv"]
    new, (rep,) = lowrank.compress_model(model, plan, input_shape=(3, 8, 8))
    assert isinstance(new.conv, lowrank.FactorizedConv2d) and new.again is new.conv
    assert torch.allclose(new(x), model(x), atol=1e-10)
    assert lowrank.count(model, (3, 8, 8))[1] == 3 * 16 * 9 * 64 + 2 * rep.macs_before  # both calls counted
    assert lowrank.count(new, (3, 8, 8))[1] == 3 * 16 * 9 * 64 + 2 * rep.macs_after
    low, _ = lowrank.compress_model(model, lowrank.plan_layers(model, "tucker2", (4, 4)), input_shape=(3, 8, 8))
    assert low.again is low.conv and not any(
        type(m) is nn.Conv2d and m.weight.shape == (16, 16, 3, 3) for m in low.modules())


class _Attention(nn.Module):
    """A conv stem, then self-attention over its pixels: nn.MultiheadAttention reads
    ``out_proj.weight`` itself, so a factorized out_proj would break the model."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        t = self.conv(torch.relu(self.stem(x))).flatten(2).transpose(1, 2)
        return self.head(self.attn(t, t, t, need_weights=False)[0].mean(1))


def test_a_layer_whose_parent_reads_its_weight_is_left_dense_with_the_reason_and_the_others_kept():
    torch.manual_seed(0)
    model = _Attention().eval()
    plan = lowrank.plan_layers(model, "tucker2", "ratio", options={"ratio": 2.0}, pointwise_method="svd")
    assert set(plan) == {"conv", "attn.out_proj", "head"}
    for apply in ("compress", "factors"):
        if apply == "compress":
            new, reports = lowrank.compress_model(model, plan, input_shape=(3, 6, 6))
        else:
            factors = {n: lowrank.decompose(model.get_submodule(n).weight, m, r)
                       for n, (m, r) in {"conv": ("tucker2", (8, 8)), "attn.out_proj": ("svd", 4),
                                         "head": ("svd", 4)}.items()}
            new, reports = lowrank.apply_factors(model, factors, input_shape=(3, 6, 6))
        by = {r.name: r for r in reports}
        assert by["conv"].status == by["head"].status == "ok", apply
        assert by["attn.out_proj"].status == "skipped" and "MultiheadAttention" in by["attn.out_proj"].reason
        assert by["attn.out_proj"].params_after == by["attn.out_proj"].params_before
        assert type(new.attn.out_proj) is type(model.attn.out_proj)
        assert isinstance(new.conv, lowrank.FactorizedConv2d) and isinstance(new.head, lowrank.FactorizedLinear)
        assert new(torch.randn(2, 3, 6, 6)).shape == (2, 10)
