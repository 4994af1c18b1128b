"""Models the runner knows: the built-in small CNN and torchvision's classification models.

Checkpoints are state dicts loaded with ``torch.load(weights_only=True)`` only: a file that
needs arbitrary unpickling is refused, never executed.
"""
from __future__ import annotations

import functools
import pickle
from pathlib import Path

import torch
from torch import nn

from .tv import import_torchvision


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model (one-line message)."""


class SmallCNN(nn.Module):
    """Five 3x3 conv blocks (32-64-64-128-128 channels, two stride-2), global pooling, a Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        widths = [(in_channels, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1)]
        layers = []
        for i, (cin, cout, stride) in enumerate(widths, start=1):
            layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@functools.lru_cache(maxsize=1)
def available_models() -> tuple[str, ...]:
    tv = import_torchvision()
    return ("smallcnn", *tv.models.list_models(module=tv.models))


def build_model(name: str, num_classes: int) -> nn.Module:
    if name == "smallcnn":
        return SmallCNN(num_classes)
    tv = import_torchvision()
    kwargs = {"weights": None, "num_classes": num_classes}
    if name.startswith(("inception", "googlenet")):
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True
    return tv.models.get_model(name, **kwargs)


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict (optionally under a ``state_dict`` key) with ``weights_only=True``."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist") from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in str(e) or "weights_only" in str(e):
            raise CheckpointError(
                f"checkpoint {str(path)!r} refused: it holds objects other than tensors and plain containers "
                f"(loaded with weights_only=True; save a state_dict instead)") from None
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupted or truncated: {first}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupted or truncated: {first}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a state dict of tensors")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        def few(keys):
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3})" if len(keys) > 3 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if mismatched:
            parts.append("shape mismatch: " + few([f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                                                   for k in mismatched]))
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit {type(model).__name__}: " + "; ".join(parts))
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"checkpoint {str(path)!r} holds non-finite weights (NaN or inf) in {len(bad)} "
                              f"tensor(s), first {bad[0]!r}; accepted: finite weights")
    model.load_state_dict(state)
    return model
