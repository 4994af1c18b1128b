"""The seed papers' claims, run through the real runner (``python -m jobs run``, a local Ray, a
sqlite MLflow store) on Fashion-MNIST, every figure read back from the MLflow registry.

Claims (``../shared/seeds/``):

* ``phan``: Phan et al. (ECCV 2020): plain CP-ALS factors of conv kernels degenerate, which makes
  fine-tuning erratic at larger learning rates; CPD-EPC at the same rank and kernel error keeps
  fine-tuning stable. ``cp3`` against ``cp3-epc`` at 2x parameters per layer, fine-tuned at three
  learning rates, top-1 after every epoch (the version's ``ft_curve`` tag).
* ``kim``: Kim et al. (ICLR 2016) and the Skoltech slides: whole-model Tucker-2 at VBMF ranks
  (every conv but the first), fine-tuned, comes back to the dense top-1. Plain VBMF and the
  weakened ranks (``--weakening``).
* ``tai``: Tai et al. (ICLR 2016): the spatial SVD against Tucker-2 and CP on the same layers at
  equal MACs (2x per layer): top-1 before and after fine-tuning and the realised speedup (ONNX
  Runtime, batch 1, one thread: the version's ``speedup_b1`` tag).

Each configuration is a registered version; a re-run registers nothing twice (the runner's config
hashes), so an interrupted run resumes where it stopped.

    .venv/bin/python bench/seeds.py                        # all claims, one seed, ~55 min on 2 cores
    .venv/bin/python bench/seeds.py --claims phan --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
LRS = (0.001, 0.01, 0.05)


def base_spec(args, seed: int, name: str) -> dict:
    return {
        "name": name, "seed": seed,
        "models": [{"name": args.model, "num_classes": 10,
                    **({"checkpoint": str(args.checkpoint.resolve())} if args.checkpoint else {})}],
        "dataset": {"kind": "fashion-mnist", "input_size": 32, "batch_size": 128, "limit_train": args.limit_train},
        "pretrain": {"epochs": args.pretrain_epochs, "lr": 0.05, "cache_dir": str(args.work / "pretrained")},
        "finetune": {"epochs": 3, "lr": 0.01},
        "resources": {"cpus_per_task": 1},
        "mlflow": {"tracking_uri": f"sqlite:///{args.work}/mlflow.db", "experiment": "seeds",
                   "registered_names": {args.model: name}},
    }


def claim_runs(claim: str, args, seed: int) -> list[tuple[str, dict]]:
    """(registered name, spec) per runner invocation of a claim."""
    runs = []
    if claim == "phan":
        for ratio, lr in ((r, lr) for r in args.phan_ratios for lr in args.lrs):
            s = base_spec(args, seed, phan_name(lr, seed, ratio))
            s["compression"] = {"methods": ["cp3", "cp3-epc"], "rank": {"strategy": "ratio", "ratio": ratio},
                                "options": {"cp3": {"n_iter_max": 300},
                                            "cp3-epc": {"n_iter_max": 300, "epc_max_sweeps": 200}}}
            s["finetune"] = {"epochs": 3, "lr": lr}
            runs.append((s["name"], s))
    elif claim == "kim":
        for k in args.weakening:
            s = base_spec(args, seed, f"seeds-kim-k{k:g}-s{seed}")
            s["compression"] = {"methods": ["tucker2"], "rank": {"strategy": "vbmf", "weakening": k}}
            s["finetune"] = {"epochs": args.kim_epochs, "lr": 0.01}
            runs.append((s["name"], s))
    elif claim == "tai":
        s = base_spec(args, seed, f"seeds-tai-s{seed}")
        s["compression"] = {"methods": ["spatial-svd", "tucker2", "cp3"],
                            "rank": {"strategy": "ratio", "ratio": 2, "target": "macs"},
                            "options": {"cp3": {"n_iter_max": 300}}}
        runs.append((s["name"], s))
    return runs


def phan_name(lr: float, seed: int, ratio: float = 2.0) -> str:
    """The registered name of one Phan run (2x keeps the name it had before ratios were an option)."""
    return f"seeds-phan-lr{lr:g}-s{seed}" + ("" if ratio == 2 else f"-x{ratio:g}")


def run_spec(spec: dict, work: Path) -> None:
    path = work / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    proc = subprocess.run([sys.executable, "-m", "jobs", "run", str(path)], cwd=work, env=env,
                          capture_output=True, text=True)
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    print(f"# {spec['name']}: exit {proc.returncode} in {time.perf_counter() - t0:.0f}s\n#   {tail}", flush=True)
    if proc.returncode not in (0, 1):  # 1: some configuration failed (reported, the others registered)
        raise SystemExit(f"error: the runner refused {path}: {tail}")


def versions(client, name: str) -> list[dict]:
    """Every registered version of ``name``: its tags, its run's metrics and its layer table."""
    out = []
    for v in client.search_model_versions(f"name='{name}'"):
        run = client.get_run(v.run_id)
        with tempfile.TemporaryDirectory() as tmp:  # the layer table, as MLflow's log_table wrote it
            table = json.loads(Path(client.download_artifacts(v.run_id, "layers.json", tmp)).read_text())
        layers = pd.DataFrame(table["data"], columns=table["columns"])
        out.append({"tags": v.tags, "metrics": run.data.metrics, "params": run.data.params,
                    "layers": layers[layers["status"] == "ok"]})
    return sorted(out, key=lambda r: r["tags"]["method"])


def fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(float(x), spec)


def table_phan(client, seed: int, lrs, ratio: float = 2.0) -> list[str]:
    lines = [f"# Phan et al.: cp3 vs cp3-epc, {ratio:g}x parameters per layer, fine-tuned 3 epochs (seed {seed}); err: mean "
             f"kernel error; degen: layers flagged degenerate; cancel: the largest sum of term norms over the "
             f"kernel's norm; sens: mean sensitivity (Phan et al.); worst drop: the largest fall of top-1 from one "
             f"epoch to the next (bn = epoch 0)",
             f"{'lr':>6} {'method':<8} {'err':>6} {'degen':>5} {'cancel':>6} {'sens':>7} {'pre':>6} {'post':>6} "
             f"{'bn':>6} {'ep1':>6} {'ep2':>6} {'ep3':>6} {'worst drop':>10}"]
    for lr in lrs:
        for v in versions(client, phan_name(lr, seed, ratio)):
            t, m, lay = v["tags"], v["metrics"], v["layers"]
            curve = json.loads(t["ft_curve"])
            pts = [m["acc_bn"], *curve]
            drop = max(0.0, max(a - b for a, b in zip(pts, pts[1:])))  # the largest fall between epochs
            final = "epc" if t["method"] == "cp3-epc" else "als"  # the diagnostics of the factors kept
            cancel, sens = lay[f"diag.{final}.cancellation_ratio"].max(), lay[f"diag.{final}.sensitivity"].mean()
            lines.append(f"{lr:>6g} {t['method']:<8} {lay['rel_error'].mean():>6.3f} {t['degenerate_layers']:>5} "
                         f"{cancel:>6.2f} {sens:>7.0f} {fmt(t['acc_pre'])} {fmt(t['acc_post']):>6} {fmt(m['acc_bn']):>6} "
                         + " ".join(f"{c:>6.3f}" for c in curve) + f" {drop:>10.3f}")
    return lines


def per_seed_table(title: str, label_head: str, cols: list[str], rows: dict[str, list[tuple]], n: int) -> list[str]:
    """One row per label: for each column, its value on every seed, then the mean over seeds."""
    lines = [title, label_head + " " + " | ".join(f"{c + ' per seed':>{7 * n}} {'mean':>6}" for c in cols)]
    for label, vals in rows.items():
        cells = []
        for j in range(len(cols)):
            col = [v[j] for v in vals]
            cells.append("".join(f"{x:>7.3f}" for x in col) + f" {sum(col) / len(col):>6.3f}")
        lines.append(f"{label} " + " | ".join(cells))
    return lines


def phan_over_seeds(client, seeds, lrs, ratio: float = 2.0) -> list[str]:
    """The final top-1 and the worst fall between epochs, per learning rate and method, over seeds."""
    rows: dict[str, list] = {}
    for lr in lrs:
        for seed in seeds:
            for v in versions(client, phan_name(lr, seed, ratio)):
                pts = [v["metrics"]["acc_bn"], *json.loads(v["tags"]["ft_curve"])]
                rows.setdefault(f"{lr:>6g} {v['tags']['method']:<8}", []).append(
                    (pts[-1], max(0.0, max(a - b for a, b in zip(pts, pts[1:])))))
    return per_seed_table(f"# Phan et al. at {ratio:g}x over seeds {', '.join(map(str, seeds))}: top-1 after 3 epochs "
                          f"and the worst fall between epochs, each seed, then the mean",
                          f"{'lr':>6} {'method':<8}", ["ep3", "worst drop"], rows, len(seeds))


def tai_over_seeds(client, seeds) -> list[str]:
    rows: dict[str, list] = {}
    for seed in seeds:
        for v in versions(client, f"seeds-tai-s{seed}"):
            t = v["tags"]
            rows.setdefault(f"{t['method']:<12}", []).append(
                (float(t["acc_post"]), float(t["acc_ft"]), float(t["speedup_b1"])))
    return per_seed_table(f"# Tai et al. over seeds {', '.join(map(str, seeds))}: top-1 right after compression, after "
                          f"fine-tuning, and the realised speedup, each seed, then the mean",
                          f"{'method':<12}", ["post", "ft", "speedup"], rows, len(seeds))


def kim_over_seeds(client, seeds, args) -> list[str]:
    rows: dict[str, list] = {}
    for k in args.weakening:
        for seed in seeds:
            for v in versions(client, f"seeds-kim-k{k:g}-s{seed}"):
                t = v["tags"]
                rows.setdefault(f"{k:>4g}", []).append(
                    (float(t["compression_ratio"]), float(t["acc_post"]), float(t["acc_ft"]),
                     float(t["acc_ft"]) - float(t["acc_pre"])))
    return per_seed_table(f"# Kim et al. over seeds {', '.join(map(str, seeds))}: parameters x, top-1 right after "
                          f"compression, after fine-tuning, and its difference from the dense model, each seed, then "
                          f"the mean", f"{'k':>4}", ["params x", "post", "ft", "ft - pre"], rows, len(seeds))


def table_kim(client, seed: int, args) -> list[str]:
    lines = [f"# Kim et al.: whole-model Tucker-2 at VBMF ranks (every conv but the first), fine-tuned "
             f"{args.kim_epochs} epochs at lr 0.01 (seed {seed}); k = weakening (1 = plain VBMF)",
             f"{'k':>4} {'params x':>8} {'MACs x':>7} {'pre':>6} {'post':>6} {'bn':>6} {'ft':>6} {'ft - pre':>8}"
             f"  ranks"]
    for k in args.weakening:
        for v in versions(client, f"seeds-kim-k{k:g}-s{seed}"):
            t, m = v["tags"], v["metrics"]
            ranks = " ".join(str(tuple(json.loads(r))) for r in v["layers"]["rank"])
            lines.append(f"{k:>4g} {float(t['compression_ratio']):>8.2f} {float(t['mac_ratio']):>7.2f} "
                         f"{fmt(t['acc_pre'])} {fmt(t['acc_post']):>6} {fmt(m.get('acc_bn')):>6} {fmt(t['acc_ft']):>6} "
                         f"{float(t['acc_ft']) - float(t['acc_pre']):>+8.3f}  {ranks}")
    return lines


def table_tai(client, seed: int) -> list[str]:
    lines = [f"# Tai et al.: equal MACs (2x per layer), fine-tuned 3 epochs at lr 0.01 (seed {seed}); speedup on "
             f"ONNX Runtime, batch 1, one thread",
             f"{'method':<12} {'MACs x':>7} {'params x':>8} {'err':>6} {'pre':>6} {'post':>6} {'bn':>6} {'ft':>6} "
             f"{'speedup':>7}"]
    for v in versions(client, f"seeds-tai-s{seed}"):
        t, m = v["tags"], v["metrics"]
        lines.append(f"{t['method']:<12} {float(t['mac_ratio']):>7.2f} {float(t['compression_ratio']):>8.2f} "
                     f"{v['layers']['rel_error'].mean():>6.3f} {fmt(t['acc_pre'])} {fmt(t['acc_post']):>6} "
                     f"{fmt(m.get('acc_bn')):>6} {fmt(t['acc_ft']):>6} {float(t['speedup_b1']):>7.2f}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--claims", nargs="+", default=["phan", "kim", "tai"], choices=["phan", "kim", "tai"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--model", default="smallcnn")
    ap.add_argument("--limit-train", type=int, default=12000, help="Fashion-MNIST training images (of 60,000)")
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--checkpoint", type=Path, help="start from these weights instead of pre-training (e.g. seed 0's "
                                                    "runner cache, so that other seeds vary only decomposition and "
                                                    "fine-tuning)")
    ap.add_argument("--lrs", nargs="+", type=float, default=list(LRS), help="phan: fine-tuning learning rates")
    ap.add_argument("--phan-ratios", nargs="+", type=float, default=[2.0], help="phan: parameter reduction per layer")
    ap.add_argument("--weakening", nargs="+", type=float, default=[1.0, 0.6, 0.3])
    ap.add_argument("--kim-epochs", type=int, default=5)
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "seeds", help="MLflow store, caches, specs")
    ap.add_argument("--report-only", action="store_true", help="read the registry, run nothing")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "seeds.out.txt")
    args = ap.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    head = [f"# bench/seeds.py {' '.join(sys.argv[1:])}".rstrip(),
            f"# {args.model} on Fashion-MNIST ({args.limit_train} training images, the 10,000 test images), "
            + (f"weights {args.checkpoint}" if args.checkpoint else f"pre-trained {args.pretrain_epochs} epochs by the runner")
            + f"; store {args.work}/mlflow.db"]
    print("\n".join(head), flush=True)
    if not args.report_only:
        for seed in args.seeds:
            for claim in args.claims:
                for _, spec in claim_runs(claim, args, seed):
                    run_spec(spec, args.work)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{args.work}/mlflow.db")
    lines = list(head)
    for seed in args.seeds:
        for claim in args.claims:
            lines += {"phan": lambda: [x for r in args.phan_ratios for x in table_phan(client, seed, args.lrs, r)],
                      "kim": lambda: table_kim(client, seed, args),
                      "tai": lambda: table_tai(client, seed)}[claim]()
    if len(args.seeds) > 1:
        summaries = {"phan": lambda: [x for r in args.phan_ratios for x in phan_over_seeds(client, args.seeds, args.lrs, r)],
                     "kim": lambda: kim_over_seeds(client, args.seeds, args),
                     "tai": lambda: tai_over_seeds(client, args.seeds)}
        for claim in args.claims:
            lines += summaries[claim]()
    print("\n".join(lines[len(head):]))
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
