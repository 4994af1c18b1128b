"""Batched CP-ALS on ResNet-18's groups of same-shaped 3x3 convs, and the GEMM rate of the sweep.

ResNet-18 has four 64-channel 3x3 convs of one shape, three of 128, three of 256, three of 512
(the first conv of stages 2-4 has half the input channels). For each group, as ``cp3`` (order 3,
``(T, S, 9)``) and ``cp4`` (order 4) at the rank that makes a layer 2x smaller, the same number of
sweeps (equal work: the batched fit gives each problem the error it gets alone, to rounding):

* ``one`` : ``cp_als`` on each layer in turn; ``batch``: ``cp_als_batched`` on the group at once;
* ``tl``  : tensorly's ``parafac`` (pytorch backend) on each layer in turn (64 and 128 channels;
  the 256/512 order-4 fits need its explicit Khatri-Rao product of > 10 GB);
* ``GF/s``: the sweep's large GEMMs (two of ``2 T S K R`` flops per layer and sweep) over the
  sweep time of the better of one/batch, against a plain ``torch.matmul`` of the same
  ``(T*K, S) @ (S, R)`` shape timed in the same run (``mm``), and their ratio (``%``);
* ``all %``: every flop the sweep must do (the two GEMMs, the ``N`` Gram matrices ``2 I_n R^2``,
  ``N`` Cholesky factorisations ``R^3 / 3`` and solves ``2 I_n R^2``, the MTTKRP contractions)
  over the same time, against the same matmul rate. At 2x the rank exceeds the channels
  (``R ~ 2.2 C``), so the rest is 64 % (order 3) and 69 % (order 4) of the GEMMs' flops: a sweep
  made only of matmul-rate work would read ``%`` 61 / 59 and ``all %`` 100.

    .venv/bin/python bench/cp_batched.py              # ~6 min on 2 cores
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

from bench.cp_speed import tensorly_fit  # noqa: E402
from bench.cp_start_error import cp_rank  # noqa: E402
from lowrank.allocator import allocator_note, tune_allocator  # noqa: E402
from lowrank.decompositions.cp_als import cp_als, init_factors  # noqa: E402
from lowrank.decompositions.cp_batched import cp_als_batched  # noqa: E402

GROUPS = {64: 4, 128: 3, 256: 3, 512: 3}
SWEEPS = {64: 100, 128: 50, 256: 20, 512: 8}


def matmul_rate(m: int, k: int, n: int) -> float:
    a, b = torch.randn(m, k, dtype=torch.float64), torch.randn(k, n, dtype=torch.float64)
    for _ in range(3):
        a @ b
    reps = max(3, int(2e9 / (2 * m * k * n)))
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", nargs="+", type=int, default=[64, 128, 256, 512])
    ap.add_argument("--out", default=str(ROOT / "bench" / "cp_batched.out.txt"))
    args = ap.parse_args()
    # both sides run with it (LOWRANK_MALLOC=default: without), and with no temporary of either library
    # mmapped afresh (tensorly's column `tl s`)
    tune_allocator(mmap_threshold=1 << 30, trim_threshold=1 << 30)
    lines = [f"# {' '.join(['bench/cp_batched.py', *sys.argv[1:]])}",
             f"# torch {torch.__version__}, {torch.get_num_threads()} threads, float64, {allocator_note()}, mmap and trim thresholds 1 GiB; seconds for the whole group",
             f"{'group':<16} {'rank':>5} {'sweeps':>6} {'one s':>7} {'batch s':>7} {'x':>5} {'tl s':>7} "
             f"{'vs tl':>6} {'GF/s':>6} {'mm':>6} {'%':>4} {'all %':>5}"]
    print("\n".join(lines), flush=True)
    for order in (3, 4):
        for c in args.channels:
            n, sweeps = GROUPS[c], SWEEPS[c]
            g = torch.Generator().manual_seed(c)
            shape = (c, c, 9) if order == 3 else (c, c, 3, 3)
            x = torch.randn(n, *shape, generator=g, dtype=torch.float64) * math.sqrt(2 / (c * 9))
            r = cp_rank(c, order, 2)
            inits = [init_factors(x[i], r, "svd", seed=0) for i in range(n)]
            t0 = time.perf_counter()
            for i in range(n):
                cp_als(x[i], r, init=inits[i], n_iter_max=sweeps, tol=-1.0)
            one = time.perf_counter() - t0
            t0 = time.perf_counter()
            cp_als_batched(x, r, init=inits, n_iter_max=sweeps, tol=-1.0)
            batch = time.perf_counter() - t0
            tl = None
            if c <= 128:
                tl = sum(tensorly_fit(x[i], inits[i], sweeps, "pytorch")[0] for i in range(n))
            flops = 2 * (2 * c * c * 9 * r) * sweeps * n
            rate = flops / min(one, batch) / 1e9
            extra = sum(2 * d * r * r + r ** 3 / 3 + 2 * d * r * r for d in shape) + 2 * 3 * c * 9 * r
            rate_all = (flops + extra * sweeps * n) / min(one, batch) / 1e9
            mm = matmul_rate(c * 9, c, r)
            lines.append(f"{n} x {'x'.join(map(str, shape)):<12} {r:>5} {sweeps:>6} {one:>7.2f} {batch:>7.2f} "
                         f"{one / batch:>5.2f} {'-' if tl is None else f'{tl:.2f}':>7} "
                         f"{'-' if tl is None else f'{tl / min(one, batch):.1f}':>6} {rate:>6.1f} {mm:>6.1f} "
                         f"{100 * rate / mm:>4.0f} {100 * rate_all / mm:>5.0f}")
            print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
