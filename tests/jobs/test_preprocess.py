"""What a model is fed: the weights' own transforms, the data's statistics, the spec's overrides,
grey data as three channels, the training augmentation; timm by name; evaluation by agreement
(EfficientNet-Lite0 over scikit-image's photos, end to end)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from jobs import preprocess
from jobs.cli import main
from jobs.data import load_dataset
from jobs.models import ModelError, SmallCNN, build, build_model
from jobs.plan import plan_sweep
from jobs.spec import DatasetSpec, ModelSpec, SpecError, parse_spec
from jobs.train import Distilled, evaluate, loader, train_epochs
from jobs.tv import import_torchvision

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _photos(folder: Path, sizes=((300, 200), (180, 260), (240, 240), (500, 333))) -> Path:
    """Two classes of colour photographs of unequal, non-square sizes (PNG)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (folder / split / c).mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / split / c / f"{i}.png")
    return folder


def _spec(**dataset) -> dict:
    return {"name": "p", "models": [{"name": "smallcnn"}], "dataset": dataset,
            "compression": {"methods": ["tucker2"]}}


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_torchvision_weights_bring_their_transforms(torch_home, tmp_path):
    tv = import_torchvision()
    w = tv.models.ResNet18_Weights.IMAGENET1K_V1
    torch_home.mkdir(parents=True)
    torch.save(build_model("resnet18", 1000).state_dict(), torch_home / Path(w.url).name)
    root = _photos(tmp_path / "photos")
    spec = parse_spec({**_spec(kind="imagefolder", root=str(root)),
                       "models": [{"name": "resnet18", "weights": "IMAGENET1K_V1", "num_classes": 1000}]})
    [cfg] = plan_sweep(spec)
    p = cfg.model.prep
    assert (p.resize, p.crop, p.mean, p.std, p.source) == (256, 224, *IMAGENET, "weights")
    assert cfg.model.input_shape == (3, 224, 224) and p.augment == "crop+flip"
    _, val, _ = load_dataset(spec.dataset, spec.seed, p)
    x, _ = val[0]
    # the same as torchvision's own preset for these weights, on the same file
    from PIL import Image

    ref = w.transforms()(tv.transforms.functional.pil_to_tensor(Image.open(val.base.base.samples[0][0]).convert("RGB")))
    assert x.shape == ref.shape == (3, 224, 224)
    assert (x - ref).abs().mean() < 0.02  # bilinear + antialias on both sides; rounding of the uint8 path only

    # the spec overrides each setting; a smaller crop keeps the weights' 256/224 ratio
    spec = parse_spec({**_spec(kind="imagefolder", root=str(root), input_size=160,
                               normalize={"mean": [0.5], "std": [0.25]}, augment="none"),
                       "models": [{"name": "resnet18", "weights": "IMAGENET1K_V1", "num_classes": 1000}]})
    p = plan_sweep(spec)[0].model.prep
    assert (p.resize, p.crop, p.mean, p.std, p.augment, p.source) == (183, 160, (0.5,) * 3, (0.25,) * 3, "none",
                                                                       "spec")


def test_without_weights_the_data_gives_its_statistics_and_grey_feeds_three_channels():
    spec = DatasetSpec(input_size=16)
    p = preprocess.resolve(spec, None)
    assert (p.resize, p.crop, p.mean, p.source, p.augment) == (16, 16, None, "data", "crop")  # digits: no flips
    train, val, _ = load_dataset(spec, 0, p)
    x = torch.stack([train[i][0] for i in range(len(train))])
    assert x.shape[1:] == (3, 16, 16) and torch.equal(x[:, 0], x[:, 2])  # grey, repeated
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.1  # normalised by its own statistics
    assert preprocess.resolve(DatasetSpec(kind="fashion-mnist"), None).augment == "crop+flip"
    assert preprocess.resolve(DatasetSpec(kind="fashion-mnist"), None, agreement=True).augment == "none"


def test_a_grey_model_is_fed_one_channel_and_colour_is_reduced_to_luminance_for_it(tmp_path, make_spec, capsys):
    grey = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(1), torch.nn.LazyLinear(10))
    m = ModelSpec(name="g", factory="tests.jobs.factories:tiny_net", kwargs={"in_channels": 1})
    p = preprocess.for_model(DatasetSpec(input_size=16), m, grey)
    assert p.channels == 1 and p.input_shape == (1, 16, 16)
    train, _, _ = load_dataset(DatasetSpec(input_size=16), 0, p)
    x = torch.stack([train[i][0] for i in range(64)])
    assert x.shape[1:] == (1, 16, 16) and abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.15
    rgb = torch.rand(2, 3, 8, 8)
    luma = 0.2989 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    assert torch.allclose(preprocess.geometry(rgb, 8, 8, channels=1)[:, 0], luma)
    assert preprocess.geometry(rgb[:, :1], 8, 8).shape[1] == 3  # grey for an RGB model: repeated
    folder = _photos(tmp_path / "photos")  # colour photographs for a grey model: one channel, its own statistics
    spec = DatasetSpec(kind="imagefolder", root=folder, input_size=32, workers=0)
    train, _, _ = load_dataset(spec, 0, preprocess.resolve(spec, None, channels=1))
    assert train[0][0].shape == (1, 32, 32)
    assert preprocess.resolve(DatasetSpec(normalize={"mean": [0.5], "std": [0.25]}), None, channels=1).mean == (0.5,)
    assert preprocess.resolve(DatasetSpec(), {"crop": 224, "mean": (0.4, 0.5, 0.6), "std": (0.2, 0.2, 0.2)},
                              channels=1).mean == pytest.approx((0.5,))  # weights' RGB values averaged
    path, _ = make_spec(mutate=lambda d: (
        d["models"][0].update(name="g", factory="tests.jobs.factories:tiny_net", kwargs={"in_channels": 1}),
        d["dataset"].update(normalize={"mean": [0.5, 0.5, 0.5], "std": [0.2]})))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "normalize has 3 values but" in err and "takes 1 channel (grey)" in err
    path, _ = make_spec(mutate=lambda d: d["models"][0].update(name="g", factory="tests.jobs.factories:tiny_net",
                                                               kwargs={"in_channels": 1}, channels=3))
    assert main(["validate", str(path)]) == 2  # told 3 channels, its stem takes 1: the forward says so
    err = capsys.readouterr().err.strip()
    assert "cannot run at the data's input size" in err and "set models.channels (1 or 3)" in err


@pytest.mark.parametrize("dataset,expected", [
    ({"input_size": 32, "crop": 28}, "crop (28) and input_size (32) are one setting"),
    ({"crop": 64, "resize": 48}, "resize (48) is smaller than the crop (64)"),
    ({"normalize": {"mean": [0.5, 0.5], "std": [0.2]}}, "normalize.mean has 2 values"),
    ({"normalize": {"mean": [0.5], "std": [0]}}, "normalize.std.0: Input should be greater than 0"),
    ({"augment": "mixup"}, "dataset.augment: Input should be 'none', 'crop' or 'crop+flip'"),
])
def test_preprocessing_settings_out_of_range_are_one_line(dataset, expected):
    with pytest.raises(SpecError) as e:
        parse_spec(_spec(**dataset))
    assert expected in str(e.value)


def test_augmentation_is_seeded_per_image_and_keeps_what_it_should():
    x = torch.randn(16, 3, 24, 24)
    a = preprocess.augment(x, "crop", torch.Generator().manual_seed(1))
    b = preprocess.augment(x, "crop", torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.allclose(a, x)
    assert torch.equal(preprocess.augment(x, "none", torch.Generator()), x)
    # crop+flip: about half of the images mirrored (measured on a left-right ramp)
    ramp = torch.linspace(-1, 1, 24).expand(64, 3, 24, 24)
    out = preprocess.augment(ramp, "crop+flip", torch.Generator().manual_seed(0))
    flipped = (out[..., 8:16, 4:20].diff(dim=-1).mean((1, 2, 3)) < 0).sum().item()
    assert 16 <= flipped <= 48
    assert (preprocess.augment(ramp, "crop", torch.Generator().manual_seed(0))[..., 8:16, 4:20]
            .diff(dim=-1).mean((1, 2, 3)) > 0).all()


# ----------------------------------------------------------------------------- timm by name


def test_timm_models_by_name_and_their_weights_from_the_hugging_face_cache(tmp_path, monkeypatch, capsys, make_spec):
    timm = pytest.importorskip("timm")
    model = build(ModelSpec(name="timm/resnet18", num_classes=10)).eval()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(SpecError, match="timm has no model 'nosuchnet'"):
        parse_spec({**_spec(), "models": [{"name": "timm/nosuchnet"}]})
    # weights: an offline machine with an empty cache says where they go, in one line
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr("socket.create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    spec, _ = make_spec(mutate=lambda d: d["models"][0].update(name="timm/resnet18.a1_in1k", weights="DEFAULT",
                                                                num_classes=1000))
    assert main(["validate", str(spec)]) == 2
    line = capsys.readouterr().err.strip()
    assert "timm/resnet18.a1_in1k weights are not in the Hugging Face cache" in line and str(tmp_path / "hf") in line
    assert "hf download timm/resnet18.a1_in1k" in line and "\n" not in line
    # the same weights placed in the cache as the hub lays it out: loaded, and their preprocessing used
    saved = timm.create_model("resnet18", num_classes=1000).state_dict()
    snap = tmp_path / "hf" / "models--timm--resnet18.a1_in1k" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    from safetensors.torch import save_file

    save_file(saved, str(snap / "model.safetensors"))
    m = ModelSpec(name="timm/resnet18.a1_in1k", weights="DEFAULT", num_classes=1000)
    model = build(m)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    p = preprocess.for_model(DatasetSpec(), m, model)
    assert (p.crop, p.resize, p.mean, p.std, p.source) == (224, 235, *IMAGENET, "weights")  # crop_pct 0.95


# ----------------------------------------------------------------------------- agreement


def test_agreement_of_a_model_with_itself_is_one_and_its_kl_zero():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 7)).eval()
    ds = torch.utils.data.TensorDataset(torch.randn(40, 3, 2, 2), torch.zeros(40, dtype=torch.long))
    dl = Distilled(loader(ds, 16, shuffle=False), model)
    r = evaluate(model, dl)
    assert r["top1"] == 1.0 and r["top5"] == 1.0 and abs(r["kl"]) < 1e-6
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 7))
    r = evaluate(other, dl)
    assert r["top1"] < 1.0 and r["kl"] > 0.01


def test_agreement_needs_weights_and_images_need_agreement():
    with pytest.raises(SpecError, match="smallcnn has no weights; give weights"):
        parse_spec({**_spec(), "evaluation": "agreement"})
    with pytest.raises(SpecError, match="kind 'images' has no labels; it serves evaluation: agreement"):
        parse_spec(_spec(kind="images", root="/tmp"))


def _skimage_photos(folder: Path) -> Path:
    """scikit-image's bundled photographs (no download), as PNG files in one folder."""
    pytest.importorskip("skimage")
    from examples.pretrained import write_photos

    assert write_photos(folder) >= 8
    return folder


def test_efficientnet_lite0_screened_by_agreement_end_to_end(make_spec, ray_start_2_cpus, tmp_path, capsys):
    """Real ImageNet weights, no labels: scikit-image's photos, agreement and KL with the dense
    model (1 and 0 for the dense model itself), fine-tuning by distillation, in the registry."""
    pytest.importorskip("efficientnet_lite_pytorch")
    photos = _skimage_photos(tmp_path / "photos")
    spec, data = make_spec(mutate=lambda d: (
        d["models"][0].update(name="lite0", factory="tests.jobs.factories:efficientnet_lite0", pretrained=True,
                              num_classes=1000),
        d.update(evaluation="agreement"),
        d["dataset"].update(kind="images", root=str(photos), val_fraction=0.5, batch_size=4, input_size=None,
                            limit_val=None),
        d["compression"].update(methods=["tucker2"], options={},
                                layers={"include": ["_blocks.1*", "_blocks.2._project_conv"],
                                        "pointwise_method": "svd"}),
        d["finetune"].update(epochs=1, lr=0.001)))
    assert main(["run", str(spec)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "agree_pre agree_post" in out
    from mlflow import MlflowClient

    client = MlflowClient(data["mlflow"]["tracking_uri"])
    [v] = client.search_model_versions("name='lowrank-lite0'")
    assert float(v.tags["agree_pre"]) == 1.0 and not any(k.startswith("acc_") for k in v.tags)
    assert 0 <= float(v.tags["agree_post"]) <= 1 and float(v.tags["kl_post"]) >= 0
    assert float(v.tags["compression_ratio"]) > 1.0
    m = client.get_run(v.tags["run_id"]).data.metrics
    assert m["kl_pre"] < 1e-6 and m["agree_pre"] == 1.0 and {"agree_ft", "kl_ft", "agree_post"} <= set(m)
    params = client.get_run(v.tags["run_id"]).data.params
    assert json.loads(params["preprocess.mean"]) == [0.498] * 3 and params["preprocess.crop"] == "224"


@pytest.mark.parametrize("batch,trains_bn", [(32, True), (4, False)])
def test_distillation_trains_batchnorm_except_on_tiny_batches(batch, trains_bn):
    """Frozen BatchNorm at usual batch sizes let distillation diverge (small CNN on digits, lr
    0.005: KL 0.03 -> NaN in 20 steps); it stays frozen only below 16 images per batch."""
    torch.manual_seed(0)
    student, teacher = SmallCNN(10).train(), SmallCNN(10).eval()
    bn = student.features[1]
    before = bn.running_mean.clone()
    data = TensorDataset(torch.rand(64, 3, 16, 16), torch.zeros(64, dtype=torch.long))
    losses = train_epochs(student, Distilled(loader(data, batch, shuffle=True), teacher), epochs=1, lr=0.001)
    assert losses and all(math.isfinite(v) for v in losses)
    assert (not torch.equal(bn.running_mean, before)) == trains_bn
