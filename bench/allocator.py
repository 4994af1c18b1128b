"""What glibc's malloc costs a CP fit and a training step, and what ``lowrank.tune_allocator`` gives back.

Each case runs in a fresh Python process, once with glibc's defaults (``LOWRANK_MALLOC=default``)
and once tuned (``tune_allocator()`` first thing), the two interleaved, ``--repeats`` times; the
table shows medians of seconds and of minor page faults (``getrusage``) for the timed part only.
Cases: our CP-ALS and tensorly's ``parafac`` (pytorch backend), same start, fixed sweeps, float64,
on ResNet-18 conv shapes at 2x (He-initialised random kernels), and ResNet-18 training steps
(batch 64, 32 px, SGD), as fine-tuning runs them.

    .venv/bin/python bench/allocator.py [--repeats 3] [--out bench/allocator.out.txt]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # name: (kind, shape, sweeps)
    "ours 64x64x9": ("ours", (64, 64, 9), 100),
    "tensorly 64x64x9": ("tensorly", (64, 64, 9), 100),
    "ours 128x128x9": ("ours", (128, 128, 9), 50),
    "tensorly 128x128x9": ("tensorly", (128, 128, 9), 50),
    "ours 128x128x3x3": ("ours", (128, 128, 3, 3), 50),
    "tensorly 128x128x3x3": ("tensorly", (128, 128, 3, 3), 20),
    "ours 256x256x9": ("ours", (256, 256, 9), 20),
    "tensorly 256x256x9": ("tensorly", (256, 256, 9), 10),
    "resnet18 train steps": ("train", (64, 3, 32, 32), 10),
}


def child(name: str) -> dict:
    """Run one case in this (fresh) process; seconds and minor faults of the timed part."""
    sys.path.insert(0, str(ROOT))
    from lowrank.allocator import tune_allocator
    tuned = tune_allocator()
    import torch
    kind, shape, n = CASES[name]
    if kind == "train":
        from jobs.tv import import_torchvision
        model = import_torchvision().models.resnet18(num_classes=10)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))

        def run():
            for _ in range(n):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        model(x)  # first call's one-off costs outside the timed part
    else:
        from lowrank.decompositions.cp_als import cp_als, init_factors
        c = shape[0]
        g = torch.Generator().manual_seed(c)
        x = torch.randn(*shape, generator=g, dtype=torch.float64) * math.sqrt(2 / (c * 9))
        rank = (c * c * 9) // (2 * (2 * c + (9 if len(shape) == 3 else 6)))
        init = init_factors(x, rank, "svd", seed=0)
        if kind == "ours":
            def run():
                cp_als(x, rank, init=init, n_iter_max=n, tol=-1.0)
        else:
            from bench.cp_speed import tensorly_fit

            def run():
                tensorly_fit(x, init, n, "pytorch")
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    run()
    secs, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {"tuned": tuned, "seconds": secs, "faults": r1.ru_minflt - r0.ru_minflt}


def measure(name: str, tuned: bool) -> dict:
    env = dict(os.environ, LOWRANK_MALLOC="tuned" if tuned else "default")
    out = subprocess.run([sys.executable, __file__, "--child", name], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--out", default=str(ROOT / "bench" / "allocator.out.txt"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    import torch
    lines = [f"# bench/allocator.py {' '.join(sys.argv[1:])}".rstrip(),
             f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.uname().machine}; each case in a "
             f"fresh process, default and tuned interleaved, medians of {args.repeats}; n = sweeps (steps for training)",
             f"{'case':<22} {'n':>6} {'default s':>9} {'faults':>8} {'tuned s':>8} {'faults':>7} {'gain':>5}"]
    print("\n".join(lines), flush=True)
    for name in args.cases:
        runs = {False: [], True: []}
        for _ in range(args.repeats):
            for tuned in (False, True):
                r = measure(name, tuned)
                if r["tuned"] != tuned:
                    raise SystemExit(f"{name}: the allocator could not be tuned here (not glibc?)")
                runs[tuned].append(r)
        med = {k: (statistics.median(r["seconds"] for r in v), statistics.median(r["faults"] for r in v))
               for k, v in runs.items()}
        lines.append(f"{name:<22} {CASES[name][2]:>6} {med[False][0]:>9.3f} {med[False][1]:>8.0f} "
                     f"{med[True][0]:>8.3f} {med[True][1]:>7.0f} {med[False][0] / med[True][0]:>4.2f}x")
        print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
