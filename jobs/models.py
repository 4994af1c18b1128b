"""Models the runner builds: the built-in small CNN, torchvision's classification models (with
their pretrained weights by name, read from torchvision's cache), timm's (``timm/<arch>``, the
optional extra; weights from the Hugging Face cache), and any ``nn.Module`` a
``factory: 'package.module:callable'`` of the user's own code returns.

Checkpoints are state dicts loaded with ``torch.load(weights_only=True)`` only: a file that
needs arbitrary unpickling is refused, never executed.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import io
import math
import pickle
import socket
from pathlib import Path

import torch
from torch import nn

from .tv import import_torchvision


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model (one-line message)."""


class ModelError(ValueError):
    """A model that cannot be built: a factory that does not import, fails or returns something
    else; pretrained weights that are not there (one-line message, exit 2)."""


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


def _timm():
    import_torchvision()  # timm imports torchvision, which may need its op schemas defined first
    try:
        import timm  # deferred: the optional timm extra
    except ImportError:
        raise ModelError("timm models need the timm extra: pip install 'lowrank-runner[timm]'") from None
    return timm


def check_timm_name(name: str) -> str:
    """``timm/<architecture>[.<tag>]`` naming a model timm has (ValueError otherwise)."""
    try:
        timm = _timm()
    except ModelError as e:
        raise ValueError(str(e)) from None
    arch = name.removeprefix("timm/")
    if not timm.is_model(arch.split(".")[0]):
        close = timm.list_models(f"{arch.split('.')[0][:4]}*")[:6]
        raise ValueError(f"timm has no model {arch!r}" + (f" (e.g. {', '.join(close)})" if close else ""))
    return name


def _timm_model(name: str, num_classes: int, pretrained: bool) -> nn.Module:
    timm, arch = _timm(), name.removeprefix("timm/")
    if not pretrained:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    import huggingface_hub  # deferred: the timm extra only; its weights live in the Hugging Face cache

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is not None and cfg.num_classes and cfg.num_classes != num_classes:
        raise ModelError(f"{name} weights have {cfg.num_classes} classes; set num_classes: {cfg.num_classes}")
    repo = (cfg.hf_hub_id if cfg is not None else None) or f"timm/{arch}"
    cached = any(isinstance(huggingface_hub.try_to_load_from_cache(repo, f), str)
                 for f in ("model.safetensors", "pytorch_model.bin"))
    where = (f"{name} weights are not in the Hugging Face cache {huggingface_hub.constants.HF_HUB_CACHE!r} and "
             f"cannot be downloaded")
    hint = f"fetch them where there is network (hf download {repo}) and copy that cache here (HF_HOME decides it)"
    if not cached:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=5).close()
        except OSError as e:
            raise ModelError(f"{where} ({type(e).__name__}); {hint}") from None
    offline = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = cached  # a cached file is read without asking the hub
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            return timm.create_model(arch, pretrained=True, num_classes=num_classes)
    except Exception as e:  # noqa: BLE001 - missing file, hub refused, corrupt file: one line naming where
        raise ModelError(f"{where} ({_first_line(e)}); {hint}") from None
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = offline


def build_model(name: str, num_classes: int) -> nn.Module:
    """A built-in, timm or torchvision model, randomly initialised."""
    if name == "smallcnn":
        return SmallCNN(num_classes)
    if name.startswith("timm/"):
        return _timm_model(name, num_classes, pretrained=False)
    tv = import_torchvision()
    kwargs = {"weights": None, "num_classes": num_classes}
    if name.startswith(("inception", "googlenet")):
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True
    return tv.models.get_model(name, **kwargs)


def build(m) -> nn.Module:
    """The model a ``ModelSpec`` names: factory, torchvision with pretrained weights, or plain."""
    if m.factory is not None:
        return build_factory(m.factory, dict(m.kwargs))
    if m.name.startswith("timm/") and m.weights is not None:
        return _timm_model(m.name, m.num_classes, pretrained=True)
    model = build_model(m.name, m.num_classes)
    if m.weights is not None:
        model.load_state_dict(pretrained_state(m.name, m.weights, m.num_classes))
    return model


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"


def resolve_factory(path: str):
    """``'package.module:attr.attr'`` -> the callable (ModelError when it cannot be had)."""
    module_name, _, attrs = path.partition(":")
    with contextlib.suppress(ImportError):  # user code that imports torchvision (or timm) needs its op schemas
        import_torchvision()
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - the user's module: any import failure is the answer
        raise ModelError(f"factory {path!r}: module {module_name!r} does not import ({_first_line(e)}); ship your "
                         f"code with the job (--working-dir) or install it on the nodes") from None
    for a in attrs.split("."):
        if not hasattr(obj, a):
            raise ModelError(f"factory {path!r}: {module_name!r} has no {attrs!r}") from None
        obj = getattr(obj, a)
    if not callable(obj):
        raise ModelError(f"factory {path!r} is a {type(obj).__name__}, not a callable")
    return obj


def build_factory(path: str, kwargs: dict) -> nn.Module:
    fn = resolve_factory(path)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # "Loaded pretrained weights ..." chatter
            model = fn(**kwargs)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"factory {path!r} failed with kwargs {sorted(kwargs)}: {_first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory {path!r} returned a {type(model).__name__}; accepted: a torch.nn.Module")
    return model


def pretrained_state(name: str, weights: str, num_classes: int) -> dict:
    """torchvision's pretrained state dict ``name``/``weights`` from its cache
    (``$TORCH_HOME/hub/checkpoints``), fetched there first when the network allows."""
    tv = import_torchvision()
    try:
        enum = tv.models.get_model_weights(name)
    except ValueError:
        raise ModelError(f"torchvision has no pretrained weights for {name}") from None
    names = ["DEFAULT", *(e.name for e in enum)]
    if weights not in names:
        raise ModelError(f"{name} has no pretrained weights {weights!r}; accepted: {', '.join(names)}")
    w = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    classes = len(w.meta.get("categories") or [])
    if classes and classes != num_classes:
        raise ModelError(f"{name} {w.name} weights have {classes} classes; set num_classes: {classes} "
                         f"(or train your own and give checkpoint)")
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
    if not path.is_file():
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(15)
        try:
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                torch.hub.load_state_dict_from_url(w.url, progress=False, check_hash=True)
        except Exception as e:  # noqa: BLE001 - offline, proxy, hash mismatch: the answer names the file
            raise ModelError(f"{name} {w.name} weights: {str(path)!r} is not there and cannot be downloaded "
                             f"({type(e).__name__}); put the file from {w.url} there (TORCH_HOME decides the "
                             f"folder)") from None
        finally:
            socket.setdefaulttimeout(old)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{name} {w.name} weights file {str(path)!r} cannot be read: {_first_line(e)}") from None


WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")  # Lightning / common training loops / torchvision's references
PREFIXES = ("module.", "model.", "_orig_mod.")  # DataParallel/DDP, Lightning's attribute, torch.compile


def _unwrapped(state, own: dict):
    """The model's state dict inside what a training loop saved: under one of ``WRAPPER_KEYS``
    beside other entries (epoch, optimizer), and its keys behind the prefixes that DDP, Lightning
    or ``torch.compile`` put in front (stripped only where every key has it and ``own`` has none)."""
    if isinstance(state, dict) and not all(torch.is_tensor(v) for v in state.values()):
        state = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), dict)), state)
    if not isinstance(state, dict) or not state:
        return state
    stripped = True
    while stripped:
        stripped = False
        for p in PREFIXES:
            if all(isinstance(k, str) and k.startswith(p) for k in state) and not any(k.startswith(p) for k in own):
                state, stripped = {k[len(p):]: v for k, v in state.items()}, True
    return state


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict with ``weights_only=True``: as saved, or as a training loop saved it
    (under ``state_dict`` / ``model_state_dict`` / ``model``, keys behind ``module.`` / ``model.``
    / ``_orig_mod.``)."""
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
    own = model.state_dict()
    state = _unwrapped(state, own)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a state dict of tensors (accepted: a state_dict, "
                              f"or one under {', '.join(repr(k) for k in WRAPPER_KEYS)})")
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


def reference_preprocessing(m, model: nn.Module | None = None) -> dict | None:
    """The preprocessing a model's pretrained weights were trained with: ``{crop, resize, mean,
    std}`` from torchvision's weights transforms, or a timm-style ``pretrained_cfg`` on a
    pretrained factory's model; None when its weights are trained here (or unknown)."""
    timm_weights = m.name.startswith("timm/") and m.weights is not None
    if m.weights is not None and m.factory is None and not timm_weights:
        tv = import_torchvision()
        enum = tv.models.get_model_weights(m.name)
        t = (enum.DEFAULT if m.weights == "DEFAULT" else enum[m.weights]).transforms()
        return {"crop": int(t.crop_size[0]), "resize": int(t.resize_size[0]), "mean": tuple(t.mean),
                "std": tuple(t.std)}
    cfg = ((getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None))
           if m.pretrained or timm_weights else None)
    if not isinstance(cfg, dict) or not {"mean", "std"} <= set(cfg):
        return None
    size = cfg.get("input_size")
    crop = int(size[-1]) if isinstance(size, (tuple, list)) and size else None
    pct = float(cfg.get("crop_pct") or 1.0)
    return {"crop": crop, "resize": int(math.floor(crop / pct)) if crop else None,
            "mean": tuple(float(v) for v in cfg["mean"]), "std": tuple(float(v) for v in cfg["std"])}
