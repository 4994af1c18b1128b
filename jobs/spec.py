"""The sweep spec: YAML validated by strict pydantic models (unknown keys rejected, each error
reported with the key's location). Validation never starts Ray or MLflow."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BUILTIN_MODELS = ("smallcnn",)
DEFAULT_SPEC = Path(__file__).with_name("default_sweep.yaml")


class SpecError(ValueError):
    """A spec that cannot run; the message is one line naming the key and what is accepted."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LayerSelection(_Strict):
    include: list[str] = Field(default_factory=list, description="glob patterns on qualified layer names; empty = all")
    exclude: list[str] = Field(default_factory=list, description="glob patterns of layers to leave dense")
    skip_first: bool = Field(True, description="leave the first conv dense (few input channels, cheap)")
    pointwise_method: Literal["svd"] | None = Field(
        None, description="also factorize 1x1 convs and Linear layers with this method")


class ModelSpec(_Strict):
    name: str = Field(description="torchvision architecture (resnet18, vgg16, ...) or 'smallcnn'")
    num_classes: int = Field(10, ge=2, description="classifier outputs")
    checkpoint: Path | None = Field(None, description="state dict file, loaded with torch.load(weights_only=True)")
    layers: LayerSelection | None = Field(None, description="overrides compression.layers for this model")

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from .models import available_models

        names = available_models()
        if v not in names:
            close = [n for n in names if n.startswith(v[:4])][:6]
            raise ValueError(f"unknown model {v!r}; accepted: 'smallcnn' or a torchvision classification model"
                             + (f" (e.g. {', '.join(close)})" if close else " (e.g. resnet18, vgg16, alexnet)"))
        return v


class DatasetSpec(_Strict):
    kind: Literal["digits", "cifar10", "imagefolder"] = Field(
        "digits", description="digits: scikit-learn's bundled 8x8 digits (upscaled); cifar10: torchvision "
                              "format in a local folder (no download); imagefolder: one folder per class")
    root: Path | None = Field(None, description="data folder for cifar10 / imagefolder")
    input_size: int = Field(32, ge=8, le=512, description="images are resized to input_size x input_size")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="validation split (digits, imagefolder)")
    batch_size: int = Field(64, ge=1, description="batch size for training and evaluation")
    workers: int = Field(0, ge=0, description="DataLoader worker processes")
    limit_train: int | None = Field(None, ge=1, description="use at most this many training samples")
    limit_val: int | None = Field(None, ge=1, description="use at most this many validation samples")

    @model_validator(mode="after")
    def _root_needed(self):
        if self.kind != "digits" and self.root is None:
            raise ValueError(f"dataset kind {self.kind!r} needs 'root' (a local folder)")
        return self


class PretrainSpec(_Strict):
    epochs: int = Field(3, ge=0, description="training epochs when no checkpoint is given")
    lr: float = Field(0.05, gt=0, description="learning rate")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="optimizer")
    cache_dir: Path = Field(Path(".cache/pretrained"), description="pre-trained weights cached by content hash")


class RankSpec(_Strict):
    strategy: Literal["fixed", "vbmf", "energy", "ratio"] = Field(
        "ratio", description="fixed ranks, VBMF (Kim et al.), energy fraction, or a per-layer ratio target")
    rank: int | tuple[int, int] | None = Field(None, description="fixed: rank for every layer")
    per_layer: dict[str, int | tuple[int, int]] = Field(default_factory=dict, description="fixed: rank per layer name")
    ratio: float | None = Field(2.0, description="ratio: how many times smaller each layer becomes (>= 1)")
    target: Literal["params", "macs"] = Field("params", description="ratio: count parameters or MACs")
    energy: float | None = Field(None, description="energy: fraction of squared singular values kept, (0, 1]")
    weakening: float = Field(1.0, ge=0, le=1, description="vbmf: R = Rmax - k (Rmax - Rvbmf); 1 = plain VBMF")
    min_rank: int = Field(1, ge=1, description="vbmf/energy: never below this rank")

    @model_validator(mode="after")
    def _needs(self):
        if self.strategy == "fixed" and self.rank is None and not self.per_layer:
            raise ValueError("rank strategy 'fixed' needs 'rank' or 'per_layer'")
        if self.strategy == "ratio" and (self.ratio is None or self.ratio < 1):
            raise ValueError(f"rank strategy 'ratio' needs 'ratio' >= 1, got {self.ratio!r}")
        if self.strategy == "energy" and (self.energy is None or not 0 < self.energy <= 1):
            raise ValueError(f"rank strategy 'energy' needs 0 < 'energy' <= 1, got {self.energy!r}")
        return self

    def for_layer(self, name: str):
        """(rank, strategy options) for one layer, in lowrank's vocabulary."""
        if self.strategy == "fixed":
            r = self.per_layer.get(name, self.rank)
            return (tuple(r) if isinstance(r, (list, tuple)) else r), {}
        if self.strategy == "ratio":
            return "ratio", {"ratio": self.ratio, "target": self.target}
        if self.strategy == "energy":
            return "energy", {"energy": self.energy, "min_rank": self.min_rank}
        return "vbmf", {"weakening": self.weakening, "min_rank": self.min_rank}


STRATEGY_FIELDS = {  # the search fields each strategy's result depends on (its config hash)
    "budget": ("target", "ratio", "candidate_ratios", "loss", "latency_device", "val_batches", "bn_batches"),
    "uniform": ("target", "ratio", "candidate_ratios", "loss", "latency_device", "val_batches", "bn_batches"),
    "vbmf": ("vbmf_weakening", "loss", "val_batches", "bn_batches"),
    "tolerance": ("epsilon", "tolerance_steps", "candidate_ratios", "val_batches", "bn_batches"),
    "tune": ("target", "ratio", "candidate_ratios", "loss", "latency_device", "val_batches", "bn_batches", "tune"),
}


class TuneSpec(_Strict):
    trials: int = Field(6, ge=2, description="configurations tried near the budget solution (the first is it)")
    noise: float = Field(0.5, ge=0, description="log-normal sigma applied to the per-layer losses to draw neighbours")
    grace_epochs: int = Field(1, ge=1, description="ASHA: epochs every trial runs before it may be stopped")
    reduction_factor: int = Field(2, ge=2, description="ASHA: keep the best 1/reduction_factor at each rung")


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
    val_batches: int = Field(4, ge=1, description="validation batches per sensitivity probe")
    bn_batches: int = Field(5, ge=1, description="training batches for BN recalibration per probe")
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
    epochs: int = Field(1, ge=0, description="fine-tuning epochs after each stage but the last (the last uses "
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
        import lowrank

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
        import inspect

        import lowrank

        for m, opts in self.options.items():
            if m not in self.methods:
                raise ValueError(f"options given for method {m!r}, which is not in methods {self.methods}")
            params = inspect.signature(lowrank.METHODS[m].decompose).parameters
            bad = sorted(set(opts) - set(params) - {"allow_larger"})
            if bad:
                ok = [p for p in params if p not in ("weight", "rank", "groups", "callback", "epc_callback")]
                raise ValueError(f"unknown option(s) {bad} for method {m!r}; accepted: {ok}")
        return self


class FinetuneSpec(_Strict):
    epochs: int = Field(1, ge=0, description="fine-tuning epochs after compression")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="optimizer")
    lr: float = Field(0.005, gt=0, description="learning rate (about 0.1x the pre-training one)")
    bn_recalibration: bool = Field(True, description="recompute BatchNorm statistics before fine-tuning")
    bn_batches: int = Field(20, ge=1, description="training batches used for BN recalibration")


class ResourcesSpec(_Strict):
    cpus_per_task: float = Field(1, gt=0, description="CPUs per Ray task")
    gpus_per_task: float = Field(0, ge=0, description="GPUs per Ray task (fractions allowed); 0 = CPU")
    max_concurrent: int | None = Field(None, ge=1, description="most tasks in flight at once")


class MlflowSpec(_Strict):
    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI (also the registry)")
    experiment: str = Field("lowrank-sweeps", min_length=1, description="experiment name")
    registered_model_prefix: str = Field("lowrank-", description="registered model = prefix + model name")
    registered_names: dict[str, str] = Field(default_factory=dict, description="explicit registered names per model")

    def registered_name(self, model: str) -> str:
        return self.registered_names.get(model, f"{self.registered_model_prefix}{model}")


class FromScratchSpec(_Strict):
    """Train the model in the vertical-BN-horizontal low-rank form of Tai et al. (2016) from
    random initialisation, next to the dense model trained with the same schedule."""

    ratio: float | None = Field(None, description="per-conv parameter ratio of the low-rank form (>= 1)")
    rank: int | None = Field(None, ge=1, description="or one rank K for every converted conv")
    layers: LayerSelection = Field(default_factory=LayerSelection, description="which convs take the low-rank form")
    epochs: int = Field(4, ge=1, description="training epochs, the same for both models")
    lr: float = Field(0.05, gt=0, description="learning rate")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="optimizer")

    @model_validator(mode="after")
    def _rank_or_ratio(self):
        if (self.ratio is None) == (self.rank is None):
            raise ValueError("from_scratch needs exactly one of ratio (>= 1) or rank")
        if self.ratio is not None and self.ratio < 1:
            raise ValueError(f"from_scratch.ratio must be >= 1 (how many times smaller), got {self.ratio}")
        return self


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="sweep name (tag on every run)")
    seed: int = Field(0, description="seed for data split, training and decompositions")
    models: list[ModelSpec] = Field(min_length=1, description="models to compress")
    dataset: DatasetSpec = Field(default_factory=DatasetSpec, description="data for training and evaluation")
    pretrain: PretrainSpec = Field(default_factory=PretrainSpec, description="pre-training without a checkpoint")
    compression: CompressionSpec | None = Field(None, description="methods, ranks and layers")
    from_scratch: FromScratchSpec | None = Field(None, description="train low-rank (Tai et al.) and dense models "
                                                                   "from scratch with one schedule")
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec, description="fine-tuning after compression")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Ray resources")
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec, description="where results go")

    @model_validator(mode="after")
    def _something_to_do(self):
        if self.compression is None and self.from_scratch is None:
            raise ValueError("a sweep needs compression (methods to apply) and/or from_scratch")
        return self

    @model_validator(mode="after")
    def _latency_device_has_gpus(self):
        s = self.compression.search if self.compression else None
        if s is not None and s.latency_device == "cuda" and self.resources.gpus_per_task <= 0:
            raise ValueError("compression.search.latency_device 'cuda' needs resources.gpus_per_task > 0 "
                             "(latency is measured on the workers' device)")
        return self

    @model_validator(mode="after")
    def _tune_needs_epochs(self):
        s = self.compression.search if self.compression else None
        if s is not None and "tune" in s.strategies and self.finetune.epochs < 1:
            raise ValueError("compression.search strategy 'tune' needs finetune.epochs >= 1 (ASHA stops trials "
                             "between fine-tuning epochs)")
        return self

    @model_validator(mode="after")
    def _unique_models(self):
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"each model may appear once, got {names}")
        return self


def _format_error(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def parse_spec(data, source: str = "spec") -> SweepSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a sweep spec is a YAML mapping, got {type(data).__name__}")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_error(e, source)) from None


def load_spec(path: str | Path | None = None) -> SweepSpec:
    """Read and validate a spec file (``None``: the embedded default sweep)."""
    p = Path(path) if path is not None else DEFAULT_SPEC
    if not p.is_file():
        raise SpecError(f"spec file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SpecError(f"{p}:{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    return parse_spec(data, str(p))


def check_local_paths(spec: SweepSpec, source: str = "spec") -> None:
    """Files the spec names must exist where it runs (kept out of the schema so that cluster
    specs, whose paths live on the cluster, still validate elsewhere with ``--schema-only``)."""
    for i, m in enumerate(spec.models):
        if m.checkpoint is not None and not Path(m.checkpoint).is_file():
            raise SpecError(f"{source}: models.{i}.checkpoint: checkpoint file {str(m.checkpoint)!r} does not exist")
    d = spec.dataset
    if d.kind != "digits" and not Path(d.root).is_dir():
        raise SpecError(f"{source}: dataset.root: {str(d.root)!r} is not a folder (kind {d.kind!r} reads a local folder)")


def stable_hash(obj, n: int = 16) -> str:
    """Hash of a JSON-serialisable object with sorted keys (paths as strings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
