"""The work Ray runs. Plain functions (the driver wraps them with ``ray.remote``); they take and
return plain data (dicts, tensors, factor dataclasses) and never log to MLflow."""
from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path

import torch

import lowrank
from lowrank.errors import RankTooLargeError

from .data import load_dataset
from .models import build_model, load_checkpoint
from .spec import DatasetSpec, FinetuneSpec, ModelSpec, PretrainSpec
from .train import evaluate, loader, measure_latency, recalibrate_bn, train_epochs


def node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except Exception:  # noqa: BLE001
        return "local"


def pick_device(want_gpu: bool) -> str:
    return "cuda" if want_gpu and torch.cuda.is_available() else "cpu"


def _cpu_state(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _latency(model, input_shape, device) -> dict:
    return {"b1": measure_latency(model, input_shape, 1, device=device, repeats=10),
            "b32": measure_latency(model, input_shape, 32, device=device, repeats=3, warmup=1)}


def _setup(model_json: str, dataset_json: str, seed: int, want_gpu: bool):
    """What every model-level task starts with: specs, device, seeded RNG, data, input shape."""
    mspec, dspec = ModelSpec.model_validate_json(model_json), DatasetSpec.model_validate_json(dataset_json)
    torch.manual_seed(seed)
    train, val, _ = load_dataset(dspec, seed)
    return mspec, dspec, pick_device(want_gpu), train, val, tuple(train[0][0].shape)


def baseline_task(model_json: str, dataset_json: str, pretrain_json: str, seed: int, cache_key: str,
                  want_gpu: bool) -> dict:
    """Trained weights of one model (checkpoint, cache, or a few epochs of training), its
    accuracy, size and latency."""
    t_task = time.perf_counter()
    mspec, dspec, device, train, val, input_shape = _setup(model_json, dataset_json, seed, want_gpu)
    pspec = PretrainSpec.model_validate_json(pretrain_json)
    model = build_model(mspec.name, mspec.num_classes)
    t0 = time.perf_counter()
    cache = Path(pspec.cache_dir) / f"{mspec.name}-{cache_key}.pt"
    if mspec.checkpoint is not None:
        load_checkpoint(model, mspec.checkpoint)
        source = "checkpoint"
    elif cache.is_file():
        load_checkpoint(model, cache)
        source = "cache"
    else:
        train_epochs(model, loader(train, dspec.batch_size, shuffle=True, workers=dspec.workers, seed=seed),
                     epochs=pspec.epochs, lr=pspec.lr, optimizer=pspec.optimizer, device=device)
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".tmp")
        os.close(fd)
        torch.save(_cpu_state(model), tmp)
        os.replace(tmp, cache)  # atomic: a concurrent sweep never reads half a file
        source = "trained"
    train_seconds = time.perf_counter() - t0
    model.to(device)
    acc = evaluate(model, loader(val, dspec.batch_size, shuffle=False), device)
    params, macs = lowrank.count(model.cpu(), input_shape)
    return {"state_dict": _cpu_state(model), "acc": acc, "params": params, "macs": macs,
            "latency": _latency(model, input_shape, device), "source": source, "train_seconds": train_seconds,
            "input_shape": input_shape, "device": device, "task_seconds": time.perf_counter() - t_task,
            "node": node_id()}


def decompose_task(name: str, module: torch.nn.Module, method: str, rank, options: dict, want_gpu: bool) -> dict:
    """One (layer, method, rank) decomposition. Failures are data (status + reason), not raises."""
    t0 = time.perf_counter()
    out = {"name": name, "method": method, "status": "ok", "reason": "", "factors": None, "rank": None,
           "rel_error": None, "diagnostics": {}}
    try:
        opts = dict(options)
        if method.startswith("cp") and want_gpu and torch.cuda.is_available():
            opts.setdefault("device", "cuda")
        _, factors = lowrank.api.factorize_with_factors(module, method, rank, **opts)
        factors = lowrank.factors_to(factors, "cpu")
        out.update(factors=factors, rank=factors.rank, rel_error=lowrank.relative_error(module.weight, factors),
                   diagnostics=dict(getattr(factors, "diagnostics", {}) or {}))
    except RankTooLargeError as e:
        out.update(status="skipped", reason=str(e))
    except Exception as e:  # noqa: BLE001 - a failed layer is recorded, the sweep goes on
        out.update(status="failed", reason=f"{type(e).__name__}: {e}".splitlines()[0],
                   traceback=traceback.format_exc(limit=5))
    out["seconds"] = time.perf_counter() - t0
    out["node"] = node_id()
    return out


def evaluate_task(model_json: str, base_state: dict, dataset_json: str, finetune_json: str, seed: int,
                  want_gpu: bool, *layer_results: dict) -> dict:
    """Assemble the compressed model, evaluate it (post), recalibrate BN, fine-tune, evaluate (ft)."""
    t_task = time.perf_counter()
    mspec, dspec, device, train, val, input_shape = _setup(model_json, dataset_json, seed, want_gpu)
    fspec = FinetuneSpec.model_validate_json(finetune_json)
    model = build_model(mspec.name, mspec.num_classes)
    model.load_state_dict(base_state)
    factors = {r["name"]: r["factors"] for r in layer_results if r["status"] == "ok"}
    new, reports = lowrank.apply_factors(model, factors, input_shape=input_shape)
    val_dl = loader(val, dspec.batch_size, shuffle=False)
    train_dl = loader(train, dspec.batch_size, shuffle=True, workers=dspec.workers, seed=seed)
    t0 = time.perf_counter()
    acc_post = evaluate(new, val_dl, device)
    acc_bn = None
    if fspec.bn_recalibration and recalibrate_bn(new, train_dl, fspec.bn_batches, device):
        acc_bn = evaluate(new, val_dl, device)
    losses = train_epochs(new, train_dl, epochs=fspec.epochs, lr=fspec.lr, optimizer=fspec.optimizer, device=device)
    acc_ft = evaluate(new, val_dl, device)
    ft_seconds = time.perf_counter() - t0
    params, macs = lowrank.count(new.cpu(), input_shape)
    return {"state_dict": _cpu_state(new), "acc_post": acc_post, "acc_bn": acc_bn, "acc_ft": acc_ft,
            "params": params, "macs": macs, "latency": _latency(new, input_shape, device),
            "reports": [r.to_dict() for r in reports], "ft_losses": losses, "ft_seconds": ft_seconds,
            "device": device, "factors": factors, "task_seconds": time.perf_counter() - t_task, "node": node_id(),
            "layer_status": [{k: v for k, v in r.items() if k not in ("factors", "traceback")} for r in layer_results]}


def screen_task(name: str, module: torch.nn.Module, input_shape, methods: list[str], ratios: list[float],
                options: dict, want_gpu: bool, vbmf_weakening: float | None = None) -> dict:
    """Screening of one layer (every method x candidate ratio), factors kept for assembly."""
    from .search.screen import screen_layer

    t0 = time.perf_counter()
    rows = screen_layer(name, module, input_shape, methods, ratios, options=options, device=pick_device(want_gpu),
                        keep_factors=True, vbmf_weakening=vbmf_weakening)
    return {"name": name, "rows": rows, "task_seconds": time.perf_counter() - t0, "node": node_id()}


def sensitivity_task(model_json: str, base_state: dict, dataset_json: str, seed: int, layer: str | None, factors,
                     val_batches: int, bn_batches: int, want_gpu: bool) -> dict:
    """Accuracy on a validation subset with only ``layer`` compressed by ``factors`` (BN
    recalibrated); ``layer=None`` measures the dense model on the same subset."""
    from torch.utils.data import Subset

    t0 = time.perf_counter()
    mspec, dspec, device, train, val, _ = _setup(model_json, dataset_json, seed, want_gpu)
    model = build_model(mspec.name, mspec.num_classes)
    model.load_state_dict(base_state)
    out = {"layer": layer}
    if isinstance(factors, dict):  # {"method", "ratio", "options"}: factorize here (the tolerance bisection)
        dense = model.get_submodule(layer)
        _, f = lowrank.api.factorize_with_factors(dense, factors["method"], "ratio", ratio=factors["ratio"],
                                                  **factors["options"])
        factors = lowrank.factors_to(f, "cpu")
        out.update(factors=factors, rank=factors.rank, rel_error=lowrank.relative_error(dense.weight, factors))
    if layer is not None:
        model, reports = lowrank.apply_factors(model, {layer: factors}, inplace=True)
        out.update(params=reports[0].params_after, macs=reports[0].macs_after)
    sub = Subset(val, range(min(len(val), val_batches * dspec.batch_size)))
    if layer is not None:
        recalibrate_bn(model, loader(train, dspec.batch_size, shuffle=True, seed=seed), bn_batches, device)
    out["acc"] = evaluate(model, loader(sub, dspec.batch_size, shuffle=False), device)["top1"]
    return {**out, "task_seconds": time.perf_counter() - t0, "node": node_id()}


def tune_trial(config: dict, *, model_json: str, base_state: dict, dataset_json: str, finetune_json: str, seed: int,
               want_gpu: bool, allocations: list[dict]) -> None:
    """One Ray Tune trial: the model compressed by ``allocations[config['trial']]`` (layer ->
    factors), BN recalibrated, fine-tuned, reporting validation top-1 after every epoch so that
    ASHA can stop it early. Reports only metrics; the driver logs the trials to MLflow."""
    from ray import tune

    mspec, dspec, device, train, val, input_shape = _setup(model_json, dataset_json, seed, want_gpu)
    fspec = FinetuneSpec.model_validate_json(finetune_json)
    model = build_model(mspec.name, mspec.num_classes)
    model.load_state_dict(base_state)
    new, _ = lowrank.apply_factors(model, allocations[config["trial"]], input_shape=input_shape)
    val_dl = loader(val, dspec.batch_size, shuffle=False)
    train_dl = loader(train, dspec.batch_size, shuffle=True, workers=dspec.workers, seed=seed)
    if fspec.bn_recalibration:
        recalibrate_bn(new, train_dl, fspec.bn_batches, device)
    params, macs = lowrank.count(new, input_shape)

    def report(epoch: int, loss: float) -> None:
        tune.report({"epoch": epoch, "acc": evaluate(new, val_dl, device)["top1"], "loss": loss, "params": params,
                     "macs": macs})

    train_epochs(new, train_dl, epochs=fspec.epochs, lr=fspec.lr, optimizer=fspec.optimizer, device=device,
                 on_epoch=report)


def scratch_task(model_json: str, dataset_json: str, scratch_json: str, seed: int, want_gpu: bool,
                 low_rank: bool) -> dict:
    """Train one model from scratch: dense, or with its convs in the vertical-BN-horizontal
    low-rank form (Tai et al.), which is folded (BN into the vertical conv) before evaluation.
    Both get the same seed, data order and schedule."""
    from lowrank.reparam import fold_bn, to_lowrank_bn

    from .spec import FromScratchSpec

    t_task = time.perf_counter()
    mspec, dspec, device, train, val, input_shape = _setup(model_json, dataset_json, seed, want_gpu)
    fs = FromScratchSpec.model_validate_json(scratch_json)
    model = build_model(mspec.name, mspec.num_classes)
    reports = []
    if low_rank:
        sel = fs.layers
        model, reports = to_lowrank_bn(model, rank=fs.rank, ratio=fs.ratio, init="random", include=sel.include or None,
                                       exclude=sel.exclude or None, skip_first=sel.skip_first, inplace=True)
    val_dl = loader(val, dspec.batch_size, shuffle=False)
    curve = []
    t0 = time.perf_counter()
    losses = train_epochs(model, loader(train, dspec.batch_size, shuffle=True, workers=dspec.workers, seed=seed),
                          epochs=fs.epochs, lr=fs.lr, optimizer=fs.optimizer, device=device,
                          on_epoch=lambda e, loss: curve.append(evaluate(model, val_dl, device)["top1"]))
    train_seconds = time.perf_counter() - t0
    acc = evaluate(model, val_dl, device)
    factors = {}
    if low_rank:
        model, factors = fold_bn(model.cpu().eval(), inplace=True)
        factors = {k: lowrank.factors_to(f, "cpu") for k, f in factors.items()}
        folded = evaluate(model, val_dl, "cpu")
        if abs(folded["top1"] - acc["top1"]) > 1.0 / max(1, len(val)) + 1e-12:  # at most one borderline sample
            raise RuntimeError(f"BN folding changed top-1 from {acc['top1']:.4f} to {folded['top1']:.4f}")
        acc = folded
    params, macs = lowrank.count(model.cpu(), input_shape)
    for r in reports:
        r.params_after = sum(p.numel() for p in model.get_submodule(r.name).parameters())
    return {"state_dict": _cpu_state(model), "acc": acc, "params": params, "macs": macs,
            "latency": _latency(model, input_shape, device), "losses": losses, "curve": curve, "factors": factors,
            "reports": [r.to_dict() for r in reports], "train_seconds": train_seconds, "input_shape": input_shape,
            "device": device, "task_seconds": time.perf_counter() - t_task, "node": node_id()}


def multistage_task(model_json: str, base_state: dict, dataset_json: str, finetune_json: str, seed: int,
                    want_gpu: bool, method: str, rank_json: str, options: dict, layers: dict, schedule: list,
                    stage_epochs: int) -> dict:
    """Compress in stages (MUSCO): at each stage decompose the stage's layers (a layer factorized
    by an earlier stage is first turned back into its exact dense kernel, trained factors
    included), recalibrate BN, fine-tune; the last stage fine-tunes ``finetune.epochs``."""
    import fnmatch

    from lowrank.accounting import layer_input_shapes
    from lowrank.reparam import to_dense
    from lowrank.surgery import _set_submodule

    from .spec import RankSpec

    t_task = time.perf_counter()
    mspec, dspec, device, train, val, input_shape = _setup(model_json, dataset_json, seed, want_gpu)
    fspec = FinetuneSpec.model_validate_json(finetune_json)
    rank_spec = RankSpec.model_validate_json(rank_json)
    model = build_model(mspec.name, mspec.num_classes)
    model.load_state_dict(base_state)
    dense_params, dense_macs = lowrank.count(model, input_shape)
    plan = lowrank.plan_layers(model, method, 1, include=layers["include"] or None, exclude=layers["exclude"] or None,
                               skip_first=layers["skip_first"], pointwise_method=layers["pointwise_method"])
    original = {n: model.get_submodule(n).weight.detach().clone() for n in plan}
    shapes = layer_input_shapes(model, plan, input_shape)
    val_dl = loader(val, dspec.batch_size, shuffle=False)
    train_dl = loader(train, dspec.batch_size, shuffle=True, workers=dspec.workers, seed=seed)
    factors, statuses, history, reports = {}, {}, [], {}
    for s, (patterns, ratio) in enumerate(schedule):
        t_stage = time.perf_counter()
        names = [n for n in plan if patterns is None or any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        model.cpu()
        for n in names:
            meth = plan[n][0]
            cur = model.get_submodule(n)
            dense = to_dense(cur) if isinstance(cur, lowrank.FactorizedConv2d) else cur
            if ratio is not None:
                rank, strat = "ratio", {"ratio": ratio, "target": rank_spec.target}
            else:
                rank, strat = rank_spec.for_layer(n)
            opts = {**strat, **(options if meth == method else {})}
            if rank == "ratio" and len(shapes[n]) == 4:
                opts["input_size"] = tuple(shapes[n][2:])  # what a MAC target counts with
            t0 = time.perf_counter()
            try:
                new, f = lowrank.api.factorize_with_factors(dense, meth, rank, **opts)
            except RankTooLargeError as e:  # the layer keeps what it has
                statuses[n] = {"name": n, "method": meth, "status": "skipped", "reason": str(e), "seconds": 0.0}
                continue
            _set_submodule(model, n, new)
            factors[n] = lowrank.factors_to(f, "cpu")
            statuses[n] = {"name": n, "method": meth, "status": "ok", "reason": "", "rank": f.rank,
                           "seconds": time.perf_counter() - t0,
                           "rel_error": lowrank.relative_error(dense.weight, f)}
            reports[n] = {"name": n, "method": meth, "rank": list(f.rank) if isinstance(f.rank, tuple) else f.rank,
                          "rel_error": lowrank.relative_error(original[n], f), "params_before": original[n].numel(),
                          "params_after": sum(p.numel() for p in new.parameters()), "macs_before": None,
                          "macs_after": None, "seconds": statuses[n]["seconds"],
                          "diagnostics": dict(getattr(f, "diagnostics", {}) or {})}
        acc_post = evaluate(model, val_dl, device)
        acc_bn = None
        if fspec.bn_recalibration and recalibrate_bn(model, train_dl, fspec.bn_batches, device):
            acc_bn = evaluate(model, val_dl, device)
        last = s == len(schedule) - 1
        epochs = fspec.epochs if last else stage_epochs
        losses = train_epochs(model, train_dl, epochs=epochs, lr=fspec.lr, optimizer=fspec.optimizer, device=device)
        acc_ft = evaluate(model, val_dl, device)
        params, macs = lowrank.count(model.cpu(), input_shape)
        history.append({"stage": s + 1, "layers": len(names), "ratio": ratio, "patterns": patterns,
                        "params": params, "macs": macs, "compression_ratio": dense_params / params,
                        "mac_ratio": dense_macs / macs, "acc_post": acc_post["top1"],
                        "acc_bn": None if acc_bn is None else acc_bn["top1"], "acc_ft": acc_ft["top1"],
                        "epochs": epochs, "losses": losses, "seconds": time.perf_counter() - t_stage})
    # the last stage's acc_post/acc_bn/acc_ft, losses, params and MACs are the configuration's
    return {"state_dict": _cpu_state(model), "acc_post": acc_post, "acc_bn": acc_bn, "acc_ft": acc_ft,
            "params": params, "macs": macs, "latency": _latency(model, input_shape, device),
            "reports": list(reports.values()), "ft_losses": losses,
            "ft_seconds": sum(h["seconds"] for h in history), "device": device, "factors": factors,
            "stages": history, "task_seconds": time.perf_counter() - t_task, "node": node_id(),
            "layer_status": list(statuses.values())}
