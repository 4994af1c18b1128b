"""``tune_allocator``: glibc's malloc kept from returning a sweep's temporaries to the kernel.

Each check runs in a fresh interpreter: malloc settings are per process, and glibc's dynamic
thresholds depend on what the process has already freed."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

FIT = """
import json, math, resource, sys, torch
from lowrank.allocator import allocator_tuned, tune_allocator
tuned = tune_allocator()
from lowrank.decompositions.cp_als import cp_als, init_factors
torch.manual_seed(0)
x = torch.randn(96, 96, 9, dtype=torch.float64)
init = init_factors(x, 160, "svd")
cp_als(x, 160, init=init, n_iter_max=2, tol=-1.0)  # one-off costs outside the count
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f, errs = cp_als(x, 160, init=init, n_iter_max=20, tol=-1.0)
print(json.dumps({"tuned": tuned, "state": allocator_tuned(), "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0,
                  "err": errs[-1]}))
"""


def _fit(mode: str) -> dict:
    env = dict(os.environ, LOWRANK_MALLOC=mode, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", FIT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_tuned_sweeps_stop_faulting_their_temporaries_in_and_fit_the_same():
    default, tuned = _fit("default"), _fit("tuned")
    assert default["tuned"] is False and default["state"] is False
    assert tuned["tuned"] is True and tuned["state"] is True
    # glibc's defaults hand the megabyte temporaries back and fault them in again every sweep
    assert default["faults"] > 2000, default
    # tuned, what is left is the process's own start-up (about a thousand faults on a loaded machine): a
    # third of the default's leaves room for that and still fails when the tuning does nothing
    assert tuned["faults"] < default["faults"] / 3, (default, tuned)
    assert tuned["err"] == pytest.approx(default["err"], rel=1e-12)  # where memory comes from, not what is computed


@pytest.mark.parametrize("value", ["default", "OFF", "0"])
def test_lowrank_malloc_off_leaves_malloc_alone(value):
    code = "from lowrank.allocator import tune_allocator, allocator_tuned; print(tune_allocator(), allocator_tuned())"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, LOWRANK_MALLOC=value, PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_tune_allocator_is_idempotent_and_reported():
    from lowrank.allocator import allocator_note, allocator_tuned, tune_allocator

    first = tune_allocator()
    assert tune_allocator() == first == allocator_tuned()
    assert ("tuned" in allocator_note()) == first
