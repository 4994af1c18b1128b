"""ONNX export of factorized models and the paired timing step (jobs.deploy, jobs.tasks.timing)."""
import numpy as np
import pytest
import torch
from torch import nn

import lowrank
from jobs import deploy, report
from jobs.models import SmallCNN
from jobs.spec import LatencySpec, ModelSpec, SpecError, parse_spec
from jobs.tasks.timing import timing_task

from .specs import write_spec


def _compressed(method: str, model=None):
    model = (model or SmallCNN(10)).eval()
    opts = {"ratio": 2, **({"n_iter_max": 5} if method.startswith("cp") else {}),
            **({"epc_max_sweeps": 5} if method.endswith("epc") else {})}
    small, reports = lowrank.compress_model(model, lowrank.plan_layers(model, method, "ratio", options=opts),
                                            input_shape=(3, 16, 16))
    assert any(r.status == "ok" for r in reports)
    return model, small.eval()


@pytest.mark.parametrize("method", ["spatial-svd", "tucker2", "cp3-epc", "cp4"])
def test_every_factorized_model_exports_to_onnx_and_runs_there_as_in_torch(method, tmp_path):
    _, small = _compressed(method)
    path = deploy.export_onnx(small, (3, 16, 16), tmp_path / "m.onnx")
    x = torch.randn(3, 3, 16, 16)  # another batch size than the export's: the batch axis is dynamic
    got = deploy._session(path, 1).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = small(x).numpy()
    assert got.shape == (3, 10)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


class _SamePad(nn.Conv2d):
    """TF-style 'same' padding computed in forward (as efficientnet-lite-pytorch's convs)."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        ph = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - ih, 0)
        pw = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - iw, 0)
        x = nn.functional.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_a_padding_stage_in_front_of_a_factorized_layer_exports_exactly(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), _SamePad(16, 32, 3, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    small, [rep] = lowrank.compress_model(model, {"2": ("tucker2", (8, 8), {})}, input_shape=(3, 17, 17))
    assert rep.status == "ok"
    path = deploy.export_onnx(small.eval(), (3, 17, 17), tmp_path / "m.onnx")
    x = torch.randn(2, 3, 17, 17)
    with torch.no_grad():
        np.testing.assert_allclose(deploy._session(path, 1).run(None, {"input": x.numpy()})[0], small(x).numpy(),
                                   rtol=1e-4, atol=1e-5)


class _OddPool(nn.Module):
    """A factorizable conv, then an adaptive pooling to 2 x 3 from 7 x 7: sizes that do not divide,
    which ONNX has no operator for and the TorchScript exporter refuses."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32 * 6, 10)

    def forward(self, x):
        x = self.conv(self.stem(x).relu()).relu()
        return self.head(nn.functional.adaptive_avg_pool2d(x, (2, 3)).flatten(1))


def test_a_model_the_torchscript_exporter_refuses_exports_by_the_next_one_silently(tmp_path, capfd):
    small, [rep] = lowrank.compress_model(_OddPool().eval(), {"conv": ("tucker2", (8, 8), {})}, input_shape=(3, 14, 14))
    assert rep.status == "ok"
    with pytest.raises(Exception):
        with deploy._quiet():
            deploy.EXPORTERS["torchscript"](small.eval(), torch.randn(2, 3, 14, 14), tmp_path / "t.onnx")
    capfd.readouterr()
    path = deploy.export_onnx(small, (3, 14, 14), tmp_path / "m.onnx")
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")  # no TorchScript graph dump on the file descriptors
    for batch in (1, 3):  # the batch axis stays dynamic
        x = torch.randn(batch, 3, 14, 14)
        with torch.no_grad():
            np.testing.assert_allclose(deploy._session(path, 1).run(None, {"input": x.numpy()})[0], small(x).numpy(),
                                       rtol=1e-4, atol=1e-5)


class _NoOnnx(nn.Module):
    def forward(self, x):
        g = x[:, 0, :3, :3]
        return torch.linalg.eigh(g @ g.transpose(1, 2))[0]


def test_a_model_no_exporter_takes_gets_one_line_naming_each_exporters_reason(tmp_path, capfd):
    with pytest.raises(deploy.RuntimeUnavailable) as e:
        deploy.export_onnx(_NoOnnx(), (3, 8, 8), tmp_path / "m.onnx")
    msg = str(e.value)
    assert "\n" not in msg and "\x1b" not in msg
    assert "torchscript: " in msg and "dynamo: " in msg and "eigh" in msg
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_paired_timing_tells_the_faster_model_from_the_slower(runtime):
    """The 'compressed' model here is eight times the dense one's work: the ratio must say so,
    whichever of the two is timed first in a repetition."""
    dense = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    heavy = nn.Sequential(nn.Conv2d(3, 128, 3, padding=1), *[m for _ in range(3) for m in (
        nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1))], nn.AdaptiveAvgPool2d(1), nn.Flatten())
    rows = deploy.paired(dense, heavy, (3, 32, 32), runtime=runtime, batches=(1, 4), threads=(1, 0), all_threads=2,
                         repeats=5)
    pairs = {(r["batch"], r["threads"]) for r in rows}
    assert {b for b, _ in pairs} == {1, 4} and 1 in {t for _, t in pairs}
    for r in rows:
        assert r["runtime"] == runtime and r["input"] == "3x32x32" and r["repeats"] >= 5
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["compressed_ms"])
        assert r["speedup"] < 0.5, r  # the heavy model is far slower
    top = deploy.headline(rows)
    assert top["threads"] == 1 and top["big_batch"] == 4
    assert top["b1"] > top["b1_dense"] and top["b32"] == pytest.approx(
        next(r for r in rows if r["batch"] == 4 and r["threads"] == 1)["compressed_ms"] / 1e3)


class _Unexportable(nn.Module):
    """cummax has no ONNX symbolic at opset 17."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return torch.cummax(self.conv(x), 1).values.mean((2, 3))


def test_timing_falls_back_to_eager_and_says_why_when_onnx_cannot_take_the_model():
    model = _Unexportable().eval()
    out = timing_task(model, model, (3, 12, 12), LatencySpec(batches=[1], threads=[1], repeats=3))
    assert out["runtime"] == "torch" and out["note"].startswith("onnxruntime could not run the model")
    assert out["b1"] > 0 and out["b1_dense"] > 0 and out["input"] == "3x12x12"


def test_timing_at_another_input_size_than_the_data():
    dense, small = _compressed("spatial-svd")
    out = timing_task(dense, small, (3, 16, 16), LatencySpec(batches=[1], threads=[1], repeats=3, input_size=40))
    assert out["input"] == "3x40x40" and out["note"] == "" and out["runtime"] == "onnxruntime"
    macs = [lowrank.count(m, (3, 40, 40))[1] for m in (dense, small)]
    assert out["mac_ratio"] == pytest.approx(macs[0] / macs[1])  # counted where it was timed
    assert macs[0] / macs[1] != pytest.approx(lowrank.count(dense, (3, 16, 16))[1] / lowrank.count(small, (3, 16, 16))[1])


def test_timing_also_at_other_sizes_gives_batch_one_there_as_metrics_and_a_tag():
    dense, small = _compressed("spatial-svd")
    out = timing_task(dense, small, (3, 16, 16), LatencySpec(batches=[1, 4], threads=[1], repeats=3), also_at=(24,))
    assert out["input"] == "3x16x16" and [a["size"] for a in out["also"]] == [24]
    rows = out["also"][0]["rows"]
    assert [(r["batch"], r["threads"], r["input"]) for r in rows] == [(1, 1, "3x24x24")]
    metrics = report.latency_metrics({"b1": 1.0, "b32": 1.0}, out)  # the in-task figures, unused here
    assert metrics["speedup_b1_t1_24px"] == rows[0]["speedup"] > 0
    assert metrics["latency_b1_t1_24px_dense_ms"] == rows[0]["dense_ms"]
    assert metrics["speedup_b4_t1"] > 0 and not any(k.endswith("px") and "b4" in k for k in metrics)
    tags = report.latency_tags(out)
    assert tags["speedup_b1_24px"] == f"{rows[0]['speedup']:.4f}" and tags["latency_input"] == "3x16x16"


@pytest.mark.parametrize("model,also_at,timed,expected", [
    ({"name": "resnet18"}, "auto", 32, (224,)),         # an ImageNet-style network timed small: also at 224
    ({"name": "resnet18"}, "auto", 224, ()),            # already timed there
    ({"name": "smallcnn"}, "auto", 32, ()),
    ({"name": "mine", "factory": "examples.own_model:build"}, "auto", 28, ()),  # a user's own network: as asked
    ({"name": "smallcnn"}, [224, 32, 224, 96], 32, (224, 96)),
    ({"name": "resnet18"}, [], 32, ()),
])
def test_the_sizes_a_version_is_also_timed_at(model, also_at, timed, expected):
    assert LatencySpec(also_at=also_at).extra_sizes(ModelSpec(**model), timed) == expected


def _pointwise_pairs() -> tuple[nn.Module, nn.Module]:
    """Two SVD-factorized 1x1 convs with a BatchNorm between: their inner stages merge at export
    (and in the dense model the two 64 -> 64 convs, a linear chain as well)."""
    dense = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 1), nn.BatchNorm2d(64),
                          nn.Conv2d(64, 64, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        dense[3].running_var.uniform_(0.5, 2)
        dense[3].running_mean.uniform_(-1, 1)
    small, reports = lowrank.compress_model(dense.eval(), {"2": ("svd", 16, {}), "4": ("svd", 16, {})},
                                            input_shape=(3, 12, 12))
    assert [r.status for r in reports] == ["ok", "ok"]
    return dense, small.eval()


def test_export_merges_pointwise_chains_and_the_file_still_computes_the_model(tmp_path):
    import onnx

    _, small = _pointwise_pairs()
    convs = {}
    for fuse in (False, True):
        path = deploy.export_onnx(small, (3, 12, 12), tmp_path / f"m{fuse}.onnx", fuse=fuse)  # checked inside
        convs[fuse] = sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)
        x = torch.randn(3, 3, 12, 12)
        with torch.no_grad():
            np.testing.assert_allclose(deploy._session(path, 1).run(None, {"input": x.numpy()})[0], small(x).numpy(),
                                       rtol=1e-4, atol=1e-5)
    assert convs == {False: 5, True: 3}  # the 3x3 conv, 64 -> 16 (merged twice), 16 -> 64
    assert [deploy.merged_pairs(tmp_path / f"m{fuse}.onnx") for fuse in (False, True)] == [0, 2]  # in its metadata


def test_the_merge_count_of_a_file_only_the_next_exporter_takes_is_stamped_beside_its_weights(tmp_path):
    """The torch.export-based exporter keeps the weights in a file beside the model: the stamp
    rewrites the model only, and ONNX Runtime still finds them."""
    _, small = _pointwise_pairs()
    odd = nn.Sequential(small[:5], nn.AdaptiveAvgPool2d((5, 5)), nn.Flatten(), nn.Linear(64 * 25, 4)).eval()
    path = deploy.export_onnx(odd, (3, 12, 12), tmp_path / "m.onnx")  # 12 -> 5: the TorchScript exporter refuses
    assert deploy.merged_pairs(path) == 2 and (tmp_path / "m.onnx.data").exists()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        np.testing.assert_allclose(deploy._session(path, 1).run(None, {"input": x.numpy()})[0], odd(x).numpy(),
                                   rtol=1e-4, atol=1e-5)


def test_where_the_merged_graph_does_not_export_the_model_as_it_is_is_timed_and_nothing_is_said_merged(monkeypatch):
    dense, small = _pointwise_pairs()

    def refusing(export):  # the exporters refuse every merged (traced) graph: the model as it is goes out
        def run(model, x, path):
            if isinstance(model, torch.fx.GraphModule):
                raise RuntimeError("refused for the test")
            export(model, x, path)
        return run

    monkeypatch.setattr(deploy, "EXPORTERS", {k: refusing(f) for k, f in deploy.EXPORTERS.items()})
    out = timing_task(dense, small, (3, 12, 12), LatencySpec(batches=[1], threads=[1], repeats=3))
    assert out["runtime"] == "onnxruntime" and out["note"] == ""
    assert out["rows"][0]["merged"] == (0, 0)


def test_timing_says_what_the_export_merged():
    dense, small = _pointwise_pairs()
    out = timing_task(dense, small, (3, 12, 12), LatencySpec(batches=[1], threads=[1], repeats=3))
    assert out["runtime"] == "onnxruntime" and out["note"] == "1x1 conv pairs merged at export: 2 (dense: 1)"
    eager = timing_task(dense, small, (3, 12, 12), LatencySpec(runtime="torch", batches=[1], threads=[1], repeats=3))
    assert eager["note"] == ""  # eager PyTorch runs the model as it is


def test_latency_settings_are_checked_in_one_line(tmp_path):
    path, data = write_spec(tmp_path, "tiny.yaml")
    for bad, expected in (({"runtime": "tensorrt"}, "latency.runtime: Input should be 'onnxruntime', 'torch' or "
                                                    "'torch-compile'"),
                          ({"batches": [0]}, "latency.batches.0: Input should be greater than or equal to 1"),
                          ({"batches": []}, "latency.batches: List should have at least 1 item"),
                          ({"also_at": [4]}, "latency.also_at: [4] is not a size list; accepted: 'auto' (224 px for "
                                             "ImageNet-style networks), a list of up to 4 square sizes of 8-4096 px, or [] (none)"),
                          ({"also_at": "always"}, "latency.also_at: 'always' is not a size list; accepted: 'auto'")):
        with pytest.raises(SpecError) as e:
            parse_spec({**data, "latency": bad}, "spec.yaml")
        assert expected in str(e.value) and "\n" not in str(e.value)


def test_timing_in_the_driver_of_a_running_ray_uses_this_process_threads(ray_start_2_cpus):
    """Outside a task (the driver) there are no assigned CPUs to ask Ray for."""
    dense, small = _compressed("spatial-svd")
    out = timing_task(dense, small, (3, 16, 16), LatencySpec(batches=[1], threads=[1, 0], repeats=2))
    assert {r["threads"] for r in out["rows"]} <= {1, torch.get_num_threads()} and out["note"] == ""


def test_a_model_onnx_cannot_take_is_still_compressed_timed_eagerly_and_registered(make_spec, ray_start_2_cpus,
                                                                                 capsys):
    from mlflow import MlflowClient

    from jobs.cli import main

    spec, data = make_spec(mutate=lambda d: (
        d["models"][0].update(name="odd", factory="tests.jobs.factories:unexportable"),
        d["compression"].update(methods=["tucker2"], options={}), d["pretrain"].update(epochs=1),
        d.update(latency={"batches": [1], "threads": [1], "repeats": 3})))
    assert main(["run", str(spec)]) == 0, capsys.readouterr().err
    [v] = MlflowClient(data["mlflow"]["tracking_uri"]).search_model_versions("name='lowrank-odd'")
    for tag in (v.tags["latency_runtime"], v.tags["onnx"]):  # each exporter's reason, named
        assert "torchscript: UnsupportedOperatorError" in tag and "dynamo: DispatchError" in tag and "cummax" in tag
    assert v.tags["latency_runtime"].startswith("torch (onnxruntime could not run the model (no ONNX exporter takes")
    assert v.tags["onnx"].startswith("not exported (no ONNX exporter takes") and float(v.tags["speedup_b1"]) > 0
