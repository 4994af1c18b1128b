"""The normal equations' Cholesky solve straight from LAPACK (``_lapack``) against torch's own."""
import os
import subprocess
import sys

import pytest
import torch

from lowrank.decompositions import _lapack
from lowrank.decompositions.cp_sweep import solve_normal


def _spd(b, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, r, 2 * r, generator=g, dtype=torch.float64)
    return (a @ a.mT / (2 * r) + 0.05 * torch.eye(r, dtype=torch.float64)).to(dtype)


def test_the_direct_path_is_taken_on_this_build():
    """torch's CPU wheel exports MKL's potrf/potrs: else every comparison below would be torch's
    against itself."""
    for dtype in (torch.float32, torch.float64):
        assert _lapack._routines(dtype) is not None
    assert "potrf/potrs direct (float32, float64)" in _lapack.lapack_note()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("b,i,r", [(1, 64, 134), (3, 9, 40), (2, 300, 17)])
def test_direct_solve_equals_torch(dtype, tol, b, i, r):
    gamma = _spd(b, r, dtype)
    g = torch.randn(b, i, r, dtype=dtype)
    g_before, gamma_before = g.clone(), gamma.clone()
    ours, failed = _lapack.cholesky_solve_right(g, gamma)
    ref, ref_failed, _ = _lapack._torch_solve(g, gamma)
    assert failed == [] and ref_failed == []
    assert float((ours - ref).norm() / ref.norm()) < tol
    exact = (g.double() @ torch.linalg.inv(gamma.double())).to(dtype)
    assert float((ours - exact).norm() / exact.norm()) < 100 * tol
    assert g.equal(g_before) and gamma.equal(gamma_before)  # inputs are not overwritten


@pytest.mark.parametrize("path", ["direct", "torch"])
def test_the_factor_returned_is_the_upper_cholesky_factor_in_its_upper_triangle(path):
    gamma = _spd(2, 40, torch.float64)
    g = torch.randn(2, 9, 40, dtype=torch.float64)
    solve = _lapack.cholesky_solve_right_factor if path == "direct" else _lapack._torch_solve
    out, failed, c = solve(g, gamma)
    assert failed == []
    upper = torch.triu(c)
    assert torch.allclose(upper.mT @ upper, gamma, atol=1e-10)
    # what EPC's root finder reads: Y C^{-1} from the triangle alone
    y = torch.randn(2, 9, 40, dtype=torch.float64)
    assert torch.allclose(torch.linalg.solve_triangular(c, y, upper=True, left=False), y @ torch.linalg.inv(upper),
                          atol=1e-10)
    assert torch.allclose(out, g @ torch.linalg.inv(gamma), atol=1e-10)


def test_non_contiguous_inputs_and_one_problem_unbatched():
    gamma = _spd(1, 30, torch.float64)[0]
    g = torch.randn(30, 20, dtype=torch.float64).T  # (20, 30), a transposed view
    before = g.clone()
    out = solve_normal(g, gamma)
    assert out.shape == (20, 30) and torch.allclose(out, before @ torch.linalg.inv(gamma), atol=1e-10)
    assert g.equal(before)


def test_a_singular_problem_in_a_batch_takes_the_pseudo_inverse():
    gamma = _spd(3, 12, torch.float64)
    u = torch.randn(12, 5, dtype=torch.float64)
    gamma[1] = u @ u.T  # rank 5: not positive definite
    g = torch.randn(3, 7, 12, dtype=torch.float64)
    _, failed = _lapack.cholesky_solve_right(g, gamma)
    assert failed == [1]
    assert _lapack._torch_solve(g, gamma)[1] == [1]
    out = solve_normal(g, gamma)
    assert torch.allclose(out[1], g[1] @ torch.linalg.pinv(gamma[1], hermitian=True), atol=1e-8)
    for k in (0, 2):
        assert torch.allclose(out[k], g[k] @ torch.linalg.inv(gamma[k]), atol=1e-10)


def test_lowrank_lapack_torch_switches_the_direct_path_off():
    code = ("import torch; from lowrank.decompositions import _lapack as l; "
            "print(l.lapack_note()); print(l._routines(torch.float64) is None)")
    env = {**os.environ, "LOWRANK_LAPACK": "torch"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["normal equations by torch.linalg", "True"]
