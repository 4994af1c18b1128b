import math

import pytest
import torch
from torch import nn

import lowrank
from lowrank.decompositions.cp_als import SweepEngine, cp_als, init_factors, khatri_rao, rebalance, reconstruct
from lowrank.decompositions.cp_sweep import solve_normal
from lowrank.decompositions.epc import _ridge_by_cholesky, _secular_root, epc, objective_value
from lowrank.decompositions.diagnostics import CANCELLATION_DEGENERATE


def _rel(x, factors):
    return float((x - reconstruct(factors)).norm() / x.norm())


@pytest.mark.parametrize("dims,rank,init", [((12, 10, 9), 6, "svd"), ((9, 8, 7), 5, "random"),
                                            ((10, 8, 3, 3), 7, "svd"), ((8, 6, 4, 3), 5, "random")])
def test_exact_rank_tensors_are_recovered(dims, rank, init):
    g = torch.Generator().manual_seed(sum(dims))
    x = reconstruct([torch.randn(n, rank, generator=g, dtype=torch.float64) for n in dims])
    factors, errors = cp_als(x, rank, init=init, seed=3, n_iter_max=3000, tol=0)
    assert _rel(x, factors) < 1e-8
    assert errors[-1] < 1e-8


def test_als_error_non_increasing_and_seed_deterministic():
    x = torch.randn(16, 12, 9, dtype=torch.float64)
    rec = []
    f1, _ = cp_als(x, 10, init="random", seed=7, n_iter_max=200, tol=0, callback=lambda it, e: rec.append((it, e)))
    assert [it for it, _ in rec] == list(range(1, 201))
    errs = [e for _, e in rec]
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:]))
    f2, _ = cp_als(x, 10, init="random", seed=7, n_iter_max=200, tol=0)
    f3, _ = cp_als(x, 10, init="random", seed=8, n_iter_max=200, tol=0)
    assert all(torch.equal(a, b) for a, b in zip(f1, f2))
    assert not all(torch.equal(a, b) for a, b in zip(f1, f3))


@pytest.mark.parametrize("fused_below", [0, 1 << 30])  # slice by slice / in one broadcast operation
def test_mttkrp_matches_explicit_khatri_rao(monkeypatch, fused_below):
    # the dimension-tree sweep must compute the same normal equations as the textbook ALS
    from lowrank.decompositions import cp_sweep
    from lowrank.decompositions.cp_als import SweepEngine

    monkeypatch.setattr(cp_sweep, "FUSED_BELOW", fused_below)
    x = torch.randn(5, 4, 3, 2, dtype=torch.float64)
    fs = [torch.randn(n, 3, dtype=torch.float64) for n in x.shape]
    seen = {}

    def update(n, g, gamma):
        others = [fs_now[m] for m in range(4) if m != n]
        unf = x.movedim(n, 0).reshape(x.shape[n], -1)
        assert torch.allclose(g, unf @ khatri_rao(others), atol=1e-12)
        seen[n] = True
        return fs_now[n]

    fs_now = [f.clone() for f in fs]
    SweepEngine(x).sweep(fs_now, [f.T @ f for f in fs_now], update)
    assert sorted(seen) == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def degenerate_kernel_fit():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 64, 3, 3, generator=g, dtype=torch.float64) * math.sqrt(2 / (64 * 9))
    factors, errors = cp_als(x, 64, init="random", seed=1, n_iter_max=1000, tol=0)
    return x, factors


def test_epc_keeps_error_and_removes_cancellation(degenerate_kernel_fit):
    x, als = degenerate_kernel_fit
    before = lowrank.cp_diagnostics(als, x)
    assert before["degenerate"] and before["cancellation_ratio"] > 4
    js = []
    fixed, info = epc(x, als, max_sweeps=1500, tol=1e-7, callback=lambda s, j: js.append(j))
    after = lowrank.cp_diagnostics(fixed, x)
    assert abs(after["rel_error"] - before["rel_error"]) <= 1e-6 * before["rel_error"]
    assert after["cancellation_ratio"] * 3 <= before["cancellation_ratio"]
    assert after["max_term_ratio"] < before["max_term_ratio"]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(js, js[1:]))  # objective non-increasing
    assert info["objective_end"] < info["objective_start"]


def test_epc_sensitivity_objective_and_user_target(degenerate_kernel_fit):
    x, als = degenerate_kernel_fit
    delta = 1.05 * float((x - reconstruct(als)).norm())
    fixed, info = epc(x, als, delta=delta, objective="sens", max_sweeps=300)
    assert float((x - reconstruct(fixed)).norm()) == pytest.approx(delta, rel=1e-6)
    assert objective_value(fixed, "sens") < objective_value(als, "sens")


def test_epc_extrapolation_keeps_the_error_and_lowers_j_in_fewer_sweeps(degenerate_kernel_fit):
    """A step along each sweep's move, scaled back onto the bound: the error stays at delta, J never
    rises, and J falls to where plain EPC is after 200 sweeps in at most half as many."""
    x, als = degenerate_kernel_fit
    runs = {}
    for extrapolate in (False, True):
        js = []
        fixed, info = epc(x, als, max_sweeps=200, tol=0, extrapolate=extrapolate, callback=lambda s, j: js.append(j))
        assert float((x - reconstruct(fixed)).norm()) == pytest.approx(info["delta"], rel=1e-9)
        assert all(b <= a * (1 + 1e-12) for a, b in zip(js, js[1:]))
        runs[extrapolate] = (info, js)
    assert runs[False][0]["extrapolated"] == 0 and runs[True][0]["extrapolated"] > 20
    assert runs[True][1][99] <= runs[False][1][-1]
    assert runs[True][0]["objective_end"] < 0.8 * runs[False][0]["objective_end"]


def _ridge_problem(seed, i=20, r=30):
    """One EPC block step's ridge problem: ``Gt`` (I x R), ``A`` (R x R, SPD) and a ``tau`` that some
    ``rho > 0`` meets (a fraction of least squares' ``phi(0)``)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(3 * r, r, generator=g, dtype=torch.float64)
    a = k.T @ k
    gt = torch.randn(i, r, generator=g, dtype=torch.float64)
    e, q = torch.linalg.eigh(a)
    c = ((gt @ q) ** 2).sum(0)
    return gt, a, 0.6 * float((c / e).sum()), e, q, c


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("off", [0.9, 1.003, 1.5])
def test_cholesky_ridge_step_equals_the_eigen_path_and_lies_on_the_bound(seed, off):
    """From a root guessed a little or far off (the previous sweep's), Newton steps on 1/phi with one
    Cholesky each reach the secular equation's root: the same block step as the eigendecomposition's,
    with ``phi = 2<Y, Gt> - tr(Y A Y^T) = tau`` (the error on its bound) to rounding."""
    gt, a, tau, e, q, c = _ridge_problem(seed)
    rho = _secular_root(c.numpy(), e.numpy(), tau)
    y_eig = ((gt @ q) / (e + rho)) @ q.T
    found = _ridge_by_cholesky(gt, a, tau, rho * off)
    assert found is not None
    y, rho_c = found
    assert rho_c == pytest.approx(rho, rel=1e-4)
    assert float((y - y_eig).norm() / y_eig.norm()) < 1e-6
    phi = 2 * float((y * gt).sum()) - float(((y @ a) * y).sum())
    assert phi == pytest.approx(tau, rel=1e-12)


def test_cholesky_ridge_declines_where_the_eigen_path_must_decide():
    gt, a, tau, e, q, c = _ridge_problem(3)
    assert _ridge_by_cholesky(gt, a, tau, 0.0) is None  # no previous root
    rho = _secular_root(c.numpy(), e.numpy(), tau)
    assert _ridge_by_cholesky(gt, a, tau, rho * 1e4) is None  # too far for a few Newton steps
    # the bound out of reach (tau above least squares' phi(0)): the root is 0, which only eigh finds
    assert _ridge_by_cholesky(gt, a, 2.0 * float((c / e).sum()), rho) is None


@pytest.mark.parametrize("objective", ["norm", "sens"])
def test_epc_by_cholesky_steps_equals_epc_by_eigendecompositions(degenerate_kernel_fit, objective):
    """The same sweeps either way (without extrapolation, whose accept/refuse decisions amplify
    rounding): J to 1e-6, the error to rounding, and all but the first sweep's block steps without
    an eigendecomposition."""
    x, als = degenerate_kernel_fit
    runs = {ridge: epc(x, als, max_sweeps=60, tol=0, extrapolate=False, objective=objective, ridge=ridge)
            for ridge in ("eigh", "cholesky")}
    (fe, ie), (fc, ic) = runs["eigh"], runs["cholesky"]
    assert ic["objective_end"] == pytest.approx(ie["objective_end"], rel=1e-6)
    assert ic["rel_error"] == pytest.approx(ie["rel_error"], rel=1e-9)
    assert ie["eigen_steps"] == 60 * 4
    assert 4 <= ic["eigen_steps"] <= 12
    with pytest.raises(ValueError, match="accepted: 'cholesky', 'eigh'"):
        epc(x, als, ridge="lu")


def test_border_rank_tensor_is_flagged_and_healthy_is_not():
    g = torch.Generator().manual_seed(0)
    a1, a2, b1, b2, c1, c2 = (torch.randn(4, generator=g, dtype=torch.float64) for _ in range(6))
    outer = lambda a, b, c: torch.einsum("i,j,k->ijk", a, b, c)  # noqa: E731
    x = outer(a1, b1, c2) + outer(a1, b2, c1) + outer(a2, b1, c1)  # rank 3, border rank 2
    f, errors = cp_als(x, 2, init="random", seed=0, n_iter_max=5000, tol=0)
    d = lowrank.cp_diagnostics(f, x)
    assert d["degenerate"]
    assert d["cancellation_ratio"] > CANCELLATION_DEGENERATE and d["min_congruence"] < -0.8

    fs = [torch.randn(n, 20, generator=g, dtype=torch.float64) for n in (30, 25, 20)]
    y = reconstruct(fs)
    y = y + 0.01 * y.norm() / math.sqrt(y.numel()) * torch.randn(y.shape, generator=g, dtype=torch.float64)
    h, _ = cp_als(y, 20, n_iter_max=500)
    d = lowrank.cp_diagnostics(h, y)
    assert not d["degenerate"]
    assert d["cancellation_ratio"] < 1.1 and d["rel_error"] < 0.02


def test_cp_epc_layer_reports_diagnostics_before_and_after():
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), conv)
    new, [rep] = lowrank.compress_model(model, {"1": ("cp3-epc", 12, {"epc_max_sweeps": 50})}, input_shape=(3, 12, 12))
    d = rep.diagnostics
    assert {"als", "epc", "epc_sweeps", "epc_scale", "epc_rel_error_at_bound", "degenerate"} <= set(d)
    assert d["epc"]["rel_error"] == pytest.approx(d["als"]["rel_error"], rel=1e-6)  # EPC keeps ALS's error
    assert d["epc_rel_error_at_bound"] == pytest.approx(d["epc"]["rel_error"], rel=1e-9)
    assert rep.rel_error == pytest.approx(d["epc"]["rel_error"], rel=1e-9)


def _trained_like_kernel():
    """A kernel with decaying spectra in every mode (as trained kernels have), at a rank where
    ALS leaves cancelling terms for EPC to remove."""
    g = torch.Generator().manual_seed(3)
    fs = [torch.randn(n, 48, generator=g, dtype=torch.float64) * torch.linspace(1, 0.05, 48, dtype=torch.float64)
          for n in (32, 32, 9)]
    x = reconstruct(fs) + 0.3 * torch.randn(32, 32, 9, generator=g, dtype=torch.float64) / 3
    return x.reshape(32, 32, 3, 3).float()


def test_epc_shrinks_the_model_and_the_optional_rescaling_undoes_it_exactly():
    w = _trained_like_kernel()
    x = w.double().reshape(32, 32, 9)
    kept = lowrank.decompose(w, "cp3-epc", 20, n_iter_max=60, epc_max_sweeps=200)  # Phan et al.'s model, as is
    fixed = lowrank.decompose(w, "cp3-epc", 20, n_iter_max=60, epc_max_sweeps=200, epc_rescale=True)
    als = lowrank.decompose(w, "cp3", 20, n_iter_max=60)

    def scale(f):
        m = f.to_weight().double().reshape(x.shape)
        return float((x * m).sum() / (m * m).sum())

    assert scale(als) == pytest.approx(1.0, abs=1e-6)  # least squares: no shrinkage
    assert scale(kept) > 1.01  # the minimum-norm model on the error sphere is shrunk
    assert kept.diagnostics["epc_scale"] == pytest.approx(scale(kept), rel=1e-6)  # and says by how much
    assert fixed.diagnostics["epc_scale"] == pytest.approx(scale(kept), rel=1e-6)
    assert scale(fixed) == pytest.approx(1.0, abs=1e-9)
    assert fixed.diagnostics["epc"]["rel_error"] < kept.diagnostics["epc"]["rel_error"]
    # the same corrected terms: congruence is scale-free, J grows by the scale squared
    assert fixed.diagnostics["epc"]["min_congruence"] == pytest.approx(kept.diagnostics["epc"]["min_congruence"], rel=1e-6)
    assert kept.diagnostics["epc"]["degenerate"] == fixed.diagnostics["epc"]["degenerate"]


def test_epc_rescale_option_is_checked():
    with pytest.raises(lowrank.LowRankError, match="option 'epc_rescale' of method 'cp3-epc' must be true or false"):
        lowrank.decompose(torch.randn(8, 8, 3, 3), "cp3-epc", 4, epc_rescale="yes")


def test_cp_rank_larger_than_allowed():
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(lowrank.LowRankError, match=r"above the maximum 27"):
        lowrank.decompose(w, "cp4", 28, allow_larger=True)


@pytest.mark.gpu
def test_cp_als_on_cuda_matches_cpu():
    x = torch.randn(16, 12, 9, dtype=torch.float64)
    f_cpu, _ = cp_als(x, 8, n_iter_max=50)
    f_gpu, _ = cp_als(x.cuda(), 8, n_iter_max=50)
    assert _rel(x, f_cpu) == pytest.approx(_rel(x, [f.cpu() for f in f_gpu]), rel=1e-6)


def test_linesearch_reaches_the_plain_als_error_in_fewer_sweeps():
    """Bro's extrapolation: the error 150 plain sweeps reach, in clearly fewer sweeps."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 32, 9, generator=g, dtype=torch.float64)
    _, plain = cp_als(x, 60, n_iter_max=150, tol=0)
    _, fast = cp_als(x, 60, n_iter_max=150, tol=0, linesearch=True, stop_at=plain[-1])
    assert fast[-1] <= plain[-1]
    assert len(fast) < 0.75 * len(plain)
    assert all(b <= a + 1e-12 for a, b in zip(fast, fast[1:]))  # a step is only taken when it lowers the error


def test_linesearch_also_pays_on_a_structured_tensor():
    """A low-rank tensor with two nearly collinear components in its small mode (plain ALS crawls
    there: a swamp) and a little noise, fitted at its true rank: line search reaches the plain
    error in clearly fewer sweeps here too (it^(1/2) halved after each refusal took all 200)."""
    g = torch.Generator().manual_seed(52)
    fs = [torch.randn(n, 20, generator=g, dtype=torch.float64) for n in (32, 32, 9)]
    fs[2] = fs[2] + 2.0 * fs[2][:, :1]
    x = reconstruct(fs)
    x = x / x.norm() + 0.01 * torch.randn(x.shape, generator=g, dtype=torch.float64) / math.sqrt(x.numel())
    _, plain = cp_als(x, 20, n_iter_max=200, tol=0)
    _, fast = cp_als(x, 20, n_iter_max=200, tol=0, linesearch=True, stop_at=plain[-1])
    assert fast[-1] <= plain[-1] and len(fast) < 0.75 * len(plain)


def test_linesearch_steps_shrink_after_four_refusals_in_a_row_per_problem():
    from lowrank.decompositions.cp_sweep import LS_FIRST_POWER, ls_schedule

    power, refused = LS_FIRST_POWER, 0
    for accepted in (False, False, False, True, False, False, False):  # an acceptance resets the count
        power, refused = ls_schedule(accepted, power, refused)
    assert (power, refused) == (2.0, 3)
    power, refused = ls_schedule(False, power, refused)
    assert (power, refused) == (3.0, 0)  # it^(1/2) -> it^(1/3)
    # batched: the same rule, problem by problem
    p, r = ls_schedule(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0]), torch.tensor([3.0, 3.0]))
    assert p.tolist() == [3.0, 2.0] and r.tolist() == [0.0, 0.0]


def test_linesearch_check_is_the_next_sweeps_first_gemm(monkeypatch):
    """Checking an extrapolated point costs the next sweep's first GEMM, which that sweep reuses
    when the step is taken: one large GEMM more per refused step, none per accepted one."""
    from lowrank.decompositions import cp_sweep

    calls = {"start": 0, "mode1": 0}
    for name in calls:
        original = getattr(cp_sweep.Sweep, name)

        def counted(self, *a, _name=name, _original=original, **kw):
            calls[_name] += 1
            return _original(self, *a, **kw)
        monkeypatch.setattr(cp_sweep.Sweep, name, counted)
    x = torch.randn(20, 16, 9, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _, plain = cp_als(x, 24, n_iter_max=40, tol=-1)
    assert calls == {"start": 40, "mode1": 40}
    calls.update(start=0, mode1=0)
    _, errors = cp_als(x, 24, n_iter_max=40, tol=-1, linesearch=True)
    assert calls["mode1"] == 40  # the second GEMM: once per sweep
    # first GEMMs: 40 sweeps + 38 checks - the steps taken (whose check the next sweep reused),
    # + the rebalancing every 10 sweeps that invalidates a reused product
    assert 40 < calls["start"] < 40 + 38
    assert errors[-1] < plain[-1]


def test_float32_als_then_float64_epc_keeps_the_error_and_reports_it():
    w = torch.randn(24, 16, 3, 3, generator=torch.Generator().manual_seed(2))
    f64 = lowrank.decompose(w, "cp3-epc", 20, n_iter_max=40, epc_max_sweeps=30)
    f32 = lowrank.decompose(w, "cp3-epc", 20, n_iter_max=40, epc_max_sweeps=30, als_dtype="float32")
    assert all(f.dtype == torch.float64 for f in f32.factors)
    d = f32.diagnostics
    assert d["epc"]["rel_error"] == pytest.approx(d["als"]["rel_error"], rel=1e-6)  # EPC in float64 keeps it
    assert d["als"]["rel_error"] == pytest.approx(f64.diagnostics["als"]["rel_error"], abs=2e-3)


@pytest.mark.parametrize("linesearch", [False, True])
def test_batched_als_equals_one_problem_at_a_time_each_stopping_on_its_own(linesearch):
    """``cp_als_batched``: one exact-rank problem (stops early: its error falls to rounding) among
    random ones (they run to the cap or to ``tol``): each gets the factors and the error curve it
    gets alone, and leaves the batch when it stops."""
    from lowrank.decompositions.cp_batched import cp_als_batched

    g = torch.Generator().manual_seed(3)
    exact = reconstruct([torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (16, 12, 3, 3)])
    x = torch.stack([exact, *torch.randn(2, 16, 12, 3, 3, generator=g, dtype=torch.float64)])
    batch, curves = cp_als_batched(x, 4, n_iter_max=80, tol=1e-7, linesearch=linesearch)
    lengths = []
    for b in range(3):
        alone, errors = cp_als(x[b], 4, n_iter_max=80, tol=1e-7, linesearch=linesearch)
        assert len(curves[b]) == len(errors)
        assert curves[b] == pytest.approx(errors, abs=1e-9)
        assert float((reconstruct(batch[b]) - reconstruct(alone)).norm() / x[b].norm()) < 1e-9
        lengths.append(len(errors))
    assert lengths[0] < min(lengths[1:])  # the exact problem left the batch first
    assert curves[0][-1] < 1e-6


def test_grouped_conv_cp_fits_its_groups_as_one_batch(monkeypatch):
    from lowrank.decompositions import cp as cp_module

    calls = []
    batched = cp_module.cp_als_batched
    monkeypatch.setattr(cp_module, "cp_als_batched", lambda x, *a, **k: calls.append(x.shape) or batched(x, *a, **k))
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False)
    f = lowrank.decompose(conv.weight, "cp3", 6, groups=4, n_iter_max=30)
    assert calls == [(4, 8, 8, 9)]  # the four groups, one batch
    for i, w in enumerate(conv.weight.detach().double().reshape(4, 8, 8, 9)):
        alone, _ = cp_als(w, 6, n_iter_max=30)
        got = reconstruct([m[i] for m in f.factors]).double()
        assert float((got - reconstruct(alone)).norm() / w.norm()) < 1e-9


@pytest.mark.parametrize("shape", [(6, 5, 4), (6, 5, 3, 2)])
def test_a_sweep_replaces_factors_and_never_writes_into_them(shape):
    """Line search keeps the previous factors by reference (no copy): that holds only while a
    sweep, its update and rebalancing leave the tensors they were given untouched."""
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    factors = init_factors(x, 4, "random", 0)
    before = [f.clone() for f in factors]
    kept, grams = list(factors), [f.T @ f for f in factors]
    engine = SweepEngine(x)
    engine.sweep(factors, grams)
    rebalance(factors, grams)
    assert all(k.equal(b) for k, b in zip(kept, before)) and not all(f is k for f, k in zip(factors, kept))


def test_a_sweeps_update_sees_the_factors_it_updated_before():
    """EPC's update reads the other factors (its weights): within a sweep it must see the ones the
    sweep has already replaced, not the sweep's start."""
    x = torch.randn(7, 6, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    factors = init_factors(x, 4, "random", 0)
    grams, made, order = [f.T @ f for f in factors], {}, []

    def update(n, g, gamma):
        assert all(factors[m] is t for m, t in made.items())
        made[n] = solve_normal(g, gamma)
        order.append(n)
        return made[n]
    SweepEngine(x).sweep(factors, grams, update)
    assert sorted(order) == [0, 1, 2, 3] and all(factors[n].equal(made[n]) for n in range(4))
