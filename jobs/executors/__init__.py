"""One executor per kind of configuration, registered by kind. Each takes the session and its
configurations (``plan.Config``) and logs every configuration it completes through the session."""
from __future__ import annotations

from .oneshot import run_oneshot
from .scratch import run_scratch
from .search import run_search
from .staged import run_staged

EXECUTORS = {"oneshot": run_oneshot, "staged": run_staged, "scratch": run_scratch, "search": run_search}
