"""Rank-configuration search, the pure parts: per-layer screening (``screen``), the screening
table on disk (``cache``), the budgeted allocation (``allocate``) and the strategies' decisions
(``strategies``). The search executor (``jobs.executors.search``) runs them as Ray stages."""
