"""EPC's block step by Cholesky factorisations against one by an eigendecomposition.

Each EPC block step solves a ridge problem ``Y = Gt (A + rho I)^{-1}`` whose ``rho`` puts the model
on the error bound. ``ridge='eigh'`` (EPC's only path before) diagonalises ``A`` once and finds
``rho`` on the secular equation; ``ridge='cholesky'`` (the default now) takes Newton steps on
``1/phi(rho)`` from the previous sweeps' roots, one Cholesky factorisation each, and scales the result
onto the bound (``lowrank/decompositions/epc.py``, ``_ridge_by_cholesky``; docs/algorithms.md 1.4).

For ResNet-18's 3x3 convs (64, 128, 256 channels) as the tensors of ``cp3`` (order 3) and ``cp4``
(order 4), at the rank of 2x fewer parameters: CP-ALS with the library's defaults, then EPC with
the library's defaults (extrapolated, ``tol`` 1e-7) up to ``--sweeps`` sweeps, by each path,
interleaved, ``--repeats`` times (the fastest run of each is quoted). Per row: ms per sweep of
each path and their ratio, the share of the Cholesky run's block steps that fell back to an
eigendecomposition, and how far the two runs' final ``J`` and relative error lie apart (the
extrapolation's accept/refuse decisions amplify rounding-level differences, so ``--plain`` also
compares the two without extrapolation). He-initialised random kernels, or with ``--state-dict`` a
trained ResNet-18's first ``conv1`` of each width.

    .venv/bin/python bench/epc_ridge.py                       # ~10 min on 2 cores
    .venv/bin/python bench/epc_ridge.py --state-dict .cache/bench/epc-fashion-mnist-resnet18-e15-n12000.pt \\
        --out bench/epc_ridge_trained.out.txt
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cp_start_error import cp_rank, kernels  # noqa: E402
from lowrank.decompositions.cp_als import cp_als  # noqa: E402
from lowrank.decompositions.epc import epc  # noqa: E402


def run(x: torch.Tensor, als: list[torch.Tensor], sweeps: int, ridge: str, extrapolate: bool) -> dict:
    t0 = time.perf_counter()
    _, info = epc(x, als, max_sweeps=sweeps, tol=1e-7, extrapolate=extrapolate, ridge=ridge)
    return {**info, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state-dict", help="a ResNet-18 state dict: each width's first 3x3 conv1 instead of a random kernel")
    ap.add_argument("--channels", nargs="+", type=int, default=[64, 128, 256])
    ap.add_argument("--sweeps", type=int, default=300, help="EPC's cap in this benchmark")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--plain", action="store_true", help="EPC without extrapolation (both paths)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "epc_ridge.out.txt"))
    args = ap.parse_args()
    trained = torch.load(args.state_dict, map_location="cpu", weights_only=True) if args.state_dict else None
    mode = "plain" if args.plain else "extrapolated"
    lines = [f"# {' '.join(['bench/epc_ridge.py', *sys.argv[1:]])}",
             f"# torch {torch.__version__}, {torch.get_num_threads()} threads, float64; EPC ({mode}, norm, tol 1e-7, "
             f"cap {args.sweeps}) from CP-ALS's defaults at 2x, block steps by eigh or by Cholesky; ms = per sweep, "
             f"fastest of {args.repeats}; eigh share = the Cholesky run's block steps that fell back to eigh; "
             f"J diff, err diff = (cholesky - eigh) / eigh at the end",
             f"{'tensor':<12} {'rank':>5} {'sweeps':>6} | {'eigh ms':>8} {'chol ms':>8} {'x':>5} {'eigh share':>10} | "
             f"{'J diff':>8} {'err diff':>8} | {'eigh s':>7} {'chol s':>7}"]
    print("\n".join(lines), flush=True)
    for order, c, x in kernels(args.channels, trained, lines):
        r = cp_rank(c, order, 2)
        als, _ = cp_als(x, r)
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for ridge in ("eigh", "cholesky"):
                got = run(x, als, args.sweeps, ridge, not args.plain)
                if ridge not in best or got["seconds"] < best[ridge]["seconds"]:
                    best[ridge] = got
        e, ch = best["eigh"], best["cholesky"]
        ms_e, ms_c = (1e3 * b["seconds"] / b["sweeps"] for b in (e, ch))
        steps = ch["sweeps"] * order
        lines.append(
            f"{'x'.join(map(str, x.shape)):<12} {r:>5} {ch['sweeps']:>6} | {ms_e:>8.2f} {ms_c:>8.2f} "
            f"{ms_e / ms_c:>5.2f} {ch['eigen_steps'] / steps:>10.1%} | "
            f"{(ch['objective_end'] - e['objective_end']) / e['objective_end']:>8.1e} "
            f"{(ch['rel_error'] - e['rel_error']) / e['rel_error']:>8.1e} | {e['seconds']:>7.2f} {ch['seconds']:>7.2f}")
        print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
