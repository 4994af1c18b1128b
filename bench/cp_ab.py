"""CP-ALS (line search) of this tree against the same code at another commit, interleaved in one
process: microseconds per sweep (the SVD start included), the median of seven fits each, the order
alternating every repetition, and whether both reach the same error.

    .venv/bin/python bench/cp_ab.py --against HEAD~2 --out bench/cp_ab.out.txt

The other commit's ``lowrank/`` is unpacked with ``git archive`` into a temporary folder and
imported under its own module objects, so that the two run side by side on the same machine state.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [((64, 64, 9), 134, 60), ((128, 128, 9), 278, 40), ((64, 64, 3, 3), 137, 60),
          ((128, 128, 3, 3), 281, 40), ((256, 256, 9), 566, 15)]


def load_both(rev: str, where: str):
    """``(ours, theirs)``: ``lowrank.decompositions.cp_als`` of this tree and of ``rev``."""
    blob = subprocess.run(["git", "archive", rev, "lowrank"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(where, filter="data")
    sys.path.insert(0, str(ROOT))
    import lowrank.decompositions.cp_als as ours
    from lowrank import tune_allocator
    tune_allocator()
    for name in [m for m in sys.modules if m == "lowrank" or m.startswith("lowrank.")]:
        del sys.modules[name]
    sys.path.insert(0, where)
    import lowrank.decompositions.cp_als as theirs
    assert theirs.__file__.startswith(where) and not ours.__file__.startswith(where)
    return ours, theirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", default="HEAD~1", help="the commit to compare with")
    ap.add_argument("--out", help="also write the table here")
    args = ap.parse_args()
    rev = subprocess.run(["git", "rev-parse", "--short", args.against], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as where:
        ours, theirs = load_both(args.against, where)
        import torch
        lines = [f"# bench/cp_ab.py --against {args.against} ({rev}); torch {torch.__version__}, "
                 f"{torch.get_num_threads()} threads, malloc tuned; cp_als with line search, us per sweep",
                 f"{'tensor':<12} {'rank':>5} {'dtype':>8} {rev + ' us':>10} {'this us':>10} {'x':>6}  same error"]
        print("\n".join(lines), flush=True)
        gen = torch.Generator().manual_seed(0)
        for shape, rank, sweeps in SHAPES:
            x = torch.randn(*shape, generator=gen, dtype=torch.float64) * (2 / (shape[1] * 9)) ** 0.5
            for dtype in (torch.float32, torch.float64):
                xx, times, last = x.to(dtype), {"this": [], "that": []}, {}
                for rep in range(8):  # the first pair warms up
                    pair = (("this", ours), ("that", theirs))
                    for name, mod in pair if rep % 2 else pair[::-1]:
                        t = time.perf_counter()
                        _, errors = mod.cp_als(xx, rank, n_iter_max=sweeps, tol=-1, linesearch=True)
                        if rep:
                            times[name].append(time.perf_counter() - t)
                        last[name] = errors[-1]
                this, that = (sorted(times[k])[3] / sweeps * 1e6 for k in ("this", "that"))
                same = abs(last["this"] - last["that"]) <= 1e-6 * max(last["that"], 1e-12)
                line = (f"{'x'.join(map(str, shape)):<12} {rank:>5} {str(dtype).removeprefix('torch.'):>8} "
                        f"{that:>10.0f} {this:>10.0f} {that / this:>6.2f}  {same}")
                lines.append(line)
                print(line, flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
