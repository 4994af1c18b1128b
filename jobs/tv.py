"""The one place that imports torchvision.

torchvision 0.28's compiled ops link CUDA libraries; on a CPU-only torch they fail to load and
``import torchvision`` raises ``operator torchvision::nms does not exist``. Defining the two op
schemas first lets the pure-Python parts (models, datasets, transforms) import. This is done
only when the compiled ops are missing.
"""
from __future__ import annotations

import sys

import torch

_LIB = None


def import_torchvision():
    global _LIB
    try:  # deferred: torchvision is heavy, and its import may need the op schemas defined first
        import torchvision  # noqa: F401
        return torchvision
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    if _LIB is None:
        _LIB = torch.library.Library("torchvision", "DEF")
        _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision

    return torchvision
