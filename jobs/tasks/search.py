"""The search's tasks: screening one layer, probing one option's accuracy drop, and one Ray Tune
trial (a whole configuration fine-tuned, reporting after every epoch)."""
from __future__ import annotations

import time

import torch

import lowrank

from ..search import calibrate
from ..search.screen import screen_layer
from ..spec import FinetuneSpec
from ..train import evaluate, recalibrate_bn, train_epochs
from .env import TaskEnv, node_id


def screen_task(name: str, module: torch.nn.Module, input_shape, methods: tuple, ratios: list, options: dict,
                gpu: bool, vbmf_weakening: float | None = None, runtime: str = "torch", multiple_of: int = 1) -> dict:
    """Screening of one layer (every method x candidate ratio), factors kept for assembly."""
    t0 = time.perf_counter()
    rows = screen_layer(name, module, input_shape, methods, ratios, options=options,
                        device="cuda" if gpu and torch.cuda.is_available() else "cpu", keep_factors=True,
                        vbmf_weakening=vbmf_weakening, runtime=runtime, multiple_of=multiple_of)
    return {"name": name, "rows": rows, "task_seconds": time.perf_counter() - t0, "node": node_id()}


def calibrate_task(model: torch.nn.Module, names: list, input_shape: tuple, runtime: str, gpu: bool,
                   options: dict | None = None) -> dict:
    """The latency search's calibration (``search.calibrate.measure``): the dense model and its copy
    with the searched layers stubbed, timed interleaved at ``input_shape`` (C, H, W), then every
    searched layer and its ``options`` (layer -> factors) alone, interleaved."""
    t0 = time.perf_counter()
    out = calibrate.measure(model, names, input_shape, runtime=runtime, options=options,
                            device="cuda" if gpu and torch.cuda.is_available() else "cpu")
    return {**out, "task_seconds": time.perf_counter() - t0, "node": node_id()}


def sensitivity_task(env: TaskEnv, base_state: dict, layer: str | None, factors, val_batches: int,
                     bn_batches: int) -> dict:
    """Accuracy on a validation subset with only ``layer`` compressed by ``factors`` (BN
    recalibrated); ``layer=None`` measures the dense model on the same subset. ``factors`` may
    be a ``LayerPlan`` instead: the layer is factorized here (the tolerance bisection)."""
    t0 = time.perf_counter()
    env.begin()
    model = env.dense(base_state)
    out = {"layer": layer}
    if isinstance(factors, lowrank.LayerPlan):
        dense = model.get_submodule(layer)
        _, f = factors.factorize(dense)
        factors = lowrank.factors_to(f, "cpu")
        out.update(factors=factors, rank=factors.rank, rel_error=lowrank.relative_error(dense.weight, factors))
    if layer is not None:
        model, reports = lowrank.apply_factors(model, {layer: factors}, input_shape=env.input_shape, inplace=True)
        out.update(params=reports[0].params_after, macs=reports[0].macs_after)
        recalibrate_bn(model, env.bn_loader(workers=False), bn_batches, env.device)
    out["acc"] = evaluate(model, env.val_loader(val_batches * env.dataset.batch_size), env.device)["top1"]
    return {**out, "task_seconds": time.perf_counter() - t0, "node": node_id()}


def tune_trial(config: dict, *, env: TaskEnv, base_state: dict, finetune: FinetuneSpec, allocations: list[dict]
               ) -> None:
    """One Ray Tune trial: the model compressed by ``allocations[config['trial']]`` (layer ->
    factors), BN recalibrated, fine-tuned, reporting validation top-1 after every epoch so that
    ASHA can stop it early. Reports only metrics; the driver logs the trials to MLflow."""
    from ray import tune  # deferred: only Tune's trial processes need ray.tune

    env.begin()
    new, _ = lowrank.apply_factors(env.dense(base_state), allocations[config["trial"]], input_shape=env.input_shape)
    device, val_dl, train_dl = env.device, env.val_loader(), env.train_loader()
    if finetune.bn_recalibration:
        recalibrate_bn(new, env.bn_loader(), finetune.bn_batches, device)
    params, macs = lowrank.count(new, env.input_shape)

    def report(epoch: int, loss: float) -> None:
        tune.report({"epoch": epoch, "acc": evaluate(new, val_dl, device)["top1"], "loss": loss, "params": params,
                     "macs": macs, "threads": torch.get_num_threads()})  # the trial's CPUs (with_task_threads)

    train_epochs(new, train_dl, epochs=finetune.epochs, lr=finetune.lr, optimizer=finetune.optimizer, device=device,
                 on_epoch=report)
