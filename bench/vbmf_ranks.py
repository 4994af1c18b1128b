"""Why plain VBMF picks rank 1, and what to do about it, on real weights.

1. Per network, every matrix VBMF sees (each KxK conv's two Tucker-2 mode unfoldings, each 1x1 conv
   and Linear as it is): the EVBMF rank as a share of the full rank, how many matrices get rank 0
   (no singular value above the noise estimate; ``select_rank`` then returns ``min_rank`` = 1),
   the share of the squared norm VBMF puts down to noise (``sigma^2 L M / ||W||^2``), and how many
   singular values stand above the Marchenko-Pastur edge of that noise. Networks: EfficientNet-Lite0
   with its ImageNet weights, the small CNN trained on Fashion-MNIST (``bench/seeds.py``'s runner
   cache when present, else trained here), the small CNN and ResNet-18 trained 4 epochs on digits
   (the embedded default), and the small CNN at its random initialisation (the null: pure noise).
2. The remedies on EfficientNet-Lite0 (the stem by Tucker-2, every 1x1 conv and the classifier by
   SVD, ranks by VBMF): plain (rank 0 -> 1), rank-0 layers left dense (``rank.zero: dense``), and
   MUSCO's weakening; top-1 agreement and KL(dense || compressed) on scikit-image's photographs, no
   fine-tuning.

    .venv/bin/python bench/vbmf_ranks.py            # ~3 min on 2 cores (trains the digits networks)
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import lowrank  # noqa: E402
from efficientnet_agreement import agreement, digits_trained, views  # noqa: E402
from examples.pretrained import efficientnet_lite0, write_photos  # noqa: E402
from jobs.models import build_model  # noqa: E402
from lowrank.vbmf import evbmf  # noqa: E402


def matrices(model) -> list[tuple[str, torch.Tensor]]:
    """What VBMF is applied to: a KxK conv's mode-1 and mode-2 unfoldings (Kim et al.), a 1x1 conv
    or Linear as a matrix. Depthwise convs are not factorized and not listed."""
    out = []
    for name, _ in lowrank.select_layers(model, "tucker2", skip_first=False, pointwise_method="svd").items():
        mod = model.get_submodule(name)
        if getattr(mod, "groups", 1) > 1:
            continue
        w = mod.weight.detach().double()
        if w.dim() == 4 and w.shape[2] * w.shape[3] > 1:
            out += [(f"{name}[out]", w.flatten(1)), (f"{name}[in]", w.transpose(0, 1).flatten(1))]
        else:
            out.append((name, w.flatten(1)))
    return out


def spectrum_row(m: torch.Tensor) -> dict:
    rank, s2 = evbmf(m)
    small, big = sorted(m.shape)
    sv = torch.linalg.svdvals(m)
    edge = math.sqrt(s2) * (math.sqrt(small) + math.sqrt(big))  # largest singular value of pure noise
    return {"share": rank / small, "zero": rank == 0, "noise": s2 * small * big / float((m * m).sum()),
            "above": int((sv > edge).sum()), "rank": rank}


def fashion_smallcnn():
    cached = sorted((ROOT / ".cache" / "seeds" / "pretrained").glob("smallcnn-*.pt"))
    model = build_model("smallcnn", 10)
    if cached:
        model.load_state_dict(torch.load(cached[-1], weights_only=True))
        return model.eval(), f"runner cache {cached[-1].name}"
    from jobs.data import load_dataset
    from jobs.preprocess import Augmented, resolve
    from jobs.spec import DatasetSpec
    from jobs.train import loader, train_epochs

    spec = DatasetSpec(kind="fashion-mnist", input_size=32, batch_size=128, limit_train=12000)
    prep = resolve(spec, None)
    train, _, _ = load_dataset(spec, 0, prep)
    torch.manual_seed(0)
    train_epochs(model, Augmented(loader(train, 128, shuffle=True), prep.augment, 0), epochs=15, lr=0.05)
    return model.eval(), "trained here, 12,000 images, 15 epochs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "vbmf_ranks.out.txt"))
    args = ap.parse_args()
    effnet = efficientnet_lite0().eval()
    fashion, fashion_src = fashion_smallcnn()
    torch.manual_seed(0)
    nets = [("EfficientNet-Lite0 (ImageNet weights)", effnet),
            ("smallcnn (Fashion-MNIST, 15 epochs)", fashion),
            ("smallcnn (digits, 4 epochs)", digits_trained("smallcnn")),
            ("resnet18 (digits, 4 epochs)", digits_trained("resnet18")),
            ("smallcnn (random init: noise)", build_model("smallcnn", 10).eval())]
    lines = [f"# {' '.join(['bench/vbmf_ranks.py', *sys.argv[1:]])}",
             f"# torch {torch.__version__}; Fashion-MNIST small CNN: {fashion_src}",
             "# 1. what EVBMF sees: share = rank / full rank (median), rank 0 = matrices with no singular value above",
             "#    the noise estimate, noise = share of the squared norm put down to noise (median), above edge =",
             "#    singular values above the noise's Marchenko-Pastur edge (median), per matrix",
             f"{'network':<38} {'matrices':>8} {'share':>6} {'rank 0':>7} {'noise':>6} {'above edge':>10}"]
    for label, model in nets:
        rows = [spectrum_row(m) for _, m in matrices(model)]
        lines.append(f"{label:<38} {len(rows):>8} {statistics.median(r['share'] for r in rows):>6.3f} "
                     f"{sum(r['zero'] for r in rows):>3}/{len(rows):<3} {statistics.median(r['noise'] for r in rows):>6.2f} "
                     f"{statistics.median(r['above'] for r in rows):>10g}")
        print(lines[-1], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        write_photos(Path(tmp))
        images = views(Path(tmp))
    shape = (3, 224, 224)
    p0, _ = lowrank.count(effnet, shape)
    lines += ["# 2. remedies on EfficientNet-Lite0 (stem by Tucker-2, 1x1 convs and classifier by SVD, VBMF ranks, no "
              "fine-tuning),", f"#    top-1 agreement and KL with the dense model on {len(images)} views of 13 photographs",
              "#    (the 16 depthwise convs stay dense; left dense besides: 'rank 0' = no structure found (zero: dense),",
              "#    'larger' = the rank would not shrink the layer)",
              f"{'rule':<34} {'factorized':>10} {'rank 0':>6} {'larger':>6} {'params x':>8} {'agree':>6} {'KL':>7}"]
    rules = [("plain VBMF (rank 0 -> 1)", {}), ("plain, rank 0 left dense", {"zero": "dense"}),
             ("weakened k=0.6", {"weakening": 0.6}), ("weakened k=0.6, rank 0 dense", {"weakening": 0.6, "zero": "dense"}),
             ("weakened k=0.3, rank 0 dense", {"weakening": 0.3, "zero": "dense"})]
    for label, settings in rules:
        plan = {name: lp for name, lp in lowrank.plan_layers(effnet, "tucker2", lowrank.RankRule("vbmf", **settings),
                                                              skip_first=False, pointwise_method="svd").items()
                if getattr(effnet.get_submodule(name), "groups", 1) == 1}  # the depthwise convs stay as they are
        small, reports = lowrank.compress_model(copy.deepcopy(effnet), plan, input_shape=shape, on_error="record")
        p, _ = lowrank.count(small, shape)
        a = agreement(effnet, small.eval(), images)
        ok = sum(r.status == "ok" for r in reports)
        zero = sum("no component above" in (r.reason or "") for r in reports)
        lines.append(f"{label:<34} {ok:>10} {zero:>6} {len(reports) - ok - zero:>6} {p0 / p:>8.2f} {a['top1']:>6.3f} "
                     f"{a['kl']:>7.3f}")
        print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
