"""Merge chains of 1x1 convs that nothing non-linear separates, for deployment.

A factorized layer begins and ends with 1x1 stages (Tucker-2, CP, SVD of a pointwise conv). Where
such a stage meets another 1x1 conv with at most an eval-mode BatchNorm between them and no other
reader of the intermediate map, the two are one linear map per pixel:

    conv_b(bn(conv_a(x))) = (W_b D W_a) x + W_b (D b_a + c) + b_b,   D = diag(gamma / sqrt(var + eps)),
                                                                      c = beta - D mean

with the strides multiplied (a 1x1 conv with no padding reads pixels ``0, s, 2s, ..``, so two in a
row read ``0, s_a s_b, ..``, and ``ceil(ceil(H / s_a) / s_b) = ceil(H / (s_a s_b))``). The pair
is merged only where that costs fewer multiply-accumulates per pixel: ``C_in C_out < m (C_in +
C_out)`` for ``C_in -> m -> C_out``; otherwise it is the bottleneck a network or a factorization
put there on purpose. ONNX Runtime folds BatchNorm into the conv before it, but merges no two
convs: this pass does what it does not. It works on a ``torch.fx`` trace; a model that does not
trace is returned as it is.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from .reparam import bn_affine


def _pointwise(m: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` (not a subclass: a QAT conv or one with its own ``forward`` computes
    something else), 1x1, unpadded, undilated, ungrouped."""
    return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.padding in ((0, 0), "valid")
            and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros")


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _module(gm: fx.GraphModule, node: fx.Node | None) -> nn.Module | None:
    if node is None or node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    return gm.get_submodule(node.target)


@torch.no_grad()
def _merged(a: nn.Conv2d, bn: nn.BatchNorm2d | None, b: nn.Conv2d) -> nn.Conv2d:
    wa, wb = a.weight[:, :, 0, 0].double(), b.weight[:, :, 0, 0].double()
    m = wa.shape[0]
    ba = a.bias.double() if a.bias is not None else wa.new_zeros(m)
    d, c = (t.to(wa) for t in bn_affine(bn)) if bn is not None else (wa.new_ones(m), wa.new_zeros(m))
    w = wb @ (d[:, None] * wa)
    bias = wb @ (d * ba + c) + (b.bias.double() if b.bias is not None else 0)
    has_bias = a.bias is not None or bn is not None or b.bias is not None
    out = nn.Conv2d(wa.shape[1], wb.shape[0], 1, stride=(a.stride[0] * b.stride[0], a.stride[1] * b.stride[1]),
                    bias=has_bias, device=b.weight.device, dtype=b.weight.dtype)
    out.weight.copy_(w[:, :, None, None])
    if has_bias:
        out.bias.copy_(bias)
    return out


def _worth_it(a: nn.Conv2d, b: nn.Conv2d) -> bool:
    cin, m, cout = a.in_channels, a.out_channels, b.out_channels
    return cin * cout < m * (cin + cout)


def fuse_pointwise(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``model`` (eval mode) with every mergeable pair of 1x1 convs merged (module
    docstring), and how many pairs were; ``(model, 0)`` where it does not trace or nothing merges.
    Repeats until no pair is left, so chains of three or more merge too."""
    try:
        gm = fx.symbolic_trace(copy.deepcopy(model).eval())
    except Exception:  # noqa: BLE001 - data-dependent control flow, unsupported Python: deploy as it is
        return model, 0
    merged = 0
    while True:
        pair = _next_pair(gm)
        if pair is None:
            break
        a_node, bn_node, b_node = pair
        a, b = gm.get_submodule(a_node.target), gm.get_submodule(b_node.target)
        bn = gm.get_submodule(bn_node.target) if bn_node is not None else None
        name = f"fused_pointwise_{merged}"
        gm.add_submodule(name, _merged(a, bn, b))
        with gm.graph.inserting_after(b_node):
            new = gm.graph.call_module(name, (a_node.args[0],))
        b_node.replace_all_uses_with(new)
        for node in (b_node, bn_node, a_node):
            if node is not None:
                gm.graph.erase_node(node)
        merged += 1
    if not merged:
        return model, 0
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, merged


def _next_pair(gm: fx.GraphModule):
    for node in gm.graph.nodes:
        a = _module(gm, node)
        if a is None or not _pointwise(a):
            continue
        nxt = _only_user(node)
        bn_node = None
        mid = _module(gm, nxt)
        if type(mid) is nn.BatchNorm2d and not mid.training and mid.running_var is not None:
            bn_node, nxt = nxt, _only_user(nxt)
        b = _module(gm, nxt)
        if b is not None and _pointwise(b) and _worth_it(a, b):
            return node, bn_node, nxt
    return None
