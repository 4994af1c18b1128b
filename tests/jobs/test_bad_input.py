"""No bad input ever becomes a registered model: one end-to-end test per class of bad input.

- nothing compressed -> exit 1 naming the configuration, no version;
- a request no node can serve -> exit 2 within seconds (or, autoscaling, exit 1 after its timeout);
- found before Ray or MLflow start (exit 2, one line, nothing created): a model that cannot run at
  the data's input size, a NaN checkpoint, a one-class image folder, an unreadable image, a
  tracking URI that cannot work, a selection that matches no layer;
- noise: a refused checkpoint's torch warning is not printed above the one-line error.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.cli import main
from jobs.models import SmallCNN

ROOT = Path(__file__).resolve().parents[2]


def _versions(data) -> list:
    from mlflow import MlflowClient

    return MlflowClient(data["mlflow"]["tracking_uri"]).search_model_versions("name='lowrank-smallcnn'")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- with Ray


def test_nothing_compressed_is_a_failed_configuration_never_a_version(make_spec, ray_start_2_cpus, capsys):
    # energy 1.0 keeps every singular value: each Tucker-2 layer would grow, so every layer stays dense
    spec, data = make_spec(mutate=lambda d: (d["compression"].update(methods=["tucker2", "spatial-svd"], options={},
                                                                   rank={"strategy": "energy", "energy": 1.0}),
                                             d["finetune"].update(epochs=0), d["pretrain"].update(epochs=1)))
    assert main(["run", str(spec)]) == 1
    out = capsys.readouterr().out
    assert "FAILED smallcnn/tucker2: not registered: nothing was compressed: all 4 selected layer(s) failed or " \
           "stayed dense (first: tucker2 at rank" in out, out[-2000:]
    assert "0 version(s) registered now" in out and "2 failed" in out
    assert _versions(data) == []


def test_a_request_no_node_can_serve_is_refused_within_seconds(make_spec, ray_start_2_cpus, capsys):
    spec, data = make_spec(mutate=lambda d: d.update(resources={"cpus_per_task": 1000}))
    assert main(["run", str(spec)]) == 2
    line = _one_line(capsys)
    assert "resources: a task asks for 1000 CPUs but no node of the Ray cluster has that (the largest: 2 CPUs" in line
    assert _versions(data) == []
    spec, _ = make_spec(mutate=lambda d: d.update(resources={"memory_per_task_gb": 100_000}), name="mem.yaml")
    assert main(["run", str(spec)]) == 2
    assert "100000.0 GiB memory" in _one_line(capsys)


def test_autoscaling_waits_for_a_node_then_gives_up_with_exit_1(make_spec, ray_start_2_cpus, capsys):
    spec, data = make_spec(mutate=lambda d: d.update(resources={"cpus_per_task": 64, "autoscaling": True,
                                                                "schedule_timeout_s": 2}))
    assert main(["run", str(spec)]) == 1
    cap = capsys.readouterr()
    assert "waiting up to 2s for the autoscaler to add one" in cap.out
    assert "no node able to run a task asking for 64 CPUs joined within 2s" in cap.err
    assert _versions(data) == []


# ----------------------------------------------------------------------------- pre-flight (no Ray, no MLflow)


def _refused_before_anything(tmp_path, capsys, spec) -> str:
    assert main(["run", str(spec)]) == 2
    line = _one_line(capsys)
    assert not (tmp_path / "mlflow.db").exists(), "MLflow was touched before the input was checked"
    return line


def test_a_model_that_cannot_run_at_the_input_size(tmp_path, make_spec, capsys):
    spec, _ = make_spec(mutate=lambda d: (d["models"][0].update(name="vgg11"), d["dataset"].update(input_size=16)))
    line = _refused_before_anything(tmp_path, capsys, spec)
    assert "models.0: VGG cannot run at the data's input size 16x16 (RuntimeError:" in line
    assert "accepted: a dataset.input_size the model can take" in line


def test_a_nan_checkpoint(tmp_path, make_spec, capsys):
    state = SmallCNN(10).state_dict()
    state["features.6.weight"][0, 0, 0, 0] = float("nan")
    ckpt = tmp_path / "nan.pt"
    torch.save(state, ckpt)
    spec, _ = make_spec(mutate=lambda d: d["models"][0].update(checkpoint=str(ckpt)))
    line = _refused_before_anything(tmp_path, capsys, spec)
    assert "holds non-finite weights (NaN or inf) in 1 tensor(s), first 'features.6.weight'" in line


def _images(root: Path, classes: list[str], n: int = 3) -> None:
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (12, 12), (40 * i, 80, 120)).save(root / c / f"{i}.png")


def test_a_one_class_image_folder_and_an_unreadable_image(tmp_path, make_spec, capsys):
    one = tmp_path / "one"
    _images(one, ["cat"])
    spec, _ = make_spec(mutate=lambda d: d["dataset"].update(kind="imagefolder", root=str(one)), name="one.yaml")
    line = _refused_before_anything(tmp_path, capsys, spec)
    assert "has 1 class folder(s) (cat); a classifier needs at least 2" in line

    two = tmp_path / "two"
    _images(two, ["cat", "dog"], n=8)
    (two / "dog" / "7.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really an image" * 10)
    spec, _ = make_spec(mutate=lambda d: d["dataset"].update(kind="imagefolder", root=str(two), val_fraction=0.5),
                        name="two.yaml")
    line = _refused_before_anything(tmp_path, capsys, spec)
    assert "dog/7.png' cannot be decoded (" in line


@pytest.mark.parametrize("uri,expected", [
    ("mlflowx://somewhere", "unknown scheme 'mlflowx'; accepted: sqlite, file, http, https"),
    ("sqlite:///{tmp}/afile/mlflow.db", "the local store's folder '{tmp}/afile' cannot be created"),
    ("{tmp}/afile/runs", "the local store's folder '{tmp}/afile/runs' cannot be created"),
])
def test_a_tracking_uri_that_cannot_work(tmp_path, make_spec, capsys, uri, expected):
    (tmp_path / "afile").write_text("a file, not a folder")
    spec, _ = make_spec(mutate=lambda d: d["mlflow"].update(tracking_uri=uri.format(tmp=tmp_path)))
    line = _refused_before_anything(tmp_path, capsys, spec)
    assert expected.format(tmp=tmp_path) in line


def test_a_selection_that_matches_no_layer(tmp_path, make_spec, capsys):
    spec, _ = make_spec(mutate=lambda d: d["compression"].update(layers={"include": ["conv*"]}))
    line = _refused_before_anything(tmp_path, capsys, spec)
    assert "compression.layers: selects no layer of smallcnn that tucker2 applies to (nothing would be compressed)" \
           in line


class _Evil:
    def __reduce__(self):
        return (print, ("executed",))


def test_a_refused_checkpoint_prints_one_line_and_no_warning(tmp_path, make_spec):
    state = SmallCNN(10).state_dict()
    state["payload"] = _Evil()
    ckpt = tmp_path / "evil.pt"
    torch.save(state, ckpt)
    spec, _ = make_spec(mutate=lambda d: d["models"][0].update(checkpoint=str(ckpt)))
    out = subprocess.run([sys.executable, "-W", "default", "-m", "jobs", "run", str(spec)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: checkpoint"), out.stderr
    assert "executed" not in out.stdout
