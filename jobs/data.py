"""Data sets: scikit-learn's bundled digits (the embedded default), CIFAR-10 in torchvision's
on-disk format from a local folder (no download), MNIST and Fashion-MNIST from their IDX files
(Fashion-MNIST by default from Debian's ``dataset-fashion-mnist`` package), and ImageFolder. Images are 3-channel,
``input_size`` square, normalised."""
from __future__ import annotations

import functools
import gzip
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .spec import DatasetSpec
from .tv import import_torchvision

_MEAN, _STD = 0.5, 0.25


class DataError(ValueError):
    """A data set that cannot be loaded (one-line message)."""


def _split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def _to_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, C, h, w)`` in [0, 1] -> ``(N, 3, size, size)`` normalised."""
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return ((x - _MEAN) / _STD).contiguous()


def _digits(spec: DatasetSpec, seed: int):
    from sklearn.datasets import load_digits  # deferred: scikit-learn is only needed for the digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    x = _to_images(x, spec.input_size)
    tr, va = _split(len(y), spec.val_fraction, seed)
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va]), 10


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR-10 batches are pickles: only the numpy reconstruction they need is allowed."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}  # protocol-2 bytes

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name} from a CIFAR-10 batch file")


def _read_cifar_batch(path: Path):
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="latin1").load()
        data = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d.get("labels", d.get("fine_labels")), dtype=np.int64)
    except (OSError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as e:
        raise DataError(f"CIFAR-10 batch {str(path)!r} cannot be read: {e}") from None
    return torch.from_numpy(data), torch.from_numpy(labels)


def _cifar10(spec: DatasetSpec, seed: int):
    root = Path(spec.root)
    base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    train_files = [base / f"data_batch_{i}" for i in range(1, 6)]
    test_file = base / "test_batch"
    missing = [p.name for p in [*train_files, test_file] if not p.is_file()]
    if missing:
        raise DataError(f"CIFAR-10 folder {str(base)!r} lacks {', '.join(missing)} "
                        f"(expected torchvision's cifar-10-batches-py layout; nothing is downloaded)")
    parts = [_read_cifar_batch(p) for p in train_files]
    xtr = torch.cat([p[0] for p in parts]).float() / 255
    ytr = torch.cat([p[1] for p in parts])
    xte, yte = _read_cifar_batch(test_file)
    return (TensorDataset(_to_images(xtr, spec.input_size), ytr),
            TensorDataset(_to_images(xte.float() / 255, spec.input_size), yte), 10)


IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST family's format), ``.gz`` or plain: unsigned bytes, big-endian sizes."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
        if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
            raise ValueError("not an IDX file of unsigned bytes (magic 0x0000 08..)")
        ndim = raw[3]
        dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if data.size != int(np.prod(dims)):
            raise ValueError(f"header says {tuple(int(d) for d in dims)} but holds {data.size} bytes")
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f"IDX file {str(path)!r} cannot be read: {e}") from None
    return data.reshape(tuple(int(d) for d in dims))


class _GreyImages(Dataset):
    """uint8 ``(N, H, W)`` images kept as bytes; each converted when read (a 60,000-image set at
    32 px would otherwise take 740 MB as 3-channel floats)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, size: int):
        self.images, self.labels, self.size = torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)), size

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return _to_images(self.images[i][None, None].float() / 255, self.size)[0], self.labels[i]


def _idx(spec: DatasetSpec, seed: int):
    folder = Path(spec.folder)
    sets = []
    for split, names in IDX_FILES.items():
        found = []
        for name in names:
            path = next((folder / (name + ext) for ext in (".gz", "") if (folder / (name + ext)).is_file()), None)
            if path is None:
                raise DataError(f"{spec.kind} folder {str(folder)!r} lacks {name}(.gz) (the standard IDX files "
                                f"train-*/t10k-*; nothing is downloaded)")
            found.append(read_idx(path))
        images, labels = found
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{spec.kind} {split} files disagree: images {images.shape}, labels {labels.shape}")
        sets.append(_GreyImages(images, labels, spec.input_size))
    classes = int(max(int(s.labels.max()) for s in sets)) + 1
    return sets[0], sets[1], classes


class _Images(Dataset):
    def __init__(self, base, size):
        self.base, self.size = base, size

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        try:
            img, label = self.base[i]
        except Exception as e:  # noqa: BLE001 - PIL raises many types for a broken file
            path = self.base.samples[i][0]
            raise DataError(f"image {path!r} cannot be decoded ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:120]})") from None
        return _to_images(img.unsqueeze(0), self.size)[0], label


def _image_folder(tv, folder: Path):
    try:
        base = tv.datasets.ImageFolder(str(folder), transform=tv.transforms.ToTensor())
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"image folder {str(folder)!r} has no usable images: {e}") from None
    if len(base) < 2:
        raise DataError(f"image folder {str(folder)!r} has {len(base)} image(s); need at least 2")
    if len(base.classes) < 2:
        raise DataError(f"image folder {str(folder)!r} has {len(base.classes)} class folder(s) "
                        f"({', '.join(base.classes)}); a classifier needs at least 2 (one sub-folder per class)")
    return base


def _imagefolder(spec: DatasetSpec, seed: int):
    """One sub-folder per class. A folder with ``train/`` and ``val/`` is split as it says;
    otherwise ``val_fraction`` of the images (seeded) is held out. Images are decoded as they
    are read (never all in memory)."""
    tv = import_torchvision()
    root = Path(spec.root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        train, val = _image_folder(tv, root / "train"), _image_folder(tv, root / "val")
        if train.classes != val.classes:
            raise DataError(f"image folder {str(root)!r}: train/ and val/ name different classes "
                            f"({len(train.classes)} vs {len(val.classes)}: {sorted(set(train.classes) ^ set(val.classes))[:3]})")
        return _Images(train, spec.input_size), _Images(val, spec.input_size), len(train.classes)
    base = _image_folder(tv, root)
    ds = _Images(base, spec.input_size)
    tr, va = _split(len(ds), spec.val_fraction, seed)
    return Subset(ds, tr), Subset(ds, va), len(base.classes)


_LOADERS = {"digits": _digits, "cifar10": _cifar10, "imagefolder": _imagefolder, "mnist": _idx,
            "fashion-mnist": _idx}


@functools.lru_cache(maxsize=4)
def _load_cached(spec_json: str, seed: int):
    spec = DatasetSpec.model_validate_json(spec_json)
    train, val, n_classes = _LOADERS[spec.kind](spec, seed)
    if spec.limit_train is not None and spec.limit_train < len(train):
        train = Subset(train, range(spec.limit_train))
    if spec.limit_val is not None and spec.limit_val < len(val):
        val = Subset(val, range(spec.limit_val))
    return train, val, n_classes


def check_sample(spec: DatasetSpec, seed: int = 0, n: int = 16) -> None:
    """Decode ``n`` samples spread over both splits (DataError naming the first unreadable file)."""
    train, val, _ = load_dataset(spec, seed)
    for ds in (train, val):
        for i in sorted({int(j * (len(ds) - 1) / max(n // 2 - 1, 1)) for j in range(n // 2)}):
            x, _ = ds[i]
            if not torch.isfinite(x).all():
                raise DataError(f"sample {i} of the {spec.kind} data decodes to non-finite values")


def load_dataset(spec: DatasetSpec, seed: int = 0):
    """``(train, val, num_classes)``; cached per process (Ray workers reuse it across tasks)."""
    return _load_cached(spec.model_dump_json(), seed)
