"""Realised speedup on the runtime users deploy: ONNX Runtime (CPU) against eager PyTorch.

For ResNet-18 (ImageNet head, 224 px, and the 10-class network at 32 px as on Fashion-MNIST) and
the small CNN (32 px): every method at 2x parameters per layer (first conv dense, 1x1 shortcuts by
SVD), then the same model with the layers that are slower than dense on that runtime left dense
(each layer timed alone, batch 1, one thread: what a latency-target search does). Per model:
MACs reduction, and per runtime, batch and threads the speedup of the compressed model timed
interleaved with the dense one (``jobs.deploy.paired``, medians), and the speedup per MAC
reduction (1 = every MAC saved is time saved).

    .venv/bin/python bench/deploy_latency.py                 # ~6 min on 2 cores
    .venv/bin/python bench/deploy_latency.py --runtimes onnxruntime torch torch-compile
    .venv/bin/python bench/deploy_latency.py --runtimes onnxruntime --batches 1 --threads 1 --multiples 1 16

``--multiples``: the ranks rounded to multiples of each (``rank.multiple_of``; 1 = as the ratio
chooses them), every variant in the same run (variant ``x16`` ...).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lowrank  # noqa: E402
from jobs import deploy  # noqa: E402
from jobs.models import build_model  # noqa: E402

METHODS = ("spatial-svd", "tucker2", "cp3")
NETS = {"resnet18-224": ("resnet18", 1000, 224), "resnet18-32": ("resnet18", 10, 32), "smallcnn-32": ("smallcnn", 10, 32)}


def compressed(model, method: str, shape, multiple: int = 1):
    align = {"multiple_of": multiple} if multiple > 1 else {}
    opts = {"ratio": 2, **align, **({"n_iter_max": 3} if method.startswith("cp") else {})}  # timing: no good fit needed
    plan = {n: (m, r, opts if m == method else {"ratio": 2, **align})
            for n, (m, r, _) in lowrank.plan_layers(model, method, "ratio", pointwise_method="svd").items()}
    small, reports = lowrank.compress_model(model, plan, input_shape=shape)
    return small.eval(), [r.name for r in reports if r.status == "ok"]


def without_slower(dense, small, names, shape, runtime: str, repeats: int):
    """The compressed model with every layer that is slower than its dense layer on ``runtime``
    (timed alone) put back to the original; and how many were put back."""
    per = deploy.per_layer(dense, small, names, shape, runtime=runtime, repeats=repeats)
    slower = [n for n, t in per.items() if t["speedup"] < 1]
    fast = copy.deepcopy(small)
    for n in slower:
        lowrank.replace_submodule(fast, n, copy.deepcopy(dense.get_submodule(n)))
    return fast.eval(), len(slower)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--runtimes", nargs="+", default=["onnxruntime", "torch"], choices=list(deploy.RUNTIMES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--multiples", nargs="+", type=int, default=[1], help="rank.multiple_of values compared")
    ap.add_argument("--out", default=str(ROOT / "bench" / "deploy_latency.out.txt"))
    args = ap.parse_args()
    import onnxruntime  # noqa: PLC0415 - only for the version line

    lines = [f"# {' '.join(['bench/deploy_latency.py', *sys.argv[1:]])}",
             f"# torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, CPU, all threads = "
             f"{torch.get_num_threads()}; dense and compressed timed interleaved, medians of {args.repeats}",
             f"{'net':<13} {'method':<12} {'variant':<13} {'MACs x':>6} {'runtime':<12} {'batch':>5} {'thr':>3} "
             f"{'dense ms':>9} {'comp ms':>9} {'speedup':>7} {'sp/MACx':>7}"]
    print("\n".join(lines), flush=True)
    for net in args.nets:
        name, classes, size = NETS[net]
        torch.manual_seed(0)
        dense = build_model(name, classes).eval()
        shape = (3, size, size)
        _, m0 = lowrank.count(dense, shape)
        for method, multiple in ((m, k) for m in args.methods for k in args.multiples):
            t0 = time.perf_counter()
            small, names = compressed(dense, method, shape, multiple)
            tag = f"x{multiple} " if len(args.multiples) > 1 else ""
            for runtime in args.runtimes:
                fast, n_slow = without_slower(dense, small, names, shape, runtime, args.repeats)
                for variant, model in ((f"{tag}all {len(names)}", small), (f"{tag}-{n_slow} slower", fast)):
                    if variant.endswith("-0 slower"):
                        continue  # no layer was slower: the same model
                    _, m = lowrank.count(model, shape)
                    rows = deploy.paired(dense, model, shape, runtime=runtime, batches=tuple(args.batches),
                                         threads=tuple(args.threads), repeats=args.repeats)
                    for r in rows:
                        lines.append(f"{net:<13} {method:<12} {variant:<13} {m0 / m:>6.2f} {runtime:<12} "
                                     f"{r['batch']:>5} {r['threads']:>3} {r['dense_ms']:>9.2f} "
                                     f"{r['compressed_ms']:>9.2f} {r['speedup']:>7.2f} {r['speedup'] / (m0 / m):>7.2f}")
                        print(lines[-1], flush=True)
            print(f"# {net} {method} {tag}: {time.perf_counter() - t0:.0f}s", flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
