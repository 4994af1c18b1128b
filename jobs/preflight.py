"""Checks ``python -m jobs run`` makes before starting Ray or touching MLflow, so that bad input
costs a one-line message (exit 2), never a half-run sweep."""
from __future__ import annotations

from .data import load_dataset
from .models import build_model, load_checkpoint
from .spec import SpecError, SweepSpec, check_local_paths
from .tracking import check_reachable


def preflight(spec: SweepSpec, source: str = "spec") -> None:
    check_local_paths(spec, source)
    search = spec.compression.search if spec.compression else None
    if search is not None and search.latency_device == "cuda":
        import os

        import torch

        if not os.environ.get("RAY_ADDRESS") and not torch.cuda.is_available():
            raise SpecError(f"{source}: compression.search.latency_device: 'cuda' requested but this machine has "
                            f"no CUDA device; accepted here: 'cpu'")
    check_reachable(spec.mlflow.tracking_uri)
    load_dataset(spec.dataset, spec.seed)  # DataError: missing, empty or unreadable data
    check_models(spec, source)


def check_models(spec: SweepSpec, source: str = "spec") -> None:
    """What only the models can tell (no Ray, no MLflow, no data): fixed ranks that do not fit a
    layer, layer patterns of stages that match nothing, from-scratch ranks and selections."""
    import fnmatch

    import lowrank
    from lowrank.ranks import normalize_rank
    from lowrank.registry import KernelShape

    seen_layers: set[str] = set()
    comp = spec.compression
    for i, m in enumerate(spec.models):
        model = build_model(m.name, m.num_classes)
        if m.checkpoint is not None:
            load_checkpoint(model, m.checkpoint)  # CheckpointError: truncated, corrupted, wrong architecture
        modules = dict(model.named_modules())
        seen_layers |= set(modules)
        if spec.from_scratch is not None:
            _check_scratch(spec.from_scratch, model, m.name, source)
        if comp is None:
            continue
        sel = (m.layers or comp.layers).model_dump()
        for method in comp.methods:
            plan = lowrank.plan_layers(model, method, 1, include=sel["include"] or None,
                                       exclude=sel["exclude"] or None, skip_first=sel["skip_first"],
                                       pointwise_method=sel["pointwise_method"])
            if comp.stages is not None and comp.stages.layers is not None:
                for j, patterns in enumerate(comp.stages.layers):
                    if not any(fnmatch.fnmatchcase(n, p) for n in plan for p in patterns):
                        raise SpecError(f"{source}: compression.stages.layers.{j}: {patterns} matches none of the "
                                        f"{len(plan)} {method} layers of {m.name} ({', '.join(list(plan)[:5])}"
                                        f"{' ...' if len(plan) > 5 else ''})")
            if comp.rank.strategy != "fixed":
                continue
            allow = bool(comp.options.get(method, {}).get("allow_larger", False))
            for name, (meth, _, _) in plan.items():
                r, _ = comp.rank.for_layer(name)
                try:
                    normalize_rank(lowrank.get_method(meth), KernelShape.of(modules[name]), r, allow_larger=allow)
                except lowrank.LowRankError as e:
                    where = f"per_layer.{name}" if name in comp.rank.per_layer else "rank"
                    raise SpecError(f"{source}: compression.rank.{where}: {m.name} {name} ({meth}): {e}") from None
    unknown = sorted(set(comp.rank.per_layer) - seen_layers) if comp else []
    if unknown:
        raise SpecError(f"{source}: compression.rank.per_layer.{unknown[0]}: no layer of that name in "
                        f"{', '.join(m.name for m in spec.models)}")


def _check_scratch(fs, model, model_name: str, source: str) -> None:
    import lowrank
    from lowrank.ranks import normalize_rank
    from lowrank.registry import KernelShape

    sel = fs.layers
    plan = lowrank.plan_layers(model, "spatial-svd", 1, include=sel.include or None, exclude=sel.exclude or None,
                               skip_first=sel.skip_first)
    if not plan:
        raise SpecError(f"{source}: from_scratch.layers: no conv with a spatial kernel of {model_name} is selected")
    if fs.rank is None:
        return
    method = lowrank.get_method("spatial-svd")
    for name in plan:
        try:
            normalize_rank(method, KernelShape.of(model.get_submodule(name)), fs.rank)
        except lowrank.LowRankError as e:
            raise SpecError(f"{source}: from_scratch.rank: {model_name} {name}: {e}") from None
