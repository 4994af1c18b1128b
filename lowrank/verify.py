"""Is a layer what its class says? Real model code subclasses ``nn.Conv2d`` / ``nn.Linear`` with a
``forward`` of its own (TF-style "same" padding computed from the input size, with ``padding=0``
stored on the module, is the common case). A factorized layer reproduces the *plain* layer
(``F.conv2d`` / ``F.linear`` with the module's stride, padding, dilation, groups and bias), so such
a module is checked on a probe input of the size it really sees:

- it computes the plain layer: it can be replaced as is;
- it computes the plain layer after an extra zero padding of the input (TF "same"): it can be
  replaced by ``ZeroPad2d(that padding)`` followed by the factorized layer, exact at that input
  size (the padding depends on the size, so the replaced model is for that size);
- anything else: it is left dense, with the reason.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .accounting import forward_once

_TOL = 1e-4  # relative: the probe runs in float32


def own_forward(module: nn.Module) -> bool:
    """True when ``module``'s class overrides the ``forward`` of the torch layer it subclasses."""
    for base in (nn.Conv2d, nn.Linear):
        if isinstance(module, base):
            return type(module).forward is not base.forward
    return False


def _plain(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(x, module.weight, module.bias)
    return nn.Conv2d.forward(module, x)


def _plain_or_none(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The plain layer's output, or None where it cannot run on ``x`` (a kernel larger than an
    unpadded input: the module's own forward pads, the plain layer would not)."""
    try:
        return _plain(module, x)
    except RuntimeError:
        return None


def _same_padding(module: nn.Conv2d, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """TF/Keras "same" padding for this input size: ``(left, right, top, bottom)``."""
    pads = []
    for n, k, s, d in zip(size, module.kernel_size, module.stride, module.dilation):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return left, right, top, bottom


def _close(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and a.shape == b.shape and float((a - b).norm()) <= _TOL * max(float(b.norm()), 1e-12)


def replacement_prefix(module: nn.Module, in_shape) -> tuple[nn.Module | None, str | None]:
    """``(prefix, None)``: the module may be replaced (``prefix``: a padding stage to put in front
    of the factorized layer, or None); ``(None, reason)``: leave it dense."""
    if not own_forward(module):
        return None, None
    name = f"{type(module).__name__} (a {type(module).__mro__[1].__name__} with its own forward)"
    if in_shape is None:
        return None, f"{name} can only be verified at its input size; give input_shape"
    x = torch.randn(*in_shape, generator=torch.Generator().manual_seed(0)).to(module.weight)
    with torch.no_grad():
        try:
            y = module(x)
        except Exception as e:  # noqa: BLE001 - the user's layer; its failure is the reason
            return None, f"{name} fails on a probe input of shape {tuple(in_shape)}: {type(e).__name__}"
        plain = _plain_or_none(module, x)
        if _close(plain, y):
            return None, None
        if isinstance(module, nn.Conv2d) and x.dim() == 4:
            pad = _same_padding(module, tuple(x.shape[-2:]))
            if any(pad) and _close(_plain_or_none(module, F.pad(x, pad)), y):
                return nn.ZeroPad2d(pad), None
    if plain is not None and plain.shape == y.shape:
        differs = f"the same output shape {tuple(y.shape)}, other values"
    else:
        differs = f"output {tuple(y.shape)} vs {tuple(plain.shape) if plain is not None else 'none: it cannot run there'}"
    return None, (f"{name} does not compute a plain {type(module).__mro__[1].__name__} at input {tuple(in_shape)} "
                  f"({differs}) and no padding reproduces it: left dense")


def check_replacement(module: nn.Module, new: nn.Module, in_shape) -> str | None:
    """After building: the replacement gives the module's output shape on the probe (None) or why not."""
    if in_shape is None:
        return None
    x = torch.randn(*in_shape, generator=torch.Generator().manual_seed(0)).to(module.weight)
    with torch.no_grad():
        a = module(x)
        try:
            b = new.to(x)(x)
        except RuntimeError as e:
            return f"the factorized layer fails on the layer's input {tuple(in_shape)} ({str(e).splitlines()[0][:120]}): left dense"
    if a.shape != b.shape:
        return f"the factorized layer's output {tuple(b.shape)} differs from the layer's {tuple(a.shape)}: left dense"
    return None


def model_fails(model: nn.Module, input_shape) -> str | None:
    """Why ``model`` does not run on a probe of ``input_shape`` (one line), or None when it does.
    A layer can pass ``check_replacement`` and still break its model: a parent that reads the
    layer's ``weight`` itself (``nn.MultiheadAttention`` does with ``out_proj``)."""
    try:
        forward_once(model, input_shape, [])
    except Exception as e:  # noqa: BLE001 - the user's model; its failure is the reason
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return None
