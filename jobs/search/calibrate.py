"""Calibrating the latency search's additive model against the whole graph.

The screening times every layer alone (``screen.LayerTimer``): the same input and weights run after
run, warm in the caches. In the whole network they are not: at batch 1 a ResNet-18 streams 45 MB
of weights per forward pass, and its searched convs, timed alone, add up to under half of the
graph's time (``bench/latency_additivity.py``). Taking the rest as a fixed cost made targets look
out of reach that the registered models then met.

So the part of the latency that the search does not touch is measured, not inferred: the model is
timed on the search's runtime beside a copy whose searched layers are *stubs* (the same output
shape and dependency on the input, at a negligible cost: one input channel through a 1x1 conv
or a 1-input linear layer, on which the runtime fuses the following BatchNorm and ReLU as it does
on the real conv), interleaved, at batch 1 and one thread. The searched layers' share of the graph
is ``whole - fixed``; the layers' costs (below) are scaled by one factor per model so that the
dense layers add up to it (``scale``).

The screening times each option interleaved with its dense layer, the weights warm in the caches:
that holds an option's speedup over its layer from one screening to the next, but not in the
graph. At 32 px, a ResNet-18 is bound by streaming its weights, which the graph's other layers have
evicted by the time a layer runs: factorizing all 3x3 convs by spatial SVD at 2x, the screened
speedups predict 1.20x and ONNX Runtime measures 1.56x (``bench/latency_model.py``). So the
calibration task also times every dense searched layer and every screened option alone, all of them
interleaved one round after another (each runs after the others have been through the caches, as in
the graph), and those are the costs the allocation uses (``option_costs``): the same example then
predicts 1.44x; Tucker-2, 1.06x for a measured 1.02x where the screened costs said 0.85x.

A module timed alone also pays what every call costs whatever it computes (the runtime's dispatch,
the input and output copies), a large part of each time at 32 px, where a ResNet-18 conv runs for
tens of microseconds: alone, every option's speedup is drawn towards 1. In the graph that cost is
not paid per layer. So each layer's stub is timed alone in the same rounds, and every cost is net
of it (never below a tenth of the time measured): at 32 px spatial SVD at 2x is then predicted
1.17x for a measured 1.17x (1.10x gross), Tucker-2 0.74x for 0.66x (0.82x gross); over two runs
at 32 and 224 px the prediction's error fell from 9 % to 5 % on average
(``bench/latency_model.py``), and the searches land near their target instead of past it
(``bench/search_latency_epyc*.out.txt``).
"""
from __future__ import annotations

import copy
import math
import tempfile

import torch
from torch import nn

import lowrank

from .. import deploy
from ..train import measure_latency
from .screen import LayerTimer


class LayerStub(nn.Module):
    """Stands in for a conv or linear layer: its output shape, next to nothing of its cost."""

    def __init__(self, in_shape: tuple, out_shape: tuple):
        super().__init__()
        self.conv = len(out_shape) == 4
        if self.conv:
            (h_in, w_in), (c, h, w) = in_shape[2:], out_shape[1:]
            self.step = (max(1, h_in // h), max(1, w_in // w))
            self.size = (h, w)
            self.pad = (0, max(0, w - math.ceil(w_in / self.step[1])), 0, max(0, h - math.ceil(h_in / self.step[0])))
            self.proj = nn.Conv2d(1, c, 1, bias=False)
        else:
            self.proj = nn.Linear(1, out_shape[-1], bias=False)

    def forward(self, x):
        if not self.conv:
            return self.proj(x[..., :1])
        y = x[:, :1, :: self.step[0], :: self.step[1]][:, :, : self.size[0], : self.size[1]]
        if any(self.pad):
            y = nn.functional.pad(y, self.pad)
        return self.proj(y)


def _io_shapes(model: nn.Module, names, input_shape) -> dict[str, tuple]:
    """layer -> (input shape, output shape) at ``input_shape`` (with the batch dimension)."""
    shapes: dict[str, tuple] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: shapes.__setitem__(n, (tuple(i[0].shape), tuple(o.shape)))) for n in names]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(input_shape))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def stubbed(model: nn.Module, names, input_shape) -> nn.Module:
    """A copy of ``model`` with every layer of ``names`` replaced by a ``LayerStub`` of its output
    shape at ``input_shape`` (with the batch dimension)."""
    shapes = _io_shapes(model, names, input_shape)
    out = copy.deepcopy(model)
    for n in names:
        parent, _, leaf = n.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, leaf, LayerStub(*shapes[n]))
    return out.eval()


def measure(model: nn.Module, names, input_shape, *, runtime: str, device: str = "cpu", repeats: int = 30,
            options: dict | None = None) -> dict:
    """``{whole, fixed, layers, options, overhead, runtime}``: the model's median batch-1 time
    (seconds) on ``runtime`` at one thread and that of its stubbed copy, interleaved; then each layer
    of ``names`` alone (``layers``: name -> seconds), each of its factorized options (``options``:
    name -> seconds in the order of ``options[name]``, a list of factors) and its stub
    (``overhead``: what a call of that shape costs), all of them interleaved in one round after
    another, at the input each sees in the model; ``layers`` and ``options`` net of ``overhead``
    (at least a tenth of the time measured). Eagerly on a GPU. ``input_shape`` without the batch
    dimension."""
    model = model.cpu().eval()
    stub = stubbed(model, names, (1, *input_shape))
    shapes = _io_shapes(model, names, (1, *input_shape))
    gen = torch.Generator().manual_seed(0)
    layers, xs, owner = [], [], []  # the modules timed, their inputs, (layer, option index or None)
    for n in names:
        dense, x = model.get_submodule(n), torch.randn(shapes[n][0], generator=gen).to(device)
        for i, f in enumerate([None, *(options or {}).get(n, [])]):
            layers.append(copy.deepcopy(dense) if f is None else lowrank.get_method(f.method).build(dense, f))
            xs.append(x)
            owner.append((n, None if f is None else i - 1))
        layers.append(LayerStub(*shapes[n]))
        xs.append(x)
        owner.append((n, "stub"))
    with tempfile.TemporaryDirectory() as tmp, deploy.torch_threads(1):
        times = LayerTimer(runtime, device, tmp).many([m.to(device) for m in layers], xs, repeats)
        if str(device).startswith("cuda"):
            whole = fixed = math.inf
            for _ in range(3):  # alternating rounds, the best of each
                whole = min(whole, measure_latency(model, input_shape, 1, repeats=repeats, device=device))
                fixed = min(fixed, measure_latency(stub, input_shape, 1, repeats=repeats, device=device))
            runtime = f"torch on {device}"
        else:
            whole, fixed = deploy.timed([model, stub], tuple(input_shape), runtime=runtime, batch=1, threads=1,
                                        repeats=repeats, workdir=tmp)
    out = {"whole": whole, "fixed": fixed, "layers": {}, "options": {n: [] for n in (options or {})},
           "overhead": {n: t for (n, i), t in zip(owner, times) if i == "stub"}, "runtime": runtime}
    for (n, i), t in zip(owner, times):
        if i == "stub":
            continue
        net = max(t - out["overhead"][n], 0.1 * t)
        if i is None:
            out["layers"][n] = net
        else:
            out["options"][n].append(net)
    return out


def option_costs(rows: dict[str, list[dict]], calibration: dict | None) -> dict[str, list[float]]:
    """layer -> the cost of each of its rows (dense first), from the calibration's one task where it
    timed them (``layers``, ``options``), else as screened (a layer's dense time from the task, if
    there, over each option's screened speedup)."""
    cal = calibration or {}
    out = {}
    for n, rs in rows.items():
        dense = float(cal.get("layers", {}).get(n, rs[0]["latency"]))
        timed = cal.get("options", {}).get(n)
        if timed is not None and len(timed) == len(rs) - 1:
            out[n] = [dense, *map(float, timed)]
        else:
            out[n] = [dense * r["latency"] / rs[0]["latency"] for r in rs]
    return out


def scaled_costs(rows: dict[str, list[dict]], calibration: dict) -> tuple[dict[str, list[float]], float | None]:
    """``option_costs`` and the ``scale`` that brings their dense costs to the graph's share (None:
    the measurement cannot say, and the costs stay as timed alone)."""
    costs = option_costs(rows, calibration)
    return costs, scale(calibration, sum(cs[0] for cs in costs.values()))


def scale(calibration: dict, dense_layers: float) -> float | None:
    """The factor that brings the layers' isolated dense costs (summed: ``dense_layers``) to their
    share of the graph; None where the measurement cannot say (the stubbed model not faster)."""
    share = calibration["whole"] - calibration["fixed"]
    if not (dense_layers > 0 and share > 0 and math.isfinite(share)):
        return None
    return share / dense_layers
