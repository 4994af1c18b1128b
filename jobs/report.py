"""Tables and plots of a sweep, pure (no MLflow): the metrics of a configuration, the per-layer
table, the Pareto fronts, the summary printed at the end, Parquet files and PNG plots."""
from __future__ import annotations

import json
import re
from pathlib import Path

def quality(figures: dict) -> str:
    """The name of the figures' top-1: ``acc`` (accuracy on labels) or ``agree`` (agreement with
    the dense model, whose figures carry a ``kl``)."""
    return "agree" if "kl" in figures else "acc"


def finetune_note(acc_post: dict, acc_bn: dict | None, acc_ft: dict, epochs: int, margin: float = 0.01) -> str:
    """A warning where fine-tuning left the model worse on the validation set than it was before it
    (right after compression, or after BatchNorm recalibration) by more than ``margin``: the
    registered model is the fine-tuned one, and a learning rate too high for it is the usual cause."""
    before = max(a["top1"] for a in (acc_post, acc_bn) if a)
    if epochs <= 0 or acc_ft["top1"] >= before - margin:
        return ""
    q = quality(acc_post)
    return (f"fine-tuning lowered {q} from {before:.3f} to {acc_ft['top1']:.3f} (the registered model is the "
            f"fine-tuned one): check finetune.lr and epochs")


def chance_note(acc: dict, num_classes: int, source: str) -> str:
    """A warning for a model trained here that is no better than guessing: top-1 at most 1.2x the
    chance level of its ``num_classes`` outputs (agreement figures and given weights: none)."""
    if "kl" in acc or source not in ("trained", "cache") or acc["top1"] > 1.2 / num_classes:
        return ""
    return (f" (no better than chance, 1/{num_classes}: pre-training did not learn; "
            f"check pretrain.lr and epochs, or give a checkpoint)")


def metric_name(key: str, q: str) -> str:
    """``acc_*`` named as what it measures (``agree_*`` under evaluation by agreement)."""
    return q + key[3:] if key.startswith("acc_") else key


def named(m: dict, q: str) -> dict:
    return {metric_name(k, q): v for k, v in m.items()}


def latency_metrics(dense: dict, lat: dict) -> dict:
    """Latency and speedup at batch 1 and the large batch, named by the batch they were taken at
    (``speedup_b8`` where ``latency.batches`` is ``[1, 8]``): from the paired timing step where it
    ran (``lat['b1_dense']``, the dense model timed beside the compressed one), else against the
    baseline's own in-task figures (batch 32); plus one figure per timed (batch, threads) pair."""
    m = {}
    big = lat.get("big_batch", 32)
    for key, name in (("b1", "b1"), ("b32", f"b{big}")) if big > 1 else (("b1", "b1"),):
        d = lat.get(f"{key}_dense", dense[key])
        m.update({f"latency_{name}_dense_ms": 1e3 * d, f"latency_{name}_ms": 1e3 * lat[key], f"speedup_{name}": d / lat[key]})
    if "mac_ratio" in lat:  # the timing step's MAC reduction at the size it timed: how much of it is realised
        m.update(mac_ratio_timed=lat["mac_ratio"], speedup_per_mac_b1=m["speedup_b1"] / lat["mac_ratio"])
    rows = [(r, "") for r in lat.get("rows", [])] + [(r, f"_{a['size']}px") for a in lat.get("also", []) for r in a["rows"]]
    for r, at in rows:
        m[f"speedup_b{r['batch']}_t{r['threads']}{at}"] = r["speedup"]
        m[f"latency_b{r['batch']}_t{r['threads']}{at}_ms"] = r["compressed_ms"]
        m[f"latency_b{r['batch']}_t{r['threads']}{at}_dense_ms"] = r["dense_ms"]
    return m


def latency_tags(lat: dict) -> dict:
    """Where the speedup tags were taken: runtime, input, threads, the large batch."""
    if "runtime" not in lat:  # no timing step ran (a result replayed from the spool, or it failed)
        return {"latency_runtime": f"{lat.get('in_task', 'torch')} (in the task, beside other tasks"
                                   + (f"; {lat['note']}" if lat.get("note") else "") + ")"}
    also = {f"speedup_b1_{a['size']}px": f"{r['speedup']:.4f}" for a in lat.get("also", []) for r in a["rows"]
            if r["threads"] == lat["threads"]}  # at the other sizes, batch 1, the tags' threads
    return {"latency_runtime": lat["runtime"] + (f" ({lat['note']})" if lat.get("note") else ""),
            "latency_input": lat["input"], "latency_threads": str(lat["threads"]),
            "latency_big_batch": str(lat["big_batch"]), **also}


def config_metrics(base: dict, result) -> dict:
    """A configuration's metrics against its dense reference (``result``: an ``EvalResult``);
    under evaluation by agreement ``agree_*`` and ``kl_*`` in place of ``acc_*``."""
    m = {
        "acc_pre": base["acc"]["top1"], "acc_post": result.acc_post["top1"], "acc_ft": result.acc_ft["top1"],
        "compression_ratio": base["params"] / result.params, "mac_ratio": base["macs"] / result.macs,
        "params": result.params, "macs": result.macs, "params_dense": base["params"], "macs_dense": base["macs"],
        **latency_metrics(base["latency"], result.latency),
        "decompose_seconds": result.decompose_seconds(),
        "finetune_seconds": result.ft_seconds,
    }
    if "top5" in base["acc"]:
        m.update(acc_pre_top5=base["acc"]["top5"], acc_post_top5=result.acc_post["top5"],
                 acc_ft_top5=result.acc_ft["top5"])
    if result.acc_bn is not None:
        m["acc_bn"] = result.acc_bn["top1"]
    if result.predicted:  # the search's own estimate, to set beside what was measured
        m["search_predicted_ratio"] = result.predicted
    q = quality(base["acc"])
    if q == "agree":
        m.update({f"kl_{k}": d["kl"] for k, d in (("pre", base["acc"]), ("post", result.acc_post),
                                                  ("bn", result.acc_bn), ("ft", result.acc_ft)) if d is not None})
    return named(m, q)


_AT = re.compile(r"speedup_b1_(\d+)px")


def summary_row(model: str, method: str, registered_name: str, version: str, tags: dict, config_hash: str) -> dict:
    """A registered version as a row of the sweep's summary (from its tags); ``acc_*`` hold its
    top-1 figures, ``metric`` says which (``acc`` or ``agree``)."""
    q = "agree" if "agree_ft" in tags else "acc"
    return {"model": model, "method": method, "registered_name": registered_name, "version": version,
            "compression_ratio": float(tags["compression_ratio"]), "mac_ratio": float(tags["mac_ratio"]),
            "speedup_b1": float(tags.get("speedup_b1", "nan")), "acc_pre": float(tags[f"{q}_pre"]),
            "acc_post": float(tags[f"{q}_post"]), "acc_ft": float(tags[f"{q}_ft"]), "metric": q,
            "degenerate_layers": int(tags["degenerate_layers"]), "config_hash": config_hash,
            "timed_on": " ".join(tags[k] for k in ("latency_runtime", "latency_input") if k in tags),
            **{k: float(v) for k, v in tags.items() if _AT.fullmatch(k)}}  # speedup_b1_224px: latency.also_at


def format_summary(rows: list[dict], candidates: dict[str, str] | None = None) -> str:
    q = rows[0].get("metric", "acc") if rows else "acc"
    sizes = sorted({int(m[1]) for r in rows for k in r if (m := _AT.fullmatch(k))})  # a column per also_at size
    head = f"{'model':<20} {'method':<16} {'params x':>8} {'MACs x':>7} {'speedup':>7} " \
           + "".join(f"{f'@{s}px':>7} " for s in sizes) + f"{q + '_pre':>7} {q + '_post':>8} {q + '_ft':>7} {'degen':>5}  registered"
    lines = [head, "-" * len(head)]
    for r in rows:
        star = " *candidate" if candidates and candidates.get(r["registered_name"]) == r["version"] else ""
        at = "".join(f"{r[k]:>7.2f} " if (k := f"speedup_b1_{s}px") in r else f"{'-':>7} " for s in sizes)
        lines.append(f"{r['model']:<20} {r['method']:<16} {r['compression_ratio']:>8.2f} {r['mac_ratio']:>7.2f} "
                     f"{r.get('speedup_b1', float('nan')):>7.2f} {at}{r['acc_pre']:>7.3f} {r['acc_post']:>8.3f} "
                     f"{r['acc_ft']:>7.3f} {r['degenerate_layers']:>5}  {r['registered_name']} v{r['version']}{star}")
    where = sorted({r["timed_on"] for r in rows if r.get("timed_on")})
    if where:
        lines.append(f"(speedup: the compressed model against the dense one, batch 1, one thread, on {'; '.join(where)}"
                     + ("; @Npx: the same at N x N px (latency.also_at)" if sizes else "") + ")")
    return "\n".join(lines)


def _flat(prefix: str, d: dict, out: dict) -> None:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            _flat(key + ".", v, out)
        elif isinstance(v, (bool, int, float)) or v is None:
            out[key] = v
        else:
            out[key] = str(v)


def layer_rows(reports: list[dict], statuses: list[dict], timing: dict | None = None) -> list[dict]:
    """Per-layer table: the built layers plus layers that were skipped or failed (with reasons);
    with ``timing`` (``deploy.per_layer``) each built layer's latency alone against dense and
    ``slower_than_dense`` where the factorized layer loses on that runtime."""
    timing = timing or {}
    rows = []
    for r in reports:
        row = {"layer": r["name"], "method": r["method"], "status": r.get("status", "ok"), "reason": r.get("reason", ""),
               "rank": json.dumps(r["rank"]), "rel_error": r["rel_error"], "params_before": r["params_before"],
               "params_after": r["params_after"], "macs_before": r["macs_before"], "macs_after": r["macs_after"]}
        st = next((s for s in statuses if s["name"] == r["name"]), None)
        row["seconds"] = st["seconds"] if st else r["seconds"]
        _flat("diag.", r.get("diagnostics", {}), row)
        if r["name"] in timing:
            t = timing[r["name"]]
            row.update(latency_dense_ms=t["dense_ms"], latency_ms=t["compressed_ms"], speedup_b1=t["speedup"],
                       slower_than_dense=bool(t["speedup"] < 1))
        rows.append(row)
    for s in statuses:
        if s["status"] != "ok":
            rows.append({"layer": s["name"], "method": s["method"], "status": s["status"], "reason": s["reason"],
                         "seconds": s["seconds"]})
    return rows


def columns(rows: list[dict]) -> dict:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in keys}


def write_parquet(rows: list[dict], path: Path) -> None:
    import pyarrow as pa  # deferred: pyarrow is heavy and only writing a table needs it
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pydict(columns(rows)), str(path))


def plot_sweep(rows: list[dict], path: Path) -> None:
    import matplotlib  # deferred: matplotlib is heavy and only drawing needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = [r for r in rows if r["model"] == model]
        for method in sorted({r["method"] for r in sub}):
            pts = [r for r in sub if r["method"] == method]
            line = ax.plot([p["compression_ratio"] for p in pts], [p["acc_ft"] for p in pts], "o", label=f"{method} ft")
            ax.plot([p["compression_ratio"] for p in pts], [p["acc_post"] for p in pts], "x",
                    color=line[0].get_color(), label=f"{method} post")
        ax.axhline(sub[0]["acc_pre"], color="gray", ls="--", lw=1, label="dense")
        ax.set(title=model, xlabel="parameter compression ratio",
               ylabel="top-1 agreement with the dense model" if sub[0].get("metric") == "agree" else "top-1 accuracy")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _front(points: list[tuple[float, float]]) -> list[bool]:
    """Non-dominated flags for (x, y), both to maximise."""
    flags = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def pareto_table(rows: list[dict]) -> list[dict]:
    """Every evaluated point (configurations, Tune trials, the dense model) with its Pareto flags.
    ``pareto_ratio``: no other point of the model has both a higher ratio and a higher top-1;
    ``pareto_latency`` likewise with the measured speedup (points without one are not ranked)."""
    table = []
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model]
        pts = [{"model": model, "method": "dense", "kind": "dense", "compression_ratio": 1.0, "speedup_b1": 1.0,
                "acc_ft": sub[0]["acc_pre"]}]
        pts += [{"model": model, "method": r["method"], "kind": r.get("kind", "config"),
                 "compression_ratio": r["compression_ratio"], "speedup_b1": r.get("speedup_b1"),
                 "acc_ft": r["acc_ft"]} for r in sub]
        for p, f in zip(pts, _front([(p["compression_ratio"], p["acc_ft"]) for p in pts])):
            p["pareto_ratio"] = f
        timed = [p for p in pts if p["speedup_b1"] is not None and p["speedup_b1"] == p["speedup_b1"]]
        for p, f in zip(timed, _front([(p["speedup_b1"], p["acc_ft"]) for p in timed])):
            p["pareto_latency"] = f
        for p in pts:
            p.setdefault("pareto_latency", None)
        table += pts
    return table


def plot_pareto(table: list[dict], path: Path) -> None:
    import matplotlib  # deferred: matplotlib is heavy and only drawing needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in table))
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 4 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        sub = [r for r in table if r["model"] == model]
        for ax, x, flag, label in ((row[0], "compression_ratio", "pareto_ratio", "parameter compression ratio"),
                                   (row[1], "speedup_b1", "pareto_latency", "measured speedup (batch 1)")):
            pts = [r for r in sub if r[x] is not None]
            ax.scatter([p[x] for p in pts], [p["acc_ft"] for p in pts], c="lightgray", s=18, label="evaluated")
            front = sorted((p for p in pts if p[flag]), key=lambda p: p[x])
            ax.plot([p[x] for p in front], [p["acc_ft"] for p in front], "o-", color="C3", label="Pareto front")
            for p in front:
                ax.annotate(p["method"], (p[x], p["acc_ft"]), fontsize=6)
            ax.set(title=model, xlabel=label, ylabel="top-1 after fine-tuning")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
