"""Rank-configuration search: screening tables and the global allocation of (method, rank) per
layer (issue: the scheduler; in progress, not yet wired into the sweep spec)."""
