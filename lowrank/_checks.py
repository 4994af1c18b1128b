"""Input validation shared by the decompositions (raise, never assert, on user input)."""
from __future__ import annotations

import numpy as np
import torch

from .errors import LowRankError


def check_finite(weight: torch.Tensor, what: str = "weight") -> None:
    if not torch.is_tensor(weight):
        raise LowRankError(f"{what} must be a torch.Tensor, got {type(weight).__name__}")
    if not torch.is_floating_point(weight):
        raise LowRankError(f"{what} must be a floating-point tensor, got dtype {weight.dtype}")
    if not bool(torch.isfinite(weight).all()):
        n_bad = int((~torch.isfinite(weight)).sum())
        raise LowRankError(
            f"{what} has {n_bad} non-finite value(s) (NaN or Inf); only finite weights can be decomposed"
        )


def check_int_rank(rank, maximum: int, what: str = "rank") -> int:
    if isinstance(rank, np.integer):  # numpy integers are fine
        rank = int(rank)
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise LowRankError(f"{what} must be an integer, got {rank!r}")
    if rank < 1:
        raise LowRankError(f"{what} must be >= 1, got {rank}; accepted: 1..{maximum}")
    if rank > maximum:
        raise LowRankError(f"{what} {rank} is above the maximum {maximum} for this layer; accepted: 1..{maximum}")
    return rank


def resolve_device(device) -> torch.device | None:
    if device is None:
        return None
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LowRankError(f"device {str(device)!r} requested but CUDA is not available here; accepted: 'cpu' or None")
    return dev
