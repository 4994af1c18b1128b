"""CPD-EPC against CP-ALS layer by layer, on trained kernels (Phan et al., ECCV 2020).

At the same rank (2x and 3x fewer parameters per layer), each conv that CP applies to is fitted by
plain ALS (``cp3``) and by ALS followed by Error Preserving Correction (``cp3-epc``), with the
library's defaults (ALS up to 500 sweeps; EPC at ALS's error, up to ``--epc-sweeps``). Per layer:
the kernel error (equal by construction), the degeneracy diagnostics of each fit (flagged,
cancellation = sqrt(sum of squared term norms) / the model's norm, sensitivity), and the quality of
the network with only that layer compressed; then the quality with all of them compressed, before
and after BatchNorm recalibration.

Networks: EfficientNet-Lite0 with its real ImageNet weights (its stem is the one conv CP applies to:
the others are depthwise or 1x1), quality = top-1 agreement and KL(dense || compressed) on
scikit-image's photographs (no labels needed); the small CNN and ResNet-18 trained here on
Fashion-MNIST (every conv but the first; ResNet-18's 64- and 128-channel stages, as the default sweep), quality =
top-1 on held-out images. With ``--ft-lrs``, the Fashion-MNIST networks with all those layers
compressed are then fine-tuned ``--ft-epochs`` epochs at each rate (SGD with momentum, cosine
schedule, the training augmentation), top-1 after every epoch (bn = after BatchNorm recalibration,
before any step).

    .venv/bin/python bench/epc_layers.py --models efficientnet smallcnn --out bench/epc_layers.out.txt   # ~15 min
    .venv/bin/python bench/epc_layers.py --models resnet18 --out bench/epc_layers_resnet18.out.txt
    .venv/bin/python bench/epc_layers.py --models resnet18 --ratios 2 --ft-lrs 0.001 0.01 0.05 \
        --out bench/epc_layers_resnet18_ft.out.txt
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lowrank  # noqa: E402
from bench.efficientnet_agreement import agreement, views  # noqa: E402
from bench.epc_shrinkage import pretrained  # noqa: E402
from examples.pretrained import efficientnet_lite0, write_photos  # noqa: E402
from jobs.data import load_dataset  # noqa: E402
from jobs.preprocess import Augmented, resolve  # noqa: E402
from jobs.spec import DatasetSpec  # noqa: E402
from jobs.train import evaluate, loader, recalibrate_bn, train_epochs  # noqa: E402

METHODS = ("cp3", "cp3-epc")
# ResNet-18: its 64- and 128-channel stages, as the embedded default sweep (EPC at 1,000 sweeps on a 512-channel
# layer, rank 1141, takes about as long as the whole small CNN)
LAYERS = {"resnet18": ["layer1.*", "layer2.*"]}


def fits(model, ratio: float, epc_sweeps: int, skip_first: bool, include=None) -> dict[str, dict]:
    """layer -> method -> factors, at the rank that makes the layer ``ratio`` x smaller."""
    modules = dict(model.named_modules())
    out = {}
    for name in lowrank.select_layers(model, "cp3", skip_first=skip_first, include=include):
        if modules[name].groups != 1:  # depthwise: one input channel per group, nothing for CP to share
            continue
        rank = lowrank.RankRule.of("ratio", ratio=ratio).resolve(modules[name], "cp3", groups=1)
        w = modules[name].weight
        out[name] = {"cp3": lowrank.decompose(w, "cp3", rank),
                     "cp3-epc": lowrank.decompose(w, "cp3-epc", rank, epc_max_sweeps=epc_sweeps)}
    return out


def diag(f) -> dict:
    """ALS's diagnostics for ``cp3``, the corrected model's for ``cp3-epc``."""
    return f.diagnostics["epc"] if "epc" in f.diagnostics else f.diagnostics["als"]


def rows(label: str, model, ratio: float, fitted: dict, quality, shape, recal) -> list[str]:
    out = []
    for name, by in fitted.items():
        w = model.get_submodule(name).weight
        cells = []
        for method in METHODS:
            d = diag(by[method])
            one, _ = lowrank.apply_factors(model, {name: by[method]}, input_shape=shape)
            cells.append(f"{d['rel_error']:>6.3f} {'yes' if d['degenerate'] else 'no':>5} {d['cancellation_ratio']:>6.2f} "
                         f"{d['sensitivity']:>8.1f} {quality(one)}")
        conv = by["cp3-epc"].diagnostics
        out.append(f"{label:<10} {ratio:>4g} {name:<22} {'x'.join(map(str, w.shape)):<12} {by['cp3'].rank:>5} | "
                   + " | ".join(cells) + f" | {conv['epc_sweeps']:>5}{'' if conv['epc_converged'] else '+'}")
    cells = []
    for method in METHODS:
        new, _ = lowrank.apply_factors(model, {n: by[method] for n, by in fitted.items()}, input_shape=shape)
        post = quality(new)
        cells.append(f"{method}: {post}" + (f", after BN recalibration {quality(recal(new))}" if recal else ""))
    out.append(f"{label:<10} {ratio:>4g} all {len(fitted)} layers: " + "; ".join(cells))
    return out


def curves(label: str, model, ratio: float, fitted: dict, shape, plain, prep, vdl, lrs, epochs: int) -> list[str]:
    """Fine-tuning curves of the model with every fitted layer compressed, per rate and method."""
    out = []
    for lr in lrs:
        for method in METHODS:
            new, _ = lowrank.apply_factors(model, {n: by[method] for n, by in fitted.items()}, input_shape=shape)
            recalibrate_bn(new, plain, 20)
            curve = [evaluate(new, vdl)["top1"]]
            torch.manual_seed(0)
            train_epochs(new, Augmented(plain, prep.augment, 0), epochs=epochs, lr=lr,
                         on_epoch=lambda e, loss, new=new: curve.append(evaluate(new, vdl)["top1"]))
            drop = max(0.0, *(a - b for a, b in zip(curve, curve[1:])))
            out.append(f"{label:<10} {ratio:>4g} fine-tuned at lr {lr:<6g} {method:<8} bn {curve[0]:.3f} -> "
                       + " ".join(f"{v:.3f}" for v in curve[1:]) + f"  (worst fall {drop:.3f})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["efficientnet", "smallcnn", "resnet18"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[2.0, 3.0])
    ap.add_argument("--limit-train", type=int, default=12000)
    ap.add_argument("--epochs", type=int, default=15, help="pre-training epochs on Fashion-MNIST")
    ap.add_argument("--epc-sweeps", type=int, default=1000)
    ap.add_argument("--ft-lrs", nargs="*", type=float, default=[], help="fine-tuning rates (Fashion-MNIST networks)")
    ap.add_argument("--ft-epochs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "epc_layers.out.txt"))
    args = ap.parse_args()
    torch.manual_seed(0)
    lines = [f"# {' '.join(['bench/epc_layers.py', *sys.argv[1:]])}",
             f"# torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; cp3 (ALS) against cp3-epc (ALS + EPC, "
             f"up to {args.epc_sweeps} sweeps) at the same rank; per method: err = relative kernel error, degen = "
             f"flagged degenerate, cancel = sqrt(sum of squared term norms) / model norm, sens = sensitivity, and the "
             f"quality with only that layer compressed; epc = EPC sweeps (+: stopped at the cap)",
             f"{'net':<10} {'x':>4} {'layer':<22} {'kernel':<12} {'rank':>5} | "
             f"{'err':>6} {'degen':>5} {'cancel':>6} {'sens':>8} {'ALS alone':<14} | "
             f"{'err':>6} {'degen':>5} {'cancel':>6} {'sens':>8} {'EPC alone':<14} | {'epc':>5}"]
    print("\n".join(lines), flush=True)
    for name in args.models:
        t0 = time.perf_counter()
        if name == "efficientnet":
            dense = efficientnet_lite0().eval()
            with tempfile.TemporaryDirectory() as tmp:
                write_photos(Path(tmp))
                images = views(Path(tmp))

            def quality(m, dense=dense, images=images):
                a = agreement(dense, m.eval(), images)
                return f"{a['top1']:.3f} KL {a['kl']:.3f}"
            model, shape, recal, skip = dense, (3, 224, 224), None, False
            lines.append(f"# EfficientNet-Lite0, ImageNet weights; quality = top-1 agreement and KL with the dense model "
                         f"on {len(images)} views of 13 photographs (only its stem is a full conv)")
        else:
            spec = DatasetSpec(kind="fashion-mnist", input_size=32, limit_train=args.limit_train, limit_val=2000)
            prep = resolve(spec, None)
            train, val, _ = load_dataset(spec, 0, prep)
            plain, vdl = loader(train, 64, shuffle=True, seed=0), loader(val, 500, shuffle=False)
            model = pretrained(name, spec, plain, prep, args.epochs).eval()

            def quality(m, vdl=vdl):
                return f"{evaluate(m, vdl)['top1']:.3f}"

            def recal(m, plain=plain):
                recalibrate_bn(m, plain, 20)
                return m
            shape, skip = (3, 32, 32), True
            lines.append(f"# {name} on Fashion-MNIST ({len(train)} training images, {args.epochs} epochs here); quality = "
                         f"top-1 on {len(val)} held-out images; dense {quality(model)}")
        print(lines[-1], flush=True)
        for ratio in args.ratios:
            fitted = fits(model, ratio, args.epc_sweeps, skip, LAYERS.get(name))
            new = rows(name, model, ratio, fitted, quality, shape, recal)
            if args.ft_lrs and name != "efficientnet":
                new += curves(name, model, ratio, fitted, shape, plain, prep, vdl, args.ft_lrs, args.ft_epochs)
            lines += new
            print("\n".join(new), flush=True)
        lines.append(f"# {name}: {time.perf_counter() - t0:.0f} s")
        Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
