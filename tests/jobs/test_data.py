import pickle

import numpy as np
import pytest
import torch

from jobs.data import DataError, load_dataset
from jobs.spec import DatasetSpec


def _write_cifar(root, n_per_batch=6):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {"batch_label": name, "data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
             "labels": [int(v) for v in rng.integers(0, 10, n_per_batch)],
             "filenames": [f"img{i}.png" for i in range(n_per_batch)]}
        with open(base / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": n_per_batch}, f, protocol=2)
    return base


def test_digits_default():
    train, val, n = load_dataset(DatasetSpec(input_size=16, val_fraction=0.25))
    assert n == 10 and len(train) + len(val) == 1797 and abs(len(val) - 449) <= 1
    x, y = train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= int(y) < 10


def test_cifar10_real_format(tmp_path):
    base = _write_cifar(tmp_path)
    train, val, n = load_dataset(DatasetSpec(kind="cifar10", root=tmp_path, input_size=24))
    assert (len(train), len(val), n) == (30, 6, 10)
    x, y = val[0]
    assert x.shape == (3, 24, 24)
    # pixel order: channel-major 32x32 planes, as CIFAR-10 stores them
    with open(base / "test_batch", "rb") as f:
        raw = pickle.load(f)["data"][0].reshape(3, 32, 32)
    spec = DatasetSpec(kind="cifar10", root=tmp_path, input_size=32, normalize={"mean": [0.5], "std": [0.25]})
    train32, val32, _ = load_dataset(spec)
    assert torch.allclose(val32[0][0] * 0.25 + 0.5, torch.tensor(raw, dtype=torch.float32) / 255, atol=1e-6)


def test_cifar10_missing_files_and_malicious_pickle(tmp_path):
    base = _write_cifar(tmp_path)
    (base / "data_batch_3").unlink()
    with pytest.raises(DataError, match="lacks data_batch_3"):
        load_dataset(DatasetSpec(kind="cifar10", root=tmp_path))

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(base / "data_batch_3", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(DataError, match="refused to load"):
        load_dataset(DatasetSpec(kind="cifar10", root=tmp_path, input_size=20))
    assert not marker.exists()


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "eel"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    train, val, n = load_dataset(DatasetSpec(kind="imagefolder", root=tmp_path, input_size=16, val_fraction=0.25))
    assert n == 3 and len(train) == 9 and len(val) == 3
    assert train[0][0].shape == (3, 16, 16)


def test_empty_imagefolder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no usable images"):
        load_dataset(DatasetSpec(kind="imagefolder", root=tmp_path / "empty"))
