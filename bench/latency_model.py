"""How well does the latency search predict a factorized model's speed? Screening timings, and the
costs the allocation uses, against what is measured.

ResNet-18 (10 classes) at batch 1 on ONNX Runtime, one thread.

1. *Screening noise*: every third 3x3 conv at 224 px, its spatial-SVD options (1.5-6x) screened
   twice, each time both ways: one module after another, 7 runs each after one warm-up (the timer
   the screening had before), and all interleaved (``jobs.search.screen.LayerTimer``, 25 rounds).
   Per layer: how far apart the two screenings put the same option's time, and its speedup over
   the dense layer (the largest ratio over the options).
2. *Prediction*: every 3x3 conv but the first factorized by one method at one parameter ratio. The
   speedup over the dense model is predicted three ways and set beside the one measured (the two
   models timed interleaved, ``jobs.deploy.timed``):
   - *screened*: each layer's option timed interleaved with its dense layer only, weights warm, as
     the screening times them;
   - *calibration*: every dense layer and every option timed alone, all interleaved one round after
     another, as the search's calibration task times them (``jobs.search.calibrate.measure``):
     *gross* as timed, *net* of what each layer's stub costs alone (the per-call cost), which is
     what the search uses;
   - *in graph*: each layer, dense and factorized, put alone into the stubbed model.
   All are scaled so that the dense layers add up to their share of the graph (the whole model's
   time less that of the copy with the layers stubbed), which is what the search does.
3. *What calibration costs* (``--cost MODEL..``): the calibration task's seconds on deeper networks
   at 224 px, every 3x3 conv but the first searched with the options a screening of
   ``spatial-svd`` and ``tucker2`` at the default candidate ratios (1.5-6x) leaves, set beside what
   the screening spends timing the same options (each layer's options interleaved with it alone).

    .venv/bin/python bench/latency_model.py --out bench/latency_model.out.txt   # ~5 min on 2 cores
    .venv/bin/python bench/latency_model.py --cost resnet18 resnet50 --out bench/latency_cost.out.txt
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import lowrank  # noqa: E402
from jobs import deploy  # noqa: E402
from jobs.models import build_model  # noqa: E402
from jobs.search import calibrate  # noqa: E402
from jobs.search.screen import LayerTimer  # noqa: E402


def convs3x3(model: nn.Module) -> list[str]:
    """Every 3x3 conv but the first conv of the network: the layers every table here factorizes."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return [n for n in convs[1:] if model.get_submodule(n).kernel_size == (3, 3)]


def noise(size: int = 224, ratios=(1.5, 2, 3, 4, 6)) -> list[str]:
    torch.manual_seed(0)
    model = build_model("resnet18", 10).eval()
    names = convs3x3(model)[::3]
    shapes = lowrank.layer_input_shapes(model, names, (1, 3, size, size))
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        old, new = LayerTimer("onnxruntime", "cpu", tmp, warmup=1), LayerTimer("onnxruntime", "cpu", tmp)
        for n in names:
            dense, x = model.get_submodule(n), torch.randn(shapes[n])
            mods = [dense] + [lowrank.factorize_with_factors(dense, "spatial-svd", "ratio", ratio=r)[0] for r in ratios]

            def spread(a, b):
                return max(max(u / v, v / u) for u, v in zip(a, b))

            seq = [[old(m, x, 7) for m in mods] for _ in range(2)]
            inter = [new.many(mods, x) for _ in range(2)]
            speedups = [[[t[0] / u for u in t[1:]] for t in two] for two in (seq, inter)]
            lines.append(f"{n:>15} {spread(*seq):>10.2f}x {spread(*speedups[0]):>13.2f}x {spread(*inter):>10.2f}x "
                         f"{spread(*speedups[1]):>13.2f}x")
            print(lines[-1], flush=True)
    return lines


def one(size: int, method: str, ratio: float, repeats: int) -> str:
    torch.manual_seed(0)
    model = build_model("resnet18", 10).eval()
    names = convs3x3(model)
    shape = (3, size, size)
    shapes = lowrank.layer_input_shapes(model, names, (1, *shape))
    factors = {n: lowrank.factorize_with_factors(model.get_submodule(n), method, "ratio", ratio=ratio)[1]
               for n in names}
    compressed, _ = lowrank.apply_factors(model, factors, input_shape=shape)
    with tempfile.TemporaryDirectory() as tmp:
        timer = LayerTimer("onnxruntime", "cpu", tmp)
        warm = {n: timer.many([model.get_submodule(n), compressed.get_submodule(n)], torch.randn(shapes[n]))
                for n in names}
        cal = calibrate.measure(model, names, shape, runtime="onnxruntime", repeats=repeats,
                                options={n: [f] for n, f in factors.items()})
        stub = calibrate.stubbed(model, names, (1, *shape))
        variants = []  # the stubbed model with one layer real: dense, then factorized, per layer
        for n in names:
            for src in (model, compressed):
                v = copy.deepcopy(stub)
                lowrank.replace_submodule(v, n, copy.deepcopy(src.get_submodule(n)))
                variants.append(v)
        t = deploy.timed([stub, *variants], shape, runtime="onnxruntime", batch=1, threads=1, repeats=repeats,
                         workdir=tmp)
        in_graph = [(t[1 + 2 * i] - t[0], t[2 + 2 * i] - t[0]) for i in range(len(names))]
        whole, comp = deploy.timed([model, compressed], shape, runtime="onnxruntime", batch=1, threads=1,
                                   repeats=repeats, workdir=tmp)
    share, fixed = cal["whole"] - cal["fixed"], cal["fixed"]

    def predicted(dense: float, option: float) -> float:
        return cal["whole"] / (fixed + share * option / dense)

    p_warm = predicted(sum(d for d, _ in warm.values()), sum(o for _, o in warm.values()))
    p_cal = predicted(sum(cal["layers"].values()), sum(ts[0] for ts in cal["options"].values()))
    over = cal["overhead"]  # each layer's stub alone; the costs above are net of it (gross: added back,
    # exact except where a cost was floored at a tenth of its time)
    p_gross = predicted(sum(t + over[n] for n, t in cal["layers"].items()),
                        sum(ts[0] + over[n] for n, ts in cal["options"].items()))
    p_graph = predicted(sum(d for d, _ in in_graph), sum(o for _, o in in_graph))
    return (f"{size:>4} {method:>12} {ratio:>5} {whole * 1e3:>9.2f} {fixed / cal['whole']:>8.0%} "
            f"{p_warm:>9.2f}x {p_gross:>7.2f}x {p_cal:>5.2f}x {p_graph:>9.2f}x {whole / comp:>9.2f}x")


def cost(name: str, size: int, ratios=(1.5, 2, 3, 4, 6), methods=("spatial-svd", "tucker2")) -> str:
    torch.manual_seed(0)
    model = build_model(name, 1000).eval()
    names = convs3x3(model)
    shape = (3, size, size)
    shapes = lowrank.layer_input_shapes(model, names, (1, *shape))
    options = {n: [lowrank.factorize_with_factors(model.get_submodule(n), m, "ratio", ratio=r)[1]
                   for m in methods for r in ratios] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        timer, t0 = LayerTimer("onnxruntime", "cpu", tmp), time.perf_counter()
        for n in names:
            dense = model.get_submodule(n)
            timer.many([dense, *(lowrank.get_method(f.method).build(dense, f) for f in options[n])],
                       torch.randn(shapes[n]))
        screen_s, t0 = time.perf_counter() - t0, time.perf_counter()
    cal = calibrate.measure(model, names, shape, runtime="onnxruntime", options=options)  # the runner's repeats
    cal_s = time.perf_counter() - t0
    timed = len(names) * (1 + len(ratios) * len(methods))
    return (f"{name:>9} {size:>4} {len(names):>6} {timed:>7} {cal['whole'] * 1e3:>9.1f} {screen_s:>10.1f} "
            f"{cal_s:>9.1f} {cal_s / screen_s:>8.2f}")


def cpu() -> str:
    """The CPU's name and last-level cache, for the output's header (the timings depend on both)."""
    import platform
    import subprocess
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        return f"{fields.get('Model name', platform.processor()).strip()}, L3 {fields.get('L3 cache', '?').strip()}"
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    ap.add_argument("--methods", nargs="+", default=["spatial-svd", "tucker2"])
    ap.add_argument("--ratio", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--cost", nargs="*", default=[], metavar="MODEL", help="time the calibration task on these models")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.cost:
        lines = [f"# {cpu()}",
                 f"# bench/latency_model.py --cost, torch {torch.__version__}: seconds the calibration task takes "
                 "(ONNX Runtime, batch 1, one thread, the runner's repeats), against the screening's timing of the "
                 "same options",
                 "    model size layers modules  whole ms  screen s  calib s  calib/screen"]
        print("\n".join(lines), flush=True)
        for name in args.cost:
            lines.append(cost(name, 224))
            print(lines[-1], flush=True)
        if args.out:
            args.out.write_text("\n".join(lines) + "\n")
        return
    head = [f"# {cpu()}",
            f"# bench/latency_model.py, torch {torch.__version__}: screening noise, spatial SVD at 224 px; two screenings "
            "apart by (the largest ratio over a layer's options)",
            "          layer  sequential: time  speedup  interleaved: time  speedup"]
    print("\n".join(head), flush=True)
    head += noise()
    lines = [f"# bench/latency_model.py, torch {torch.__version__}, ResNet-18 3x3 convs but the first, ONNX Runtime, "
             "batch 1, one thread",
             "size       method ratio whole ms  outside  screened  calibration: gross  net  in graph  measured"]
    print("\n".join(lines), flush=True)
    for size in args.sizes:
        for method in args.methods:
            lines.append(one(size, method, args.ratio, args.repeats))
            print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(head + [""] + lines) + "\n")


if __name__ == "__main__":
    main()
