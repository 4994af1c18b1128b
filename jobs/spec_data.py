"""The data section of the sweep spec: which images, and how a model is fed them (the size it
sees, resize, normalisation, augmentation; see ``jobs/preprocess.py`` for what "default" means)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from .spec_compression import _Strict

# where a kind's data is when no root is given (digits: bundled with scikit-learn)
DEFAULT_ROOTS = {"digits": None, "fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}


class NormalizeSpec(_Strict):
    mean: list[Annotated[float, Field(ge=-10, le=10)]] = Field(min_length=1, max_length=3,
                                                                description="per channel (one value: all three)")
    std: list[Annotated[float, Field(gt=0, le=10)]] = Field(min_length=1, max_length=3,
                                                             description="per channel (one value: all three)")

    @model_validator(mode="after")
    def _three_or_one(self):
        for key in ("mean", "std"):
            if len(getattr(self, key)) == 2:
                raise ValueError(f"normalize.{key} has 2 values; accepted: 1 (all channels) or 3 (R, G, B)")
        return self


class DatasetSpec(_Strict):
    kind: Literal["digits", "cifar10", "imagefolder", "mnist", "fashion-mnist", "images"] = Field(
        "digits", description="digits: scikit-learn's bundled 8x8 digits (upscaled); cifar10: torchvision "
                              "format in a local folder (no download); imagefolder: one folder per class "
                              "(train/ and val/ used when present); mnist / fashion-mnist: the standard IDX files "
                              "(.gz or plain), train and t10k; images: any folder of images, unlabelled "
                              "(evaluation: agreement)")
    root: Path | None = Field(None, description="data folder for cifar10 / imagefolder / mnist / images; "
                                                "fashion-mnist defaults to Debian's /usr/share/datasets/fashion-mnist")
    input_size: int | None = Field(None, ge=8, le=1024, description="side of the square the model sees (the centre "
                                                                    "crop); default: the pretrained weights' crop, "
                                                                    "else 32")
    crop: int | None = Field(None, ge=8, le=1024, description="the same as input_size (torchvision's name)")
    resize: int | None = Field(None, ge=8, le=2048, description="the shorter side is resized to this before the "
                                                                "centre crop; default: the weights' ratio (256 for "
                                                                "224), else the crop (no crop)")
    normalize: NormalizeSpec | None = Field(None, description="mean/std after scaling to [0, 1]; default: the "
                                                              "pretrained weights' own, else the training "
                                                              "split's statistics")
    augment: Literal["none", "crop", "crop+flip"] | None = Field(
        None, description="training and fine-tuning augmentation: random zoom (0.8-1) and shift (1/8); +flip: "
                          "horizontal flips; default crop+flip, crop for digits and mnist (a flipped digit is "
                          "another glyph), none with evaluation: agreement")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="validation split (digits, imagefolder without val/, "
                                                             "images)")
    batch_size: int = Field(64, ge=1, le=65_536, description="batch size for training and evaluation")
    workers: int | None = Field(None, ge=0, le=256, description="DataLoader worker processes; default: up to 4 "
                                                                "for image folders (decoded as read), 0 otherwise")
    limit_train: int | None = Field(None, ge=1, description="use at most this many training samples")
    limit_val: int | None = Field(None, ge=1, description="use at most this many validation samples")

    @model_validator(mode="after")
    def _consistent(self):
        if self.kind not in DEFAULT_ROOTS and self.root is None:
            raise ValueError(f"dataset kind {self.kind!r} needs 'root' (a local folder)")
        if self.crop is not None and self.input_size is not None and self.crop != self.input_size:
            raise ValueError(f"crop ({self.crop}) and input_size ({self.input_size}) are one setting; give one")
        size = self.crop_size
        if size is not None and self.resize is not None and self.resize < size:
            raise ValueError(f"resize ({self.resize}) is smaller than the crop ({size}); accepted: resize >= crop")
        return self

    @property
    def crop_size(self) -> int | None:
        """The side the spec asks for (None: the weights' or the default)."""
        return self.crop if self.crop is not None else self.input_size

    @property
    def folder(self) -> Path | None:
        """The folder the data is read from (``root``, or the kind's default)."""
        return self.root if self.root is not None else DEFAULT_ROOTS.get(self.kind)
