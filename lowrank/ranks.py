"""Rank vocabulary, resolved in one place.

A rank is an ``int`` (``svd``, ``spatial-svd``, CP) or a pair ``(R3, R4)`` (``tucker2``: input-
and output-channel ranks; an int means both). ``select_rank`` turns a strategy into a rank:

* ``fixed``: the given ``rank``, validated;
* ``vbmf``: analytic EVBMF (Kim et al.), optionally weakened as in MUSCO:
  ``R = Rmax - k (Rmax - Rvbmf)`` with ``k = weakening`` in [0, 1] (1 = plain VBMF), never below
  ``min_rank`` (default 1, so a VBMF rank of 0 never produces an empty layer). A VBMF rank of 0
  means no singular value stands above the noise estimate: the matrix is indistinguishable from a
  random one (a Marchenko-Pastur bulk), which VBMF cannot tell from a full-rank layer. ``zero``
  says what such a layer becomes: ``'min_rank'`` (the default) or ``'dense'`` (left as it is:
  ``NoStructureError``). Trained 1x1 convs of EfficientNet-Lite0 are like that, and cut to rank 1
  they ruin the network (``bench/vbmf_ranks.py``);
* ``energy``: the smallest rank keeping a fraction ``energy`` of the squared singular values;
* ``ratio``: the largest rank whose layer is at least ``ratio`` times smaller than the dense
  one in parameters (``target='params'``) or MACs (``target='macs'``, needs the module and
  ``input_size=(H, W)``).

A rank that makes the layer larger than the dense one is refused (``RankTooLargeError``) unless
``allow_larger=True``.

``multiple_of`` (every strategy but ``fixed``; default 1 = as chosen) rounds each rank component to
the nearest multiple of it (ties up; down where up would make the layer larger than the dense one;
never above the full rank, kept as it is where no multiple fits). Runtimes block channels (ONNX
Runtime's CPU convs in blocks of 16 with AVX-512, 8 with AVX2): on ResNet-18 at 224 px, Tucker-2
at 2x per layer ran 1.28x faster than dense at the ranks as chosen, 1.86x at multiples of 16
(``bench/deploy_latency.py --multiples 1 16``, README "Ranks the runtime likes").

``RankRule`` is the strategy with its settings as one frozen value (what a plan carries per
layer, ``input_size`` included for MAC targets); ``select_rank`` is its keyword form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from ._checks import check_finite, check_int_rank
from .errors import LowRankError, NoStructureError, RankTooLargeError
from .geometry import ConvGeometry
from .registry import METHODS, KernelShape, Method, dense_macs, get_method
from .vbmf import evbmf

STRATEGIES = ("fixed", "vbmf", "energy", "ratio")
ZERO = ("min_rank", "dense")  # what a VBMF rank of 0 becomes
TARGETS = ("params", "macs")


def normalize_rank(method: Method, k: KernelShape, rank, *, allow_larger: bool = False):
    """Validate ``rank`` for ``method`` on a kernel of shape ``k``; returns int or (R3, R4)."""
    mx = method.max_rank(k)
    if method.pair_rank:
        if isinstance(rank, (list, tuple)):
            if len(rank) != 2:
                raise LowRankError(f"{method.name} rank must be an int or a pair (R3, R4), got {rank!r}")
            r = (check_int_rank(rank[0], mx[0], "R3 (input-channel rank)"),
                 check_int_rank(rank[1], mx[1], "R4 (output-channel rank)"))
        else:
            if isinstance(rank, int) and not isinstance(rank, bool) and rank > min(mx):
                raise LowRankError(
                    f"rank {rank} is above the maximum for this layer; accepted: 1..{min(mx)} "
                    f"(or a pair (R3, R4) with R3 <= {mx[0]}, R4 <= {mx[1]})")
            r0 = check_int_rank(rank, min(mx))
            r = (r0, r0)
    else:
        if isinstance(rank, (list, tuple)):
            raise LowRankError(f"{method.name} takes a single integer rank, got {rank!r}")
        r = check_int_rank(rank, mx)
    new, dense = method.n_params(k, r), k.dense_params
    if new > dense and not allow_larger:
        raise RankTooLargeError(
            f"{method.name} at rank {r} has {new} parameters, more than the dense layer's {dense}; "
            f"use a smaller rank or pass allow_larger=True")
    return r


def _matrices(method: Method, w: torch.Tensor, k: KernelShape) -> list[list[torch.Tensor]]:
    """The matrices whose spectra determine each rank component (one list per component)."""
    if method.unfoldings is None:
        capable = [n for n, m in sorted(METHODS.items()) if m.unfoldings is not None]
        raise LowRankError(f"this strategy needs a matrix rank and method {method.name!r} has none; accepted methods "
                           f"for 'vbmf'/'energy': {', '.join(capable)} (use 'fixed' or 'ratio' for CP)")
    return method.unfoldings(w.reshape(k.t, k.s, k.kh, k.kw) if w.dim() == 4 else w, k.groups)


def _energy_rank(m: torch.Tensor, energy: float) -> int:
    s2 = torch.linalg.svdvals(m) ** 2
    cum = torch.cumsum(s2, 0) / s2.sum()
    return int((cum < energy - 1e-12).sum()) + 1


def _layer_cost(method, k, r, target, geo, input_size):
    if target == "params":
        return method.n_params(k, r), k.dense_params
    h, w = input_size
    ho, wo = geo.output_size(h, w)
    if geo.needs_prepad:
        top, bottom, left, right = geo.pad
        h, w = h + top + bottom, w + left + right
    return method.stages_macs(k, r, h, w, ho, wo), dense_macs(k, ho, wo)


def _ratio_rank(method, k, ratio, target, geo, input_size):
    mx = method.max_rank(k)
    if method.pair_rank:
        def rank_at(i):
            return (i, max(1, min(mx[1], round(i * mx[1] / mx[0]))))
        hi = mx[0]
    else:
        def rank_at(i):
            return i
        hi = mx

    def ok(i):
        new, dense = _layer_cost(method, k, rank_at(i), target, geo, input_size)
        return dense / new >= ratio

    if not ok(1):
        new, dense = _layer_cost(method, k, rank_at(1), target, geo, input_size)
        raise RankTooLargeError(
            f"{target} ratio {ratio:g} is not reachable with {method.name} on this layer; "
            f"the most it reaches is {dense / new:.3g} (at rank {rank_at(1)})")
    lo = 1
    while lo < hi:  # largest i with ok(i); cost grows with the rank
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return rank_at(lo)


@dataclass(frozen=True)
class RankRule:
    """How one layer's rank is chosen: a strategy and its settings (see the module docstring).
    ``input_size=(H, W)`` is the layer's own input size, needed by ``target='macs'``."""

    strategy: str = "fixed"
    rank: int | tuple[int, int] | None = None
    ratio: float | None = None
    target: str = "params"
    energy: float | None = None
    weakening: float = 1.0
    min_rank: int = 1
    input_size: tuple[int, int] | None = None
    zero: str = "min_rank"
    multiple_of: int = 1

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise LowRankError(f"unknown rank strategy {self.strategy!r}; accepted: {', '.join(STRATEGIES)}")
        if self.zero not in ZERO:
            raise LowRankError(f"zero (what a VBMF rank of 0 becomes) must be one of {', '.join(ZERO)}, got {self.zero!r}")
        if isinstance(self.multiple_of, bool) or not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise LowRankError(f"multiple_of must be an integer >= 1 (1 = ranks as chosen), got {self.multiple_of!r}")
        if isinstance(self.rank, list):
            object.__setattr__(self, "rank", tuple(self.rank))
        if self.input_size is not None:
            object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))

    @classmethod
    def keywords(cls) -> tuple[str, ...]:
        """The names a keyword call (``select_rank``, ``factorize_layer(..., 'ratio', ratio=2)``) may use."""
        return tuple(f.name for f in fields(cls) if f.name not in ("strategy", "rank"))

    @classmethod
    def of(cls, rank, **settings) -> "RankRule":
        """A rank (int or pair: ``fixed``), a strategy name with its settings, or a rule."""
        if isinstance(rank, RankRule):
            return replace(rank, **settings) if settings else rank
        if isinstance(rank, str):
            return cls(strategy=rank, **settings)
        if settings:
            raise LowRankError(f"option(s) {sorted(settings)} only apply with a rank strategy "
                               f"('vbmf', 'energy', 'ratio'), not with a fixed rank {rank!r}")
        return cls(strategy="fixed", rank=rank)

    def to_dict(self) -> dict:
        """The settings that apply to this strategy (JSON-able)."""
        keep = {"fixed": ("rank",), "ratio": ("ratio", "target", "input_size"), "energy": ("energy", "min_rank"),
                "vbmf": ("weakening", "min_rank", "zero")}[self.strategy]
        out = {"strategy": self.strategy}
        for k in keep:
            v = getattr(self, k)
            if v is not None and not (k == "zero" and v == "min_rank"):  # the default, as before it existed
                out[k] = list(v) if isinstance(v, tuple) else v
        if self.strategy != "fixed" and self.multiple_of != 1:
            out["multiple_of"] = self.multiple_of
        return out

    def resolve(self, weight, method: str, *, groups: int = 1, allow_larger: bool = False):
        """The rank for ``weight`` (a tensor, or the ``nn.Conv2d``/``nn.Linear`` itself):
        an int, or ``(R3, R4)`` for ``tucker2``."""
        return _resolve(self, weight, method, groups=groups, allow_larger=allow_larger)


def select_rank(weight, method: str, strategy: str = "fixed", *, rank=None, groups: int = 1,
                allow_larger: bool = False, **settings):
    """Choose a rank for ``weight`` (a tensor, or the ``nn.Conv2d``/``nn.Linear`` itself).

    ``settings``: ``weakening``, ``min_rank``, ``energy``, ``ratio``, ``target``, ``input_size``.
    Returns an int, or ``(R3, R4)`` for ``tucker2``. See the module docstring for strategies.
    """
    unknown = sorted(set(settings) - set(RankRule.keywords()))
    if unknown:
        raise LowRankError(f"unknown rank setting(s) {unknown}; accepted: {', '.join(RankRule.keywords())}")
    return RankRule(strategy=strategy, rank=rank, **settings).resolve(weight, method, groups=groups, allow_larger=allow_larger)


def _resolve(rule: RankRule, weight, method: str, *, groups: int, allow_larger: bool):
    m = get_method(method)
    module = weight if isinstance(weight, nn.Module) else None
    w = module.weight if module is not None else weight
    check_finite(w)
    k = KernelShape.of(module if module is not None else w, groups)
    strategy = rule.strategy

    if strategy == "fixed":
        if rule.rank is None:
            raise LowRankError("strategy 'fixed' needs rank=<int> (or a pair (R3, R4) for tucker2)")
        return normalize_rank(m, k, rule.rank, allow_larger=allow_larger)

    if strategy == "ratio":
        ratio, target, input_size = rule.ratio, rule.target, rule.input_size
        if ratio is None or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 1:
            raise LowRankError(f"strategy 'ratio' needs ratio >= 1 (how many times smaller), got {ratio!r}")
        if target not in TARGETS:
            raise LowRankError(f"unknown ratio target {target!r}; accepted: {', '.join(TARGETS)}")
        geo = None
        if target == "macs":
            if isinstance(module, nn.Linear):
                target = "params"  # a Linear's MACs equal its weight count
            elif isinstance(module, nn.Conv2d) and input_size is not None:
                geo = ConvGeometry.from_conv(module)
            else:
                raise LowRankError("target='macs' needs the conv module itself (not a bare weight) and input_size=(H, W)")
        r = _ratio_rank(m, k, float(ratio), target, geo, input_size)
        return _aligned(m, k, r, rule.multiple_of, allow_larger)

    w64 = w.detach().to(torch.float64)
    mats = _matrices(m, w64, k)
    if strategy == "energy":
        energy = rule.energy
        if energy is None or not (0 < energy <= 1):
            raise LowRankError(f"strategy 'energy' needs 0 < energy <= 1, got {energy!r}")
        ranks = [max(_energy_rank(x, energy) for x in comp) for comp in mats]
    else:  # vbmf
        weakening = rule.weakening
        if not isinstance(weakening, (int, float)) or not (0.0 <= weakening <= 1.0):
            raise LowRankError(f"weakening must be in [0, 1] (1 = plain VBMF, 0 = full rank), got {weakening!r}")
        mx = m.max_rank(k)
        mxs = list(mx) if m.pair_rank else [mx]
        ranks = []
        for mode, (comp, rmax) in enumerate(zip(mats, mxs)):
            r_vbmf = max(evbmf(x)[0] for x in comp)
            if r_vbmf == 0 and rule.zero == "dense":
                which = f" in mode {mode + 1} of {len(mats)}" if len(mats) > 1 else ""
                raise NoStructureError(f"VBMF finds no component above the noise{which} (rank 0: the spectrum is "
                                       f"like a random matrix's), so the layer stays dense (zero='dense')")
            r_vbmf = min(r_vbmf, rmax)
            ranks.append(int(round(rmax - weakening * (rmax - r_vbmf))))
    min_rank = rule.min_rank
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise LowRankError(f"min_rank must be an integer >= 1, got {min_rank!r}")
    mx = m.max_rank(k)
    mxs = list(mx) if m.pair_rank else [mx]
    ranks = [min(max(r, min_rank), rmax) for r, rmax in zip(ranks, mxs)]
    r = tuple(ranks) if m.pair_rank else ranks[0]
    return _aligned(m, k, r, rule.multiple_of, allow_larger, floor=min_rank)


def _aligned(m: Method, k: KernelShape, r, multiple: int, allow_larger: bool, floor: int = 1):
    """``r`` with each component rounded to the nearest positive multiple of ``multiple`` (ties
    up), within ``floor..full rank``; rounded down where up would make the layer larger than the
    dense one; left as it is where no multiple fits."""
    if multiple == 1:
        return normalize_rank(m, k, r, allow_larger=allow_larger)
    mx = m.max_rank(k)
    comps, mxs = (list(r), list(mx)) if m.pair_rank else ([r], [mx])

    def snap(v: int, cap: int, up: bool) -> int:
        lo, hi = (v // multiple) * multiple, -(-v // multiple) * multiple
        for pick in ((hi, lo) if up or lo < max(floor, 1) else (lo, hi)):
            if max(floor, 1) <= pick <= cap:
                return pick
        return v

    def as_rank(c):
        return tuple(c) if m.pair_rank else c[0]

    nearest = [snap(v, cap, up=(v % multiple) * 2 >= multiple) for v, cap in zip(comps, mxs)]
    down = [snap(v, cap, up=False) for v, cap in zip(comps, mxs)]
    for cand in (nearest, down):
        if allow_larger or m.n_params(k, as_rank(cand)) <= k.dense_params:
            return normalize_rank(m, k, as_rank(cand), allow_larger=allow_larger)
    return normalize_rank(m, k, r, allow_larger=allow_larger)
