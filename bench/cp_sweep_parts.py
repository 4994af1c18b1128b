"""Where a CP-ALS sweep's time goes on the small layers.

For ResNet-18's 64- and 128-channel 3x3 convs as the order-3 ``(T, S, 9)`` tensor of ``cp3``, at
the rank that makes the layer 2x smaller, in float32 (the fastest of ``bench/cp_equal_error.py``'s
settings, with line search): a sweep's time, and the share of it spent in the three Cholesky
factorisations and solves of the ``R x R`` normal equations and in the large GEMMs with their
contractions over the spatial modes, timed where the sweep calls them. (What malloc's page
faults cost, ours and tensorly's: ``bench/allocator.py``.) Last, for 64-512 channels in float32
and float64: a sweep's time with the normal equations solved by ``torch.linalg.cholesky_ex`` and
``cholesky_solve`` against LAPACK's ``potrf``/``potrs`` called directly
(``lowrank/decompositions/_lapack.py``), interleaved, best of three, and the share of
``cholesky_ex``'s time that its ``tril_`` takes (torch's profiler, 20 factorisations).

    .venv/bin/python bench/cp_sweep_parts.py --out bench/cp_sweep_parts.out.txt   # ~3 min
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowrank.allocator import allocator_note, tune_allocator  # noqa: E402
from lowrank.decompositions import _lapack, cp_sweep  # noqa: E402
from lowrank.decompositions.cp_als import cp_als, init_factors  # noqa: E402


def in_sweep(x, rank: int, init, sweeps: int = 40) -> tuple[float, dict[str, float]]:
    """(microseconds per sweep, share of it per part) of ``cp_als`` with line search: the parts
    timed where the sweep calls them (``solve_normal``: Cholesky and solve; ``start`` and
    ``mode1``: the two large GEMMs and their contractions), after one warm-up fit."""
    spent: dict[str, float] = {}
    originals = {"solve_normal": cp_sweep.solve_normal, "start": cp_sweep.Sweep.start,
                 "mode1": cp_sweep.Sweep.mode1}

    def timed(name, fn):
        def run(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
            return out
        return run

    cp_als(x, rank, init=init, n_iter_max=sweeps, tol=-1, linesearch=True)
    cp_sweep.solve_normal = timed("solve_normal", originals["solve_normal"])
    cp_sweep.Sweep.start = timed("start", originals["start"])
    cp_sweep.Sweep.mode1 = timed("mode1", originals["mode1"])
    try:
        t = time.perf_counter()
        cp_als(x, rank, init=init, n_iter_max=sweeps, tol=-1, linesearch=True)
        total = time.perf_counter() - t
    finally:
        cp_sweep.solve_normal = originals["solve_normal"]
        cp_sweep.Sweep.start, cp_sweep.Sweep.mode1 = originals["start"], originals["mode1"]
    return total / sweeps * 1e6, {k: v / total for k, v in spent.items()}


def rates(c: int, r: int, repeats: int = 200) -> tuple[float, float, float]:
    """Float32 GFLOP/s of the sweep's three kinds of work at one layer's sizes, each alone."""
    g = torch.randn(r, 2 * r) / math.sqrt(2 * r)
    gamma, rhs = g @ g.T + 0.1 * torch.eye(r), torch.randn(1, c, r)
    x, u = torch.randn(1, c * 9, c), torch.randn(1, c, r)
    chol = torch.linalg.cholesky_ex(gamma.unsqueeze(0))[0]
    work = [(r ** 3 / 3, lambda: torch.linalg.cholesky_ex(gamma.unsqueeze(0))),
            (2 * r * r * c, lambda: torch.cholesky_solve(rhs.mT, chol)),
            (2 * c * 9 * c * r, lambda: x @ u)]
    out = []
    for flops, fn in work:
        fn()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        out.append(flops * repeats / (time.perf_counter() - t) / 1e9)
    return tuple(out)


def solve_paths(x, rank: int, init, sweeps: int) -> tuple[float, float]:
    """Microseconds per sweep (line search) with torch's Cholesky and with LAPACK's direct, each
    the best of three fits, the two interleaved."""
    best = {"torch": float("inf"), "direct": float("inf")}
    paths = {"torch": _lapack._torch_solve, "direct": _lapack.cholesky_solve_right}
    try:
        for _ in range(3):
            for name, fn in paths.items():
                cp_sweep.cholesky_solve_right = fn
                t = time.perf_counter()
                cp_als(x, rank, init=init, n_iter_max=sweeps, tol=-1, linesearch=True)
                best[name] = min(best[name], (time.perf_counter() - t) / sweeps * 1e6)
    finally:
        cp_sweep.cholesky_solve_right = paths["direct"]
    return best["torch"], best["direct"]


def tril_share(rank: int, dtype: torch.dtype) -> float:
    """The share of ``torch.linalg.cholesky_ex``'s time in its ``tril`` (profiled)."""
    from torch.profiler import ProfilerActivity, profile

    a = torch.randn(1, rank, 2 * rank, dtype=dtype) / math.sqrt(2 * rank)
    gamma = a @ a.mT + 0.1 * torch.eye(rank, dtype=dtype)
    torch.linalg.cholesky_ex(gamma)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            torch.linalg.cholesky_ex(gamma)
    spent = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    return spent.get("aten::tril", 0.0) / max(sum(spent.values()), 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    tune_allocator()  # as the runner's workers run (LOWRANK_MALLOC=default: without)
    lines = [f"# bench/cp_sweep_parts.py, torch {torch.__version__}, {torch.get_num_threads()} threads, {allocator_note()}, float32, cp3 at 2x, "
             "line search; a sweep's time and the share of it in each part",
             f"{'tensor':<10} {'rank':>5} {'sweep us':>9} {'chol + solve':>14} {'GEMMs etc.':>11}"]
    for c in (64, 128):
        g = torch.Generator().manual_seed(c)
        x = torch.randn(c, c, 9, generator=g, dtype=torch.float64) * math.sqrt(2 / (c * 9))
        r = (c * c * 9) // (2 * (2 * c + 9))
        init = init_factors(x, r, "svd", seed=0)
        per_sweep, share = in_sweep(x.float(), r, [f.float() for f in init])
        lines.append(f"{f'{c}x{c}x9':<10} {r:>5} {per_sweep:>9.0f} {share['solve_normal']:>14.0%} "
                     f"{share['start'] + share['mode1']:>11.0%}")
        print(lines[-1], flush=True)
    lines.append("# float32 rates here, GFLOP/s: the R x R Cholesky, its solve of the I x R MTTKRP, and the mode-0 GEMM")
    lines.append(f"{'tensor':<10} {'rank':>5} {'cholesky':>9} {'solve':>6} {'GEMM':>6}")
    for c in (64, 128):
        r = (c * c * 9) // (2 * (2 * c + 9))
        lines.append(f"{f'{c}x{c}x9':<10} {r:>5} " + " ".join(f"{v:>{w}.0f}" for v, w in zip(rates(c, r), (9, 6, 6))))
        print(lines[-1], flush=True)
    lines.append(f"# a sweep (line search), us, its normal equations by torch.linalg (cholesky_ex, cholesky_solve) or by LAPACK called directly ({_lapack.lapack_note()})")
    lines.append(f"{'tensor':<10} {'rank':>5} {'dtype':>7} {'torch us':>9} {'direct us':>9} {'x':>5} {'tril in chol':>12}")
    for c in (64, 128, 256, 512):
        g = torch.Generator().manual_seed(c)
        x = torch.randn(c, c, 9, generator=g, dtype=torch.float64) * math.sqrt(2 / (c * 9))
        r = (c * c * 9) // (2 * (2 * c + 9))
        init = init_factors(x, r, "svd", seed=0)
        for dtype in (torch.float32, torch.float64):
            t_torch, t_direct = solve_paths(x.to(dtype), r, [f.to(dtype) for f in init], max(4, 1280 // c))
            lines.append(f"{f'{c}x{c}x9':<10} {r:>5} {str(dtype)[6:]:>7} {t_torch:>9.0f} {t_direct:>9.0f} "
                         f"{t_torch / t_direct:>5.2f} {tril_share(r, dtype):>12.0%}")
            print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
