"""The dedicated timing step: the dense and the compressed model, timed side by side on the
spec's runtime (``jobs.deploy``), in a task of its own (with ``latency.exclusive`` it holds a
whole node's CPUs, so no other task runs beside it)."""
from __future__ import annotations

import time

import lowrank

from .. import deploy
from ..spec import LatencySpec
from .env import assigned_cpus, node_id


def timing_task(dense, compressed, input_shape: tuple, latency: LatencySpec, layers=(), also_at=()) -> dict:
    """``deploy.headline`` of the paired rows, plus each of ``layers`` timed alone
    (``deploy.per_layer``, under ``layers``) and the pair at batch 1 at each size of ``also_at``
    (under ``also``: ``[{'size', 'rows'}]``); where the chosen runtime cannot run the model,
    PyTorch eager is timed instead and ``note`` says why."""
    t0 = time.perf_counter()
    shape = deploy.timed_shape(input_shape, latency.input_size)
    kw = {"batches": tuple(latency.batches), "threads": tuple(latency.threads), "repeats": latency.repeats,
          "all_threads": assigned_cpus()}
    note = ""
    try:
        rows = deploy.paired(dense, compressed, shape, runtime=latency.runtime, **kw)
    except Exception as e:  # noqa: BLE001 - export or runtime failures of a user's model: timed eagerly instead
        note = f"{latency.runtime} could not run the model ({deploy.failure(e)})"
        rows = deploy.paired(dense, compressed, shape, runtime="torch", **kw)
    runtime = rows[0]["runtime"]
    if any(rows[0].get("merged", ())):  # what the timed ONNX files merged (deploy.export_onnx), beside the figures
        dense_n, compressed_n = rows[0]["merged"]
        note = "; ".join(filter(None, [note, f"1x1 conv pairs merged at export: {compressed_n} (dense: {dense_n})"]))
    also = []
    for size in also_at:  # the same pair at the other sizes it is deployed at (224 px for ImageNet-style networks)
        at = deploy.timed_shape(input_shape, size)
        try:
            also.append({"size": size, "rows": deploy.paired(dense, compressed, at, runtime=runtime, **{**kw, "batches": (1,)})})
        except Exception as e:  # noqa: BLE001 - a size the runtime cannot take: said in the note, the rest stands
            note = "; ".join(filter(None, [note, f"not timed at {size} px ({deploy.failure(e)})"]))
    try:
        per = deploy.per_layer(dense, compressed, list(layers), shape, runtime=runtime, repeats=latency.repeats)
    except Exception:  # noqa: BLE001 - a layer the runtime cannot take alone: those layers are timed eagerly
        per = deploy.per_layer(dense, compressed, list(layers), shape, runtime="torch", repeats=latency.repeats)
    try:  # the MAC reduction at the timed size, against which the speedup is read (speedup_per_mac_b1)
        extra = {"mac_ratio": lowrank.count(dense, shape)[1] / lowrank.count(compressed, shape)[1]}
    except Exception:  # noqa: BLE001 - a model that counts only at the data's size
        extra = {}
    return {**deploy.headline(rows), **extra, "note": note, "layers": per, "also": also, "node": node_id(),
            "task_seconds": time.perf_counter() - t0}
