"""Configurations that run as one task each: multi-stage compression (MUSCO) and low-rank
training from scratch (Tai et al.)."""
from __future__ import annotations

import time

import lowrank
from lowrank.reparam import fold_bn, to_dense, to_lowrank_bn

from ..results import EvalResult, LayerResult
from ..spec import FinetuneSpec, FromScratchSpec
from ..train import evaluate, recalibrate_bn, train_epochs
from .env import TaskEnv, cpu_state, node_id


def multistage_task(env: TaskEnv, base_state: dict, finetune: FinetuneSpec, stages: tuple, stage_epochs: int
                    ) -> EvalResult:
    """Compress in stages (``plan.Stage``s): at each stage decompose the stage's layers by their
    plans (a layer factorized by an earlier stage is first turned back into its exact dense
    kernel, trained factors included), recalibrate BN, fine-tune; the last stage fine-tunes
    ``finetune.epochs``."""
    t_task = time.perf_counter()
    env.begin()
    model = env.dense(base_state)
    dense_params, dense_macs = lowrank.count(model, env.input_shape)
    names = list(dict.fromkeys(lp.name for st in stages for lp in st.layers))
    original = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    in_shapes = lowrank.layer_input_shapes(model, names, env.input_shape)
    own = {}  # layers whose own forward a plain factorized layer would not reproduce: left dense
    for n in names:
        prefix, why = lowrank.replacement_prefix(model.get_submodule(n), in_shapes.get(n))
        if why or prefix is not None:
            own[n] = why or "multi-stage compression leaves layers that need their own padding stage dense"
    device, val_dl, train_dl = env.device, env.val_loader(), env.train_loader()
    factors, statuses, history, reports = {}, {}, [], {}
    for s, stage in enumerate(stages):
        t_stage = time.perf_counter()
        model.cpu()
        for plan in stage.layers:
            n, cur = plan.name, model.get_submodule(plan.name)
            dense = to_dense(cur) if isinstance(cur, lowrank.FactorizedConv2d) else cur
            t0 = time.perf_counter()
            if n in own:
                statuses[n] = LayerResult(n, plan.method, status="skipped", reason=own[n])
                continue
            try:
                new, f = plan.factorize(dense)
            except lowrank.LeftDense as e:  # the layer keeps what it has
                statuses[n] = LayerResult.failure(n, plan.method, e, skipped=True)
                continue
            lowrank.replace_submodule(model, n, new)
            why = lowrank.model_fails(model, env.input_shape)
            if why:  # a parent reads the layer's weight itself: it keeps what it had
                lowrank.replace_submodule(model, n, cur)
                statuses[n] = LayerResult(n, plan.method, status="skipped",
                                          reason=f"the model fails with this layer factorized ({why}): left dense")
                continue
            factors[n] = lowrank.factors_to(f, "cpu")
            statuses[n] = LayerResult(n, plan.method, rank=f.rank, seconds=time.perf_counter() - t0,
                                      rel_error=lowrank.relative_error(dense.weight, f))
            reports[n] = {"name": n, "method": plan.method, "rank": list(f.rank) if isinstance(f.rank, tuple) else f.rank,
                          "rel_error": lowrank.relative_error(original[n], f), "params_before": original[n].numel(),
                          "params_after": sum(p.numel() for p in new.parameters()), "macs_before": None,
                          "macs_after": None, "seconds": statuses[n].seconds,
                          "diagnostics": dict(getattr(f, "diagnostics", {}) or {})}
        acc_post = evaluate(model, val_dl, device)
        acc_bn = None
        if finetune.bn_recalibration and recalibrate_bn(model, env.bn_loader(), finetune.bn_batches, device):
            acc_bn = evaluate(model, val_dl, device)
        epochs = finetune.epochs if s == len(stages) - 1 else stage_epochs
        losses = train_epochs(model, train_dl, epochs=epochs, lr=finetune.lr, optimizer=finetune.optimizer,
                              device=device)
        acc_ft = evaluate(model, val_dl, device)
        params, macs = lowrank.count(model.cpu(), env.input_shape)
        history.append({"stage": s + 1, "layers": len(stage.layers), "ratio": stage.ratio,
                        "patterns": None if stage.patterns is None else list(stage.patterns),
                        "params": params, "macs": macs, "compression_ratio": dense_params / params,
                        "mac_ratio": dense_macs / macs, "acc_post": acc_post["top1"],
                        "acc_bn": None if acc_bn is None else acc_bn["top1"], "acc_ft": acc_ft["top1"],
                        "epochs": epochs, "losses": losses, "seconds": time.perf_counter() - t_stage})
    # the last stage's acc_post/acc_bn/acc_ft, losses, params and MACs are the configuration's
    return EvalResult(state_dict=cpu_state(model), factors=factors, acc_post=acc_post, acc_bn=acc_bn, acc_ft=acc_ft,
                      params=params, macs=macs, latency=env.latency(model),
                      reports=list(reports.values()), layer_status=[r.status_row() for r in statuses.values()],
                      ft_losses=losses, ft_seconds=sum(h["seconds"] for h in history), device=device,
                      stages=history, task_seconds=time.perf_counter() - t_task, node=node_id())


def scratch_task(env: TaskEnv, fs: FromScratchSpec, low_rank: bool) -> dict:
    """Train one model from scratch: dense, or with its convs in the vertical-BN-horizontal
    low-rank form (Tai et al.), which is folded (BN into the vertical conv) before evaluation.
    Both get the same seed, data order and schedule."""
    t_task = time.perf_counter()
    env.begin()
    model = env.build()
    reports = []
    if low_rank:
        sel = fs.layers
        model, reports = to_lowrank_bn(model, rank=fs.rank, ratio=fs.ratio, init="random", include=sel.include or None,
                                       exclude=sel.exclude or None, skip_first=sel.skip_first, inplace=True)
    device, val_dl = env.device, env.val_loader()
    curve = []
    t0 = time.perf_counter()
    losses = train_epochs(model, env.train_loader(), epochs=fs.epochs, lr=fs.lr, optimizer=fs.optimizer,
                          device=device, on_epoch=lambda e, loss: curve.append(evaluate(model, val_dl, device)["top1"]))
    train_seconds = time.perf_counter() - t0
    acc = evaluate(model, val_dl, device)
    factors = {}
    if low_rank:
        model, factors = fold_bn(model.cpu().eval(), inplace=True)
        factors = {k: lowrank.factors_to(f, "cpu") for k, f in factors.items()}
        folded = evaluate(model, val_dl, "cpu")
        if abs(folded["top1"] - acc["top1"]) > 1.0 / max(1, len(env.data[1])) + 1e-12:  # one borderline sample
            raise RuntimeError(f"BN folding changed top-1 from {acc['top1']:.4f} to {folded['top1']:.4f}")
        acc = folded
    params, macs = lowrank.count(model.cpu(), env.input_shape)
    for r in reports:
        r.params_after = sum(p.numel() for p in model.get_submodule(r.name).parameters())
    return {"state_dict": cpu_state(model), "acc": acc, "params": params, "macs": macs,
            "latency": env.latency(model), "losses": losses, "curve": curve, "factors": factors,
            "reports": [r.to_dict() for r in reports], "train_seconds": train_seconds,
            "input_shape": env.input_shape, "device": device, "task_seconds": time.perf_counter() - t_task,
            "node": node_id()}


def scratch_result(dense: dict, low: dict) -> tuple[dict, EvalResult]:
    """The dense model is the reference (``acc_pre``, dense params/MACs/latency); the low-rank
    model trained from scratch is both ``acc_post`` and ``acc_ft`` (there is no fine-tuning)."""
    base = {"acc": dense["acc"], "params": dense["params"], "macs": dense["macs"], "latency": dense["latency"],
            "input_shape": dense["input_shape"], "source": "scratch"}
    result = EvalResult(
        state_dict=low["state_dict"], factors=low["factors"], acc_post=low["acc"], acc_ft=low["acc"],
        params=low["params"], macs=low["macs"], latency=low["latency"], reports=low["reports"],
        layer_status=[LayerResult(r["name"], r["method"]).status_row() for r in low["reports"]],
        ft_losses=low["losses"], ft_seconds=low["train_seconds"], device=low["device"], node=low["node"],
        curves={"acc_dense": dense["curve"], "acc_lowrank": low["curve"], "loss_dense": dense["losses"],
                "loss_lowrank": low["losses"]})
    return base, result
