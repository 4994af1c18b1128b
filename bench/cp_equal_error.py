"""CP-ALS time to equal error against tensorly's ``parafac`` (not equal iterations).

For every ResNet-18 3x3 conv shape (64-512 channels) as the order-3 ``(T, S, 9)`` tensor of
``cp3`` and the order-4 ``(T, S, 3, 3)`` tensor of ``cp4``, at the ranks that make the layer 2x
and 4x smaller: tensorly (pytorch backend, its default ALS, no line search) runs ``iters`` sweeps
from our SVD start; then ours, from the same start, runs until its relative error is at most
tensorly's final one: plain ALS, with line search (``linesearch: true``), and with line search in
float32 (``als_dtype: float32``, the error checked in float64 afterwards). ``x`` = tensorly's
seconds / ours. tensorly with its own line search (``linesearch=True``) then runs from the same start
until it reaches the same error (``tl-ls``), and ``x best`` is the faster of tensorly's two fits
over our fastest. Last, ours from its own start (``init: slices``, computed inside the timed
region; tensorly's SVD start is not in its time), with line search in float32 (``sl32``). Every time is the best of three runs where one run takes under 3 s (``best_of``), after two
untimed sweeps of each library on the shape. The kernels are He-initialised random (no trained weights can be downloaded here).

    .venv/bin/python bench/cp_equal_error.py            # ~15 min on 2 cores
    .venv/bin/python bench/cp_equal_error.py --quick    # 64 and 128 channels
    .venv/bin/python bench/cp_equal_error.py --state-dict .cache/bench/epc-fashion-mnist-resnet18-e15-n12000.pt \
        --out bench/cp_equal_error_trained.out.txt       # trained kernels (bench/epc_layers.py caches them)
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

from bench.cp_speed import best_of, tensorly_fit, warm_up  # noqa: E402
from bench.cp_start_error import cp_rank  # noqa: E402
from lowrank.allocator import allocator_note, tune_allocator  # noqa: E402
from lowrank.decompositions._lapack import lapack_note  # noqa: E402
from lowrank.decompositions.cp_als import cp_als, init_factors, reconstruct  # noqa: E402

ITERS = {64: 200, 128: 100, 256: 40, 512: 12}


def ours(x, init, target: float, cap: int, **kw) -> tuple[float, int, float]:
    """(seconds, sweeps, float64 relative error) to reach ``target`` (or ``cap`` sweeps). ``init``:
    the shared start, or an init's name (``'slices'``), then computed inside the timed region."""
    dtype = kw.pop("dtype", torch.float64)
    rank = kw.pop("rank", None) or init[0].shape[1]
    xs, start = x.to(dtype), init if isinstance(init, str) else [f.to(dtype) for f in init]
    t0 = time.perf_counter()
    f, errs = cp_als(xs, rank, init=start, n_iter_max=cap, tol=-1.0, stop_at=target, **kw)
    secs = time.perf_counter() - t0
    err = float((x - reconstruct([t.double() for t in f])).norm() / x.norm())
    return secs, len(errs), err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "cp_equal_error.out.txt"))
    ap.add_argument("--state-dict", help="take each shape's kernel from this ResNet-18 state dict (its first 3x3 conv "
                    "of that many in and out channels) instead of a random one, e.g. the Fashion-MNIST ResNet-18 "
                    "that bench/epc_layers.py trains and caches")
    args = ap.parse_args()
    trained = torch.load(args.state_dict, map_location="cpu", weights_only=True) if args.state_dict else None
    # both sides run with it (LOWRANK_MALLOC=default: without), and with no temporary of either library
    # mmapped afresh: tensorly's mode-2 Khatri-Rao product is 297 MB at 256 channels
    tune_allocator(mmap_threshold=1 << 30, trim_threshold=1 << 30)
    channels = [64, 128] if args.quick else [64, 128, 256, 512]
    lines = [f"# {' '.join(['bench/cp_equal_error.py', *sys.argv[1:]])}",
             f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {allocator_note()}, mmap and trim thresholds 1 GiB, ours with {lapack_note()}; tensorly parafac (pytorch backend) "
             f"ITERS sweeps, ours until its error <= tensorly's",
             f"{'tensor':<12} {'ratio':>5} {'rank':>5} {'tl it':>5} {'tl s':>7} {'tl err':>8} | "
             f"{'plain it':>8} {'s':>6} {'x':>5} | {'ls it':>5} {'s':>6} {'x':>5} | {'ls32 it':>7} {'s':>6} {'x':>5} "
             f"{'err32':>8} | {'tl-ls it':>8} {'s':>7} {'x best':>6}"]
    print("\n".join(lines), flush=True)
    for order in (3, 4):
        for c in channels:
            if order == 4 and c == 512:
                continue  # tensorly's explicit Khatri-Rao product for the 3x3 modes needs > 10 GB
            g = torch.Generator().manual_seed(c)
            shape = (c, c, 9) if order == 3 else (c, c, 3, 3)
            x = torch.randn(*shape, generator=g, dtype=torch.float64) * math.sqrt(2 / (c * 9))
            if trained is not None:
                name = next(k for k, w in trained.items() if k.endswith("conv1.weight") and tuple(w.shape) == (c, c, 3, 3))
                x = trained[name].double().reshape(shape)
                if order == 3:
                    lines.append(f"# {c} channels: {name}")
            for ratio in (2, 4):
                r = cp_rank(c, order, ratio)
                n = ITERS[c]
                init = init_factors(x, r, "svd", seed=0)
                warm_up(x, init, dtypes=(torch.float64, torch.float32), backends=("pytorch",))
                tl_s, tl_err, _ = best_of(lambda: tensorly_fit(x, init, n, "pytorch"))
                cap = 4 * n
                runs = [best_of(lambda kw=kw: ours(x, init, tl_err, cap, **kw))
                        for kw in ({}, {"linesearch": True}, {"linesearch": True, "dtype": torch.float32})]
                ls_s, ls_err, ls_it = best_of(lambda: tensorly_fit(x, init, cap, "pytorch", linesearch=True,
                                                                   stop_at=tl_err))
                ls_it = ls_it if ls_err <= tl_err * (1 + 1e-9) else f">{ls_it}"  # did not get there
                cells = " | ".join(f"{it:>{w}} {s:>6.2f} {tl_s / s:>5.1f}" for (s, it, _), w in zip(runs, (8, 5, 7)))
                best = min(tl_s, ls_s) / min(s for s, _, _ in runs)
                # our own start (init: slices), its cost inside the time; tensorly's SVD start is not in its time
                sl_s, sl_it, sl_err = best_of(lambda: ours(x, "slices", tl_err, cap, rank=r, linesearch=True,
                                                           dtype=torch.float32))
                sl_it = sl_it if sl_err <= tl_err * (1 + 1e-4) else f">{sl_it}"
                lines.append(f"{'x'.join(map(str, shape)):<12} {ratio:>4}x {r:>5} {n:>5} {tl_s:>7.2f} {tl_err:>8.5f} | "
                             f"{cells} {runs[2][2]:>8.5f} | {ls_it:>8} {ls_s:>7.2f} {best:>6.1f} | "
                             f"{sl_it:>7} {sl_s:>6.2f} {tl_s / sl_s:>5.1f} {min(tl_s, ls_s) / sl_s:>6.1f}")
                print(lines[-1], flush=True)
    lines[1] = lines[1].replace("ITERS", "/".join(str(ITERS[c]) for c in channels))
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
