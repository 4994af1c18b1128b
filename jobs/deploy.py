"""What a model costs where it is deployed: ONNX export (checked against PyTorch's own output)
and paired timing of the dense and the compressed model on one runtime.

Runtimes are registered in ``RUNTIMES``: ``onnxruntime`` (ONNX Runtime, CPU execution provider,
all graph optimisations: it folds BatchNorm into the convs before it and fuses conv + ReLU by
itself; it merges no two convs, so before export chains of 1x1 convs that nothing non-linear
separates are merged where that saves work: ``lowrank.fuse_pointwise``), ``torch`` (eager) and
``torch-compile`` (inductor). The two models are timed in one process, interleaved (the order
alternates every repetition), and the medians are compared: the machines are shared and noisy,
so only the ratio is trusted.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import lowrank

OPSET = 17  # the TorchScript exporter's
DYNAMO_OPSET = 18  # the torch.export-based exporter's lowest


class RuntimeUnavailable(RuntimeError):
    """A runtime cannot run this model here (the reason is the message)."""


def failure(e: BaseException, width: int = 300) -> str:
    """One line saying why export or timing failed, for a tag or a log: the message alone where it
    is our own ``RuntimeUnavailable``; else the innermost cause's type and first line (the
    torch.export-based exporter wraps the operator that failed in generic advice), without
    terminal colour codes."""
    if not isinstance(e, RuntimeUnavailable):
        while e.__cause__ is not None:
            e = e.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    first = text.splitlines()[0][:width] if text else ""
    return first if isinstance(e, RuntimeUnavailable) else f"{type(e).__name__}: {first}"


def timed_shape(input_shape, size: int | None) -> tuple:
    """The ``(C, H, W)`` latency is measured at: the data's, or square at ``size``
    (``latency.input_size``) when set."""
    shape = tuple(input_shape)
    return shape if size is None else (*shape[:-2], size, size)


@contextlib.contextmanager
def _quiet():
    """Nothing reaches this process's stdout or stderr, including what C++ writes to the file
    descriptors themselves: the TorchScript exporter prints the whole TorchScript graph to fd 2
    when an operator fails, hundreds of lines per model. (Where a descriptor is closed, only
    Python's streams are redirected.)"""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = {}
    with open(os.devnull, "w") as null, warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")  # deprecation notices, constant-folding warnings
        try:
            for fd in (1, 2):
                with contextlib.suppress(OSError):
                    saved[fd] = os.dup(fd)
                    os.dup2(null.fileno(), fd)
            yield
        finally:
            for fd, copy_ in saved.items():
                os.dup2(copy_, fd)
                os.close(copy_)


def _torchscript_export(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=OPSET, input_names=["input"],
                      output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})


def _dynamo_export(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=DYNAMO_OPSET, input_names=["input"],
                      output_names=["output"], dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)


# Tried in order. The TorchScript exporter gives the graphs every figure in the README was timed on; the
# torch.export-based one (onnxscript) takes what it cannot, e.g. an adaptive pooling whose output size
# does not divide its input's (ONNX has no such operator, and torch.export decomposes it).
EXPORTERS: dict[str, Callable[[nn.Module, torch.Tensor, Path], None]] = {
    "torchscript": _torchscript_export, "dynamo": _dynamo_export}


def export_onnx(model: nn.Module, input_shape, path: str | Path, *, check: bool = True, fuse: bool = True) -> Path:
    """Export ``model`` (eval mode, float32) to ONNX with a dynamic batch dimension, by the first
    of ``EXPORTERS`` that takes it; with ``fuse``, chains of 1x1 convs with nothing non-linear
    between them merged first where that saves work (``lowrank.fuse_pointwise``; the model as it
    is where the merged graph does not export or check). With ``check`` the file is run once in
    ONNX Runtime and compared with ``model``'s own output. Where no exporter takes the model, the
    error names each one's reason."""
    model = model.eval()
    path = Path(path)
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    merged, n = lowrank.fuse_pointwise(model) if fuse else (model, 0)
    if n:
        try:
            return _stamp(_export_checked(merged, model, x, path, check), n)
        except RuntimeUnavailable:  # e.g. a traced graph an exporter takes less well: the model as it is
            pass
    return _export_checked(model, model, x, path, check)


MERGED_KEY = "lowrank.merged_1x1_pairs"  # ONNX metadata: how many 1x1 conv pairs the file has merged


def _stamp(path: Path, n: int) -> Path:
    """Record in the file's metadata that ``n`` 1x1 conv pairs were merged (weights kept where the
    exporter put them, inline or beside the file)."""
    import onnx  # deferred: only export needs the ONNX package

    m = onnx.load(str(path), load_external_data=False)
    onnx.helper.set_model_props(m, {**{p.key: p.value for p in m.metadata_props}, MERGED_KEY: str(n)})
    onnx.save(m, str(path))
    return path


def merged_pairs(path: str | Path) -> int:
    """The 1x1 conv pairs ``export_onnx`` merged in the exported file (0: exported as it was)."""
    import onnx  # deferred: only export needs the ONNX package

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return int(props.get(MERGED_KEY, 0))


def _export_checked(exported: nn.Module, model: nn.Module, x: torch.Tensor, path: Path, check: bool) -> Path:
    failures = []
    for name, export in EXPORTERS.items():
        try:
            with _quiet():
                export(exported, x, path)
            break
        except Exception as e:  # noqa: BLE001 - exporters fail in many ways; the next one may take it
            failures.append(f"{name}: {failure(e, 110)}")
    else:
        raise RuntimeUnavailable("no ONNX exporter takes the model (" + "; ".join(failures) + ")")
    if check:
        with torch.no_grad():
            want = model(x).numpy()
        got = _session(path, 1).run(None, {"input": x.numpy()})[0]
        err = float(np.abs(got - want).max())
        if not err <= 1e-4 * max(1.0, float(np.abs(want).max())):
            raise RuntimeUnavailable(f"the ONNX export differs from the PyTorch model by {err:.3g}")
    return path


def _session(path: Path, threads: int):
    import onnxruntime as ort  # deferred: only timing and export checks need ONNX Runtime

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Runtime:
    """``prepare(model, input_shape, threads, workdir)`` returns ``run(x: np.ndarray)``, a
    forward pass on that runtime (what each fuses by itself: the module docstring, the README)."""

    name: str
    prepare: Callable


def _onnx_path(model, input_shape, workdir) -> Path:
    return Path(workdir) / f"m{id(model)}-{'x'.join(map(str, input_shape))}.onnx"


def _prepare_ort(model, input_shape, threads, workdir):
    path = _onnx_path(model, input_shape, workdir)
    if not path.exists():  # exported and checked once per model and input: every (batch, threads) pair reuses it
        export_onnx(model, input_shape, path)
    sess = _session(path, threads)
    return lambda x: sess.run(None, {"input": x})


def _torch_runner(fn, threads):
    def run(x):
        with torch.no_grad(), torch_threads(threads):
            return fn(torch.from_numpy(x))
    return run


def _prepare_torch(model, input_shape, threads, workdir):
    return _torch_runner(model.eval(), threads)


def _prepare_compile(model, input_shape, threads, workdir):
    compiled = torch.compile(model.eval(), dynamic=False)
    run = _torch_runner(compiled, threads)
    try:
        run(np.zeros((1, *input_shape), dtype=np.float32))  # compiles here, not in the timed loop
    except Exception as e:  # noqa: BLE001 - inductor fails in many ways (no compiler, unsupported op)
        raise RuntimeUnavailable(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    return run


RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    Runtime("onnxruntime", _prepare_ort), Runtime("torch", _prepare_torch), Runtime("torch-compile", _prepare_compile),
)}


def timed(models: list[nn.Module], input_shape, *, runtime: str, batch: int, threads: int, repeats: int,
          warmup: int = 3, workdir: str) -> list[float]:
    """Median seconds per forward pass of each model at ``batch`` and ``threads``, interleaved
    (the order rotates every repetition)."""
    runs = [RUNTIMES[runtime].prepare(m.float().eval(), tuple(input_shape), threads, workdir) for m in models]
    x = np.random.default_rng(batch).standard_normal((batch, *input_shape)).astype(np.float32)
    return interleaved(runs, [x] * len(runs), repeats=repeats, warmup=warmup)


def interleaved(runs: list[Callable], args: list, *, repeats: int, warmup: int, sync: Callable | None = None
                ) -> list[float]:
    """Median seconds of each ``runs[i](args[i])``: ``warmup`` calls of each, then ``repeats`` rounds
    that call each once, the order reversed every other round; ``sync`` (e.g. CUDA's) around each
    timed call."""
    for run, arg in zip(runs, args):
        for _ in range(warmup):
            run(arg)
    sync = sync or (lambda: None)
    times: list[list[float]] = [[] for _ in runs]
    for n in range(repeats):
        for i in (range(len(runs)) if n % 2 == 0 else reversed(range(len(runs)))):
            sync()
            t0 = time.perf_counter()
            runs[i](args[i])
            sync()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(v) for v in times]


def paired(dense: nn.Module, compressed: nn.Module, input_shape, *, runtime: str = "onnxruntime",
           batches=(1, 32), threads=(1, 0), all_threads: int | None = None, repeats: int = 30) -> list[dict]:
    """Median forward time of both models on ``runtime`` for every (batch, threads) pair
    (``threads`` 0 = ``all_threads``, by default torch's intra-op threads), interleaved. One row per
    pair: ``{runtime, input, batch, threads, dense_ms, compressed_ms, speedup, repeats}``, and on
    ONNX Runtime ``merged``: the 1x1 conv pairs merged in the timed files, ``(dense, compressed)``."""
    every = max(1, all_threads or torch.get_num_threads())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in dict.fromkeys(every if t == 0 else t for t in threads):
            for b in batches:
                d, c = timed([dense, compressed], input_shape, runtime=runtime, batch=b, threads=t, repeats=repeats,
                             workdir=tmp)
                rows.append({"runtime": runtime, "input": "x".join(map(str, input_shape)), "batch": b, "threads": t,
                             "dense_ms": 1e3 * d, "compressed_ms": 1e3 * c, "speedup": d / c if c > 0 else math.nan,
                             "repeats": repeats})
        if runtime == "onnxruntime":
            merged = tuple(merged_pairs(_onnx_path(m.float().eval(), tuple(input_shape), tmp)) for m in (dense, compressed))
            rows = [{**r, "merged": merged} for r in rows]
    return rows


def per_layer(dense: nn.Module, compressed: nn.Module, names, input_shape, *, runtime: str = "onnxruntime",
              repeats: int = 20) -> dict[str, dict]:
    """Each replaced layer alone, dense against factorized (with its padding stage), at the input
    it sees in the network, batch 1, one thread: ``{name: {dense_ms, compressed_ms, speedup}}``."""
    shapes = lowrank.layer_input_shapes(dense, names, tuple(input_shape))
    out = {}
    for name in names:
        if name not in shapes:
            continue
        r = paired(dense.get_submodule(name), compressed.get_submodule(name), shapes[name][1:], runtime=runtime,
                   batches=(1,), threads=(1,), repeats=repeats)[0]
        out[name] = {k: r[k] for k in ("dense_ms", "compressed_ms", "speedup")}
    return out


def headline(rows: list[dict]) -> dict:
    """The figures a registered version is tagged with: batch 1 and the largest batch, at one
    thread where measured (else the fewest), in seconds, as ``EvalResult.latency`` holds them
    (the largest under the key ``b32`` whatever it is; ``big_batch`` says which)."""
    t = min(r["threads"] for r in rows)
    at = {r["batch"]: r for r in rows if r["threads"] == t}
    big = max(at)
    out = {"runtime": rows[0]["runtime"], "input": rows[0]["input"], "threads": t, "big_batch": big,
           "rows": rows}
    for key, b in (("b1", min(at)), ("b32", big)):
        out[key] = at[b]["compressed_ms"] / 1e3
        out[f"{key}_dense"] = at[b]["dense_ms"] / 1e3
    return out
