"""Your own network and weights, real data: factory models, torchvision weights by name from
TORCH_HOME, EfficientNet-Lite0's real weights through surgery, the MNIST-family IDX readers."""
import gzip
import math
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lowrank
from jobs.cli import main
from jobs.data import DataError, load_dataset, read_idx
from jobs.models import build, build_model
from jobs.spec import DatasetSpec, ModelSpec
from jobs.tv import import_torchvision

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _line(capsys) -> str:
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.strip()]
    assert len(lines) == 1, out
    return lines[0]


# ----------------------------------------------------------------------------- factory models


@pytest.mark.parametrize("factory,kwargs,expected", [
    ("tests.jobs.no_such_module:net", {}, "module 'tests.jobs.no_such_module' does not import (ModuleNotFoundError"),
    ("tests.jobs.factories:nothing_here", {}, "'tests.jobs.factories' has no 'nothing_here'"),
    ("tests.jobs.factories:not_a_module", {}, "returned a dict; accepted: a torch.nn.Module"),
    ("tests.jobs.factories:raises", {}, "failed with kwargs []: RuntimeError: the user's constructor failed"),
    ("tests.jobs.factories:tiny_net", {"depth": 3}, "failed with kwargs ['depth']: TypeError"),
    ("tests.jobs.factories:needs_224", {}, "models.0: Sequential cannot run at the data's input size 16x16"),
    ("tests.jobs.factories:tiny_net", {"in_channels": 4},
     "models.0: TinyNet's first conv 'stem' takes 4 input channels; accepted: 1 (grey) or 3 (RGB)"),
])
def test_a_factory_that_cannot_give_a_model_is_one_line_exit_2(make_spec, capsys, factory, kwargs, expected):
    spec, _ = make_spec(mutate=lambda d: d["models"][0].update(name="mine", factory=factory, kwargs=kwargs))
    assert main(["validate", str(spec)]) == 2
    assert expected in _line(capsys)


def test_a_factory_from_a_library_that_imports_torchvision_works_in_a_fresh_process(make_spec):
    """User code importing torchvision (or timm, which does) on this CPU-only torch: the factory
    is imported after torchvision's op schemas are defined, in a fresh interpreter as a user runs it."""
    import subprocess
    import sys

    spec, _ = make_spec(mutate=lambda d: d["models"][0].update(
        name="tvgrey", factory="torchvision.models:resnet18", kwargs={"num_classes": 10}))
    out = subprocess.run([sys.executable, "-m", "jobs", "validate", str(spec)], cwd=Path(__file__).parents[2],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "is a valid sweep spec" in out.stdout, out.stderr


def test_factory_model_end_to_end_with_its_own_padding(make_spec, ray_start_2_cpus, capsys, tmp_path):
    """A network of the user's code (a grey-input stem with TF-"same" padding, and self-attention
    whose out_proj the model cannot run factorized) through a local Ray and sqlite MLflow."""
    spec, data = make_spec(mutate=lambda d: (
        d["models"][0].update(name="mine", factory="tests.jobs.factories:attention_net",
                              kwargs={"width": 16, "in_channels": 1}),
        d["compression"].update(methods=["tucker2"], options={},
                                layers={"skip_first": False, "pointwise_method": "svd"}),
        d["finetune"].update(epochs=0), d["pretrain"].update(epochs=1)))
    assert main(["run", str(spec)]) == 0, capsys.readouterr().err
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(data["mlflow"]["tracking_uri"])
    [v] = client.search_model_versions("name='lowrank-mine'")
    assert v.tags["method"] == "tucker2" and float(v.tags["compression_ratio"]) > 1.2
    mlflow.set_tracking_uri(data["mlflow"]["tracking_uri"])
    model = mlflow.pytorch.load_model(f"models:/lowrank-mine/{v.version}")
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)  # the stem's own padding kept: 16 -> 8 -> 4
    run = client.get_run(v.tags["run_id"])
    assert run.data.params["preprocess.channels"] == "1" and len(json.loads(run.data.params["preprocess.mean"])) == 1
    assert v.tags["latency_input"].startswith("1x16x16")
    import pyarrow.parquet as pq

    table = pq.read_table(client.download_artifacts(v.tags["run_id"], "layers/layers.parquet", str(tmp_path))).to_pydict()
    rows = {n: (s, r) for n, s, r in zip(table["layer"], table["status"], table["reason"])}
    assert rows["attn.out_proj"][0] == "skipped" and "MultiheadAttention" in rows["attn.out_proj"][1]
    assert rows["head"][0] == rows["body.2"][0] == "ok"


# ----------------------------------------------------------------------------- torchvision weights by name


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_torchvision_weights_by_name_are_read_from_torch_home(torch_home, make_spec, capsys):
    w = import_torchvision().models.SqueezeNet1_1_Weights.IMAGENET1K_V1
    torch_home.mkdir(parents=True)
    saved = build_model("squeezenet1_1", 1000).state_dict()
    torch.save(saved, torch_home / Path(w.url).name)  # the file name torchvision expects
    model = build(ModelSpec(name="squeezenet1_1", weights="IMAGENET1K_V1", num_classes=1000))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    assert build(ModelSpec(name="squeezenet1_1", weights="DEFAULT", num_classes=1000)) is not None
    spec, _ = make_spec(mutate=lambda d: (d["models"][0].update(name="squeezenet1_1", weights="IMAGENET1K_V1",
                                                                num_classes=1000),
                                          d["dataset"].update(input_size=64)))
    assert main(["validate", str(spec)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("weights,classes,expected", [
    ("IMAGENET1K_V1", 1000, "is not there and cannot be downloaded"),
    ("IMAGENET1K_V9", 1000, "squeezenet1_1 has no pretrained weights 'IMAGENET1K_V9'; accepted: DEFAULT, IMAGENET1K_V1"),
    ("IMAGENET1K_V1", 10, "IMAGENET1K_V1 weights have 1000 classes; set num_classes: 1000"),
])
def test_weights_that_cannot_be_had_are_one_line(torch_home, make_spec, capsys, monkeypatch, weights, classes,
                                                 expected):
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # offline, as the benchmark machines are
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    spec, _ = make_spec(mutate=lambda d: (d["models"][0].update(name="squeezenet1_1", weights=weights,
                                                                num_classes=classes),
                                          d["dataset"].update(input_size=64)))
    assert main(["validate", str(spec)]) == 2
    line = _line(capsys)
    assert expected in line
    if "downloaded" in line:
        assert str(torch_home / "squeezenet1_1-b8a52dc0.pth") in line and "put the file from https://" in line


# ----------------------------------------------------------------------------- real weights through surgery


def test_efficientnet_lite0_real_weights_compress_with_their_same_padding():
    pytest.importorskip("efficientnet_lite_pytorch")
    from tests.jobs.factories import efficientnet_lite0

    model = efficientnet_lite0().eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(x)
    plan = lowrank.plan_layers(model, "spatial-svd", "ratio", options={"ratio": 1.3}, skip_first=False,
                               pointwise_method="svd")
    new, reports = lowrank.compress_model(model, plan, input_shape=(3, 224, 224), on_error="record")
    ok = [r for r in reports if r.status == "ok"]
    assert len(ok) >= 30 and all(r.status in ("ok", "skipped") for r in reports)
    stem = new.get_submodule("_conv_stem")
    assert isinstance(stem, torch.nn.Sequential) and isinstance(stem[0], torch.nn.ZeroPad2d)
    with torch.no_grad():
        out = new(x)
    assert out.shape == dense.shape == (2, 1000) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- IDX data


def _write_idx(folder: Path, split: str, n: int, gz: bool, rng) -> None:
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 3).astype(np.uint8)
    for name, arr, code in ((f"{split}-images-idx3-ubyte", images, 3), (f"{split}-labels-idx1-ubyte", labels, 1)):
        raw = bytes([0, 0, 8, code]) + np.asarray(arr.shape, dtype=">i4").tobytes() + arr.tobytes()
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_readers_on_files_written_here(tmp_path, gz):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path, "train", 30, gz, rng)
    _write_idx(tmp_path, "t10k", 9, gz, rng)
    train, val, classes = load_dataset(DatasetSpec(kind="mnist", root=tmp_path, input_size=16))
    assert (len(train), len(val), classes) == (30, 9, 3)
    x, y = train[4]
    assert x.shape == (3, 16, 16) and int(y) == 1 and torch.isfinite(x).all()
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    raw = (gzip.decompress((tmp_path / name).read_bytes()) if gz else (tmp_path / name).read_bytes())[:-10]
    (tmp_path / name).write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(DataError, match="header says .* but holds"):
        read_idx(tmp_path / name)


def test_idx_files_are_found_where_torchvisions_dataset_root_keeps_them_and_spelt_with_a_dot(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw, "train", 12, False, rng)
    _write_idx(raw, "t10k", 5, True, rng)
    for f in raw.glob("t10k-*"):  # the dotted spelling of some mirrors
        f.rename(raw / f.name.replace("-idx", ".idx"))
    train, val, classes = load_dataset(DatasetSpec(kind="fashion-mnist", root=tmp_path, input_size=16))
    assert (len(train), len(val), classes) == (12, 5, 3)
    with pytest.raises(DataError, match="lacks train-images-idx3-ubyte.* there or in raw/, MNIST/raw/"):
        load_dataset(DatasetSpec(kind="mnist", root=tmp_path, input_size=16))  # MNIST's are not FashionMNIST's


def test_a_folder_without_the_idx_files_is_one_line(tmp_path, make_spec, capsys):
    spec, _ = make_spec(mutate=lambda d: d["dataset"].update(kind="mnist", root=str(tmp_path)))
    assert main(["run", str(spec)]) == 2
    assert "lacks train-images-idx3-ubyte(.gz)" in _line(capsys)


@pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_the_debian_package():
    train, val, classes = load_dataset(DatasetSpec(kind="fashion-mnist", input_size=32))
    assert (len(train), len(val), classes) == (60000, 10000, 10)
    assert torch.bincount(train.base.labels).tolist() == [6000] * 10
    assert train[0][0].shape == (3, 32, 32)


@pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_the_readme_own_model_example_and_the_fashion_mnist_sweep_validate(capsys):
    root = Path(__file__).resolve().parents[2]
    assert main(["validate", str(root / "examples" / "own-model.yaml")]) == 0, capsys.readouterr().err
    assert main(["validate", "--schema-only", str(root / "cluster" / "sweeps" / "fashion-mnist.yaml")]) == 0


def test_an_image_folder_with_train_and_val_is_split_as_it_says(tmp_path):
    from PIL import Image

    for split, n in (("train", 5), ("val", 2)):
        for c in ("ant", "bee"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (10, 10), (30 * i, 100 if c == "ant" else 200, 0)).save(tmp_path / split / c / f"{i}.png")
    train, val, classes = load_dataset(DatasetSpec(kind="imagefolder", root=tmp_path, input_size=16))
    assert (len(train), len(val), classes) == (10, 4, 2)
    assert [int(val[i][1]) for i in range(4)] == [0, 0, 1, 1] and val[0][0].shape == (3, 16, 16)
    (tmp_path / "val" / "cat").mkdir()
    Image.new("RGB", (10, 10)).save(tmp_path / "val" / "cat" / "0.png")
    with pytest.raises(DataError, match="train/ and val/ name different classes"):
        load_dataset(DatasetSpec(kind="imagefolder", root=tmp_path, input_size=16, batch_size=3))


@pytest.mark.parametrize("wrap", ["googlenet", "tuple", "dict"])
def test_a_model_with_auxiliary_heads_trains_on_its_main_logits(wrap):
    """torchvision's GoogLeNet built by a factory keeps its auxiliary heads: in training mode it
    returns GoogLeNetOutputs(logits, aux2, aux1); other networks return a tuple or a dict."""
    from torch import nn

    from jobs.train import evaluate, loader, main_logits, train_epochs

    class Aux(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.aux = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                                nn.Flatten(), nn.Linear(8, 10)), nn.Linear(3, 10)

        def forward(self, x):
            y = self.body(x)
            if not self.training:
                return y
            return (y, self.aux(x.mean((2, 3)))) if wrap == "tuple" else {"logits": y, "aux": self.aux(x.mean((2, 3)))}

    tv = import_torchvision()
    model = tv.models.googlenet(num_classes=10, aux_logits=True, init_weights=True) if wrap == "googlenet" else Aux()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    losses = train_epochs(model, loader(ds, 32, shuffle=True), epochs=2, lr=0.01)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert 0 <= evaluate(model, loader(ds, 32, shuffle=False))["top1"] <= 1
    with pytest.raises(TypeError, match="accepted: a tensor of logits"):
        main_logits("not logits")
