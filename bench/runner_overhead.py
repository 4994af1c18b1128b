"""What the runner adds on top of the work itself, on the embedded default sweep.

Runs ``python -m jobs``'s sweep function on the default spec in a fresh temporary directory
(fresh MLflow store and pre-training cache, so pre-training is included) and splits the wall
time:

* work: the seconds spent inside Ray tasks (pre-training/evaluation, every layer
  decomposition, assembly + evaluation + fine-tuning), divided by the number of parallel task
  slots; this is the wall time a perfect scheduler with zero-cost logging would need;
* runner-attributable: the start-up before the first task is submitted (MLflow store, Ray
  start) plus the tail after the last task returns (logging the last model, aliases, sweep
  summary, plot); the driver's other MLflow work overlaps with running tasks;
* upper bound = wall - work / slots, which also counts slots left idle while a dependency
  (e.g. one model's pre-training) finishes.

    .venv/bin/python bench/runner_overhead.py
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from jobs.driver import run_sweep
    from jobs.spec import load_spec

    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        spec = load_spec(None)
        result = run_sweep(spec, out=lambda *a, **k: None)
    t = result.timings
    ideal = t["task_seconds"] / t["slots"]
    overhead = t["wall"] - ideal
    print(f"default sweep: {result.registered} versions registered, {len(result.failed)} failed")
    print("| quantity | seconds | share of wall |")
    print("|---|---|---|")
    rows = [("wall time of the sweep", t["wall"]),
            (f"work inside Ray tasks / {t['slots']} slots", ideal),
            ("  of which layer decompositions / slots", t["decompose_seconds"] / t["slots"]),
            ("  of which the timing step (holds every slot of its node) / slots", t["timing_seconds"] / t["slots"]),
            ("Ray start-up", t["ray_init"]),
            ("MLflow logging + registration (driver)", t["mlflow"]),
            ("runner on the critical path: start-up before the first task (MLflow store, Ray start)", t["startup"]),
            ("runner on the critical path: after the last task (last model logged, aliases, summary, plot)",
             t["tail"]),
            ("runner-attributable = start-up + tail", t["startup"] + t["tail"]),
            ("slots idle while dependencies finish (e.g. resnet18 pre-training on one slot)",
             overhead - t["startup"] - t["tail"]),
            ("upper bound: wall - work / slots", overhead)]
    for name, v in rows:
        print(f"| {name} | {v:.1f} | {100 * v / t['wall']:.1f}% |")


if __name__ == "__main__":
    main()
