"""Methods on data harder than digits: Fashion-MNIST (``apt-get install dataset-fashion-mnist``),
28 px upscaled to 32, each model pre-trained here (augmented, cosine schedule) and cached.

For each model and seed: every method at 2x and 3x parameters per layer (the first conv and the
classifier left dense, ResNet-18's 1x1 shortcuts by SVD), top-1 before fine-tuning (``post``), after
BatchNorm recalibration (``bn``), after 1 and after 3 fine-tuning epochs; and Tucker-2 at plain VBMF
ranks over the whole model (``tucker2 all``: every conv and linear, the first conv and the classifier
included) and as Kim et al. apply it (``tucker2 kim``: every kxk conv but the first, rank 0 left dense),
at plain VBMF ranks and, with ``--weakenings``, weakened as in MUSCO (``vbmf k0.6``).

    .venv/bin/python bench/fashion_mnist.py                       # the full table (GPU: minutes)
    .venv/bin/python bench/fashion_mnist.py --models smallcnn --limit-train 12000 --epochs 6   # 2-core CPU
"""
from __future__ import annotations

import argparse
import copy
import hashlib
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

METHODS = ("spatial-svd", "tucker2", "cp3", "cp3-epc")
OPTIONS = {"cp3": {"n_iter_max": 300}, "cp3-epc": {"n_iter_max": 300, "epc_max_sweeps": 200}}


def pretrained(name: str, data, args, seed: int, device: str):
    cache = ROOT / ".cache" / "bench" / f"fashion-{name}-s{seed}-e{args.epochs}-n{args.limit_train}.pt"
    model = build_model(name, 10)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cache.is_file():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model, 0.0
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    train_epochs(model, data["aug"], epochs=args.epochs, lr=args.lr, device=device)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model, time.perf_counter() - t0


def fingerprint(model) -> str:
    """The first 12 hex digits of a SHA-256 over the weights: a later run can check it trained the same net."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def finetune_curve(model, data, args, device: str) -> dict:
    """post, bn, and top-1 after each fine-tuning epoch (one cosine schedule over them all)."""
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    out = {"post": evaluate(model, data["val"], device)["top1"]}
    recalibrate_bn(model, data["plain"], 20, device)
    out["bn"] = evaluate(model, data["val"], device)["top1"]
    curve = []
    train_epochs(model, data["aug"], epochs=max(args.ft_epochs), lr=args.ft_lr, device=device,
                 on_epoch=lambda e, loss: curve.append(evaluate(model, data["val"], device)["top1"]))
    out.update({f"ft{e}": curve[e - 1] for e in args.ft_epochs})
    return out


SCOPES = {  # which layers a row compresses: (skip the first conv, how 1x1 convs and linears go, left out)
    "": (True, "svd", ["fc"]),   # every conv but the first (1x1 convs by SVD); the 10-class classifier dense
    "all": (False, "svd", []),   # every conv and linear, the first conv and the classifier included
    "kim": (True, None, []),     # Kim et al.: every kxk conv but the first, nothing else
}


def plan_for(model, method: str, rank, options: dict, scope: str) -> dict:
    skip_first, pointwise, exclude = SCOPES[scope]
    return lowrank.plan_layers(model, method, rank, skip_first=skip_first, pointwise_method=pointwise,
                               exclude=exclude or None, options=options)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smallcnn", "resnet18"])
    ap.add_argument("--methods", nargs="*", default=list(METHODS), help="ratio rows; none for only --scopes")
    ap.add_argument("--scopes", nargs="*", default=["all", "kim"], choices=["all", "kim"],
                    help="the Tucker-2 VBMF rows (none for only the ratio rows)")
    ap.add_argument("--weakenings", nargs="+", type=float, default=[1.0],
                    help="VBMF weakening k of the --scopes rows (MUSCO: R = Rmax - k (Rmax - Rvbmf); 1 = plain)")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                    help="train and fine-tune in channels-last memory format (faster on CPU, same math)")
    ap.add_argument("--ratios", nargs="+", type=float, default=[2.0, 3.0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--epochs", type=int, default=12, help="pre-training epochs")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--ft-epochs", nargs="+", type=int, default=[1, 3])
    ap.add_argument("--ft-lr", type=float, default=0.005)
    ap.add_argument("--limit-train", type=int, default=None, help="training images (default: all 60,000)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(ROOT / "bench" / "fashion_mnist.out.txt"))
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in --out and run only the missing ones (same settings assumed)")
    args = ap.parse_args()
    spec = DatasetSpec(kind="fashion-mnist", input_size=32, batch_size=128, limit_train=args.limit_train)
    lines = [f"# {' '.join(['bench/fashion_mnist.py', *sys.argv[1:]])}",
             f"# device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}), "
             f"torch {torch.__version__}, {spec.limit_train or 60000} training / 10000 test images",
             f"{'model':<9} {'seed':>4} {'method':<13} {'rank':<9} {'params x':>8} {'MACs x':>7} {'pre':>6} {'post':>6} "
             f"{'bn':>6} " + " ".join(f"{'ft' + str(e):>6}" for e in args.ft_epochs) + f" {'s':>6}"]
    out = Path(args.out)
    if args.resume and out.is_file():
        lines = [line for line in out.read_text().splitlines() if line.strip()]
        lines.append(f"# resumed: {' '.join(['bench/fashion_mnist.py', *sys.argv[1:]])}")
    print("\n".join(lines), flush=True)
    for seed in args.seeds:
        prep = resolve(spec, None)
        train, val, _ = load_dataset(spec, seed, prep)
        data = {"plain": loader(train, spec.batch_size, shuffle=True, seed=seed),
                "val": loader(val, 512, shuffle=False)}
        data["aug"] = Augmented(data["plain"], prep.augment, seed)
        for name in args.models:
            dense, train_s = pretrained(name, data, args, seed, args.device)
            pre = evaluate(dense, data["val"], args.device)["top1"]
            shape = (3, 32, 32)
            p0, m0 = lowrank.count(dense.cpu(), shape)
            header = f"# {name} seed {seed}: dense top-1"
            kept = [line for line in lines if line.startswith(header)]
            if kept and f"weights {fingerprint(dense)}" not in kept[-1]:
                sys.exit(f"{out}: its {name} seed {seed} rows were measured on other weights ({kept[-1]}), "
                         f"these are {fingerprint(dense)}; use another --out")
            if not kept:
                lines.append(f"{header} {pre:.4f}, {p0 / 1e6:.2f}M params, {m0 / 1e6:.1f}M MACs "
                             f"(pre-trained {args.epochs} epochs, {train_s:.0f}s{'' if train_s else ': cached'}; "
                             f"weights {fingerprint(dense)})")
                print(lines[-1], flush=True)
            runs = [(m, "ratio", {"ratio": r, **OPTIONS.get(m, {})}, f"{r:g}x", "")
                    for m in args.methods for r in args.ratios]
            vbmf = {"all": {}, "kim": {"zero": "dense"}}  # kim: rank 0 (no structure) left dense
            runs += [("tucker2", "vbmf", {**vbmf[s], **({"weakening": k} if k != 1 else {})},
                      "vbmf" if k == 1 else f"vbmf k{k:g}", s) for s in args.scopes for k in args.weakenings]
            for method, rank, options, label, scope in runs:
                key = f"{name:<9} {seed:>4} {(method + ' ' + scope).strip():<13} {label:<9} "
                if any(line.startswith(key) for line in lines):
                    continue
                torch.manual_seed(seed)
                t0 = time.perf_counter()
                small, reports = lowrank.compress_model(copy.deepcopy(dense).cpu().to(memory_format=torch.contiguous_format),
                                                        plan_for(dense, method, rank, options, scope),
                                                        input_shape=shape, on_error="record")
                p, m = lowrank.count(small, shape)
                curve = finetune_curve(small, data, args, args.device)
                line = (f"{key}{p0 / p:>8.2f} "
                        f"{m0 / m:>7.2f} {pre:>6.3f} {curve['post']:>6.3f} {curve['bn']:>6.3f} "
                        + " ".join(f"{curve[f'ft{e}']:>6.3f}" for e in args.ft_epochs)
                        + f" {time.perf_counter() - t0:>6.0f}")
                if scope:
                    ranks = [r.rank for r in reports if r.status == "ok"]
                    line += f"  ranks {ranks}"
                lines.append(line)
                print(line, flush=True)
                out.write_text("\n".join(lines) + "\n")  # after every row: a stopped run keeps what it did
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
