"""The plan: the only place that translates a sweep spec into ``lowrank`` terms.

``plan_sweep(spec)`` returns one frozen ``Config`` per configuration the sweep registers, each with
its kind (``oneshot``, ``staged``, ``scratch``, ``search``), its model, the per-layer
``lowrank.LayerPlan``s (rank rules with each layer's own input size, typed method options),
its ``config_hash`` and the MLflow params derived from it. Executors read the plan, never the
spec's rank or options again.

Config hashes hash what determines a configuration's result, so that a registry filled by an
earlier version is not re-run (``tests/fixtures/config_hashes.json``), except where the result
itself changed: ``PREPROCESSING`` counts the changes of what models are fed (2: per-model
preprocessing, the data's own statistics, training augmentation).
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field

import lowrank

from . import preprocess
from .models import build
from .spec import (FromScratchSpec, LayerSelection, ModelSpec, RankSpec, SearchSpec, SweepSpec, file_digest,
                   stable_hash)


@dataclass(frozen=True)
class ModelPlan:
    """One model of the sweep: its spec, the pre-training cache key and the input shape."""

    spec: ModelSpec
    key: str
    prep: preprocess.Preprocess  # what the model is fed (mean/std None: the data's, filled in where loaded)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.prep.input_shape

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class Stage:
    """One stage of a staged configuration: the layers it (re)compresses and how."""

    patterns: tuple[str, ...] | None  # None: every selected layer
    ratio: float | None  # None: the rank spec
    layers: tuple[lowrank.LayerPlan, ...]


@dataclass(frozen=True)
class Config:
    kind: str  # oneshot | staged | scratch | search
    sweep: str
    model: ModelPlan
    method: str  # what the registered version is called by: tucker2, tucker2-2stage, search-budget, ...
    registered_name: str
    config_hash: str
    seed: int
    params: dict = field(default_factory=dict)  # MLflow params
    layers: tuple[lowrank.LayerPlan, ...] = ()  # oneshot
    stages: tuple[Stage, ...] = ()  # staged
    stage_epochs: int = 0
    strategy: str | None = None  # search
    methods: tuple[str, ...] = ()  # search: the methods that compete per layer
    options: dict = field(default_factory=dict)  # search: method -> options
    candidates: tuple[str, ...] = ()  # search: the layers screened
    search: SearchSpec | None = None  # search: the strategies' settings
    multiple_of: int = 1  # search: every screened rank rounded to a multiple of this (rank.multiple_of)
    scratch: FromScratchSpec | None = None

    @property
    def label(self) -> str:
        return f"{self.model.name}/{self.method}"


PREPROCESSING = 2


def model_key(spec: SweepSpec, m: ModelSpec) -> str:
    """Content hash of what determines a model's trained weights (the pre-training cache key)."""
    return stable_hash({"model": m.name, "num_classes": m.num_classes, "dataset": spec.dataset.model_dump(mode="json"),
                        "pretrain": spec.pretrain.model_dump(mode="json", exclude={"cache_dir"}),
                        "checkpoint": file_digest(m.checkpoint) if m.checkpoint else None, "seed": spec.seed,
                        **_source(spec, m)})


def _source(spec: SweepSpec, m: ModelSpec) -> dict:
    """Where a model comes from beyond its name and how it is judged (each only when set), and the
    preprocessing version."""
    return {**({"factory": m.factory, "kwargs": m.kwargs} if m.factory else {}),
            **({"weights": m.weights} if m.weights else {}), **({"pretrained": True} if m.pretrained else {}),
            **({"channels": m.channels} if m.channels else {}),
            **({"evaluation": spec.evaluation} if spec.evaluation != "accuracy" else {}),
            "preprocessing": PREPROCESSING}


def rank_rule(rank: RankSpec, layer: str, input_size: tuple[int, int] | None) -> lowrank.RankRule:
    """The spec's rank for one layer as a ``lowrank.RankRule`` (``input_size``: the layer's own)."""
    if rank.strategy == "fixed":
        return lowrank.RankRule.of(rank.per_layer.get(layer, rank.rank))
    if rank.strategy == "ratio":
        return lowrank.RankRule("ratio", ratio=rank.ratio, target=rank.target, input_size=input_size,
                                multiple_of=rank.multiple_of)
    if rank.strategy == "energy":
        return lowrank.RankRule("energy", energy=rank.energy, min_rank=rank.min_rank, multiple_of=rank.multiple_of)
    return lowrank.RankRule("vbmf", weakening=rank.weakening, min_rank=rank.min_rank, zero=rank.zero,
                            multiple_of=rank.multiple_of)


def select(model, method: str, sel: LayerSelection) -> dict[str, str]:
    """``{layer: method}`` the selection takes for ``method`` (pointwise layers by their own)."""
    return lowrank.select_layers(model, method, include=sel.include or None, exclude=sel.exclude or None,
                                 skip_first=sel.skip_first, pointwise_method=sel.pointwise_method)


def _layer_plans(names: dict[str, str], method: str, rank: RankSpec, options: dict, sizes: dict,
                 ratio: float | None = None) -> tuple[lowrank.LayerPlan, ...]:
    plans = []
    for name, meth in names.items():
        rule = (lowrank.RankRule("ratio", ratio=ratio, target=rank.target, input_size=sizes.get(name),
                                 multiple_of=rank.multiple_of)
                if ratio is not None else rank_rule(rank, name, sizes.get(name)))
        plans.append(lowrank.LayerPlan(name, meth, rule, dict(options) if meth == method else {}))
    return tuple(plans)


def _input_sizes(model, names, input_shape) -> dict[str, tuple[int, int]]:
    """Each conv layer's own input (H, W): what a MAC target counts with."""
    shapes = lowrank.layer_input_shapes(model, list(names), input_shape)
    return {n: tuple(s[2:]) for n, s in shapes.items() if len(s) == 4}


def plan_sweep(spec: SweepSpec) -> list[Config]:
    configs: list[Config] = []
    for m in spec.models:
        model = build(m)
        prep = preprocess.for_model(spec.dataset, m, model, agreement=spec.evaluation == "agreement")
        mp = ModelPlan(m, model_key(spec, m), prep)
        common = dict(sweep=spec.name, model=mp, registered_name=spec.mlflow.registered_name(m.name), seed=spec.seed)
        if spec.from_scratch is not None:
            configs.append(_scratch(spec, m, common))
        if spec.compression is None:
            continue
        sel = m.layers or spec.compression.layers
        if spec.compression.search is not None:
            configs += _search(spec, mp, model, sel, common)
        else:
            configs += _compress(spec, mp, model, sel, common)
    return configs


def _scratch(spec: SweepSpec, m: ModelSpec, common: dict) -> Config:
    fs = spec.from_scratch
    content = {"model": m.name, "num_classes": m.num_classes, "dataset": spec.dataset.model_dump(mode="json"),
               "from_scratch": fs.model_dump(mode="json"), "seed": spec.seed, **_source(spec, m)}
    params = {"rank_strategy": "from_scratch", **{f"from_scratch.{k}": v for k, v in fs.model_dump(mode="json").items() if v is not None and k != "layers"}}
    return Config(kind="scratch", method="scratch-lowrank", config_hash=stable_hash(content), scratch=fs,
                  params=params, **common)


def _search(spec: SweepSpec, mp: ModelPlan, model, sel: LayerSelection, common: dict) -> list[Config]:
    comp, search = spec.compression, spec.compression.search
    layers = sel.model_dump(mode="json")
    names: dict[str, None] = {}
    for method in comp.methods:
        names.update(dict.fromkeys(select(model, method, sel)))
    out = []
    for strategy in search.strategies:
        content = {"model_key": mp.key, "search": search.content(strategy), "strategy": strategy,
                   "methods": comp.methods, "layers": layers, "options": comp.options,
                   "finetune": spec.finetune.content(),
                   **({"multiple_of": comp.rank.multiple_of} if comp.rank.multiple_of != 1 else {})}
        params = {"strategy": strategy, "rank_strategy": "search",
                  **{f"search.{k}": v for k, v in search.content(strategy).items() if not isinstance(v, (list, dict))},
                  "search.methods": ",".join(comp.methods), "finetune_epochs": spec.finetune.epochs,
                  **({"rank.multiple_of": comp.rank.multiple_of} if comp.rank.multiple_of != 1 else {})}
        out.append(Config(kind="search", method=f"search-{strategy}", config_hash=stable_hash(content), params=params,
                          strategy=strategy, methods=tuple(comp.methods), options=dict(comp.options),
                          candidates=tuple(names), search=search, multiple_of=comp.rank.multiple_of, **common))
    return out


def _compress(spec: SweepSpec, mp: ModelPlan, model, sel: LayerSelection, common: dict) -> list[Config]:
    comp = spec.compression
    rank_dump = comp.rank.content()
    out = []
    for method in comp.methods:
        options = comp.options.get(method, {})
        names = select(model, method, sel)
        sizes = _input_sizes(model, names, mp.input_shape)
        content = {"model_key": mp.key, "method": method, "rank": rank_dump, "layers": sel.model_dump(mode="json"),
                   "options": options, "finetune": spec.finetune.content()}
        params = {"rank_strategy": comp.rank.strategy,
                  **{f"rank.{k}": v for k, v in rank_dump.items() if v not in (None, {}, [])},
                  **{f"option.{k}": v for k, v in options.items()}, "finetune_epochs": spec.finetune.epochs}
        if comp.stages is None:
            out.append(Config(kind="oneshot", method=method, config_hash=stable_hash(content), params=params,
                              layers=_layer_plans(names, method, comp.rank, options, sizes), **common))
            continue
        content["stages"] = comp.stages.model_dump(mode="json")
        stages = tuple(Stage(None if pats is None else tuple(pats), ratio, _layer_plans(
            {n: mm for n, mm in names.items() if pats is None or any(fnmatch.fnmatchcase(n, p) for p in pats)},
            method, comp.rank, options, sizes, ratio)) for pats, ratio in comp.stages.schedule(comp.rank))
        params.update(base_method=method, stages=len(stages), stage_epochs=comp.stages.epochs,
                      stage_schedule=json.dumps([[list(s.patterns) if s.patterns else None, s.ratio]
                                                 for s in stages]))
        out.append(Config(kind="staged", method=f"{method}-{len(stages)}stage", config_hash=stable_hash(content),
                          params=params, stages=stages, stage_epochs=comp.stages.epochs, **common))
    return out


def mlflow_params(cfg: Config) -> dict:
    """What a configuration's run logs as params: identity, then the plan's own settings."""
    return {"sweep": cfg.sweep, "model": cfg.model.name, "method": cfg.method, "registered_name": cfg.registered_name,
            "config_hash": cfg.config_hash, "seed": cfg.seed, **cfg.params}
