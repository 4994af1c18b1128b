"""How far each CP start is from the kernel, and what it costs: ``svd``, ``random`` and ``slices``.

For every ResNet-18 3x3 conv shape (64-512 channels) as the order-3 ``(T, S, 9)`` tensor of ``cp3``
and the order-4 ``(T, S, 3, 3)`` tensor of ``cp4``, at the ranks that make the layer 2x and 4x
smaller (the ranks of ``bench/cp_equal_error.py``): the relative error ``||X - model|| / ||X||``
of each start (``lowrank.decompositions.cp_init.INITS``) before any sweep, and the seconds it took
(best of three). At both ratios the rank exceeds the channels, so ``svd`` fills the columns beyond
each channel mode's size with standard normal values, as tensorly's ``init='svd'`` does.

    .venv/bin/python bench/cp_start_error.py                           # He-initialised random kernels
    .venv/bin/python bench/cp_start_error.py --state-dict .cache/bench/epc-fashion-mnist-resnet18-e15-n12000.pt \
        --out bench/cp_start_error_trained.out.txt                     # trained kernels (bench/epc_layers.py caches them)
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

from lowrank.decompositions.cp_als import reconstruct  # noqa: E402
from lowrank.decompositions.cp_init import INITS  # noqa: E402


def kernel(c: int, order: int, trained: dict | None) -> tuple[torch.Tensor, str]:
    """The ``c``-channel kernel as the tensor of ``cp3`` (order 3) or ``cp4`` (order 4), and its name."""
    shape = (c, c, 9) if order == 3 else (c, c, 3, 3)
    if trained is None:
        g = torch.Generator().manual_seed(c)
        return torch.randn(*shape, generator=g, dtype=torch.float64) * math.sqrt(2 / (c * 9)), "random (He)"
    name = next((k for k, w in trained.items() if k.endswith("conv1.weight") and tuple(w.shape) == (c, c, 3, 3)), None)
    if name is None:
        raise SystemExit(f"the state dict has no conv1.weight of shape ({c}, {c}, 3, 3); accepted: a ResNet-18 state dict")
    return trained[name].double().reshape(shape), name


def kernels(channels, trained: dict | None, lines: list[str]):
    """``(order, c, x)`` for order 3 then 4 over ``channels`` (``kernel``), each announced by a
    ``# c channels, order n: name`` line appended to ``lines`` and printed."""
    for order in (3, 4):
        for c in channels:
            x, name = kernel(c, order, trained)
            lines.append(f"# {c} channels, order {order}: {name}")
            print(lines[-1], flush=True)
            yield order, c, x


def cp_rank(c: int, order: int, ratio: float) -> int:
    """The CP rank that makes a ``c``-to-``c`` 3x3 conv ``ratio`` times smaller as ``cp3`` (order 3:
    factors ``c, c, 9``) or ``cp4`` (order 4: ``c, c, 3, 3``)."""
    return int(c * c * 9 // (ratio * (2 * c + (9 if order == 3 else 6))))


def start(x: torch.Tensor, rank: int, init: str) -> tuple[float, float]:
    """(best-of-three seconds, relative error) of one start."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        f = INITS[init](x, rank, 0)
        times.append(time.perf_counter() - t0)
    return min(times), float((x - reconstruct(f)).norm() / x.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state-dict", help="take each shape's kernel from this ResNet-18 state dict (its first 3x3 "
                    "conv1 of that many channels) instead of a random one")
    ap.add_argument("--out", default=str(ROOT / "bench" / "cp_start_error.out.txt"))
    args = ap.parse_args()
    trained = torch.load(args.state_dict, map_location="cpu", weights_only=True) if args.state_dict else None
    names = list(INITS)
    lines = [f"# {' '.join(['bench/cp_start_error.py', *sys.argv[1:]])}",
             f"# torch {torch.__version__}, {torch.get_num_threads()} threads; relative error of the start, "
             f"seconds (best of 3)",
             f"{'tensor':<12} {'ratio':>5} {'rank':>5} | " + " | ".join(f"{n + ' err':>11} {'s':>6}" for n in names)
             + f" | {'svd/slices err':>14}"]
    print("\n".join(lines), flush=True)
    for order in (3, 4):
        for c in (64, 128, 256, 512):
            x, name = kernel(c, order, trained)
            if order == 3:
                lines.append(f"# {c} channels: {name}")
            for ratio in (2, 4):
                r = cp_rank(c, order, ratio)
                res = {n: start(x, r, n) for n in names}
                cells = " | ".join(f"{res[n][1]:>11.4g} {res[n][0]:>6.3f}" for n in names)
                lines.append(f"{'x'.join(map(str, x.shape)):<12} {ratio:>4}x {r:>5} | {cells} | "
                             f"{res['svd'][1] / res['slices'][1]:>14.1f}")
                print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
