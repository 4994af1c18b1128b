import pytest
import torch

import lowrank
from lowrank.vbmf import evb_tau


def test_tau_exact_root():
    assert evb_tau(1.0) == pytest.approx(2.51286, abs=1e-5)
    assert evb_tau(1 / 9) == pytest.approx(0.8642, abs=1e-4)
    assert evb_tau(0.01) == pytest.approx(0.2829, abs=1e-4)


@pytest.mark.parametrize("l,m,rank,sigma", [(64, 576, 10, 1.0), (128, 1152, 30, 0.5), (96, 864, 20, 0.7),
                                            (256, 2304, 40, 0.5)])
def test_evbmf_recovers_rank_and_noise(l, m, rank, sigma):
    g = torch.Generator().manual_seed(l + rank)
    a = torch.randn(l, rank, generator=g, dtype=torch.float64)
    b = torch.randn(m, rank, generator=g, dtype=torch.float64)
    v = a @ b.T + sigma * torch.randn(l, m, generator=g, dtype=torch.float64)
    r, s2 = lowrank.evbmf(v)
    assert r == rank
    assert s2 == pytest.approx(sigma**2, rel=0.01)  # noise variance to two digits
    r_t, _ = lowrank.evbmf(v.T)  # orientation does not matter
    assert r_t == rank


def test_evbmf_pure_noise_gives_rank_zero_and_select_rank_keeps_min_rank():
    v = torch.randn(32, 288, dtype=torch.float64)
    assert lowrank.evbmf(v)[0] == 0
    w = torch.randn(32, 32, 3, 3)
    assert lowrank.select_rank(w, "tucker2", "vbmf") == (1, 1)
    assert lowrank.select_rank(w, "tucker2", "vbmf", min_rank=4) == (4, 4)


def test_tucker_vbmf_ranks_on_noisy_tucker_kernel():
    core = torch.randn(20, 12, 3, 3, dtype=torch.float64)
    ut, _ = torch.linalg.qr(torch.randn(64, 20, dtype=torch.float64))
    us, _ = torch.linalg.qr(torch.randn(64, 12, dtype=torch.float64))
    w = torch.einsum("pqij,tp,sq->tsij", core, ut, us)
    w = w + 0.05 * w.std() * torch.randn_like(w)
    assert lowrank.select_rank(w, "tucker2", "vbmf") == (12, 20)
    # MUSCO weakening: k=0 keeps full rank, k=0.5 goes half-way
    assert lowrank.select_rank(w, "tucker2", "vbmf", weakening=0.0, allow_larger=True) == (64, 64)
    assert lowrank.select_rank(w, "tucker2", "vbmf", weakening=0.5) == (38, 42)


def test_vbmf_rank_zero_leaves_the_layer_dense_when_asked():
    """``zero='dense'``: where no singular value stands above VBMF's noise estimate (a kernel like a
    random matrix), the layer is left dense with the reason, not cut to rank 1; a kernel with
    structure in every mode is factorized as before."""
    torch.manual_seed(0)
    noise = torch.nn.Conv2d(32, 32, 3)
    with pytest.raises(lowrank.NoStructureError, match="no component above the noise in mode 1 of 2"):
        lowrank.select_rank(noise, "tucker2", "vbmf", zero="dense")
    assert isinstance(lowrank.NoStructureError("x"), lowrank.LeftDense)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), noise)
    small, reports = lowrank.compress_model(model, lowrank.plan_layers(
        model, "tucker2", lowrank.RankRule("vbmf", zero="dense"), skip_first=True), input_shape=(3, 16, 16))
    assert [(r.name, r.status) for r in reports] == [("1", "skipped")] and "no component above" in reports[0].reason
    assert type(small[1]) is torch.nn.Conv2d and torch.equal(small[1].weight, noise.weight)
    core = torch.randn(8, 8, 3, 3, dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(32, 8, dtype=torch.float64))
    w = torch.einsum("pqij,tp,sq->tsij", core, u, u) + 1e-3 * torch.randn(32, 32, 3, 3, dtype=torch.float64)
    assert lowrank.select_rank(w, "tucker2", "vbmf", zero="dense") == (8, 8)
    with pytest.raises(lowrank.LowRankError, match="zero .* must be one of min_rank, dense"):
        lowrank.select_rank(w, "tucker2", "vbmf", zero="full")


@pytest.mark.parametrize("method,strategy,settings", [
    ("tucker2", "ratio", {"ratio": 2}), ("cp3", "ratio", {"ratio": 2}), ("spatial-svd", "ratio", {"ratio": 3}),
    ("svd", "energy", {"energy": 0.5}), ("tucker2", "vbmf", {"weakening": 0.5}), ("tucker2", "vbmf", {}),
])
@pytest.mark.parametrize("multiple", [4, 8, 16])
def test_multiple_of_rounds_each_rank_to_the_nearest_multiple_that_keeps_the_layer_smaller(method, strategy,
                                                                                           settings, multiple):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(48, 80, 3) if method != "svd" else torch.nn.Conv2d(48, 80, 1)
    plain = lowrank.select_rank(conv, method, strategy, **settings)
    r = lowrank.select_rank(conv, method, strategy, multiple_of=multiple, **settings)
    pairs = zip(r, plain) if isinstance(r, tuple) else [(r, plain)]
    full = lowrank.get_method(method).max_rank(lowrank.KernelShape.of(conv, 1))
    fulls = full if isinstance(full, tuple) else [full]
    for (v, v0), cap in zip(pairs, fulls):
        assert v % multiple == 0 or v == cap or v == v0, (v, v0)
        assert abs(v - v0) < multiple  # a neighbouring multiple: the nearest, or the one below
        if v0 % multiple and (v0 % multiple) * 2 < multiple and v0 > multiple:
            assert v < v0  # nearer the multiple below
    f = lowrank.factorize_layer(conv, method, r)  # a valid rank, the layer smaller than dense
    assert sum(p.numel() for p in f.parameters()) <= sum(p.numel() for p in conv.parameters())


def test_multiple_of_is_refused_below_one_and_left_out_of_fixed_ranks():
    conv = torch.nn.Conv2d(16, 16, 3)
    with pytest.raises(lowrank.LowRankError, match="multiple_of must be an integer >= 1"):
        lowrank.select_rank(conv, "tucker2", "ratio", ratio=2, multiple_of=0)
    assert lowrank.RankRule("ratio", ratio=2, multiple_of=8).to_dict() == {"strategy": "ratio", "ratio": 2,
                                                                           "target": "params", "multiple_of": 8}
    assert "multiple_of" not in lowrank.RankRule("ratio", ratio=2).to_dict()
