"""Errors the CLI maps to exit codes that are raised below it, where importing their module
would load Ray or MLflow into ``python -m jobs validate``."""
from __future__ import annotations


class SchedulingTimeoutError(RuntimeError):
    """No node able to run a task appeared within ``resources.schedule_timeout_s`` (exit 1)."""
