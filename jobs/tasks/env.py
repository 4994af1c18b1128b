"""What every model-level task starts from: the model and data specs, the seed and the device."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import ray
import torch

from ..data import load_dataset
from ..models import build
from ..spec import DatasetSpec, ModelSpec
from ..train import loader, measure_latency


def node_id() -> str:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def cpu_state(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def latency(model, input_shape, device) -> dict:
    """Median forward time at batch 1 and batch 32 (seconds)."""
    return {"b1": measure_latency(model, input_shape, 1, device=device, repeats=10),
            "b32": measure_latency(model, input_shape, 32, device=device, repeats=3, warmup=1)}


@dataclass(frozen=True)
class TaskEnv:
    model: ModelSpec
    dataset: DatasetSpec
    seed: int
    gpu: bool  # the task was given a GPU (asked for and present in the cluster)

    @property
    def device(self) -> str:
        return "cuda" if self.gpu and torch.cuda.is_available() else "cpu"

    def begin(self) -> "TaskEnv":
        """Every task's first step: seed the RNG (model initialisation, data order), load the data."""
        torch.manual_seed(self.seed)
        _ = self.data
        return self

    @functools.cached_property
    def data(self):
        """``(train, val)``, loaded once per task (and cached per worker process)."""
        train, val, _ = load_dataset(self.dataset, self.seed)
        return train, val

    @property
    def input_shape(self) -> tuple:
        return tuple(self.data[0][0][0].shape)

    def build(self, state: dict | None = None):
        """The model, with ``state`` loaded when given."""
        model = build(self.model)
        if state is not None:
            model.load_state_dict(state)
        return model

    def val_loader(self, subset: int | None = None):
        val = self.data[1]
        if subset is not None:
            val = torch.utils.data.Subset(val, range(min(len(val), subset)))
        return loader(val, self.dataset.batch_size, shuffle=False)

    def train_loader(self, workers: bool = True):
        return loader(self.data[0], self.dataset.batch_size, shuffle=True,
                      workers=self.dataset.workers if workers else 0, seed=self.seed)
