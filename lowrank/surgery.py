"""Model surgery: the only place that mutates a model.

``compress_model(model, plan)`` replaces layers by qualified name and returns one
``LayerReport`` per planned layer. A plan maps ``"layer.name"`` to ``(method, rank)``,
``(method, rank, options)``, ``{"method": ..., "rank": ..., **options}`` or a ``LayerPlan``;
``rank`` may be a strategy name (``'vbmf'``, ``'energy'``, ``'ratio'``) with the strategy's
settings, or a ``RankRule``. ``select_layers`` picks the layers a method applies to (no rank).
"""
from __future__ import annotations

import copy
import fnmatch
import time
from dataclasses import asdict, dataclass, field

from torch import nn

from .accounting import count, layer_input_shapes
from .api import factorize_with_factors, relative_error
from .ranks import RankRule
from .errors import LeftDense, LowRankError, UnsupportedLayerError
from .registry import get_method
from .verify import check_replacement, model_fails, replacement_prefix


@dataclass
class LayerReport:
    """What happened to one layer. ``status`` is ``ok``, ``skipped`` (with ``reason``) or
    ``failed`` (with ``reason``). MACs are per sample and present when an input shape was given."""

    name: str
    method: str
    rank: object = None
    status: str = "ok"
    reason: str = ""
    layer_type: str = ""
    rel_error: float | None = None
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    seconds: float = 0.0
    diagnostics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rank"] = list(self.rank) if isinstance(self.rank, tuple) else self.rank
        return d


@dataclass(frozen=True)
class LayerPlan:
    """One layer's decomposition: the method, the rank (int, ``(R3, R4)`` or a ``RankRule``)
    and the method's options (plain values, checked by ``Method.parse_options``)."""

    name: str
    method: str
    rank: object
    options: dict = field(default_factory=dict)

    def factorize(self, module: nn.Module):
        """``(factorized layer, factors)`` of ``module`` (the dense layer this plan names)."""
        return factorize_with_factors(module, self.method, self.rank, **self.options)

    def to_dict(self) -> dict:
        rank = self.rank.to_dict() if isinstance(self.rank, RankRule) else (
            list(self.rank) if isinstance(self.rank, tuple) else self.rank)
        return {"name": self.name, "method": self.method, "rank": rank, "options": dict(self.options)}


def _normalize_entry(name, entry) -> tuple[str, object, dict]:
    if isinstance(entry, LayerPlan):
        return entry.method, entry.rank, dict(entry.options)
    if isinstance(entry, dict):
        entry = dict(entry)
        try:
            return entry.pop("method"), entry.pop("rank"), entry
        except KeyError as e:
            raise LowRankError(f"plan entry for {name!r} is missing {e.args[0]!r}; "
                               f"accepted: {{'method': ..., 'rank': ..., **options}}") from None
    if isinstance(entry, (tuple, list)) and len(entry) in (2, 3):
        method, rank, *opts = entry
        options = dict(opts[0]) if opts else {}
        return method, rank, options
    raise LowRankError(f"plan entry for {name!r} must be (method, rank), (method, rank, options) "
                       f"or a dict with 'method' and 'rank', got {entry!r}")


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (a qualified name) is, and under every other name
    that holds the same module (a layer shared between two places stays shared, and compressed in
    both: ``named_modules`` names it only once)."""
    old = model.get_submodule(name)
    aliases = [n for n, m in model.named_modules(remove_duplicate=False) if m is old and n] or [name]
    for alias in aliases:
        parent_name, _, child = alias.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)


def compress_model(model: nn.Module, plan: dict, *, input_shape=None, inplace: bool = False,
                   on_error: str = "raise") -> tuple[nn.Module, list[LayerReport]]:
    """Apply ``plan`` and return ``(new_model, reports)``.

    ``input_shape`` (``(C, H, W)``) enables per-layer MACs and MAC-ratio strategies.
    ``on_error='raise'`` (default) raises on bad input; ``'record'`` records a failed layer
    with its reason and goes on with the others. A rank chosen by a strategy that would make
    the layer larger than the dense one is always recorded as ``skipped`` (the layer stays dense).
    """
    if on_error not in ("raise", "record"):
        raise LowRankError(f"on_error must be 'raise' or 'record', got {on_error!r}")
    if not isinstance(plan, dict):
        raise LowRankError(f"plan must be a dict {{layer_name: (method, rank[, options])}}, got {type(plan).__name__}")
    model = model if inplace else copy.deepcopy(model)
    modules = dict(model.named_modules())
    for name in plan:
        if name not in modules or name == "":
            layers = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
            raise LowRankError(f"no layer named {name!r} in the model; conv/linear layers are: "
                               f"{', '.join(layers[:8])}{' ...' if len(layers) > 8 else ''}")
    shapes = layer_input_shapes(model, plan, input_shape) if input_shape is not None else {}

    reports: list[LayerReport] = []
    for name, entry in plan.items():
        method, rank, options = _normalize_entry(name, entry)
        module = modules[name]
        rep = LayerReport(name=name, method=str(method), layer_type=type(module).__name__,
                          params_before=sum(p.numel() for p in module.parameters()))
        in_shape = shapes.get(name)
        if in_shape is not None:
            rep.macs_before = count(module, in_shape)[1]
        t0 = time.perf_counter()
        _compress_one(model, name, module, method, rank, options, in_shape, on_error, rep)
        rep.seconds = time.perf_counter() - t0
        if rep.status != "ok":
            rep.params_after, rep.macs_after = rep.params_before, rep.macs_before
        reports.append(rep)
    keep_running(model, modules, reports, input_shape)
    return model, reports


def keep_running(model: nn.Module, originals: dict, reports: list[LayerReport], input_shape) -> None:
    """After the replacements: where the model no longer runs on a probe of ``input_shape``, put
    the dense layers back and the factorized ones in again one at a time, leaving dense (with the
    reason in its report) each one the model cannot run with. Nothing to check without a shape."""
    done = [r for r in reports if r.status == "ok"]
    if input_shape is None or not done or model_fails(model, input_shape) is None:
        return
    built = {r.name: model.get_submodule(r.name) for r in done}
    for r in done:
        replace_submodule(model, r.name, originals[r.name])
    for r in done:
        replace_submodule(model, r.name, built[r.name])
        why = model_fails(model, input_shape)
        if why:
            replace_submodule(model, r.name, originals[r.name])
            r.status, r.rank, r.rel_error = "skipped", None, None
            r.params_after, r.macs_after = r.params_before, r.macs_before
            r.reason = (f"the model fails with this layer factorized ({why}): its code uses the layer's "
                        f"weights itself (as nn.MultiheadAttention does with out_proj): left dense")


def _verified(module: nn.Module, new: nn.Module, prefix: nn.Module | None, in_shape) -> tuple[nn.Module, str | None]:
    """``new`` behind the padding stage ``module``'s own forward needs, and why it must not
    replace ``module`` (None: it may)."""
    new = nn.Sequential(prefix, new) if prefix is not None else new
    return new, check_replacement(module, new, in_shape)


def _compress_one(model, name, module, method, rank, options, in_shape, on_error, rep: LayerReport) -> None:
    """Decompose one layer by its plan entry and replace it, or record in ``rep`` why not."""
    prefix, why = replacement_prefix(module, in_shape)
    if why:  # a subclass whose own forward a factorized layer would not reproduce
        rep.status, rep.reason = "skipped", why
        return
    rule = None
    try:
        get_method(method)
        rule = RankRule.of(rank, **{k: options.pop(k) for k in RankRule.keywords() if k in options})
        if rule.strategy == "ratio" and rule.input_size is None and in_shape is not None and len(in_shape) == 4:
            rule = RankRule.of(rule, input_size=tuple(in_shape[2:]))  # what a MAC target counts with
        new, factors = factorize_with_factors(module, method, rule, **options)
    except LeftDense as e:
        if rule.strategy == "fixed" and on_error == "raise":
            raise
        rep.status, rep.reason = "skipped", str(e)
        return
    except (LowRankError, UnsupportedLayerError, RuntimeError, ValueError, MemoryError) as e:
        if on_error == "raise":
            raise
        rep.status, rep.reason = "failed", f"{type(e).__name__}: {e}"
        return
    new, why = _verified(module, new, prefix, in_shape)
    if why:
        rep.status, rep.reason = "skipped", why
        return
    replace_submodule(model, name, new)
    rep.rank = factors.rank
    rep.rel_error = relative_error(module.weight, factors)
    rep.params_after = sum(p.numel() for p in new.parameters())
    if in_shape is not None:
        rep.macs_after = count(new, in_shape)[1]
    rep.diagnostics = dict(getattr(factors, "diagnostics", {}) or {})


def first_conv(model: nn.Module) -> str | None:
    """The qualified name of the first ``nn.Conv2d`` a model holds (definition order): the conv its
    input usually meets (None without one)."""
    return next((n for n, mod in model.named_modules() if isinstance(mod, nn.Conv2d)), None)


def select_layers(model: nn.Module, method: str, *, include=None, exclude=None, skip_first: bool = True,
                  pointwise_method: str | None = None) -> dict[str, str]:
    """``{qualified name: method}`` for every layer ``method`` applies to, in model order.

    ``include``/``exclude`` are glob patterns on qualified names; ``skip_first`` leaves the first
    conv dense (it has few input channels and is cheap). ``pointwise_method`` (e.g. ``'svd'``)
    takes the 1x1 convs and Linears that ``method`` does not apply to.
    """
    m = get_method(method)
    pw = get_method(pointwise_method) if pointwise_method else None
    chosen: dict[str, str] = {}
    first = first_conv(model)
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        if skip_first and name == first:
            continue
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        by = m if m.unsupported_reason(mod) is None else (
            pw if pw is not None and pw.unsupported_reason(mod) is None else None)
        if by is not None:
            chosen[name] = by.name
    return chosen


def plan_layers(model: nn.Module, method: str, rank, *, include=None, exclude=None, skip_first: bool = True,
                pointwise_method: str | None = None, options: dict | None = None) -> dict:
    """``{name: (method, rank, options)}`` over ``select_layers``, for ``compress_model``. The
    layers ``pointwise_method`` takes get only the rank's settings of ``options`` (``ratio=...``),
    not ``method``'s own options (``n_iter_max`` means nothing to an SVD)."""
    layers = select_layers(model, method, include=include, exclude=exclude, skip_first=skip_first,
                           pointwise_method=pointwise_method)
    options = dict(options or {})
    shared = {k: v for k, v in options.items() if k in RankRule.keywords() or k == "allow_larger"}
    return {name: (meth, rank, dict(options if meth == method else shared)) for name, meth in layers.items()}


def summarize(reports: list[LayerReport]) -> dict:
    """Totals over the reports: parameter and MAC deltas of the replaced layers."""
    return {
        "layers": len(reports),
        "ok": sum(r.status == "ok" for r in reports),
        "params_saved": sum(r.params_before - r.params_after for r in reports),
        "macs_saved": sum((r.macs_before or 0) - (r.macs_after or 0) for r in reports),
    }


def apply_factors(model: nn.Module, factors_by_layer: dict, *, input_shape=None, inplace: bool = False):
    """Replace layers by the layers that run precomputed factors (e.g. computed in parallel by
    Ray tasks). Returns ``(new_model, reports)`` like ``compress_model`` (``seconds`` = build time)."""
    model = model if inplace else copy.deepcopy(model)
    modules = dict(model.named_modules())
    missing = [n for n in factors_by_layer if n not in modules]
    if missing:
        raise LowRankError(f"no layer named {missing[0]!r} in the model")
    shapes = layer_input_shapes(model, factors_by_layer, input_shape) if input_shape is not None else {}
    reports = []
    for name, factors in factors_by_layer.items():
        module = modules[name]
        t0 = time.perf_counter()
        in_shape = shapes.get(name)
        params = sum(p.numel() for p in module.parameters())
        rep = LayerReport(name=name, method=factors.method, rank=factors.rank, layer_type=type(module).__name__,
                          rel_error=relative_error(module.weight, factors), params_before=params, params_after=params,
                          diagnostics=dict(getattr(factors, "diagnostics", {}) or {}))
        if in_shape is not None:
            rep.macs_before = rep.macs_after = count(module, in_shape)[1]
        prefix, why = replacement_prefix(module, in_shape)
        if not why:
            new, why = _verified(module, get_method(factors.method).build(module, factors), prefix, in_shape)
        if why:  # left dense: the report says why
            rep.status, rep.reason, rep.rank = "skipped", why, None
        else:
            replace_submodule(model, name, new)
            rep.params_after = sum(p.numel() for p in new.parameters())
            if in_shape is not None:
                rep.macs_after = count(new, in_shape)[1]
        rep.seconds = time.perf_counter() - t0
        reports.append(rep)
    keep_running(model, modules, reports, input_shape)
    return model, reports
