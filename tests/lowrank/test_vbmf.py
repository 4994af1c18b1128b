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
