"""Data sets: scikit-learn's bundled digits (the embedded default), CIFAR-10 in torchvision's
on-disk format from a local folder (no download), MNIST and Fashion-MNIST from their IDX files
(Fashion-MNIST by default from Debian's ``dataset-fashion-mnist`` package), ImageFolder, and any
folder of unlabelled images (``images``, for evaluation by agreement).

Each kind's loader gives raw images in [0, 1] at their own size; ``load_dataset`` serves them
through a model's ``Preprocess`` view (resize, centre crop, three channels, normalised), decoded
as they are read except for small in-memory sets, which are converted once."""
from __future__ import annotations

import functools
import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset

from .preprocess import STATS_SAMPLES, Preprocess, geometry, resolve, statistics, view
from .spec import DatasetSpec
from .tv import import_torchvision

PRECOMPUTE_BYTES = 256 << 20  # an in-memory set converted once when its view takes at most this


class DataError(ValueError):
    """A data set that cannot be loaded (one-line message)."""


def _split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


class _Bytes(Dataset):
    """uint8 ``(N, C, H, W)`` images kept as bytes, each scaled to [0, 1] when read (60,000
    images at 32 px would take 740 MB as 3-channel floats)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i].float() / 255, self.labels[i]


def _digits(spec: DatasetSpec, seed: int):
    from sklearn.datasets import load_digits  # deferred: scikit-learn is only needed for the digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
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
    return _Bytes(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])), _Bytes(*_read_cifar_batch(test_file)), 10


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


# where torchvision's MNIST / FashionMNIST datasets keep the same files under their root
IDX_SUBFOLDERS = {"mnist": ("", "raw", "MNIST/raw"), "fashion-mnist": ("", "raw", "FashionMNIST/raw")}


def find_idx(folder: Path, kind: str, name: str) -> Path | None:
    """``name`` (``train-images-idx3-ubyte``) in ``folder`` or where torchvision's dataset root
    keeps it, ``.gz`` or plain, also spelt with a dot (``train-images.idx3-ubyte``, as some
    mirrors do)."""
    spellings = (name, name.replace("-idx", ".idx"))
    for sub in IDX_SUBFOLDERS[kind]:
        for base in spellings:
            for ext in (".gz", ""):
                if (folder / sub / (base + ext)).is_file():
                    return folder / sub / (base + ext)
    return None


def _idx(spec: DatasetSpec, seed: int):
    folder = Path(spec.folder)
    sets = []
    for split, names in IDX_FILES.items():
        found = []
        for name in names:
            path = find_idx(folder, spec.kind, name)
            if path is None:
                where = ", ".join(f"{sub}/" for sub in IDX_SUBFOLDERS[spec.kind] if sub)
                raise DataError(f"{spec.kind} folder {str(folder)!r} lacks {name}(.gz) (the standard IDX files "
                                f"train-*/t10k-*, there or in {where}; nothing is downloaded)")
            found.append(read_idx(path))
        images, labels = found
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{spec.kind} {split} files disagree: images {images.shape}, labels {labels.shape}")
        sets.append(_Bytes(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))))
    classes = int(max(int(s.labels.max()) for s in sets)) + 1
    return sets[0], sets[1], classes


def _undecodable(path, e: Exception) -> DataError:
    return DataError(f"image {str(path)!r} cannot be decoded ({type(e).__name__}: "
                     f"{(str(e).splitlines() or [''])[0][:120]})")


class _Images(Dataset):
    """A torchvision folder data set whose decoding errors name the file."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        try:
            img, label = self.base[i]
        except Exception as e:  # noqa: BLE001 - PIL raises many types for a broken file
            raise _undecodable(self.base.samples[i][0], e) from None
        return img, label


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
        return _Images(train), _Images(val), len(train.classes)
    base = _image_folder(tv, root)
    ds = _Images(base)
    tr, va = _split(len(ds), spec.val_fraction, seed)
    return Subset(ds, tr), Subset(ds, va), len(base.classes)


class _Unlabelled(Dataset):
    """Every image under a folder (any depth), label 0: what evaluation by agreement reads."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as img:
                x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())
        except Exception as e:  # noqa: BLE001 - PIL raises many types for a broken file
            raise _undecodable(self.paths[i], e) from None
        return x.permute(2, 0, 1).float() / 255, 0


def _images(spec: DatasetSpec, seed: int):
    """Any folder of images, unlabelled; ``val_fraction`` of them (seeded) evaluated on."""
    exts = import_torchvision().datasets.folder.IMG_EXTENSIONS
    paths = sorted(p for p in Path(spec.root).rglob("*") if p.suffix.lower() in exts and p.is_file())
    if len(paths) < 2:
        raise DataError(f"image folder {str(spec.root)!r} has {len(paths)} image(s) ({', '.join(exts)}); "
                        f"need at least 2")
    ds = _Unlabelled(paths)
    tr, va = _split(len(ds), spec.val_fraction, seed)
    return Subset(ds, tr), Subset(ds, va), 1


_LOADERS = {"digits": _digits, "cifar10": _cifar10, "imagefolder": _imagefolder, "mnist": _idx,
            "fashion-mnist": _idx, "images": _images}


def _limit(ds, n: int | None):
    if n is None or n >= len(ds):
        return ds
    if isinstance(ds, TensorDataset):
        return TensorDataset(*(t[:n] for t in ds.tensors))
    return Subset(ds, range(n))


@functools.lru_cache(maxsize=4)
def _raw(spec_json: str, seed: int):
    """``(train, val, num_classes)`` of raw images in [0, 1] at their own size."""
    spec = DatasetSpec.model_validate_json(spec_json)
    train, val, n_classes = _LOADERS[spec.kind](spec, seed)
    return _limit(train, spec.limit_train), _limit(val, spec.limit_val), n_classes


@functools.lru_cache(maxsize=8)
def _stats(spec_json: str, seed: int, resize: int, crop: int, channels: int = 3):
    """Per-channel mean/std of up to ``STATS_SAMPLES`` training images as the model sees them."""
    train = _raw(spec_json, seed)[0]
    n = min(len(train), STATS_SAMPLES)
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    if isinstance(train, TensorDataset):
        return statistics(geometry(train.tensors[0][idx], resize, crop, channels))
    return statistics(geometry(train[i][0][None], resize, crop, channels)[0] for i in idx)


def complete(spec: DatasetSpec, prep: Preprocess, seed: int = 0) -> Preprocess:
    """``prep`` with mean/std filled in from the training split where it has none of its own."""
    if prep.mean is not None:
        return prep
    return prep.with_stats(*_stats(spec.model_dump_json(), seed, prep.resize, prep.crop, prep.channels))


class _Viewed(Dataset):
    def __init__(self, base, prep: Preprocess):
        self.base, self.prep = base, prep

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return view(x, self.prep), y


def _viewed(ds, prep: Preprocess):
    if isinstance(ds, TensorDataset) and len(ds) * prep.channels * 4 * prep.crop ** 2 <= PRECOMPUTE_BYTES:
        x, y = ds.tensors
        return TensorDataset(view(x, prep), y)  # small and in memory: converted once
    return _Viewed(ds, prep)


@functools.lru_cache(maxsize=8)
def _load_cached(spec_json: str, seed: int, prep: Preprocess):
    train, val, n_classes = _raw(spec_json, seed)
    return _viewed(train, prep), _viewed(val, prep), n_classes


def check_sample(spec: DatasetSpec, seed: int = 0, n: int = 16) -> None:
    """Decode ``n`` samples spread over both splits (DataError naming the first unreadable file)."""
    train, val, _ = load_dataset(spec, seed)
    for ds in (train, val):
        for i in sorted({int(j * (len(ds) - 1) / max(n // 2 - 1, 1)) for j in range(n // 2)}):
            x, _ = ds[i]
            if not torch.isfinite(x).all():
                raise DataError(f"sample {i} of the {spec.kind} data decodes to non-finite values")


def load_dataset(spec: DatasetSpec, seed: int = 0, prep: Preprocess | None = None):
    """``(train, val, num_classes)`` as a model sees them (``prep``, by default the data's own:
    see ``preprocess.resolve``; completed from the data's statistics where needed); cached per
    process (Ray workers reuse it across tasks)."""
    prep = complete(spec, prep if prep is not None else resolve(spec, None), seed)
    return _load_cached(spec.model_dump_json(), seed, prep)


def default_workers(spec: DatasetSpec, cpus: int | None = None) -> int:
    """``dataset.workers``, or for sets decoded as they are read (image folders) up to 4 worker
    processes, one CPU left to the training loop: of ``cpus``, the CPUs a Ray task was given (a
    1-CPU task decodes inline, as Ray counts it), else of the machine; 0 for sets in memory."""
    if spec.workers is not None:
        return spec.workers
    if spec.kind not in ("imagefolder", "images"):
        return 0
    return max(0, min(4, (cpus or os.cpu_count() or 1) - 1))
