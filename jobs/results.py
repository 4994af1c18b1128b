"""What crosses the Ray boundary, typed and built in one place each: a layer's decomposition
(``LayerResult``), a model's baseline (``Baseline``) and a compressed, evaluated and fine-tuned
configuration (``EvalResult``). Plain dataclasses of tensors and numbers: they pickle to the
workers and back, and the spool writes them to disk."""
from __future__ import annotations

import traceback as tb
from dataclasses import dataclass, field

import torch


@dataclass
class LayerResult:
    """One layer's decomposition: ``status`` is ``ok`` (with factors), ``skipped`` (the rank
    would not make the layer smaller) or ``failed``; the reason says why."""

    name: str
    method: str
    status: str = "ok"
    reason: str = ""
    factors: object = None
    rank: object = None
    rel_error: float | None = None
    diagnostics: dict = field(default_factory=dict)
    seconds: float = 0.0
    node: str = ""
    traceback: str = ""

    @classmethod
    def failure(cls, name: str, method: str, err: Exception, *, skipped: bool = False, seconds: float = 0.0,
                node: str = "") -> "LayerResult":
        reason = str(err) if skipped else f"{type(err).__name__}: {err}".splitlines()[0]
        return cls(name, method, "skipped" if skipped else "failed", reason, seconds=seconds, node=node,
                   traceback="" if skipped else tb.format_exc(limit=5))

    def status_row(self) -> dict:
        """The layer's status without its tensors (what a layer table shows)."""
        return {"name": self.name, "method": self.method, "status": self.status, "reason": self.reason,
                "seconds": self.seconds, "node": self.node}


@dataclass
class Baseline:
    """A model's trained weights and its dense reference figures."""

    state_dict: dict
    acc: dict
    params: int
    macs: int
    latency: dict
    input_shape: tuple
    source: str  # checkpoint | cache | trained | weights | scratch
    preprocess: dict = field(default_factory=dict)  # what the model was fed (Preprocess.describe())
    train_seconds: float = 0.0
    device: str = "cpu"
    task_seconds: float = 0.0
    node: str = ""

    def reference(self) -> dict:
        """The dense figures a configuration is compared with (what is logged and spooled)."""
        return {"acc": self.acc, "params": self.params, "macs": self.macs, "latency": self.latency,
                "input_shape": tuple(self.input_shape), "source": self.source, "preprocess": self.preprocess}


@dataclass
class EvalResult:
    """A configuration's compressed model: accuracies before (post) and after fine-tuning,
    size, latency, per-layer reports and statuses, and the weights to register."""

    state_dict: dict
    factors: dict  # layer -> factors (the model is rebuilt from them, then loads state_dict)
    acc_post: dict
    acc_ft: dict
    params: int
    macs: int
    latency: dict
    reports: list  # lowrank.LayerReport.to_dict() per built layer
    layer_status: list  # LayerResult.status_row() per planned layer
    acc_bn: dict | None = None
    ft_losses: list = field(default_factory=list)
    ft_seconds: float = 0.0
    device: str = "cpu"
    task_seconds: float = 0.0
    node: str = ""
    stages: list | None = None  # staged: one record per stage
    curves: dict | None = None  # scratch: training curves of both models
    allocation: str = ""  # search: what the strategy chose per layer
    predicted: float | None = None  # search: the ratio on its target it predicted for that choice

    def decompose_seconds(self) -> float:
        return sum(s.get("seconds", 0.0) for s in self.layer_status)

    def refusal(self, dense_params: int) -> str | None:
        """Why this result must never become a registered version (None: it may): no layer was
        compressed, the model is not smaller than the dense one, or a weight is not finite."""
        if self.layer_status and not any(s["status"] == "ok" for s in self.layer_status):
            why = next((s["reason"] for s in self.layer_status if s.get("reason")), "")
            return (f"nothing was compressed: all {len(self.layer_status)} selected layer(s) failed or stayed dense"
                    + (f" (first: {why[:120]})" if why else ""))
        if self.params >= dense_params:
            return f"the model is not smaller than the dense one ({self.params} vs {dense_params} parameters)"
        bad = [k for k, v in self.state_dict.items()
               if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            return f"non-finite weights (NaN or inf) in {len(bad)} tensor(s), first {bad[0]!r}"
        return None  # non-finite outputs are checked where the model is rebuilt (Session.log)
