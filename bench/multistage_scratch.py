"""Beyond one-shot, measured with the real runner on the embedded default data (digits, 32x32).

1. Multi-stage vs one-shot at the same final per-layer ratio and the same total fine-tuning
   epochs: ``tucker2`` and ``spatial-svd`` at 3x on the small CNN and ResNet-18 (layer1 +
   layer2, like the default sweep); one-shot fine-tunes 2 epochs, two stages (1.7x, then 3x)
   fine-tune 1 epoch after each.
2. Low-rank from scratch (Tai et al.'s vertical-BN-horizontal form, 2x per conv) vs the dense
   model trained with the same schedule (4 epochs, same seed and data order).

Every number is read back from the MLflow registry the sweeps wrote.

    .venv/bin/python bench/multistage_scratch.py [--seeds 0 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def spec(seed: int, name: str, *, stages: bool | None, scratch: bool = False) -> dict:
    d = yaml.safe_load((ROOT / "jobs" / "default_sweep.yaml").read_text())
    d["name"], d["seed"] = name, seed
    d["mlflow"] = {"tracking_uri": "sqlite:///mlflow.db", "experiment": "bench-beyond",
                   "registered_model_prefix": f"{name}-"}
    if scratch:
        d.pop("compression")
        d["from_scratch"] = {"ratio": 2, "epochs": 4, "lr": 0.05, "layers": {"skip_first": True}}
        return d
    d["compression"] = {"methods": ["tucker2", "spatial-svd"], "rank": {"strategy": "ratio", "ratio": 3},
                        "layers": {"skip_first": True}}
    if stages:
        d["compression"]["stages"] = {"ratios": [1.7, 3], "epochs": 1}
        d["finetune"]["epochs"] = 1
    else:
        d["finetune"]["epochs"] = 2
    return d


def run(d: dict) -> None:
    from jobs.driver import run_sweep
    from jobs.spec import parse_spec

    t0 = time.perf_counter()
    res = run_sweep(parse_spec(d, d["name"]), out=lambda *a, **k: None)
    print(f"  {d['name']}: {res.registered} version(s) in {time.perf_counter() - t0:.0f}s"
          + (f", failed: {res.failed}" if res.failed else ""), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        client = MlflowClient("sqlite:///mlflow.db")
        rows, scratch = [], []
        for seed in args.seeds:
            for staged in (False, True):
                name = f"{'staged' if staged else 'oneshot'}-s{seed}"
                run(spec(seed, name, stages=staged))
                for model in ("smallcnn", "resnet18"):
                    for v in client.search_model_versions(f"name='{name}-{model}'"):
                        t = v.tags
                        hist = json.loads(t.get("stage_history", "[]"))
                        rows.append({"seed": seed, "model": model, "method": t["method"].split("-2stage")[0],
                                     "how": "2 stages" if staged else "one-shot", "ratio": float(t["compression_ratio"]),
                                     "acc_pre": float(t["acc_pre"]), "acc_post": float(t["acc_post"]),
                                     "acc_ft": float(t["acc_ft"]),
                                     "stages": " -> ".join(f"{h['compression_ratio']:.2f}x post {h['acc_post']:.3f} "
                                                           f"ft {h['acc_ft']:.3f}" for h in hist)})
            name = f"scratch-s{seed}"
            run(spec(seed, name, stages=None, scratch=True))
            for model in ("smallcnn", "resnet18"):
                for v in client.search_model_versions(f"name='{name}-{model}'"):
                    m = client.get_run(v.tags["run_id"]).data.metrics
                    scratch.append({"seed": seed, "model": model, "acc_dense": m["acc_pre"], "acc_lowrank": m["acc_ft"],
                                    "params_dense": m["params_dense"], "params": m["params"],
                                    "macs_dense": m["macs_dense"], "macs": m["macs"],
                                    "lat_dense": m["latency_b1_dense_ms"], "lat": m["latency_b1_ms"]})

    print("\nmulti-stage vs one-shot, 3x per layer, 2 fine-tuning epochs in total:")
    print("| model | method | seed | how | params x | acc_pre | acc_post | acc_ft | stages |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["model"], r["method"], r["seed"], r["how"])):
        print(f"| {r['model']} | {r['method']} | {r['seed']} | {r['how']} | {r['ratio']:.2f} | {r['acc_pre']:.3f} | "
              f"{r['acc_post']:.3f} | {r['acc_ft']:.3f} | {r['stages']} |")
    print("\nmeans over seeds:")
    print("| model | method | one-shot acc_post | 2 stages acc_post | one-shot acc_ft | 2 stages acc_ft |")
    print("|---|---|---|---|---|---|")
    for model in ("smallcnn", "resnet18"):
        for method in ("tucker2", "spatial-svd"):
            sub = [r for r in rows if r["model"] == model and r["method"] == method]
            one = [r for r in sub if r["how"] == "one-shot"]
            two = [r for r in sub if r["how"] == "2 stages"]
            if one and two:
                def mean(rs, k):
                    return statistics.mean(r[k] for r in rs)

                print(f"| {model} | {method} | {mean(one, 'acc_post'):.3f} | {mean(two, 'acc_post'):.3f} | "
                      f"{mean(one, 'acc_ft'):.3f} | {mean(two, 'acc_ft'):.3f} |")
    print("\nlow-rank from scratch (vertical-BN-horizontal, 2x per conv, BN folded) vs dense, 4 epochs each:")
    print("| model | seed | dense top-1 | low-rank top-1 | params dense | params low-rank | MACs dense | "
          "MACs low-rank | latency b1 dense ms | latency b1 low-rank ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(scratch, key=lambda r: (r["model"], r["seed"])):
        print(f"| {r['model']} | {r['seed']} | {r['acc_dense']:.3f} | {r['acc_lowrank']:.3f} | "
              f"{r['params_dense'] / 1e6:.3f}M | {r['params'] / 1e6:.3f}M | {r['macs_dense'] / 1e6:.1f}M | "
              f"{r['macs'] / 1e6:.1f}M | {r['lat_dense']:.2f} | {r['lat']:.2f} |")


if __name__ == "__main__":
    main()
