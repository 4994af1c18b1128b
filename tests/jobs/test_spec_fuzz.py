"""Schema fuzz: every numeric field of the spec set to NaN, inf, -1, 0 and 10**12, every string
field to empty, 10,000 characters and non-UTF-8 bytes, and random key deletions. ``python -m jobs
validate`` (in-process, so it stays fast) answers each with exit 0 or 2 and at most one line,
never a traceback.

The fields are read from the pydantic schema itself, so a field added later is fuzzed too; the
base specs together hold every section (search, stages, from_scratch, tune)."""
import copy
import random
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydantic import BaseModel

from jobs.cli import main
from jobs.spec import SweepSpec

NUMBERS = [float("nan"), float("inf"), -1, 0, 10**12]
STRINGS = ["", "x" * 10_000, "__RAW__"]  # __RAW__: replaced by non-UTF-8 bytes when the file is written


def _base_search(folder: Path) -> dict:
    return {
        "name": "fuzz", "seed": 0,
        "models": [{"name": "smallcnn", "num_classes": 10, "checkpoint": None,
                    "layers": {"include": ["features.*"], "exclude": ["features.99"], "skip_first": True, "pointwise_method": "svd"}}],
        "dataset": {"kind": "digits", "root": None, "input_size": 16, "val_fraction": 0.2, "batch_size": 32, "workers": 0,
                    "limit_train": 100, "limit_val": 50},
        "pretrain": {"epochs": 1, "lr": 0.05, "optimizer": "sgd", "cache_dir": str(folder / "cache")},
        "compression": {
            "methods": ["tucker2", "cp3-epc"],
            "rank": {"strategy": "ratio", "rank": None, "per_layer": {}, "ratio": 2.0, "target": "params",
                     "energy": None, "weakening": 1.0, "min_rank": 1, "zero": "min_rank",
                     "multiple_of": 1},
            "layers": {"include": ["*"], "exclude": ["fc*"], "skip_first": True, "pointwise_method": None},
            "options": {"tucker2": {"n_iter_max": 5, "tol": 1e-4},
                        "cp3-epc": {"init": "svd", "seed": 0, "n_iter_max": 10, "tol": 1e-8, "linesearch": True,
                                    "als_dtype": "float64", "epc_objective": "norm",
                                    "epc_max_sweeps": 5, "epc_tol": 1e-7, "epc_target": 0.5,
                                    "epc_rescale": True, "epc_extrapolate": False}},
            "search": {"strategies": ["budget", "uniform", "vbmf", "tolerance", "tune"], "target": "params",
                       "ratio": 2.0, "candidate_ratios": [1.5, 2.0, 3.0], "loss": "sensitivity",
                       "latency_device": "cpu", "val_batches": 2, "bn_batches": 2, "epsilon": 0.02,
                       "tolerance_steps": 3, "vbmf_weakening": 0.5,
                       "tune": {"trials": 3, "noise": 0.5, "grace_epochs": 1, "reduction_factor": 2}},
        },
        "finetune": {"epochs": 1, "optimizer": "sgd", "lr": 0.005, "bn_recalibration": True, "bn_batches": 5,
                     "eval_each_epoch": True},
        "resources": {"cpus_per_task": 1, "gpus_per_task": 0, "memory_per_task_gb": 1.0, "max_concurrent": 4,
                      "autoscaling": False, "schedule_timeout_s": 60},
        "latency": {"runtime": "onnxruntime", "batches": [1, 8], "threads": [1, 0], "input_size": 32, "repeats": 5,
                    "exclusive": True, "also_at": [40]},
        "mlflow": {"tracking_uri": f"sqlite:///{folder}/mlflow.db", "experiment": "fuzz",
                   "registered_model_prefix": "lowrank-", "registered_names": {"smallcnn": "fuzz-small"}},
    }


def _base_stages(folder: Path) -> dict:
    d = _base_search(folder)
    d["compression"]["methods"] = ["tucker2"]
    del d["compression"]["options"]["cp3-epc"]
    d["compression"]["search"] = None
    d["compression"]["stages"] = {"count": 2, "ratios": [1.5, 2.0], "layers": None, "epochs": 1}
    d["from_scratch"] = {"ratio": 2.0, "rank": None, "layers": {"include": ["features.*"], "exclude": ["fc"], "skip_first": True,
                                                          "pointwise_method": None}, "epochs": 1, "lr": 0.05,
                         "optimizer": "sgd"}
    return d


def _base_models(folder: Path) -> dict:
    """The model sources: a factory of the user's code and torchvision weights by name (a small
    model, its weights file in a temporary TORCH_HOME)."""
    d = _base_search(folder)
    d["compression"] = {"methods": ["tucker2"], "rank": {"strategy": "ratio", "ratio": 2.0}}
    d["dataset"]["input_size"] = 64
    d["models"] = [{"name": "mine", "factory": "tests.jobs.factories:tiny_net", "kwargs": {"width": 8},
                    "num_classes": 10, "channels": 3},
                   {"name": "squeezenet1_1", "weights": "IMAGENET1K_V1", "num_classes": 1000}]
    return d


def _base_agreement(folder: Path) -> dict:
    """Evaluation by agreement on a folder of unlabelled images, every preprocessing setting given."""
    from PIL import Image

    photos = folder / "photos"
    photos.mkdir(exist_ok=True)
    for i in range(6):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    d = _base_models(folder)
    d["evaluation"] = "agreement"
    d["models"] = [{"name": "mine", "factory": "tests.jobs.factories:tiny_net", "kwargs": {"width": 8},
                    "num_classes": 10, "pretrained": True}]
    d["dataset"] = {"kind": "images", "root": str(photos), "crop": 24, "resize": 28, "val_fraction": 0.5,
                    "normalize": {"mean": [0.5, 0.4, 0.3], "std": [0.25]}, "augment": "crop+flip", "batch_size": 4}
    return d


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    from jobs.models import build_model
    from jobs.tv import import_torchvision

    w = import_torchvision().models.SqueezeNet1_1_Weights.IMAGENET1K_V1
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(build_model("squeezenet1_1", 1000).state_dict(), folder / Path(w.url).name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return folder


def _leaves(obj, path=()):
    """Every (path, value) of a nested dict/list."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    else:
        yield path, obj


def _set(data, path, value):
    for p in path[:-1]:
        data = data[p]
    data[path[-1]] = value


def _delete(data, path):
    for p in path[:-1]:
        data = data[p]
    del data[path[-1]]


def _schema_fields(model: type[BaseModel], prefix=()) -> set[tuple]:
    """Paths of every field of the schema (list indexes and dict keys as '*')."""
    out = set()
    for name, f in model.model_fields.items():
        out.add(prefix + (name,))
        for t in _model_types(f.annotation):
            out |= _schema_fields(t, prefix + (name,))
    return out


def _model_types(ann):
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [t for a in typing.get_args(ann) for t in _model_types(a)]


def _dump(path: Path, data) -> None:
    raw = yaml.safe_dump(data, allow_unicode=True, width=10**9).encode("utf-8")
    path.write_bytes(raw.replace(b"__RAW__", b"\xff\xfe\x80"))  # raw bytes in the file: a non-UTF-8 spec


def _answer(capsys, path) -> tuple[int, str]:
    rc = main(["validate", str(path)])
    out = capsys.readouterr()
    return rc, out.out + out.err


def _cases(base: dict):
    for path, value in _leaves(base):
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) or value is None:
            for v in NUMBERS:
                yield path, v
        if isinstance(value, str) or value is None:
            for v in STRINGS:
                yield path, v


BASES = {"search": _base_search, "stages": _base_stages, "models": _base_models, "agreement": _base_agreement}


@pytest.mark.parametrize("which", list(BASES))
def test_every_field_fuzzed_answers_in_one_line(tmp_path, capsys, torch_home, which):
    base = BASES[which](tmp_path)
    p = tmp_path / "spec.yaml"
    _dump(p, base)
    rc, text = _answer(capsys, p)
    assert rc == 0, text  # the base itself is valid
    seen = 0
    for path, value in _cases(base):
        if (which == "models" and path[0] != "models") or (which == "agreement" and path[0] != "dataset"):
            continue  # the other fields are fuzzed with the other bases
        data = copy.deepcopy(base)
        _set(data, path, value)
        _dump(p, data)
        rc, text = _answer(capsys, p)
        where = ".".join(map(str, path))
        assert rc in (0, 2), f"{where}={str(value)[:30]!r}: exit {rc}: {text[-400:]}"
        assert "Traceback" not in text, f"{where}={str(value)[:30]!r}: {text[-800:]}"
        lines = [line for line in text.splitlines() if line.strip()]
        assert len(lines) <= 1, f"{where}={str(value)[:30]!r}: {len(lines)} lines: {text[:400]}"
        if isinstance(value, float) and (value != value or value == float("inf")):
            assert rc == 2, f"{where}={value}: a non-finite number was accepted"
        seen += 1
    assert seen > (20 if which in ("models", "agreement") else 150)


def test_random_key_deletions_answer_in_one_line(tmp_path, capsys):
    rng = random.Random(0)
    base = _base_search(tmp_path)
    paths = [p for p, _ in _leaves(base) if isinstance(p[-1], str)]
    p = tmp_path / "spec.yaml"
    for _ in range(60):
        data = copy.deepcopy(base)
        for path in rng.sample(paths, rng.randint(1, 4)):
            try:
                _delete(data, path[: rng.randint(1, len(path))])
            except (KeyError, TypeError, IndexError):
                pass
        _dump(p, data)
        rc, text = _answer(capsys, p)
        assert rc in (0, 2) and "Traceback" not in text, text[-800:]
        assert len([line for line in text.splitlines() if line.strip()]) <= 1, text[:400]


def test_the_bases_hold_every_field_of_the_schema(tmp_path):
    fuzzed = set()
    for base in (make(tmp_path) for make in BASES.values()):
        for path, _ in _leaves(base):
            fuzzed |= {tuple(p for p in path[:i] if isinstance(p, str)) for i in range(1, len(path) + 1)}
    missing = {p for p in _schema_fields(SweepSpec)
               if p not in fuzzed and p[-1] not in ("per_layer", "registered_names")}
    # registered_names / per_layer are dicts of user keys: fuzzed through their values above
    assert not missing, f"fields no base spec holds (so the fuzz never tries them): {sorted(missing)}"


def test_a_binary_file_as_the_spec_is_one_line(tmp_path, capsys):
    p = tmp_path / "model.pt"
    p.write_bytes(bytes(range(256)) * 4)
    rc, text = _answer(capsys, p)
    assert rc == 2 and "is not a text file" in text and len(text.strip().splitlines()) == 1, text


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\nname: bomb\nmodels: [{name: smallcnn}]\ncompression:\n  methods: [tucker2]\n"
                 "  layers: {include: *a8}\n")
    rc, text = _answer(capsys, p)
    assert rc == 2 and "expands to more than 100,000 values (YAML anchors and aliases)" in text, text


def test_a_training_loader_never_ends_on_a_batch_of_one():
    from torch.utils.data import TensorDataset

    from jobs.train import loader

    ds = TensorDataset(torch.zeros(65, 1), torch.zeros(65))
    assert [len(b[0]) for b in loader(ds, 64, shuffle=True)] == [64]
    assert [len(b[0]) for b in loader(ds, 64, shuffle=False)] == [64, 1]  # evaluation sees every sample
    assert [len(b[0]) for b in loader(TensorDataset(torch.zeros(66, 1)), 64, shuffle=True)] == [64, 2]
