"""Parameters and MACs (multiply-accumulates; FLOPs = 2 x MACs, said so everywhere).

MACs count the conv and linear layers, the same operations ``torch.utils.flop_counter``
counts (it reports FLOPs = 2 x MACs); bias adds, BatchNorm, pooling and activations are not
counted.
"""
from __future__ import annotations

import math

import torch
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _macs_of(module: nn.Module, output: torch.Tensor) -> int:
    batch = output.shape[0]
    if isinstance(module, _CONVS):
        per_out = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return output.numel() // batch * per_out
    if isinstance(module, nn.Linear):
        return output.numel() // batch * module.in_features
    return 0


def _example_input(model: nn.Module, input_shape) -> torch.Tensor:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) in (1, 3):  # no batch axis given: one sample
        shape = (1, *shape)
    p = next(iter(model.parameters()), None)
    kw = {"dtype": p.dtype, "device": p.device} if p is not None else {}
    return torch.zeros(shape, **kw)


def forward_once(model: nn.Module, input_shape, handles: list) -> None:
    """One eval-mode, no-grad forward pass on zeros; restores the mode and removes ``handles``."""
    x = _example_input(model, input_shape)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def per_layer_macs(model: nn.Module, input_shape) -> dict[str, int]:
    """MACs per sample of every conv/linear module, by qualified name (forward hooks)."""
    found: dict[str, int] = {}

    def record(name):
        def hook(module, inputs, output):
            found[name] = found.get(name, 0) + _macs_of(module, output)
        return hook

    handles = [mod.register_forward_hook(record(name)) for name, mod in model.named_modules()
               if isinstance(mod, (*_CONVS, nn.Linear))]
    forward_once(model, input_shape, handles)
    return found


def count(model: nn.Module, input_shape) -> tuple[int, int]:
    """``(params, macs)`` for one sample of ``input_shape`` (``(C, H, W)`` or ``(1, C, H, W)``)."""
    params = sum(p.numel() for p in model.parameters())
    return params, sum(per_layer_macs(model, input_shape).values())


def layer_input_shapes(model: nn.Module, names, input_shape) -> dict[str, tuple[int, ...]]:
    """The input shape (one sample) each named layer sees in a forward pass."""
    wanted = set(names)
    shapes: dict[str, tuple[int, ...]] = {}
    def record(name):
        def hook(module, inputs):  # a pre-hook must return None or it replaces the input
            shapes.setdefault(name, (1, *inputs[0].shape[1:]))
        return hook

    handles = [mod.register_forward_pre_hook(record(name)) for name, mod in model.named_modules() if name in wanted]
    forward_once(model, input_shape, handles)
    return shapes
