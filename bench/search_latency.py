"""Realised speedup of the models a latency-aware search picks, on the runtime they deploy to.

ResNet-18 over all its 3x3 convs but the first, trained on the embedded default's digits at 32 px, or
(``--data fashion-mnist --checkpoint PATH``) a ResNet-18 trained on Fashion-MNIST, for example the one
``bench/fashion_mnist.py`` caches under ``.cache/bench/``.
For each timed input size (``--sizes``: 224, ImageNet's; 32, the Fashion-MNIST/CIFAR geometry),
each method alone (``spatial-svd``, ``tucker2``) and ranks as chosen or in multiples of 16
(``rank.multiple_of``): one sweep through the real runner (local Ray, sqlite MLflow) with
``compression.search`` strategy ``budget``, ``target: latency`` at ``--ratio``, on ONNX Runtime at
batch 1, one thread (``--runtime``: another of ``latency.runtime``), screened and timed at that size
(``latency.input_size``). Every figure is read
back from the registry: ``speedup_b1`` (the timing step, dense interleaved), ``mac_ratio_timed``
(MACs at the timed size), ``speedup_per_mac_b1`` (their quotient; the target is >= 0.85), the
speedup the search predicted (``search_predicted_ratio``: its latency model, calibrated against the
whole graph), the dense model's top-1 (``acc_pre``) and the layers the search left dense.

    .venv/bin/python bench/search_latency.py                  # about 13 minutes on 2 cores (8 sweeps)
    .venv/bin/python bench/search_latency.py --sizes 32 --methods tucker2 --multiples 16
    .venv/bin/python bench/search_latency.py --sizes 32 --multiples 16 --runtime torch-compile \
        --out bench/search_latency_compile.out.txt
    .venv/bin/python bench/search_latency.py --sizes 32 --multiples 1 --data fashion-mnist \
        --checkpoint .cache/bench/fashion-resnet18-s0-e40-nNone.pt --out /tmp/search_latency_fashion.out.txt
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def spec(size: int, method: str, multiple: int, args) -> dict:
    d = yaml.safe_load((ROOT / "jobs" / "default_sweep.yaml").read_text())
    name = f"lat{size}-{method}-m{multiple}"
    d["name"] = name
    d["models"] = [{"name": "resnet18", "num_classes": 10}]
    if args.checkpoint:
        d["models"][0]["checkpoint"] = args.checkpoint  # resolved in main, before the chdir
    if args.data == "fashion-mnist":  # the 10,000 test images validate; the geometry bench/fashion_mnist.py trains in
        d["dataset"] = {"kind": "fashion-mnist", "input_size": 32, "batch_size": 128, "limit_train": args.limit_train}
    d["mlflow"] = {"tracking_uri": "sqlite:///mlflow.db", "experiment": "bench-search-latency",
                   "registered_model_prefix": f"{name}-"}
    d["compression"] = {"methods": [method], "layers": {"skip_first": True},
                        "rank": {"strategy": "ratio", "ratio": 2, "multiple_of": multiple},
                        "search": {"strategies": ["budget"], "target": "latency", "ratio": args.ratio,
                                   "candidate_ratios": [1.5, 2, 3, 4, 6], "val_batches": 4, "bn_batches": 5}}
    d["latency"] = {"runtime": args.runtime, "batches": [1], "threads": [1], "input_size": size, "repeats": args.repeats}
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 32])
    ap.add_argument("--methods", nargs="+", default=["spatial-svd", "tucker2"])
    ap.add_argument("--multiples", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--ratio", type=float, default=1.5, help="the latency target (speedup at batch 1)")
    ap.add_argument("--runtime", choices=["onnxruntime", "torch", "torch-compile"], default="onnxruntime",
                    help="latency.runtime: where the search screens and the versions are timed")
    ap.add_argument("--repeats", type=int, default=40, help="interleaved repetitions of the timing step")
    ap.add_argument("--data", choices=["digits", "fashion-mnist"], default="digits")
    ap.add_argument("--checkpoint", default=None, help="ResNet-18 state dict (10 classes) instead of pre-training")
    ap.add_argument("--limit-train", type=int, default=None, help="fashion-mnist: training images for fine-tuning")
    ap.add_argument("--out", default=str(ROOT / "bench" / "search_latency.out.txt"))
    args = ap.parse_args()
    if args.checkpoint:
        if not Path(args.checkpoint).is_file():
            sys.exit(f"--checkpoint {args.checkpoint}: no such file (bench/fashion_mnist.py writes one under .cache/bench/)")
        args.checkpoint = str(Path(args.checkpoint).resolve())  # before the sweeps chdir into their store
    out = Path(args.out).resolve()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from mlflow import MlflowClient

    from jobs.driver import run_sweep
    from jobs.spec import parse_spec

    weights = f", weights {Path(args.checkpoint).name}" if args.checkpoint else ""
    lines = [f"# {' '.join(['bench/search_latency.py', *sys.argv[1:]])}",
             f"# ResNet-18 ({args.data}, 32 px training{weights}), search budget, target latency {args.ratio:g}x; {args.runtime}, "
             f"batch 1, one thread, timed at the size named",
             "| size | method | ranks | speedup b1 | predicted | MACs x (timed size) | speedup / MAC reduction | >= 0.85 | "
             "params x | acc_pre | acc_ft | layers left dense | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # one MLflow store and one pre-training cache for every sweep
        client = MlflowClient("sqlite:///mlflow.db")
        for size in args.sizes:
            for method in args.methods:
                for multiple in args.multiples:
                    d = spec(size, method, multiple, args)
                    t0 = time.perf_counter()
                    res = run_sweep(parse_spec(d, d["name"]), out=lambda *a, **k: None)
                    seconds = time.perf_counter() - t0
                    versions = client.search_model_versions(f"name='{d['name']}-resnet18'")
                    if res.failed or not versions:
                        line = f"| {size} | {method} | x{multiple} | failed: {res.failed} | | | | | | | | | {seconds:.0f} |"
                    else:
                        t = versions[0].tags
                        alloc = client.get_run(t["run_id"]).data.params.get("allocation", "")
                        per = float(t["speedup_per_mac_b1"])
                        line = (f"| {size} | {method} | {'as chosen' if multiple == 1 else f'multiples of {multiple}'} | "
                                f"{float(t['speedup_b1']):.2f}x | {float(t.get('search_predicted_ratio', 'nan')):.2f}x | "
                                f"{float(t['mac_ratio_timed']):.2f} | {per:.2f} | "
                                f"{'yes' if per >= 0.85 else 'no'} | {float(t['compression_ratio']):.2f} | "
                                f"{float(t['acc_pre']):.3f} | {float(t['acc_ft']):.3f} | "
                                f"{alloc.count('=dense')}/{alloc.count('=')} | {seconds:.0f} |")
                    lines.append(line)
                    print(line, flush=True)
                    out.write_text("\n".join(lines) + "\n")  # after every sweep


if __name__ == "__main__":
    main()
