"""Why ``cp3-epc`` loses top-1 before BatchNorm recalibration in the embedded default sweep.

The default sweep's set-up (digits at 32 px, the model pre-trained 4 epochs, every selected layer
at 2x parameters, ALS 100 sweeps): plain ``cp3`` against ``cp3-epc`` with the corrected model kept
as EPC returns it (the default) and rescaled by its least-squares scalar (``epc_rescale: true``),
at several EPC sweep caps and both objectives, extrapolated (the default) and, at the first cap, plain
(``epc_extrapolate: false``, column ``ext``). Per configuration: the mean scalar
``<X, M> / ||M||^2`` over the layers (1 = no shrinkage), the model's norm against the kernel's,
the mean relative error, the layers flagged degenerate, whether EPC converged; what the
BatchNorm after each layer sees with only that layer compressed (``shift``: the mean over channels
of |mean' - mean| / std of the layer's output on validation images, dense statistics as the unit;
``std``: the mean over channels of std' / std;
``alone``: the mean top-1 over the layers, each compressed alone); and top-1 with all layers
compressed before (``post``) and after BatchNorm recalibration (``bn``).

    .venv/bin/python bench/epc_shrinkage.py                      # smallcnn and resnet18, ~15 min on 2 cores
    .venv/bin/python bench/epc_shrinkage.py --dataset fashion-mnist --limit-train 12000
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lowrank  # noqa: E402
from jobs.data import load_dataset  # noqa: E402
from jobs.models import build_model  # noqa: E402
from jobs.preprocess import Augmented, resolve  # noqa: E402
from jobs.spec import DatasetSpec  # noqa: E402
from jobs.train import evaluate, loader, recalibrate_bn, train_epochs  # noqa: E402

LAYERS = {"resnet18": ["layer1.*", "layer2.*"]}  # as the default sweep


def pretrained(name: str, spec: DatasetSpec, plain, prep, epochs: int):
    cache = ROOT / ".cache" / "bench" / f"epc-{spec.kind}-{name}-e{epochs}-n{spec.limit_train}.pt"
    model = build_model(name, 10)
    if cache.is_file():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model
    torch.manual_seed(0)
    train_epochs(model, Augmented(plain, prep.augment, 0), epochs=epochs, lr=0.05)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model


def shrinkage(weight: torch.Tensor, factors) -> tuple[float, float, float]:
    """(scalar <X, M>/||M||^2, ||M||/||X||, relative error)."""
    x, m = weight.detach().double(), factors.to_weight().double().reshape(weight.shape)
    return float((x * m).sum() / (m * m).sum()), float(m.norm() / x.norm()), float((x - m).norm() / x.norm())


@torch.no_grad()
def alone(model, name: str, factors, x: torch.Tensor, vdl) -> tuple[float, float, float]:
    """(BN-input mean shift in dense std units, std ratio, top-1) with only layer ``name`` compressed."""
    new, _ = lowrank.apply_factors(model, {name: factors}, input_shape=tuple(x.shape[1:]))
    outs = []
    for m, n in ((model, name), (new, name)):
        h = m.get_submodule(n).register_forward_hook(lambda mod, i, o: outs.append(o))
        m.eval()(x)
        h.remove()
    mu, sd = outs[0].mean((0, 2, 3)), outs[0].std((0, 2, 3)).clamp_min(1e-8)
    return (float(((outs[1].mean((0, 2, 3)) - mu).abs() / sd).mean()), float((outs[1].std((0, 2, 3)) / sd).mean()),
            evaluate(new, vdl)["top1"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smallcnn", "resnet18"])
    ap.add_argument("--dataset", default="digits", choices=["digits", "fashion-mnist"])
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=4, help="pre-training epochs")
    ap.add_argument("--sweeps", nargs="+", type=int, default=[150, 1000])
    ap.add_argument("--out", default=str(ROOT / "bench" / "epc_shrinkage.out.txt"))
    args = ap.parse_args()
    spec = DatasetSpec(kind=args.dataset, input_size=32, val_fraction=0.2, batch_size=64, limit_train=args.limit_train)
    prep = resolve(spec, None)
    train, val, _ = load_dataset(spec, 0, prep)
    plain, vdl = loader(train, 64, shuffle=True, seed=0), loader(val, 512, shuffle=False)
    probe = next(iter(vdl))[0]
    lines = [f"# {' '.join(['bench/epc_shrinkage.py', *sys.argv[1:]])}",
             f"# torch {torch.__version__}, CPU; {args.dataset} {len(train)} training / {len(val)} validation images, "
             f"{args.epochs} pre-training epochs, every selected layer at 2x parameters, ALS 100 sweeps",
             f"{'model':<9} {'method':<8} {'sweeps':>6} {'ext':<3} {'obj':<4} {'rescale':<7} {'scale':>6} {'|M|/|X|':>7} "
             f"{'err':>6} {'degen':>5} {'conv':>4} {'shift':>6} {'std':>6} {'alone':>6} {'post':>6} {'bn':>6} {'s':>5}"]
    print("\n".join(lines), flush=True)
    configs = [("cp3", {}, "")]
    for s in args.sweeps:
        configs += [("cp3-epc", {"epc_max_sweeps": s}, "no"),
                    ("cp3-epc", {"epc_max_sweeps": s, "epc_rescale": True}, "yes")]
        if s == args.sweeps[0]:
            configs += [("cp3-epc", {"epc_max_sweeps": s, "epc_extrapolate": False}, "no")]
    configs += [("cp3-epc", {"epc_max_sweeps": args.sweeps[0], "epc_objective": "sens"}, "no"),
                ("cp3-epc", {"epc_max_sweeps": args.sweeps[0], "epc_objective": "sens", "epc_rescale": True}, "yes")]
    for name in args.models:
        model = pretrained(name, spec, plain, prep, args.epochs)
        lines.append(f"# {name}: dense top-1 {evaluate(model, vdl)['top1']:.3f}")
        print(lines[-1], flush=True)
        plan = lowrank.plan_layers(model, "cp3", "ratio", include=LAYERS.get(name), options={"ratio": 2})
        modules = dict(model.named_modules())
        rules = {n: lowrank.RankRule.of("ratio", ratio=2).resolve(modules[n], "cp3", groups=1) for n in plan}
        for method, opts, rescale in configs:
            t0 = time.perf_counter()
            fac = {n: lowrank.decompose(modules[n].weight, method, r, n_iter_max=100, **opts) for n, r in rules.items()}
            sh = [shrinkage(modules[n].weight, f) for n, f in fac.items()]
            degen = sum(bool(f.diagnostics["degenerate"]) for f in fac.values())
            conv = "" if method == "cp3" else str(sum(bool(f.diagnostics["epc_converged"]) for f in fac.values()))
            per = [alone(model, n, f, probe, vdl) for n, f in fac.items()]
            new, _ = lowrank.apply_factors(model, fac, input_shape=(3, 32, 32))
            post = evaluate(new, vdl)["top1"]
            recalibrate_bn(new, plain, 20)
            bn = evaluate(new, vdl)["top1"]
            mean = [sum(v[i] for v in sh) / len(sh) for i in range(3)]
            ext = "" if method == "cp3" else "no" if opts.get("epc_extrapolate") is False else "yes"
            lines.append(f"{name:<9} {method:<8} {opts.get('epc_max_sweeps', ''):>6} {ext:<3} "
                         f"{opts.get('epc_objective', 'norm' if method != 'cp3' else ''):<4} {rescale:<7} "
                         f"{mean[0]:>6.3f} {mean[1]:>7.3f} {mean[2]:>6.3f} {degen:>2}/{len(fac):<2} {conv:>4} "
                         + " ".join(f"{sum(p[i] for p in per) / len(per):>6.3f}" for i in range(3)) + " "
                         f"{post:>6.3f} {bn:>6.3f} {time.perf_counter() - t0:>5.0f}")
            print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
