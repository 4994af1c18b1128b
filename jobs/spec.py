"""The sweep spec: YAML validated by strict pydantic models (unknown keys rejected, each error
reported with the key's location). Validation never starts Ray or MLflow."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, JsonValue, ValidationError, ValidationInfo, field_validator, model_validator

from .models import available_models, check_timm_name
from .spec_data import DatasetSpec, NormalizeSpec
from .spec_latency import LatencySpec
from .spec_compression import (STRATEGY_FIELDS, CompressionSpec, FromScratchSpec, LayerSelection, RankSpec,
                               SearchSpec, StagesSpec, TuneSpec, _Strict)

DEFAULT_SPEC = Path(__file__).with_name("default_sweep.yaml")
_NAME_CHARS = r"^[A-Za-z0-9_.-]*$"  # registered model names: letters, digits, '_', '.', '-'
MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_VALUES = 100_000


class SpecError(ValueError):
    """A spec that cannot run; the message is one line naming the key and what is accepted."""


__all__ = ["CompressionSpec", "FromScratchSpec", "LayerSelection", "RankSpec", "SearchSpec", "StagesSpec", "TuneSpec",
           "STRATEGY_FIELDS", "DatasetSpec", "FinetuneSpec", "ModelSpec", "MlflowSpec", "PretrainSpec",
           "NormalizeSpec", "LatencySpec", "ResourcesSpec", "SweepSpec", "SpecError", "load_spec", "parse_spec",
           "check_local_paths", "stable_hash", "file_digest", "DEFAULT_SPEC"]


class ModelSpec(_Strict):
    factory: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$", max_length=300,
                                description="'package.module:callable' returning an nn.Module (your own network; "
                                            "ship its code with --working-dir)")
    name: str = Field(max_length=100, description="torchvision architecture (resnet18, vgg16, ...), 'smallcnn', "
                                                  "'timm/<architecture>' (the timm extra), or, with 'factory', your "
                                                  "own label for the model")
    kwargs: dict[str, JsonValue] = Field(default_factory=dict, description="keyword arguments of the factory")
    weights: str | None = Field(None, pattern=r"^[A-Z0-9_]+$", max_length=64,
                                description="pretrained weights by name: torchvision's (DEFAULT, IMAGENET1K_V1, ...), "
                                            "read from its cache under TORCH_HOME; timm's: DEFAULT (the tag is in "
                                            "the name), read from the Hugging Face cache")
    num_classes: int = Field(10, ge=2, le=100_000, description="classifier outputs")
    checkpoint: Path | None = Field(None, description="state dict file, loaded with torch.load(weights_only=True)")
    pretrained: bool = Field(False, description="the factory's model comes with its trained weights: used as they "
                                                "are (never pre-trained here); a timm-style pretrained_cfg on it "
                                                "gives its preprocessing")
    channels: Literal[1, 3] | None = Field(None, description="input channels the model takes: 1 (grey) or 3 (RGB); "
                                                            "default: its first conv's in_channels (grey data is "
                                                            "repeated for RGB models, colour reduced to luminance "
                                                            "for grey ones)")
    layers: LayerSelection | None = Field(None, description="overrides compression.layers for this model")

    @field_validator("name")
    @classmethod
    def _known_name(cls, v: str, info: ValidationInfo) -> str:
        if info.data.get("factory") is not None:
            if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", v):
                raise ValueError(f"a factory model's name is a label of letters, digits, '_', '.', '-', got {v!r}")
            return v
        if v.startswith("timm/"):
            return check_timm_name(v)
        names = available_models()
        if v not in names:
            close = [n for n in names if n.startswith(v[:4])][:6]
            raise ValueError(f"unknown model {v[:100]!r}; accepted: 'smallcnn', a torchvision classification model"
                             + (f" (e.g. {', '.join(close)})" if close else " (e.g. resnet18, vgg16, alexnet)")
                             + ", or factory: 'package.module:callable'")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.pretrained and self.factory is None:
            raise ValueError("pretrained marks a factory's own weights; torchvision models take weights: DEFAULT")
        if self.factory is not None:
            if self.weights is not None:
                raise ValueError("weights names torchvision's pretrained weights; a factory loads its own (or give "
                                 "checkpoint)")
            return self
        if self.kwargs:
            raise ValueError("kwargs are the factory's; give factory: 'package.module:callable'")
        if self.weights not in (None, "DEFAULT") and self.name.startswith("timm/"):
            raise ValueError(f"timm weights are named by the model's tag (timm/resnet50.a1_in1k); give weights: DEFAULT, "
                             f"got {self.weights!r}")
        if self.weights is not None and self.name == "smallcnn":
            raise ValueError("weights are torchvision's pretrained weights; smallcnn has none (give checkpoint)")
        if self.weights is not None and self.checkpoint is not None:
            raise ValueError("give weights or checkpoint, not both")
        return self

    @property
    def trained(self) -> bool:
        """Its weights come with it (pretrained weights, a checkpoint, a pretrained factory)."""
        return self.weights is not None or self.checkpoint is not None or self.pretrained


class PretrainSpec(_Strict):
    epochs: int = Field(3, ge=0, le=1000, description="training epochs when no checkpoint is given")
    lr: float = Field(0.05, gt=0, le=10, description="learning rate")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="optimizer")
    cache_dir: Path = Field(Path(".cache/pretrained"), description="pre-trained weights cached by content hash")


class FinetuneSpec(_Strict):
    epochs: int = Field(1, ge=0, le=1000, description="fine-tuning epochs after compression")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="optimizer")
    lr: float = Field(0.005, gt=0, le=10, description="learning rate (about 0.1x the pre-training one)")
    bn_recalibration: bool = Field(True, description="recompute BatchNorm statistics before fine-tuning")
    bn_batches: int = Field(20, ge=1, le=100_000, description="training batches used for BN recalibration")
    eval_each_epoch: bool = Field(True, description="evaluate after every fine-tuning epoch (the curve: metric "
                                                    "acc_ft_epoch by step, tag ft_curve); false: only at the end")

    def content(self) -> dict:
        """What a fine-tuned result depends on (part of config hashes): evaluating between epochs
        does not change the weights, so it is left out."""
        return self.model_dump(mode="json", exclude={"eval_each_epoch"})


class ResourcesSpec(_Strict):
    cpus_per_task: float = Field(1, gt=0, description="CPUs per Ray task (checked against the cluster's nodes)")
    gpus_per_task: float = Field(0, ge=0, description="GPUs per Ray task (fractions allowed); 0 = CPU")
    memory_per_task_gb: float | None = Field(None, gt=0, description="memory reserved per Ray task, GiB")
    max_concurrent: int | None = Field(None, ge=1, description="most tasks in flight at once")
    autoscaling: bool = Field(False, description="the cluster adds nodes on demand: a request no node can serve "
                                                 "yet is waited for (schedule_timeout_s) instead of refused")
    schedule_timeout_s: float = Field(600, gt=0, le=86_400, description="autoscaling: how long to wait for a node "
                                                                        "that can run a task, then exit 1")


class MlflowSpec(_Strict):
    tracking_uri: str = Field("sqlite:///mlflow.db", min_length=1, max_length=2048, description="MLflow tracking URI (also the registry)")
    experiment: str = Field("lowrank-sweeps", min_length=1, max_length=256, description="experiment name")
    registered_model_prefix: str = Field("lowrank-", pattern=_NAME_CHARS, max_length=100,
                                         description="registered model = prefix + model name")
    registered_names: dict[str, Annotated[str, Field(pattern=_NAME_CHARS, min_length=1, max_length=200)]] = Field(
        default_factory=dict, description="explicit registered names per model")

    def registered_name(self, model: str) -> str:
        return self.registered_names.get(model, f"{self.registered_model_prefix}{model.replace('/', '-')}")


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100,
                      description="sweep name (tag on every run)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed for data split, training and decompositions")
    models: list[ModelSpec] = Field(min_length=1, description="models to compress")
    dataset: DatasetSpec = Field(default_factory=DatasetSpec, description="data for training and evaluation")
    pretrain: PretrainSpec = Field(default_factory=PretrainSpec, description="pre-training without a checkpoint")
    compression: CompressionSpec | None = Field(None, description="methods, ranks and layers")
    from_scratch: FromScratchSpec | None = Field(None, description="train low-rank (Tai et al.) and dense models "
                                                                   "from scratch with one schedule")
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec, description="fine-tuning after compression")
    evaluation: Literal["accuracy", "agreement"] = Field(
        "accuracy", description="accuracy: top-1 on the labelled validation split; agreement: top-1 agreement with "
                                "and KL(dense || compressed) from the dense model on any images, no labels "
                                "needed (fine-tuning distils from the dense model)")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Ray resources")
    latency: LatencySpec = Field(default_factory=LatencySpec, description="how registered versions are timed")
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
    def _agreement_needs_weights(self):
        if self.evaluation == "accuracy":
            if self.dataset.kind == "images":
                raise ValueError("dataset kind 'images' has no labels; it serves evaluation: agreement")
            return self
        untrained = [m.name for m in self.models if not m.trained]
        if untrained:
            raise ValueError(f"evaluation: agreement compares with a trained dense model, and {untrained[0]} has no "
                             f"weights; give weights (torchvision), checkpoint, or pretrained: true (a factory "
                             f"that loads its own)")
        if self.from_scratch is not None:
            raise ValueError("from_scratch trains on labels; it cannot run with evaluation: agreement")
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
    msg = (e["msg"].removeprefix("Value error, ").splitlines() or [""])[0]
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
    if not _is_file(p):
        raise SpecError(f"spec file {str(p)[:200]!r} does not exist or is not a file")
    raw = p.read_bytes()[:MAX_SPEC_BYTES + 1]
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"{p}: is larger than {MAX_SPEC_BYTES >> 20} MiB; a sweep spec is a small YAML text file")
    try:
        text = raw.decode("utf-8")
        if "\x00" in text:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\x00"), raw.index(b"\x00") + 1, "NUL byte")
    except UnicodeDecodeError as e:
        raise SpecError(f"{p}: is not a text file (byte {e.start}: {e.reason}); a sweep spec is UTF-8 YAML") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SpecError(f"{p}:{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if _expanded_size(data) > MAX_SPEC_VALUES:
        raise SpecError(f"{p}: expands to more than {MAX_SPEC_VALUES:,} values (YAML anchors and aliases); a sweep "
                        f"spec is small")
    return parse_spec(data, str(p))


def _expanded_size(obj, memo=None) -> int:
    """How many values ``obj`` holds once every alias is expanded (YAML shares aliased objects,
    so a 1 KB "billion laughs" file would otherwise take validation forever). Memoised by id."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    memo[id(obj)] = MAX_SPEC_VALUES + 1  # a cycle counts as too large
    if isinstance(obj, dict):
        n = 1 + sum(_expanded_size(v, memo) for v in obj.values()) + len(obj)
    elif isinstance(obj, list):
        n = 1 + sum(_expanded_size(v, memo) for v in obj)
    else:
        n = 1
    memo[id(obj)] = min(n, MAX_SPEC_VALUES + 1)
    return memo[id(obj)]


def check_local_paths(spec: SweepSpec, source: str = "spec") -> None:
    """Files the spec names must exist where it runs (kept out of the schema so that cluster
    specs, whose paths live on the cluster, still validate elsewhere with ``--schema-only``)."""
    for i, m in enumerate(spec.models):
        if m.checkpoint is not None and not _is_file(m.checkpoint):
            raise SpecError(f"{source}: models.{i}.checkpoint: checkpoint file {str(m.checkpoint)[:200]!r} does not "
                            f"exist")
    d = spec.dataset
    if d.kind != "digits" and not _is_file(d.folder, folder=True):
        hint = "; install it with: apt-get install dataset-fashion-mnist" if d.kind == "fashion-mnist" else ""
        raise SpecError(f"{source}: dataset.root: {str(d.folder)[:200]!r} is not a folder (kind {d.kind!r} reads a "
                        f"local folder{hint})")


def _is_file(path, folder: bool = False) -> bool:
    """``is_file``/``is_dir`` that answers False for names the OS refuses (too long, NUL bytes)."""
    try:
        return Path(path).is_dir() if folder else Path(path).is_file()
    except (OSError, ValueError):
        return False


def stable_hash(obj, n: int = 16) -> str:
    """Hash of a JSON-serialisable object with sorted keys (paths as strings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
