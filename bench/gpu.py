"""The GPU path, measured: CP-ALS + EPC over every ResNet-18 3x3 conv, and a latency table.

Part 1: every 3x3 conv of torchvision's ResNet-18 (its own He initialisation, seed 0: no trained
weights can be fetched on the benchmark machines), as the (T, S, 9) tensor of ``cp3`` and the
(T, S, 3, 3) tensor of ``cp4``, at the rank that makes the layer 2x smaller in parameters; float64.
Our CP-ALS on the device, the same fit on the host's CPU threads, and tensorly's ``parafac``
(pytorch backend, on the device) from the same SVD start for the same number of sweeps (no early
stop: equal sweeps from one start give equal error, reported beside). Then EPC on each ALS
result (100 sweeps by default): seconds, sweeps, cancellation ratio before and after.

Part 2: ResNet-18 at 224 px, dense against each method at 2x parameters per layer (first conv
and the classifier dense), eager PyTorch, float32 and float16, batch 1, 32 and 256, eager and replayed as a
CUDA graph (no per-kernel launch cost); dense and
compressed interleaved, median of 30 CUDA-event times.

    python bench/gpu.py [--device cuda] [--iters 50] [--quick]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import lowrank
from lowrank.decompositions.cp_als import cp_als, init_factors, reconstruct
from lowrank.decompositions.diagnostics import cp_diagnostics
from lowrank.decompositions.epc import epc


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def resnet18_convs():
    from jobs.tv import import_torchvision  # deferred: only this part needs torchvision

    torchvision = import_torchvision()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    return model, [(n, m.weight.detach()) for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]


def cp_rank(t: int, s: int, order: int, ratio: float = 2.0) -> int:
    return int(t * s * 9 // (ratio * (t + s + (9 if order == 3 else 6))))


def tensorly_fit(x, init, iters):
    import tensorly as tl
    from tensorly.cp_tensor import CPTensor
    from tensorly.decomposition import parafac

    tl.set_backend("pytorch")
    cp_init = CPTensor((torch.ones(init[0].shape[1], dtype=x.dtype, device=x.device), [f.clone() for f in init]))
    sync(x.device)
    t0 = time.perf_counter()
    w, fs = parafac(x, init[0].shape[1], n_iter_max=iters, init=cp_init, tol=0, normalize_factors=False,
                    linesearch=False)
    sync(x.device)
    secs = time.perf_counter() - t0
    fs = list(fs)
    fs[0] = fs[0] * w
    return secs, float((x - reconstruct(fs)).norm() / x.norm())


def timed_als(x, r, init, iters):
    sync(x.device)
    t0 = time.perf_counter()
    f, _ = cp_als(x, r, init=init, n_iter_max=iters, tol=-1.0)
    sync(x.device)
    return time.perf_counter() - t0, f, float((x - reconstruct(f)).norm() / x.norm())


def part_cp(device, iters: int, quick: bool, epc_sweeps: int) -> None:
    _, convs = resnet18_convs()
    seen = set()
    print(f"\n## CP-ALS + EPC, every ResNet-18 3x3 conv at 2x parameters, float64, {iters} sweeps\n")
    head = ("| layer | tensor | rank | ours GPU s | ours CPU s | GPU/CPU x | tensorly GPU s | x tensorly "
            "| err ours | err tensorly | EPC s | EPC sweeps | cancel before | cancel after | err change |")
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    totals = {"gpu": 0.0, "cpu": 0.0, "tl": 0.0, "epc": 0.0}
    for name, w in convs:
        t, s = w.shape[:2]
        if quick and (t, s) in seen:
            continue
        seen.add((t, s))
        for order in (3, 4):
            x_cpu = w.to(torch.float64).reshape(t, s, 9) if order == 3 else w.to(torch.float64)
            x = x_cpu.to(device)
            r = cp_rank(t, s, order)
            init = [f.to(device) for f in init_factors(x_cpu, r, "svd", seed=0)]
            timed_als(x, r, init, 2)  # warm-up (kernels, cuBLAS handles)
            g_s, f, err = timed_als(x, r, init, iters)
            c_s, _, _ = timed_als(x_cpu, r, [i.cpu() for i in init], iters) if not quick or t <= 128 else (math.nan, 0, 0)
            try:
                tl_s, tl_err = tensorly_fit(x, init, iters)
            except (torch.OutOfMemoryError, RuntimeError) as e:  # tensorly forms the full Khatri-Rao product
                tl_s, tl_err = math.nan, math.nan
                print(f"<!-- tensorly {name} order {order}: {type(e).__name__} -->")
            d0 = cp_diagnostics(f, x)
            sync(device)
            t0 = time.perf_counter()
            h, info = epc(x, f, max_sweeps=epc_sweeps, tol=1e-7)
            sync(device)
            e_s = time.perf_counter() - t0
            d1 = cp_diagnostics(h, x)
            for k, v in (("gpu", g_s), ("cpu", c_s), ("tl", tl_s), ("epc", e_s)):
                totals[k] += 0.0 if math.isnan(v) else v
            print(f"| {name} | {'x'.join(map(str, x.shape))} | {r} | {g_s:.2f} | {c_s:.2f} | {c_s / g_s:.1f} | "
                  f"{tl_s:.2f} | {tl_s / g_s:.1f} | {err:.4f} | {tl_err:.4f} | {e_s:.2f} | {info['sweeps']} | "
                  f"{d0['cancellation_ratio']:.2f} | {d1['cancellation_ratio']:.2f} | "
                  f"{d1['rel_error'] - d0['rel_error']:+.1e} |", flush=True)
    print(f"\nTotals: ours GPU {totals['gpu']:.1f} s, ours CPU {totals['cpu']:.1f} s, tensorly GPU {totals['tl']:.1f} s, "
          f"EPC GPU {totals['epc']:.1f} s")


def event_ms(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def runner(model, x, mode: str):
    """A no-argument callable running ``model(x)``: eager, or replaying a captured CUDA graph
    (what removes the per-kernel launch cost that a factorized model has more of)."""
    if mode == "eager":
        return lambda: model(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(x)
    return graph.replay


def part_latency(device, reps: int, batches: list[int]) -> None:
    model, _ = resnet18_convs()
    model.eval()
    shape = (3, 224, 224)
    models = {"dense": model}
    for method in ("spatial-svd", "tucker2", "cp3", "cp4"):
        opts = {"device": device.type} if lowrank.get_method(method).gpu else {}
        if method.startswith("cp"):
            opts["n_iter_max"] = 25  # latency does not depend on the fit
        plan = lowrank.plan_layers(model, method, "ratio", options={"ratio": 2.0, **opts})
        t0 = time.perf_counter()
        models[method], reps_ = lowrank.compress_model(model, plan, input_shape=shape, on_error="record")
        ok = sum(r.status == "ok" for r in reps_)
        print(f"<!-- {method}: {ok}/{len(reps_)} layers in {time.perf_counter() - t0:.1f} s -->")
    counts = {k: lowrank.count(m, shape) for k, m in models.items()}
    print(f"\n## Latency, ResNet-18 at 224 px, PyTorch on {torch.cuda.get_device_name(device)}\n")
    print("| model | params | MACs x | run | dtype | batch | dense ms | model ms | speedup | speedup / MAC reduction |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode in ("eager", "cuda-graph"):
        for dtype in (torch.float32, torch.float16):
            for batch in batches:
                x = torch.randn(batch, *shape, device=device, dtype=dtype)
                ms = {k: [] for k in models}
                with torch.inference_mode():
                    runs = {k: runner(m.to(device=device, dtype=dtype), x, mode) for k, m in models.items()}
                    for run in runs.values():
                        for _ in range(5):
                            run()
                    for _ in range(reps):  # interleaved: every model once per round
                        for k, run in runs.items():
                            ms[k].append(event_ms(run))
                med = {k: statistics.median(v) for k, v in ms.items()}
                for k in models:
                    if k == "dense":
                        continue
                    mac_x = counts["dense"][1] / counts[k][1]
                    sp = med["dense"] / med[k]
                    print(f"| {k} | {counts[k][0] / 1e6:.2f} M | {mac_x:.2f} | {mode} | {str(dtype)[6:]} | {batch} | "
                          f"{med['dense']:.3f} | {med[k]:.3f} | {sp:.2f} | {sp / mac_x:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--epc-sweeps", type=int, default=100)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--quick", action="store_true", help="one layer per shape, CPU twin only up to 128 channels")
    ap.add_argument("--skip", choices=("cp", "latency"), action="append", default=[])
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA device here; run it where one is (or --device cpu for the twin)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads")
    if "cp" not in args.skip:
        part_cp(device, args.iters, args.quick, args.epc_sweeps)
    if "latency" not in args.skip and device.type == "cuda":
        part_latency(device, args.reps, args.batches)


if __name__ == "__main__":
    main()
