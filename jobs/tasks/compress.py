"""One-shot compression: a model's baseline, one layer's decomposition, and the evaluation of the
assembled model (post), BN recalibration and fine-tuning (ft)."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

import lowrank

from ..models import load_checkpoint
from ..results import Baseline, EvalResult, LayerResult
from ..spec import FinetuneSpec, PretrainSpec
from ..train import evaluate, recalibrate_bn, train_epochs
from .env import TaskEnv, cpu_state, node_id


def baseline_task(env: TaskEnv, pretrain: PretrainSpec, cache_key: str) -> Baseline:
    """Trained weights of one model (checkpoint, cache, or a few epochs of training), its
    accuracy, size and latency."""
    t_task = time.perf_counter()
    env.begin()
    model = env.build()
    t0 = time.perf_counter()
    cache = Path(pretrain.cache_dir) / f"{env.model.name}-{cache_key}.pt"
    if env.model.checkpoint is not None:
        load_checkpoint(model, env.model.checkpoint)
        source = "checkpoint"
    elif env.model.trained:  # pretrained weights (torchvision's, a factory's own): used as they are
        source = "weights"
    elif cache.is_file():
        load_checkpoint(model, cache)
        source = "cache"
    else:
        train_epochs(model, env.train_loader(), epochs=pretrain.epochs, lr=pretrain.lr, optimizer=pretrain.optimizer,
                     device=env.device)
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".tmp")
        os.close(fd)
        torch.save(cpu_state(model), tmp)
        os.replace(tmp, cache)  # atomic: a concurrent sweep never reads half a file
        source = "trained"
    train_seconds = time.perf_counter() - t0
    model.to(env.device)
    if env.agreement:  # the dense model against itself: agreement 1, KL 0 (what the others are measured by)
        env.teach(model)
    acc = evaluate(model, env.val_loader(), env.device)
    params, macs = lowrank.count(model.cpu(), env.input_shape)
    return Baseline(state_dict=cpu_state(model), acc=acc, params=params, macs=macs,
                    latency=env.latency(model), input_shape=env.input_shape, source=source,
                    preprocess=env.preprocess.describe(),
                    train_seconds=train_seconds, device=env.device, task_seconds=time.perf_counter() - t_task,
                    node=node_id())


def decompose_task(plan: lowrank.LayerPlan, module: torch.nn.Module, gpu: bool) -> LayerResult:
    """One layer's decomposition by its plan. Failures are data (status + reason), not raises."""
    t0 = time.perf_counter()
    try:
        if gpu and lowrank.get_method(plan.method).gpu and torch.cuda.is_available():
            plan = lowrank.LayerPlan(plan.name, plan.method, plan.rank, {**plan.options, "device": "cuda"})
        _, factors = plan.factorize(module)
        factors = lowrank.factors_to(factors, "cpu")
    except lowrank.LeftDense as e:
        return LayerResult.failure(plan.name, plan.method, e, skipped=True, seconds=time.perf_counter() - t0,
                                   node=node_id())
    except Exception as e:  # noqa: BLE001 - a failed layer is recorded, the sweep goes on
        return LayerResult.failure(plan.name, plan.method, e, seconds=time.perf_counter() - t0, node=node_id())
    return LayerResult(plan.name, plan.method, factors=factors, rank=factors.rank,
                       rel_error=lowrank.relative_error(module.weight, factors),
                       diagnostics=dict(getattr(factors, "diagnostics", {}) or {}),
                       seconds=time.perf_counter() - t0, node=node_id())


def evaluate_task(env: TaskEnv, base_state: dict, finetune: FinetuneSpec, *layers: LayerResult) -> EvalResult:
    """Assemble the compressed model from the layers' factors, evaluate it (post), recalibrate
    BN, fine-tune, evaluate (ft)."""
    t_task = time.perf_counter()
    env.begin()
    model = env.dense(base_state)
    new, factors, reports, statuses = assemble(model, layers, env.input_shape)
    device, val_dl, train_dl = env.device, env.val_loader(), env.train_loader()
    t0 = time.perf_counter()
    acc_post = evaluate(new, val_dl, device)
    acc_bn = None
    if finetune.bn_recalibration and recalibrate_bn(new, env.bn_loader(), finetune.bn_batches, device):
        acc_bn = evaluate(new, val_dl, device)
    curve = []  # the figures after each epoch but the last (the last is acc_ft)
    each = (lambda e, _loss: curve.append(evaluate(new, val_dl, device)) if e < finetune.epochs else None) \
        if finetune.eval_each_epoch else None
    losses = train_epochs(new, train_dl, epochs=finetune.epochs, lr=finetune.lr, optimizer=finetune.optimizer,
                          device=device, on_epoch=each)
    acc_ft = evaluate(new, val_dl, device)
    ft_seconds = time.perf_counter() - t0
    params, macs = lowrank.count(new.cpu(), env.input_shape)
    return EvalResult(state_dict=cpu_state(new), factors=factors, acc_post=acc_post, acc_bn=acc_bn, acc_ft=acc_ft,
                      params=params, macs=macs, latency=env.latency(new),
                      reports=[r.to_dict() for r in reports], layer_status=statuses,
                      ft_losses=losses, ft_seconds=ft_seconds, device=device,
                      curves=ft_curves(curve + [acc_ft]) if finetune.eval_each_epoch and finetune.epochs else None,
                      task_seconds=time.perf_counter() - t_task, node=node_id())


def assemble(model, layers: tuple, input_shape) -> tuple:
    """``(compressed model, factors, reports, status rows)``: the layers' factors put in. A layer
    that the model cannot take after all (its own forward not reproduced, or a parent reading its
    weight) stays dense: it leaves the factors and the reports, and its status row says why."""
    factors = {r.name: r.factors for r in layers if r.status == "ok"}
    new, reports = lowrank.apply_factors(model, factors, input_shape=input_shape)
    left = {r.name: r.reason for r in reports if r.status != "ok"}
    statuses = [r.status_row() for r in layers]
    for row in statuses:
        if row["name"] in left:
            row.update(status="skipped", reason=left[row["name"]])
    return (new, {n: f for n, f in factors.items() if n not in left},
            [r for r in reports if r.status == "ok"], statuses)


def ft_curves(figures: list[dict]) -> dict:
    """Per-epoch fine-tuning figures as metric curves: ``acc_ft_epoch`` (``agree_ft_epoch`` and
    ``kl_ft_epoch`` under evaluation by agreement), one value per epoch."""
    q = "agree" if "kl" in figures[0] else "acc"
    out = {f"{q}_ft_epoch": [f["top1"] for f in figures]}
    if q == "agree":
        out["kl_ft_epoch"] = [f["kl"] for f in figures]
    return out
