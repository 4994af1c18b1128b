"""``G Gamma^{-1}`` for CP-ALS's normal equations by Cholesky, straight from the LAPACK that torch's
CPU build carries (``?potrf`` and ``?potrs``, which ``libtorch_cpu`` exports from its MKL).

``torch.linalg.cholesky_ex`` copies ``Gamma`` into column-major order, factors it, and then zeroes
the upper triangle of that copy (a strided ``tril_``). ``cholesky_solve`` reads only the lower
triangle, so that pass is wasted, and it is slow: a third to a half of ``cholesky_ex``'s time for
``R = 134 .. 1141`` (``bench/cp_sweep_parts.py``, ``tril in chol``). Here nothing is transposed or
zeroed. ``Gamma`` is symmetric, so
its row-major data is its column-major data. ``G``, ``(I, R)`` row-major, is ``G^T`` column-major,
and ``potrs`` overwrites it with ``Gamma^{-1} G^T``, which read row-major is ``G Gamma^{-1}``.

This path is taken for CPU tensors of float32 or float64 when the symbols are found and answer a
check on a small matrix. Otherwise, or with ``LOWRANK_LAPACK=torch``, torch's own path is taken.
Integers are passed as 64-bit: an LP64 LAPACK reads their low half, which on a little-endian
machine holds the same value, and an ILP64 one reads all of it.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch

_NAMES = {torch.float32: ("spotrf_", "spotrs_"), torch.float64: ("dpotrf_", "dpotrs_")}


def _int(v: int = 0) -> ctypes.c_int64:
    return ctypes.c_int64(v)


def _direct_solve(routines, g: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """``(G Gamma^{-1}, failed, factor)`` for a batch ``(B, I, R)``, ``(B, R, R)`` by
    ``potrf``/``potrs``; ``failed`` lists the problems whose ``Gamma`` was not positive definite (a
    Python list: no tensor operation per problem, which on small layers costs as much as the
    solve); ``factor``'s upper triangle, read row-major, is ``C`` with ``C^T C = Gamma`` (the
    column-major ``L`` is the row-major ``L^T``; below the diagonal it holds ``Gamma``'s entries)."""
    potrf, potrs = routines
    chol, out = gamma.contiguous().clone(), g.contiguous().clone()
    n, nrhs, uplo, info = _int(gamma.shape[-1]), _int(g.shape[-2]), ctypes.c_char_p(b"L"), _int()
    pn, pnrhs, pinfo = ctypes.byref(n), ctypes.byref(nrhs), ctypes.byref(info)
    step_c, step_o = chol[0].numel() * chol.element_size(), out[0].numel() * out.element_size()  # bytes per problem
    failed = []
    for b in range(gamma.shape[0]):
        c = ctypes.c_void_p(chol.data_ptr() + b * step_c)
        potrf(uplo, pn, c, pn, pinfo)
        if info.value == 0:
            potrs(uplo, pn, pnrhs, c, pn, ctypes.c_void_p(out.data_ptr() + b * step_o), pn, pinfo)
        if info.value != 0:  # not positive definite: the caller takes the pseudo-inverse
            failed.append(b)
    return out, failed, chol


def _torch_solve(g: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    chol, info = torch.linalg.cholesky_ex(gamma)
    return torch.cholesky_solve(g.mT, chol).mT, torch.nonzero(info).flatten().tolist(), chol.mT


@functools.cache
def _routines(dtype: torch.dtype):
    """The two LAPACK routines for ``dtype``, or ``None`` where they are not found or give a wrong
    answer on a 3 x 3 system."""
    if os.environ.get("LOWRANK_LAPACK", "").lower() == "torch" or sys.byteorder != "little":
        return None
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        routines = tuple(getattr(lib, name) for name in _NAMES[dtype])
    except (OSError, AttributeError):
        return None
    gamma = torch.tensor([[4.0, 1.0, 0.5], [1.0, 3.0, 0.25], [0.5, 0.25, 2.0]], dtype=dtype).unsqueeze(0)
    g = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]], dtype=dtype).unsqueeze(0)
    out, failed, _ = _direct_solve(routines, g, gamma)
    ok = not failed and torch.allclose(out, g @ torch.linalg.inv(gamma), rtol=1e-4, atol=1e-5)
    return routines if ok else None


def cholesky_solve_right(g: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``(G Gamma^{-1}, failed)`` for a batch ``(B, I, R)``, ``(B, R, R)`` with ``Gamma`` symmetric:
    ``failed`` lists the problems whose ``Gamma`` was not positive definite (their rows of the
    result are not to be used)."""
    return cholesky_solve_right_factor(g, gamma)[:2]


def cholesky_solve_right_factor(g: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """``cholesky_solve_right`` and the factor: ``(G Gamma^{-1}, failed, C)``, ``C`` ``(B, R, R)``
    upper triangular with ``C^T C = Gamma`` in its upper triangle (what lies below it is not to be
    read: ``torch.linalg.solve_triangular(C, Y, upper=True, left=False)``, ``Y C^{-1}``, reads only
    the triangle)."""
    routines = _routines(g.dtype) if g.device.type == "cpu" and g.dtype in _NAMES else None
    return _direct_solve(routines, g, gamma) if routines is not None else _torch_solve(g, gamma)


def lapack_note() -> str:
    """Which path solves the normal equations here (for benchmark headers)."""
    direct = [str(d).removeprefix("torch.") for d in _NAMES if _routines(d) is not None]
    return f"normal equations by {'potrf/potrs direct (' + ', '.join(direct) + ')' if direct else 'torch.linalg'}"
