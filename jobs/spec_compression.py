"""The compression parts of a sweep spec: which layers, how ranks are chosen, the rank search,
multi-stage compression and low-rank training from scratch. Strict pydantic models, like the
rest of the spec (``jobs.spec``); ``jobs.plan`` translates them into ``lowrank`` terms."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

import lowrank


class _Strict(BaseModel):
    """Unknown keys refused; every float finite (a ``.nan`` or ``.inf`` in YAML is an error)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LayerSelection(_Strict):
    include: list[str] = Field(default_factory=list, description="glob patterns on qualified layer names; empty = all")
    exclude: list[str] = Field(default_factory=list, description="glob patterns of layers to leave dense")
    skip_first: bool = Field(True, description="leave the first conv dense (few input channels, cheap)")
    pointwise_method: Literal["svd"] | None = Field(
        None, description="also factorize 1x1 convs and Linear layers with this method")


class RankSpec(_Strict):
    strategy: Literal["fixed", "vbmf", "energy", "ratio"] = Field(
        "ratio", description="fixed ranks, VBMF (Kim et al.), energy fraction, or a per-layer ratio target")
    rank: int | tuple[int, int] | None = Field(None, description="fixed: rank for every layer")
    per_layer: dict[str, int | tuple[int, int]] = Field(default_factory=dict, description="fixed: rank per layer name")
    ratio: float | None = Field(2.0, description="ratio: how many times smaller each layer becomes (>= 1)")
    target: Literal["params", "macs"] = Field("params", description="ratio: count parameters or MACs")
    energy: float | None = Field(None, description="energy: fraction of squared singular values kept, (0, 1]")
    weakening: float = Field(1.0, ge=0, le=1, description="vbmf: R = Rmax - k (Rmax - Rvbmf); 1 = plain VBMF")
    min_rank: int = Field(1, ge=1, le=1_000_000, description="vbmf/energy: never below this rank")
    zero: Literal["min_rank", "dense"] = Field(
        "min_rank", description="vbmf: where no singular value stands above VBMF's noise estimate (rank 0, a "
                                "spectrum like a random matrix's): min_rank, or dense (the layer is left as it is, "
                                "with the reason)")
    multiple_of: int = Field(
        1, ge=1, le=1024, description="vbmf/energy/ratio, and every rank a search screens: round each rank to the "
                                      "nearest multiple of this (e.g. 16: "
                                      "ONNX Runtime's CPU convs work on blocks of 16 channels with AVX-512, 8 with "
                                      "AVX2); 1 = ranks as chosen")

    def content(self) -> dict:
        """What the ranks depend on (part of config hashes); ``zero`` and ``multiple_of`` only when
        not the default, so that configurations from before they existed keep their hashes."""
        return self.model_dump(mode="json", exclude={k for k, default in (("zero", "min_rank"), ("multiple_of", 1))
                                                     if getattr(self, k) == default})

    @model_validator(mode="after")
    def _needs(self):
        if self.strategy == "fixed" and self.rank is None and not self.per_layer:
            raise ValueError("rank strategy 'fixed' needs 'rank' or 'per_layer'")
        if self.strategy == "ratio" and (self.ratio is None or self.ratio < 1):
            raise ValueError(f"rank strategy 'ratio' needs 'ratio' >= 1, got {self.ratio!r}")
        if self.strategy == "energy" and (self.energy is None or not 0 < self.energy <= 1):
            raise ValueError(f"rank strategy 'energy' needs 0 < 'energy' <= 1, got {self.energy!r}")
        if self.multiple_of != 1 and self.strategy == "fixed":
            raise ValueError("rank.multiple_of rounds the ranks a strategy chooses (vbmf, energy, ratio); with "
                             "strategy 'fixed' give the ranks you want")
        if self.zero != "min_rank" and self.strategy != "vbmf":
            raise ValueError(f"rank.zero says what a VBMF rank of 0 becomes; it applies to strategy 'vbmf', not "
                             f"{self.strategy!r}")
        return self


STRATEGY_FIELDS = {  # the search fields each strategy's result depends on (its config hash)
    "budget": ("target", "ratio", "candidate_ratios", "loss", "latency_device", "val_batches", "bn_batches"),
    "uniform": ("target", "ratio", "candidate_ratios", "loss", "latency_device", "val_batches", "bn_batches"),
    "vbmf": ("vbmf_weakening", "loss", "val_batches", "bn_batches"),
    "tolerance": ("epsilon", "tolerance_steps", "candidate_ratios", "val_batches", "bn_batches"),
    "tune": ("target", "ratio", "candidate_ratios", "loss", "latency_device", "val_batches", "bn_batches", "tune"),
}


class TuneSpec(_Strict):
    trials: int = Field(6, ge=2, le=1000, description="configurations tried near the budget solution (the first is it)")
    noise: float = Field(0.5, ge=0, le=10, description="log-normal sigma applied to the per-layer losses to draw neighbours")
    grace_epochs: int = Field(1, ge=1, le=1000, description="ASHA: epochs every trial runs before it may be stopped")
    reduction_factor: int = Field(2, ge=2, le=100, description="ASHA: keep the best 1/reduction_factor at each rung")


class SearchSpec(_Strict):
    strategies: list[Literal["budget", "uniform", "vbmf", "tolerance", "tune"]] = Field(
        description="budget: global (method, rank) allocation with the least predicted loss; uniform: every "
                    "layer at the same ratio, best method per layer; vbmf: one-shot VBMF ranks (Kim et al.), best "
                    "method per layer; tolerance: per layer the smallest rank (bisection) whose accuracy drop is "
                    "<= epsilon; tune: Ray Tune + ASHA over configurations near the budget solution. "
                    "One configuration per strategy.")
    target: Literal["params", "macs", "latency"] = Field("params", description="what the ratio counts")
    ratio: float | None = Field(None, description="how many times smaller/faster the model must be "
                                                  "(budget, uniform, tune)")
    candidate_ratios: list[float] = Field([1.25, 1.5, 2, 3, 4, 6], description="per-layer ratios screened")
    loss: Literal["sensitivity", "error"] = Field(
        "sensitivity", description="sensitivity: measured accuracy drop with only that layer compressed (after BN "
                                   "recalibration); error: squared relative weight error")
    latency_device: Literal["cpu", "cuda"] = Field("cpu", description="device the latency target is measured on")
    val_batches: int = Field(4, ge=1, le=100_000, description="validation batches per sensitivity probe")
    bn_batches: int = Field(5, ge=1, le=100_000, description="training batches for BN recalibration per probe")
    epsilon: float | None = Field(None, description="tolerance: the largest accuracy drop (top-1, a fraction) one "
                                                    "layer may cause")
    tolerance_steps: int = Field(5, ge=1, le=20, description="tolerance: bisection probes per layer and method")
    vbmf_weakening: float = Field(1.0, ge=0, le=1, description="vbmf: MUSCO weakening factor (1 = plain VBMF)")
    tune: TuneSpec = Field(default_factory=TuneSpec, description="tune: Ray Tune / ASHA settings")

    @model_validator(mode="after")
    def _targets(self):
        if not self.strategies:
            raise ValueError("search needs at least one strategy")
        if len(set(self.strategies)) != len(self.strategies):
            raise ValueError(f"strategies are listed twice: {self.strategies}")
        bad = [r for r in self.candidate_ratios if r < 1]
        if bad or not self.candidate_ratios:
            raise ValueError(f"candidate_ratios must be non-empty and >= 1, got {self.candidate_ratios}")
        need_ratio = [s for s in self.strategies if s in ("budget", "uniform", "tune")]
        if need_ratio and self.ratio is None:
            raise ValueError(f"strategy {need_ratio[0]!r} needs a target ratio (search.ratio >= 1)")
        if self.ratio is not None and self.ratio < 1:
            raise ValueError(f"search ratio must be >= 1 (how many times smaller), got {self.ratio}")
        if "uniform" in self.strategies and self.ratio not in self.candidate_ratios:
            raise ValueError(f"strategy 'uniform' needs the ratio {self.ratio:g} among candidate_ratios")
        if "tolerance" in self.strategies:
            if self.epsilon is None:
                raise ValueError("strategy 'tolerance' needs epsilon (the accuracy drop allowed per layer, e.g. 0.01)")
        if self.epsilon is not None and not 0 <= self.epsilon < 1:
            raise ValueError(f"epsilon must be an accuracy drop in [0, 1) (e.g. 0.01), got {self.epsilon}")
        if self.target == "latency" and "vbmf" in self.strategies and len(self.strategies) == 1:
            raise ValueError("target 'latency' is not used by strategy 'vbmf' (its ranks come from VBMF); "
                             "use target 'params' or add 'budget'")
        return self

    def content(self, strategy: str) -> dict:
        """What a strategy's result depends on (part of its config hash): adding a strategy or
        changing another strategy's settings does not re-run this one."""
        d = self.model_dump(mode="json")
        return {k: d[k] for k in STRATEGY_FIELDS[strategy]}


class StagesSpec(_Strict):
    """Multi-stage compression (MUSCO, Gusak et al. 2019): compress, fine-tune, compress again.
    Either ``ratios`` (every selected layer, re-decomposed at each stage to a larger per-layer
    ratio; already factorized layers are turned back into their exact dense kernel first) or
    ``layers`` (each stage compresses the layers its patterns match, at the rank spec)."""

    count: int | None = Field(None, ge=2, le=20, description="number of stages (default: len(ratios) or len(layers); "
                                                            "alone: a geometric ratio schedule)")
    ratios: list[float] | None = Field(None, description="per-layer parameter ratio after each stage, increasing; "
                                                         "the last is compression.rank.ratio")
    layers: list[list[str]] | None = Field(None, description="glob patterns of the layers each stage compresses")
    epochs: int = Field(1, ge=0, le=1000, description="fine-tuning epochs after each stage but the last (the last uses "
                                             "finetune.epochs)")

    def schedule(self, rank) -> list[tuple[list[str] | None, float | None]]:
        """``[(patterns or None = all selected layers, ratio or None = the rank spec)]`` per stage."""
        if self.layers is not None:
            return [(list(p), None) for p in self.layers]
        if self.ratios is not None:
            return [(None, float(r)) for r in self.ratios]
        return [(None, float(rank.ratio) ** ((i + 1) / self.count)) for i in range(self.count)]


class CompressionSpec(_Strict):
    methods: list[str] = Field(description="lowrank methods, e.g. spatial-svd, tucker2, cp3, cp3-epc")
    rank: RankSpec = Field(default_factory=RankSpec, description="how ranks are chosen")
    layers: LayerSelection = Field(default_factory=LayerSelection, description="which layers are compressed")
    options: dict[str, dict[str, float | int | str | bool | None]] = Field(
        default_factory=dict, description="per-method decomposition options, e.g. {cp3: {n_iter_max: 200}}")
    search: SearchSpec | None = Field(
        None, description="rank-configuration search: the methods compete per layer (replaces one configuration "
                          "per method by one per search strategy)")
    stages: StagesSpec | None = Field(None, description="multi-stage compression: compress, fine-tune, compress "
                                                        "again (one configuration per method, stages as child runs)")

    @model_validator(mode="after")
    def _stages_fit(self):
        st = self.stages
        if st is None:
            return self
        if self.search is not None:
            raise ValueError("stages and search cannot be combined (the search picks one-shot configurations)")
        given = [k for k in ("ratios", "layers") if getattr(st, k) is not None]
        if len(given) == 2:
            raise ValueError("stages: give ratios or layers, not both")
        n = len(st.ratios if st.ratios is not None else st.layers) if given else st.count
        if n is None:
            raise ValueError("stages needs count, ratios or layers")
        if n < 2:
            raise ValueError(f"stages needs at least 2 stages, got {n}")
        if st.count is not None and given and st.count != n:
            raise ValueError(f"stages.count is {st.count} but {given[0]} lists {n} stages")
        if st.layers is not None:
            if any(not p for p in st.layers):
                raise ValueError("every stage in stages.layers needs at least one pattern")
            return self
        if self.rank.strategy != "ratio":
            raise ValueError(f"stages by ratio need compression.rank.strategy 'ratio' (the final ratio), got "
                             f"{self.rank.strategy!r}; or give stages.layers")
        if st.ratios is not None:
            r = st.ratios
            if any(x < 1 for x in r) or any(b <= a for a, b in zip(r, r[1:])):
                raise ValueError(f"stages.ratios must be >= 1 and increasing, got {r}")
            if abs(r[-1] - self.rank.ratio) > 1e-9:
                raise ValueError(f"the last of stages.ratios ({r[-1]:g}) must be the final ratio compression.rank.ratio "
                                 f"({self.rank.ratio:g})")
        return self

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v):
        if not v:
            raise ValueError("at least one method is needed")
        for m in v:
            if m not in lowrank.METHODS:
                raise ValueError(f"unknown method {m!r}; accepted: {', '.join(lowrank.list_methods())}")
        if len(set(v)) != len(v):
            raise ValueError("methods are listed twice")
        return v

    @model_validator(mode="after")
    def _options_for_known_methods(self):
        for m, opts in self.options.items():
            if m not in self.methods:
                raise ValueError(f"options given for method {m!r}, which is not in methods {self.methods}")
            try:
                lowrank.get_method(m).parse_options({k: v for k, v in opts.items() if k != "allow_larger"})
            except lowrank.LowRankError as e:
                raise ValueError(f"options.{m}: {e}") from None
        return self
class FromScratchSpec(_Strict):
    """Train the model in the vertical-BN-horizontal low-rank form of Tai et al. (2016) from
    random initialisation, next to the dense model trained with the same schedule."""

    ratio: float | None = Field(None, description="per-conv parameter ratio of the low-rank form (>= 1)")
    rank: int | None = Field(None, ge=1, description="or one rank K for every converted conv")
    layers: LayerSelection = Field(default_factory=LayerSelection, description="which convs take the low-rank form")
    epochs: int = Field(4, ge=1, le=1000, description="training epochs, the same for both models")
    lr: float = Field(0.05, gt=0, le=10, description="learning rate")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="optimizer")

    @model_validator(mode="after")
    def _rank_or_ratio(self):
        if (self.ratio is None) == (self.rank is None):
            raise ValueError("from_scratch needs exactly one of ratio (>= 1) or rank")
        if self.ratio is not None and self.ratio < 1:
            raise ValueError(f"from_scratch.ratio must be >= 1 (how many times smaller), got {self.ratio}")
        return self
