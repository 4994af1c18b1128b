"""What every model-level task starts from: the model and data specs, the seed and the device."""
from __future__ import annotations

import copy
import functools
import tempfile
from dataclasses import dataclass

import ray
import torch

from .. import deploy
from ..data import complete, default_workers, load_dataset
from ..models import build
from ..preprocess import Augmented, Preprocess, resolve
from ..spec import DatasetSpec, ModelSpec
from ..train import Distilled, loader, measure_latency


def node_id() -> str:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def assigned_cpus() -> int | None:
    """The CPUs Ray gave this task (None outside a task, the driver included)."""
    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return max(1, int(cpus)) if cpus else None


def with_task_threads(fn):
    """``fn`` as a Ray task body that first sets torch's threads to the CPUs Ray gave the task.

    Ray sets ``OMP_NUM_THREADS`` to those CPUs when a task starts, but torch reads it only when it
    is first imported, and the workers' setup hook (``lowrank.allocator``) imports torch before
    that: without this, every task ran with all the node's cores, and two 1-CPU tasks side by
    side on 2 cores ran their CP fits about 10 times slower than one alone. Setting it per task
    also keeps a worker Ray reuses for a task of another size right."""
    @functools.wraps(fn)
    def body(*args, **kwargs):
        cpus = assigned_cpus()
        if cpus is not None and torch.get_num_threads() != cpus:
            torch.set_num_threads(cpus)
        return fn(*args, **kwargs)
    return body


def cpu_state(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def latency(model, input_shape, device, runtime: str = "torch") -> dict:
    """Median forward time at batch 1 and batch 32 (seconds), in the task: eagerly on a GPU or
    for ``torch``/``torch-compile`` (compiling in every task would cost more than it tells), else
    on ``runtime`` at one thread. The registered figures come from the timing step."""
    if not str(device).startswith("cuda") and runtime == "onnxruntime":
        try:
            with tempfile.TemporaryDirectory() as tmp:
                out = {f"b{b}": deploy.timed([model], tuple(input_shape), runtime=runtime, batch=b, threads=1,
                                             repeats=r, workdir=tmp)[0] for b, r in ((1, 10), (32, 3))}
            return {**out, "in_task": f"{runtime}, one thread"}
        except Exception:  # noqa: BLE001 - a model ONNX cannot take is timed eagerly (the timing step says why)
            pass
    return {"b1": measure_latency(model, input_shape, 1, device=device, repeats=10),
            "b32": measure_latency(model, input_shape, 32, device=device, repeats=3, warmup=1),
            "in_task": f"torch on {str(device).split(':')[0]}"}


@dataclass(frozen=True)
class TaskEnv:
    """A task's model, data and device. With ``agreement`` the loaders' targets are the dense
    model's outputs (``dense(base_state)``, ``teach``), so that every evaluation measures agreement
    with it and every fine-tuning distils from it, whatever the task."""

    model: ModelSpec
    dataset: DatasetSpec
    seed: int
    gpu: bool  # the task was given a GPU (asked for and present in the cluster)
    prep: Preprocess | None = None  # None: the data's own defaults (preprocess.resolve without weights)
    agreement: bool = False
    runtime: str = "torch"  # latency.runtime: where the in-task latency is measured
    latency_size: int | None = None  # latency.input_size: the square size it is measured at (None: the data's)

    @property
    def device(self) -> str:
        return "cuda" if self.gpu and torch.cuda.is_available() else "cpu"

    def begin(self) -> "TaskEnv":
        """Every task's first step: seed the RNG (model initialisation, data order), load the data."""
        torch.manual_seed(self.seed)
        _ = self.data
        return self

    def dense(self, base_state: dict):
        """The dense model of ``base_state``; with ``agreement`` also the loaders' teacher."""
        model = self.build(base_state)
        if self.agreement:
            self.teach(model)
        return model

    def teach(self, dense) -> None:
        """The dense model whose outputs are the targets (agreement); a frozen copy."""
        teacher = copy.deepcopy(dense).to(self.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        object.__setattr__(self, "_teacher", teacher)

    def _targets(self, dl):
        if not self.agreement:
            return dl
        teacher = getattr(self, "_teacher", None)
        if teacher is None:
            raise RuntimeError("evaluation by agreement needs the dense model first (TaskEnv.begin(base_state))")
        return Distilled(dl, teacher, self.device)

    @functools.cached_property
    def data(self):
        """``(train, val)``, loaded once per task (and cached per worker process)."""
        train, val, _ = load_dataset(self.dataset, self.seed, self.prep)
        return train, val

    @functools.cached_property
    def preprocess(self) -> Preprocess:
        """What the model is fed, mean/std filled in."""
        return complete(self.dataset, self.prep or resolve(self.dataset, None), self.seed)

    @property
    def input_shape(self) -> tuple:
        return tuple(self.data[0][0][0].shape)

    @property
    def latency_shape(self) -> tuple:
        """The input shape latency is measured at: ``latency.input_size`` when set, else the data's."""
        return deploy.timed_shape(self.input_shape, self.latency_size)

    def latency(self, model) -> dict:
        """``latency()`` of ``model`` at ``latency_shape``; at the data's size where the model cannot
        run at the other (``in_task`` says which size was timed)."""
        shape = self.latency_shape
        try:
            out = latency(model, shape, self.device, self.runtime)
        except Exception:  # noqa: BLE001 - e.g. a flattening classifier sized for the data's input
            if shape == self.input_shape:
                raise
            shape = self.input_shape
            out = latency(model, shape, self.device, self.runtime)
        return {**out, "in_task": f"{out['in_task']}, {shape[-1]} px"}

    def build(self, state: dict | None = None):
        """The model, with ``state`` loaded when given."""
        model = build(self.model)
        if state is not None:
            model.load_state_dict(state)
        return model

    @property
    def workers(self) -> int:
        """DataLoader workers: sized to the task's CPUs, not the node's (a 1-CPU task on a
        16-core node would otherwise start 4 decoding processes beside its training loop)."""
        return default_workers(self.dataset, assigned_cpus())

    def val_loader(self, subset: int | None = None):
        val = self.data[1]
        if subset is not None:
            val = torch.utils.data.Subset(val, range(min(len(val), subset)))
        return self._targets(loader(val, self.dataset.batch_size, shuffle=False, workers=self.workers))

    def train_loader(self, workers: bool = True):
        """Shuffled, augmented (``prep.augment``), with the teacher's targets under agreement."""
        dl = loader(self.data[0], self.dataset.batch_size, shuffle=True, workers=self.workers if workers else 0,
                    seed=self.seed)
        if self.prep is not None and self.prep.augment != "none":
            dl = Augmented(dl, self.prep.augment, self.seed)
        return self._targets(dl)

    def bn_loader(self, workers: bool = True):
        """Training images as evaluated (no augmentation, no targets): BatchNorm recalibration."""
        return loader(self.data[0], self.dataset.batch_size, shuffle=True, workers=self.workers if workers else 0,
                      seed=self.seed)
