import math

import pytest
import torch

import lowrank
from lowrank.decompositions.spatial_svd import tai_matrix


@pytest.mark.parametrize("shape,groups,rank", [((16, 12, 3, 3), 1, 5), ((12, 4, 3, 5), 3, 4), ((8, 8, 5, 5), 1, 1)])
def test_spatial_svd_error_equals_svd_tail(shape, groups, rank):
    w = torch.randn(shape, dtype=torch.float64)
    f = lowrank.decompose(w, "spatial-svd", rank, groups=groups, allow_larger=True)
    s = torch.linalg.svdvals(tai_matrix(w, groups))
    tail = math.sqrt(float((s[:, rank:] ** 2).sum()))
    err = float((w - f.to_weight()).norm())
    assert err == pytest.approx(tail, rel=1e-12, abs=1e-12)


def test_spatial_svd_beats_random_separable_filters():
    # global optimum: no separable approximation of the same rank does better
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    best = float((w - lowrank.decompose(w, "spatial-svd", 3).to_weight()).norm())
    for _ in range(20):
        v, h = torch.randn(1, 3, 5, 3, dtype=torch.float64), torch.randn(1, 6, 3, 3, dtype=torch.float64)
        f = lowrank.SpatialSVDFactors(vertical=v, horizontal=h, shape=(6, 5, 3, 3))
        # least-squares-optimal rescaling of the random model cannot beat the SVD either
        r = f.to_weight()
        alpha = float((w * r).sum() / (r * r).sum())
        assert float((w - alpha * r).norm()) >= best


def test_tucker2_hooi_error_non_increasing_and_better_than_hosvd():
    w = torch.randn(32, 24, 3, 3, dtype=torch.float64)
    errs = []
    f = lowrank.decompose(w, "tucker2", (6, 9), callback=lambda it, e: errs.append(e), tol=0, n_iter_max=30)
    assert len(errs) > 2
    assert all(b <= a + 1e-14 for a, b in zip(errs, errs[1:]))
    assert errs[-1] < errs[0]
    assert float((w - f.to_weight()).norm() / w.norm()) == pytest.approx(errs[-1], rel=1e-9)
    # factors are orthonormal
    eye = torch.eye(6, dtype=torch.float64)
    assert torch.allclose(f.in_factor[0].T @ f.in_factor[0], eye, atol=1e-12)


def test_tucker2_recovers_exact_multilinear_rank():
    core = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    ut, _ = torch.linalg.qr(torch.randn(20, 5, dtype=torch.float64))
    us, _ = torch.linalg.qr(torch.randn(16, 4, dtype=torch.float64))
    w = torch.einsum("pqij,tp,sq->tsij", core, ut, us)
    f = lowrank.decompose(w, "tucker2", (4, 5))
    assert float((w - f.to_weight()).norm() / w.norm()) < 1e-12


def test_svd_optimal_and_balanced():
    w = torch.randn(10, 7, dtype=torch.float64)
    f = lowrank.decompose(w, "svd", 3)
    s = torch.linalg.svdvals(w)
    assert float((w - f.to_weight()).norm()) == pytest.approx(float(s[3:].norm()), rel=1e-12)
    assert torch.allclose(f.left[0].norm(dim=0), f.right[0].norm(dim=1), atol=1e-12)


@pytest.mark.parametrize("method", lowrank.list_methods())
def test_decompose_is_pure_and_deterministic(method):
    w = torch.randn(6, 4, 1, 1) if method == "svd" else torch.randn(6, 4, 3, 3)
    before = w.clone()
    kw = {"n_iter_max": 30} if method.startswith("cp") else {}
    a = lowrank.decompose(w, method, 2, **kw)
    b = lowrank.decompose(w, method, 2, **kw)
    assert torch.equal(w, before)
    assert torch.equal(a.to_weight(), b.to_weight())
    assert a.n_params == lowrank.METHODS[method].n_params(lowrank.registry.KernelShape.of(w), a.rank)
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        a.shape = (1,)  # frozen
