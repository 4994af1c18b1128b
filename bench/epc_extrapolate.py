"""EPC with and without extrapolation: the same error bound, how low ``J`` gets per sweep.

For ResNet-18's 3x3 convs of 64 and 128 channels as the tensors of ``cp3`` (order 3) and ``cp4``
(order 4), at the rank of ``--ratios`` fewer parameters: CP-ALS with the library's defaults (the
``cp3-epc`` / ``cp4-epc`` start), then EPC at ALS's error with the library's defaults (objective
``norm``, ``tol`` 1e-7, up to ``--sweeps`` sweeps), once plain (``extrapolate=False``, the method
before extrapolation) and once extrapolated (``extrapolate=True``, the default now). Per run: the
sweeps it ran, ``J`` after 150 sweeps and at the end, the sweeps the extrapolated run needs to
reach the plain run's final ``J`` (``reach``: the cut in sweeps to an equal ``J`` is
plain sweeps / reach), seconds per sweep of each (their ratio: what a trial step costs), both
final relative errors (equal by construction) and cancellation ratios (``lowrank.cp_diagnostics``).
He-initialised random kernels, or with ``--state-dict`` a trained ResNet-18's first ``conv1`` of
each width (``bench/epc_layers.py`` caches one).

    .venv/bin/python bench/epc_extrapolate.py                 # ~13 min on 2 cores
    .venv/bin/python bench/epc_extrapolate.py --state-dict .cache/bench/epc-fashion-mnist-resnet18-e15-n12000.pt \
        --out bench/epc_extrapolate_trained.out.txt
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lowrank  # noqa: E402
from bench.cp_start_error import cp_rank, kernels  # noqa: E402
from lowrank.decompositions.cp_als import cp_als  # noqa: E402
from lowrank.decompositions.epc import epc  # noqa: E402


def run(x: torch.Tensor, als: list[torch.Tensor], sweeps: int, extrapolate: bool) -> dict:
    js: list[float] = []
    t0 = time.perf_counter()
    factors, info = epc(x, als, max_sweeps=sweeps, tol=1e-7, extrapolate=extrapolate,
                        callback=lambda s, j: js.append(j))
    seconds = time.perf_counter() - t0
    return {"js": js, "sweeps": info["sweeps"], "per_sweep": seconds / info["sweeps"], "err": info["rel_error"],
            "cancel": lowrank.cp_diagnostics(factors, x)["cancellation_ratio"], "kept": info["extrapolated"],
            "j_start": info["objective_start"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state-dict", help="a ResNet-18 state dict: each width's first 3x3 conv1 instead of a random kernel")
    ap.add_argument("--channels", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--ratios", nargs="+", type=float, default=[2.0])
    ap.add_argument("--sweeps", type=int, default=3000,
                    help="EPC's cap (3000: the library's epc_max_sweeps before EPC extrapolated)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "epc_extrapolate.out.txt"))
    args = ap.parse_args()
    trained = torch.load(args.state_dict, map_location="cpu", weights_only=True) if args.state_dict else None
    lines = [f"# {' '.join(['bench/epc_extrapolate.py', *sys.argv[1:]])}",
             f"# torch {torch.__version__}, {torch.get_num_threads()} threads; EPC (norm, tol 1e-7, cap {args.sweeps}) "
             f"from CP-ALS's defaults, plain against extrapolated; J150 = J after 150 sweeps; reach = the extrapolated "
             f"run's sweeps to the plain run's final J; ms = per sweep",
             f"{'tensor':<12} {'ratio':>5} {'rank':>5} {'J als':>8} | {'plain it':>8} {'J150':>8} {'J end':>8} "
             f"{'ms':>6} {'cancel':>6} | {'extra it':>8} {'J150':>8} {'J end':>8} {'ms':>6} {'cancel':>6} {'kept':>5} | "
             f"{'reach':>5} {'sweeps x':>8} {'ms x':>5} {'err diff':>8}"]
    print("\n".join(lines), flush=True)
    for order, c, x in kernels(args.channels, trained, lines):
        for ratio in args.ratios:
            r = cp_rank(c, order, ratio)
            als, _ = cp_als(x, r)
            plain, extra = run(x, als, args.sweeps, False), run(x, als, args.sweeps, True)
            j_als = plain["j_start"]
            end = plain["js"][-1]
            reach = next((i + 1 for i, j in enumerate(extra["js"]) if j <= end), None)
            j150 = [p["js"][min(149, len(p["js"]) - 1)] for p in (plain, extra)]
            lines.append(
                f"{'x'.join(map(str, x.shape)):<12} {ratio:>4g}x {r:>5} {j_als:>8.4g} | "
                f"{plain['sweeps']:>8} {j150[0]:>8.4g} {end:>8.4g} {1e3 * plain['per_sweep']:>6.2f} "
                f"{plain['cancel']:>6.2f} | {extra['sweeps']:>8} {j150[1]:>8.4g} {extra['js'][-1]:>8.4g} "
                f"{1e3 * extra['per_sweep']:>6.2f} {extra['cancel']:>6.2f} {extra['kept']:>5} | "
                f"{reach if reach else '-':>5} {plain['sweeps'] / reach if reach else float('nan'):>8.2f} "
                f"{extra['per_sweep'] / plain['per_sweep']:>5.2f} {abs(extra['err'] - plain['err']) / plain['err']:>8.1e}")
            print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
