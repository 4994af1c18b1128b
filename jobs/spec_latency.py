"""The latency section of the sweep spec: where, at what sizes, batches and threads the dense and
the compressed model are timed side by side (``jobs/tasks/timing.py``, ``jobs/deploy.py``)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from .spec_compression import _Strict


class LatencySpec(_Strict):
    runtime: Literal["onnxruntime", "torch", "torch-compile"] = Field(
        "onnxruntime", description="where the dense and the compressed model are timed for the tags (speedup_b1): "
                                   "ONNX Runtime on CPU (the exported ONNX model), PyTorch eager, or torch.compile")
    batches: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        [1, 32], min_length=1, max_length=8, description="batch sizes timed, 1 among them (tags: speedup_b1, and "
                                                         "the largest as speedup_b<N>)")
    threads: list[Annotated[int, Field(ge=0, le=1024)]] = Field(
        [1, 0], min_length=1, max_length=4, description="intra-op threads timed; 0 = all of the timing task's CPUs "
                                                        "(tags: the fewest)")
    input_size: int | None = Field(None, ge=8, le=4096, description="square input size timed (default: the data's)")
    also_at: Literal["auto"] | list[int] = Field(  # checked by _sizes_or_auto, in one line
        "auto", description="more square sizes every version is also timed at (batch 1, the same runtime and "
                            "threads; metrics speedup_b1_t1_224px, tag speedup_b1_224px): 'auto' = 224 for an "
                            "ImageNet-style network (a torchvision or timm model by name) timed at another size; "
                            "[] = none")
    repeats: int = Field(20, ge=1, le=10_000, description="interleaved repetitions per model (medians compared)")
    exclusive: bool = Field(True, description="the timing task takes a whole node's CPUs, so that no other task "
                                              "runs beside it; false: resources.cpus_per_task")

    def extra_sizes(self, model, timed: int) -> tuple[int, ...]:
        """The sizes a version of ``model`` (a ``ModelSpec``) is also timed at, besides ``timed``
        (the size its tags are taken at): ``also_at``, with ``'auto'`` resolved."""
        if self.also_at == "auto":
            imagenet_style = model.factory is None and model.name != "smallcnn"
            return (224,) if imagenet_style and timed != 224 else ()
        return tuple(dict.fromkeys(s for s in self.also_at if s != timed))

    @field_validator("also_at", mode="before")
    @classmethod
    def _sizes_or_auto(cls, v):
        ok = v == "auto" or (isinstance(v, list) and len(v) <= 4
                             and all(isinstance(s, int) and not isinstance(s, bool) and 8 <= s <= 4096 for s in v))
        if not ok:
            raise ValueError(f"{v!r:.60} is not a size list; accepted: 'auto' (224 px for ImageNet-style networks), a "
                             "list of up to 4 square sizes of 8-4096 px, or [] (none)")
        return v

    @field_validator("batches")
    @classmethod
    def _has_batch_one(cls, v: list[int]) -> list[int]:
        if 1 not in v:
            raise ValueError(f"{v} has no batch 1; accepted: a list of batch sizes with 1 among them (speedup_b1, "
                             f"the tag versions are compared by, is batch 1's), e.g. [1, {max(v)}]")
        return v
