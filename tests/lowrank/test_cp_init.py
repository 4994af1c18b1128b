"""CP-ALS starts: ``init: slices`` (the best model on the spatial singular vectors) and the registry."""
import math

import numpy as np
import pytest
import torch

import lowrank
from lowrank.decompositions.cp_als import cp_als, reconstruct
from lowrank.decompositions.cp_init import INITS, init_factors
from lowrank.options import CPOptions


def _rel(x, factors):
    return float((x - reconstruct(factors)).norm() / x.norm())


def _orthonormal(n, g):
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]


def _slices(ranks, rows, cols, g):
    """``I0 x I1`` matrices of the given ranks, mutually orthogonal (disjoint column spaces), of
    decreasing norm: then the ``c_j`` they are laid on are the spatial singular vectors."""
    basis = _orthonormal(rows, g)
    out, first = [], 0
    for j, r in enumerate(ranks):
        out.append(3.0 ** -j * basis[:, first:first + r] @ torch.randn(r, cols, generator=g, dtype=torch.float64))
        first += r
    return out


def test_slices_recovers_low_rank_slices_on_orthonormal_spatial_vectors():
    """``X = sum_j M_j o c_j``, orthonormal ``c_j``, orthogonal ``M_j`` of rank ``r_j``: exact at ``R = sum r_j``."""
    g = torch.Generator().manual_seed(0)
    c = _orthonormal(9, g)
    ranks = [5, 4, 3, 3, 2, 2, 1, 1, 1]
    x = sum(m[:, :, None] * c[:, j] for j, m in enumerate(_slices(ranks, 24, 11, g)))
    factors = init_factors(x, sum(ranks), "slices")
    assert [tuple(f.shape) for f in factors] == [(24, 22), (11, 22), (9, 22)]
    assert _rel(x, factors) < 1e-10
    assert _rel(x, init_factors(x, sum(ranks), "svd")) > 1  # the svd start's random columns


@pytest.mark.parametrize("shape", [(12, 10, 9), (12, 10, 3, 3), (9, 7, 2, 3)])
def test_slices_is_the_best_model_on_the_spatial_singular_vectors(shape):
    """Its error is that of keeping the R largest singular values over all rotated slices (numpy,
    independently), and no other split of the rank across the slices does better."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * torch.linspace(1, 0.1, shape[-1], dtype=torch.float64)
    rank = 17
    core = x.numpy()
    for m in range(2, len(shape)):  # rotate every spatial mode onto its left singular vectors
        u = np.linalg.svd(np.moveaxis(x.numpy(), m, 0).reshape(shape[m], -1))[0]
        core = np.moveaxis(np.tensordot(core, u, axes=([m], [0])), -1, m)
    slices = np.moveaxis(core.reshape(shape[0], shape[1], -1), -1, 0)
    sv = np.stack([np.linalg.svd(sl, compute_uv=False) for sl in slices])
    total = float((core ** 2).sum())
    assert total == pytest.approx(float((x ** 2).sum()), rel=1e-12)  # an orthonormal rotation
    best = math.sqrt(total - (np.sort(sv.ravel())[::-1][:rank] ** 2).sum()) / math.sqrt(total)
    err = _rel(x, init_factors(x, rank, "slices"))
    assert err == pytest.approx(best, rel=1e-9)
    even = [rank // len(sv) + (j < rank % len(sv)) for j in range(len(sv))]  # the same rank spread evenly
    assert err < math.sqrt(total - sum((sv[j, :r] ** 2).sum() for j, r in enumerate(even))) / math.sqrt(total)


def test_slices_for_order_4_gives_rank_one_spatial_factors():
    """Spatial singular vectors that are rank-one 3x3 (``p_a (x) q_b``): order 4 is exact too."""
    g = torch.Generator().manual_seed(2)
    p, q = _orthonormal(3, g), _orthonormal(3, g)
    ranks = [3, 3, 2, 2, 2, 1, 1, 1, 1]
    ms = _slices(ranks, 20, 8, g)
    x = sum(m[:, :, None, None] * torch.outer(p[:, j // 3], q[:, j % 3]) for j, m in enumerate(ms))
    rank = sum(ranks)
    factors = init_factors(x, rank, "slices")
    assert [tuple(f.shape) for f in factors] == [(20, rank), (8, rank), (3, rank), (3, rank)]
    assert _rel(x, factors) < 1e-10


def test_slices_with_more_components_than_terms_is_exact_and_finite():
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    factors = init_factors(x, 40, "slices")  # 4 slices of rank 5: 20 terms, 20 more random
    assert all(torch.isfinite(f).all() for f in factors) and _rel(x, factors) < 1e-6
    fitted, errors = cp_als(x, 40, init="slices", n_iter_max=5)
    assert errors[-1] < 1e-3 and all(math.isfinite(e) for e in errors)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_slices_keeps_no_zero_terms_of_rank_deficient_slices(dtype):
    """Slices of rank 3 and 2 (5 terms) asked for 9 components: the 4 beyond are small random
    columns, not the zero singular values of the slices, which would give zero columns."""
    g = torch.Generator().manual_seed(3)
    c = _orthonormal(9, g)
    x = sum(m[:, :, None] * c[:, j] for j, m in enumerate(_slices([3, 2], 12, 10, g))).to(dtype)
    factors = init_factors(x, 9, "slices")
    for f in factors:  # every column well away from zero, the normal equations well posed
        assert f.dtype == dtype and float(f.norm(dim=0).min()) > 1e-6 * float(f.norm(dim=0).max())
    assert _rel(x, factors) < (1e-6 if dtype == torch.float64 else 1e-3)
    _, errors = cp_als(x, 9, init=factors, n_iter_max=5)
    assert all(math.isfinite(e) for e in errors)


def test_slices_through_the_library_and_the_option_check():
    w = torch.randn(16, 12, 3, 3)
    for method in ("cp3", "cp4"):
        f = lowrank.decompose(w, method, 20, init="slices", n_iter_max=30, linesearch=True)
        assert f.diagnostics["als"]["rel_error"] < 1.0
    assert CPOptions.__dataclass_fields__["init"].metadata["choices"] == tuple(INITS)
    with pytest.raises(lowrank.LowRankError, match="'slices'"):
        lowrank.decompose(w, "cp3", 20, init="tucker")


def test_the_named_starts_are_deterministic_and_unknown_ones_refused():
    x = torch.randn(8, 7, 9, dtype=torch.float64)
    for name in INITS:
        a, b = init_factors(x, 10, name, seed=4), init_factors(x, 10, name, seed=4)
        assert all(torch.equal(s, t) for s, t in zip(a, b))
    with pytest.raises(ValueError, match="accepted: 'svd', 'random', 'slices'"):
        init_factors(x, 10, "hosvd")
