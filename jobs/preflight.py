"""Checks ``python -m jobs run`` makes before starting Ray or touching MLflow, so that bad input
costs a one-line message (exit 2), never a half-run sweep."""
from __future__ import annotations

import os

import torch

import lowrank

from . import preprocess
from .data import check_sample, load_dataset
from .models import build, load_checkpoint
from .plan import Config, plan_sweep, select
from .spec import SpecError, SweepSpec, check_local_paths
from .store import check_reachable, check_tracking_uri


def preflight(spec: SweepSpec, source: str = "spec") -> list[Config]:
    """Everything that can be checked before Ray or MLflow start; returns the sweep's plan (the
    driver runs it instead of planning again)."""
    check_local_paths(spec, source)
    search = spec.compression.search if spec.compression else None
    if search is not None and search.latency_device == "cuda":
        if not os.environ.get("RAY_ADDRESS") and not torch.cuda.is_available():
            raise SpecError(f"{source}: compression.search.latency_device: 'cuda' requested but this machine has "
                            f"no CUDA device; accepted here: 'cpu'")
    check_tracking_uri(spec.mlflow.tracking_uri)  # SpecError: a scheme MLflow cannot use, a folder that cannot be
    check_reachable(spec.mlflow.tracking_uri)     # TrackingUnavailableError / TrackingAuthError: server away, refused
    train, _, classes = load_dataset(spec.dataset, spec.seed)  # DataError: missing, empty, one class, unreadable
    if len(train) < 2:
        raise SpecError(f"{source}: dataset: the training split has {len(train)} sample(s); training needs at least 2 "
                        f"(a smaller val_fraction, a larger limit_train, or more data)")
    check_sample(spec.dataset, spec.seed)
    for i, m in enumerate(spec.models):
        if m.num_classes < classes and spec.evaluation == "accuracy":
            raise SpecError(f"{source}: models.{i}.num_classes: {m.name} has {m.num_classes} outputs but the data set "
                            f"has {classes} classes; accepted: num_classes >= {classes}")
    return check_models(spec, source)


def check_models(spec: SweepSpec, source: str = "spec") -> list[Config]:
    """What only the models can tell (no Ray, no MLflow, no data): checkpoints that do not fit,
    fixed ranks that do not fit a layer, layer patterns of stages that match nothing,
    from-scratch ranks and selections."""
    comp = spec.compression
    models = {}
    for i, m in enumerate(spec.models):
        model = models[m.name] = build(m)  # ModelError: a factory that fails, weights that are not there
        if m.checkpoint is not None:
            load_checkpoint(model, m.checkpoint)  # CheckpointError: truncated, corrupted, wrong architecture, NaN
        _check_channels(spec, m, model, f"{source}: models.{i}")
        prep = preprocess.for_model(spec.dataset, m, model)
        size, channels = prep.crop, prep.channels
        dry_forward(model, m.num_classes, size, f"{source}: models.{i}", channels=channels)
        lat = spec.latency.input_size
        if lat is not None and lat != size:  # every version is timed at that size (and a latency search screens at it)
            dry_forward(model, m.num_classes, lat, f"{source}: latency.input_size: models.{i}", channels=channels,
                        what="the size it is timed at", accepted="a latency.input_size the model can take, "
                        f"or none (the data's input size, {size} px)")
        for extra in spec.latency.extra_sizes(m, lat or size):  # every version is also timed there
            dry_forward(model, m.num_classes, extra, f"{source}: latency.also_at: models.{i}", channels=channels,
                        what="a size it is also timed at", accepted="latency.also_at sizes the model can take, "
                        "or [] (none)")
        if spec.from_scratch is not None:
            _check_scratch(spec.from_scratch, model, m.name, source)
        if comp is not None:
            for method in comp.methods:
                if not select(model, method, m.layers or comp.layers):
                    where = f"models.{i}.layers" if m.layers else "compression.layers"
                    raise SpecError(f"{source}: {where}: selects no layer of {m.name} that {method} applies to "
                                    f"(nothing would be compressed); layers are: {_layer_names(model)}")
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


def _check_channels(spec: SweepSpec, m, model, where: str) -> None:
    """A model takes grey or RGB input; a spec's normalisation has a value per channel it is fed."""
    first = lowrank.first_conv(model)
    taken = model.get_submodule(first).in_channels if first is not None else 3
    if m.channels is None and taken not in preprocess.CHANNELS:
        raise SpecError(f"{where}: {type(model).__name__}'s first conv {first!r} takes {taken} "
                        f"input channels; accepted: 1 (grey) or 3 (RGB), or models.channels where that conv is not "
                        f"the model's input")
    channels = preprocess.model_channels(m, model)
    norm = spec.dataset.normalize
    if norm is not None and channels == 1 and 3 in (len(norm.mean), len(norm.std)):
        raise SpecError(f"dataset.normalize has 3 values but {where} ({m.name}) takes 1 channel (grey); accepted: "
                        f"one mean and one std")


def dry_forward(model, num_classes: int, size: int, where: str, *, what: str = "the data's input size",
                accepted: str = "a dataset.input_size the model can take", channels: int = 3) -> None:
    """The model must run at the data's input size (or ``what``) and give finite scores, one per class."""
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0)))
    except Exception as e:  # noqa: BLE001 - any failure of the user's model is the answer
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if "channels" in first:
            accepted += f"; it was fed {channels} channel(s): set models.channels (1 or 3) if that is wrong"
        raise SpecError(f"{where}: {type(model).__name__} cannot run at {what} {size}x{size} "
                        f"({type(e).__name__}: {first}); accepted: {accepted}") from None
    if not torch.is_tensor(out) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise SpecError(f"{where}: {type(model).__name__} returns {shape} for a batch of 2 at {size}x{size}; "
                        f"accepted: (batch, num_classes) = (2, {num_classes})")
    if not torch.isfinite(out).all():
        raise SpecError(f"{where}: {type(model).__name__} gives non-finite outputs (NaN or inf) at {size}x{size}; "
                        f"its weights or checkpoint are broken")


def _layer_names(model) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")


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
