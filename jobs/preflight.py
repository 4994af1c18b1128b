"""Checks ``python -m jobs run`` makes before starting Ray or touching MLflow, so that bad input
costs a one-line message (exit 2), never a half-run sweep."""
from __future__ import annotations

from .data import load_dataset
from .models import build_model, load_checkpoint
from .spec import SpecError, SweepSpec, check_local_paths
from .tracking import check_reachable


def preflight(spec: SweepSpec, source: str = "spec") -> None:
    import lowrank
    from lowrank.ranks import normalize_rank
    from lowrank.registry import KernelShape

    check_local_paths(spec, source)
    search = spec.compression.search
    if search is not None and search.latency_device == "cuda":
        import os

        import torch

        if not os.environ.get("RAY_ADDRESS") and not torch.cuda.is_available():
            raise SpecError(f"{source}: compression.search.latency_device: 'cuda' requested but this machine has "
                            f"no CUDA device; accepted here: 'cpu'")
    check_reachable(spec.mlflow.tracking_uri)
    load_dataset(spec.dataset, spec.seed)  # DataError: missing, empty or unreadable data
    rank = spec.compression.rank
    seen_layers: set[str] = set()
    for i, m in enumerate(spec.models):
        model = build_model(m.name, m.num_classes)
        if m.checkpoint is not None:
            load_checkpoint(model, m.checkpoint)  # CheckpointError: truncated, corrupted, wrong architecture
        modules = dict(model.named_modules())
        seen_layers |= set(modules)
        if rank.strategy != "fixed":
            continue
        sel = (m.layers or spec.compression.layers).model_dump()
        for method in spec.compression.methods:
            plan = lowrank.plan_layers(model, method, 1, include=sel["include"] or None,
                                       exclude=sel["exclude"] or None, skip_first=sel["skip_first"],
                                       pointwise_method=sel["pointwise_method"])
            allow = bool(spec.compression.options.get(method, {}).get("allow_larger", False))
            for name, (meth, _, _) in plan.items():
                r, _ = rank.for_layer(name)
                try:
                    normalize_rank(lowrank.get_method(meth), KernelShape.of(modules[name]), r, allow_larger=allow)
                except lowrank.LowRankError as e:
                    where = f"per_layer.{name}" if name in rank.per_layer else "rank"
                    raise SpecError(f"{source}: compression.rank.{where}: {m.name} {name} ({meth}): {e}") from None
    unknown = sorted(set(rank.per_layer) - seen_layers)
    if unknown:
        raise SpecError(f"{source}: compression.rank.per_layer.{unknown[0]}: no layer of that name in "
                        f"{', '.join(m.name for m in spec.models)}")
