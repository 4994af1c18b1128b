"""Does a model's latency add up from its layers timed alone? The latency search's screening assumes so.

ResNet-18 (10 classes) at 1x3x32x32 on ONNX Runtime, one thread: the whole model (median of 60), and
the sum of its 3x3 convs but the first, each exported and timed alone as the screening times them
(``jobs.search.screen.LayerTimer``, warm: the same input and weights run after run), and cold (a 64 MiB
buffer is read between runs, so the layer's weights come from memory as they do in the whole graph,
where 45 MB of weights pass through the caches in every forward; it evicts the runtime's own state
too, so it over-counts). Warm and cold bound the layers' time in the graph from below and above.
"outside" is what the additive model takes as the fixed rest: 1 - sum / whole. "stubbed" is what the
search's calibration measures instead (``jobs.search.calibrate``: the searched layers replaced by stubs
of their output shape, timed interleaved with the whole model), and its share of the whole.

    .venv/bin/python bench/latency_additivity.py --out bench/latency_additivity.out.txt   # ~2 min
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import lowrank  # noqa: E402
from jobs import deploy  # noqa: E402
from jobs.models import build_model  # noqa: E402
from jobs.search import calibrate  # noqa: E402
from jobs.search.screen import LayerTimer  # noqa: E402

FLUSH = np.ones(64 << 18, dtype=np.float32)  # 64 MiB, more than the last-level cache


def cold(run, arg, repeats: int) -> float:
    run(arg)
    times = []
    for _ in range(repeats):
        FLUSH.sum()  # evicts the layer's weights
        t0 = time.perf_counter()
        run(arg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_model("resnet18", 10).eval()
    shape = (3, args.size, args.size)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    names = [n for n in convs[1:] if model.get_submodule(n).kernel_size == (3, 3)]  # the search's layers: skip_first
    shapes = lowrank.layer_input_shapes(model, names, (1, *shape))
    lines = [f"# bench/latency_additivity.py {' '.join(sys.argv[1:])}".rstrip(),
             f"# torch {torch.__version__}, ResNet-18 at 1x{'x'.join(map(str, shape))}, ONNX Runtime, one thread; "
             f"{len(names)} 3x3 convs (all but the first); ms",
             "round  whole  layers warm (7 runs)  outside  layers warm (60)  outside  layers cold (60)  outside"
             "  stubbed  outside"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        timer = LayerTimer("onnxruntime", "cpu", tmp)
        for r in range(args.rounds):
            whole = deploy.timed([model], shape, runtime="onnxruntime", batch=1, threads=1, repeats=60, workdir=tmp)[0]
            xs = {n: torch.randn(shapes[n]) for n in names}
            warm7 = sum(timer(model.get_submodule(n), xs[n], 7) for n in names)
            warm60 = sum(timer(model.get_submodule(n), xs[n], 60) for n in names)
            runs = {n: deploy.RUNTIMES["onnxruntime"].prepare(model.get_submodule(n), tuple(shapes[n][1:]), 1, tmp)
                    for n in names}
            cold60 = sum(cold(runs[n], xs[n].numpy(), 60) for n in names)
            cal = calibrate.measure(model, names, shape, runtime="onnxruntime", repeats=60)
            lines.append(f"{r:>5} {whole * 1e3:>6.2f} {warm7 * 1e3:>21.2f} {1 - warm7 / whole:>8.0%} "
                         f"{warm60 * 1e3:>17.2f} {1 - warm60 / whole:>8.0%} {cold60 * 1e3:>17.2f} {1 - cold60 / whole:>8.0%} "
                         f"{cal['fixed'] * 1e3:>8.2f} {cal['fixed'] / cal['whole']:>8.0%}")
            print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
