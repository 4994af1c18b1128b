"""What a model sees: the evaluation view of an image (shorter side resized, centre crop, as many
channels as the model takes, normalised) and the training augmentation, resolved per model.

Precedence, per setting: the spec (``dataset.input_size``/``crop``, ``resize``, ``normalize``,
``augment``), then the model's pretrained weights (torchvision's weights transforms, a timm-style
``pretrained_cfg``), then the data: the crop defaults to 32 px and mean/std to the training
split's own statistics (``with_stats``, filled in when the data is loaded). Channels: the
model's (its first conv's ``in_channels``, or ``models[].channels``); grey images are
repeated for an RGB model, colour images reduced to luminance for a grey one.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

import lowrank

from .models import reference_preprocessing
from .spec import DatasetSpec, ModelSpec

DEFAULT_CROP = 32
STATS_SAMPLES = 2048  # training images the mean/std are computed from (seeded choice)
# kinds whose images mean something else when mirrored (a flipped 2 is no digit)
NO_FLIP = {"digits", "mnist"}
CHANNELS = (1, 3)  # grey, RGB: what a model may take
LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2, as torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class Preprocess:
    resize: int  # the shorter side, before the centre crop
    crop: int  # the side of the square the model sees
    mean: tuple[float, ...] | None  # one per channel; None: the training split's statistics (with_stats)
    std: tuple[float, ...] | None
    augment: str  # none | crop | crop+flip
    source: str  # where mean/std come from: spec | weights | data
    channels: int = 3  # what the model takes: 3 (RGB) or 1 (grey)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.crop, self.crop)

    def with_stats(self, mean, std) -> "Preprocess":
        return replace(self, mean=per_channel(mean, self.channels), std=per_channel(std, self.channels))

    def describe(self) -> dict:
        """Flat, loggable: what each model of a run was fed."""
        def r(v):
            return None if v is None else [round(float(x), 4) for x in v]
        return {"resize": self.resize, "crop": self.crop, "channels": self.channels, "mean": r(self.mean),
                "std": r(self.std), "augment": self.augment, "normalize_from": self.source}


def per_channel(v, channels: int) -> tuple[float, ...]:
    """One value per channel: a single value for all; RGB values averaged for a grey model."""
    v = tuple(float(x) for x in v)
    if len(v) == channels:
        return v
    if len(v) == 1:
        return v * channels
    if channels == 1:
        return (sum(v) / len(v),)
    raise ValueError(f"{len(v)} values for {channels} channels")


def resolve(dataset: DatasetSpec, reference: dict | None, agreement: bool = False, channels: int = 3) -> Preprocess:
    """``reference``: the weights' own preprocessing (``models.reference_preprocessing``);
    ``channels``: what the model takes (1 or 3)."""
    ref = reference or {}
    crop = dataset.crop_size or ref.get("crop") or DEFAULT_CROP
    if dataset.resize is not None:
        resize = dataset.resize
    elif ref.get("resize") and ref.get("crop"):
        resize = max(crop, round(crop * ref["resize"] / ref["crop"]))  # the weights' crop ratio, at this crop
    else:
        resize = crop
    if dataset.normalize is not None:
        mean, std = per_channel(dataset.normalize.mean, channels), per_channel(dataset.normalize.std, channels)
        source = "spec"
    elif ref.get("mean") is not None:
        mean, std, source = per_channel(ref["mean"], channels), per_channel(ref["std"], channels), "weights"
    else:
        mean = std = None
        source = "data"
    augment = dataset.augment or ("none" if agreement else "crop" if dataset.kind in NO_FLIP else "crop+flip")
    return Preprocess(resize, crop, mean, std, augment, source, channels)


def model_channels(m: ModelSpec, model=None) -> int:
    """The channels a model is fed: ``models[].channels``, else its first conv's (3 when that is
    neither 1 nor 3: pre-flight refuses such a model with the reason)."""
    if m.channels is not None:
        return m.channels
    first = lowrank.first_conv(model) if model is not None else None
    c = model.get_submodule(first).in_channels if first is not None else 3
    return c if c in CHANNELS else 3


def for_model(dataset: DatasetSpec, m: ModelSpec, model=None, agreement: bool = False) -> Preprocess:
    """A model's preprocessing (``model``: the built module, for a factory's ``pretrained_cfg``
    and the channels its first conv takes)."""
    return resolve(dataset, reference_preprocessing(m, model), agreement, model_channels(m, model))


def geometry(x: torch.Tensor, resize: int, crop: int, channels: int = 3) -> torch.Tensor:
    """``(N, C, H, W)`` in [0, 1] -> shorter side ``resize`` (bilinear, antialiased when
    shrinking), centre ``crop`` x ``crop``, ``channels`` channels (grey repeated for RGB, RGB
    reduced to luminance for grey)."""
    h, w = x.shape[-2:]
    if min(h, w) != resize:
        s = resize / min(h, w)
        size = (max(crop, round(h * s)), max(crop, round(w * s)))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=s < 1)
    h, w = x.shape[-2:]
    top, left = (h - crop) // 2, (w - crop) // 2
    x = x[..., top:top + crop, left:left + crop]
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    luma = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x[:, :3] * luma).sum(1, keepdim=True)


def view(x: torch.Tensor, p: Preprocess) -> torch.Tensor:
    """The evaluation view: ``geometry`` then ``(x - mean) / std``; a batch or one image."""
    one = x.dim() == 3
    x = geometry(x[None] if one else x, p.resize, p.crop, p.channels)
    mean = torch.tensor(p.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(p.std, dtype=x.dtype).view(1, -1, 1, 1)
    x = ((x - mean) / std).contiguous()
    return x[0] if one else x


@torch.no_grad()
def statistics(images) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of an iterable of ``(C, H, W)`` images in [0, 1]."""
    n, s, ss = 0, 0.0, 0.0
    for x in images:
        x = x.double().flatten(1)
        n += x.shape[1]
        s = s + x.sum(1)
        ss = ss + (x * x).sum(1)
    mean = s / n
    std = (ss / n - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.clamp_min(1e-3).tolist())


def augment(x: torch.Tensor, policy: str, gen: torch.Generator) -> torch.Tensor:
    """One batch, each image its own draw: zoom in by 1-1.25x, shift by up to 1/8 of the side
    (what leaves the frame reads as the mean, 0 after normalisation), and a horizontal flip half
    of the time for ``crop+flip``. Vectorised (one ``grid_sample``), on the batch's device."""
    if policy == "none":
        return x
    n = x.shape[0]
    u = torch.rand(n, 4, generator=gen).to(x.device, x.dtype)
    scale = 0.8 + 0.2 * u[:, 0]
    flip = torch.where(u[:, 1] < 0.5, -1.0, 1.0).to(x.dtype) if policy == "crop+flip" else torch.ones_like(scale)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
    theta[:, 0, 2], theta[:, 1, 2] = (u[:, 2] - 0.5) * 0.5, (u[:, 3] - 0.5) * 0.5
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class Augmented:
    """A training DataLoader whose batches are augmented (``len`` and iteration as the loader's)."""

    def __init__(self, dl, policy: str, seed: int = 0):
        self.dl, self.policy = dl, policy
        self.gen = torch.Generator().manual_seed(seed + 7919)

    def __len__(self):
        return len(self.dl)

    def __iter__(self):
        for x, y in self.dl:
            yield augment(x, self.policy, self.gen), y
