"""Checks ``python -m jobs run`` makes before starting Ray or touching MLflow, so that bad input
costs a one-line message (exit 2), never a half-run sweep."""
from __future__ import annotations

import os

import torch

import lowrank

from .data import load_dataset
from .models import build_model, load_checkpoint
from .plan import Config, plan_sweep, select
from .spec import SpecError, SweepSpec, check_local_paths
from .store import check_reachable


def preflight(spec: SweepSpec, source: str = "spec") -> list[Config]:
    """Everything that can be checked before Ray or MLflow start; returns the sweep's plan (the
    driver runs it instead of planning again)."""
    check_local_paths(spec, source)
    search = spec.compression.search if spec.compression else None
    if search is not None and search.latency_device == "cuda":
        if not os.environ.get("RAY_ADDRESS") and not torch.cuda.is_available():
            raise SpecError(f"{source}: compression.search.latency_device: 'cuda' requested but this machine has "
                            f"no CUDA device; accepted here: 'cpu'")
    check_reachable(spec.mlflow.tracking_uri)
    load_dataset(spec.dataset, spec.seed)  # DataError: missing, empty or unreadable data
    return check_models(spec, source)


def check_models(spec: SweepSpec, source: str = "spec") -> list[Config]:
    """What only the models can tell (no Ray, no MLflow, no data): checkpoints that do not fit,
    fixed ranks that do not fit a layer, layer patterns of stages that match nothing,
    from-scratch ranks and selections."""
    comp = spec.compression
    models = {}
    for m in spec.models:
        model = models[m.name] = build_model(m.name, m.num_classes)
        if m.checkpoint is not None:
            load_checkpoint(model, m.checkpoint)  # CheckpointError: truncated, corrupted, wrong architecture
        if spec.from_scratch is not None:
            _check_scratch(spec.from_scratch, model, m.name, source)
    if comp is not None and comp.rank.per_layer:
        seen = {n for model in models.values() for n, _ in model.named_modules()}
        unknown = sorted(set(comp.rank.per_layer) - seen)
        if unknown:
            raise SpecError(f"{source}: compression.rank.per_layer.{unknown[0]}: no layer of that name in "
                            f"{', '.join(m.name for m in spec.models)}")
    configs = plan_sweep(spec)
    for cfg in configs:
        model = models[cfg.model.name]
        for j, stage in enumerate(cfg.stages):
            if stage.patterns is not None and not stage.layers:
                names = list(select(model, cfg.params["base_method"], cfg.model.spec.layers or comp.layers))
                raise SpecError(f"{source}: compression.stages.layers.{j}: {list(stage.patterns)} matches none of the "
                                f"{len(names)} {cfg.params['base_method']} layers of {cfg.model.name} "
                                f"({', '.join(names[:5])}{' ...' if len(names) > 5 else ''})")
        for lp in cfg.layers + tuple(lp for st in cfg.stages for lp in st.layers):
            if lp.rank.strategy != "fixed":
                continue
            try:
                lp.rank.resolve(model.get_submodule(lp.name), lp.method,
                                allow_larger=bool(lp.options.get("allow_larger", False)))
            except lowrank.LowRankError as e:
                where = f"per_layer.{lp.name}" if lp.name in comp.rank.per_layer else "rank"
                raise SpecError(f"{source}: compression.rank.{where}: {cfg.model.name} {lp.name} ({lp.method}): "
                                f"{e}") from None
    return configs


def _check_scratch(fs, model, model_name: str, source: str) -> None:
    sel = fs.layers
    names = lowrank.select_layers(model, "spatial-svd", include=sel.include or None, exclude=sel.exclude or None,
                                  skip_first=sel.skip_first)
    if not names:
        raise SpecError(f"{source}: from_scratch.layers: no conv with a spatial kernel of {model_name} is selected")
    if fs.rank is None:
        return
    for name in names:
        try:
            lowrank.RankRule.of(fs.rank).resolve(model.get_submodule(name), "spatial-svd")
        except lowrank.LowRankError as e:
            raise SpecError(f"{source}: from_scratch.rank: {model_name} {name}: {e}") from None
