import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from jobs.spec import DEFAULT_SPEC, SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "specs" / "tiny.yaml"


def _base():
    return yaml.safe_load(TINY.read_text())


def _write(tmp_path, data, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def test_default_and_tiny_specs_validate():
    assert load_spec(None).name == "digits-default"
    assert load_spec(DEFAULT_SPEC).compression.methods == ["spatial-svd", "tucker2", "cp3", "cp3-epc"]
    assert load_spec(TINY).name == "tiny"


@pytest.mark.parametrize("path", sorted(TINY.parent.glob("*.yaml")), ids=lambda p: p.name)
def test_every_spec_the_readme_and_tests_run_validates_against_its_models(path, capsys):
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("mutate,expected", [
    (lambda d: d["dataset"].update(batchsize=3), "dataset.batchsize: unknown key"),
    (lambda d: d.update(fintune={"epochs": 1}), "fintune: unknown key"),
    (lambda d: d["finetune"].update(epochs="three"), "finetune.epochs: Input should be a valid integer"),
    (lambda d: d["models"][0].update(name="resnet19"), "models.0.name: unknown model 'resnet19'"),
    (lambda d: d["compression"].update(rank={"strategy": "energy", "energy": 0}), "needs 0 < 'energy' <= 1"),
    (lambda d: d["compression"].update(rank={"strategy": "fixed"}), "compression.rank: rank strategy 'fixed' needs 'rank'"),
    (lambda d: d["compression"].update(rank={"strategy": "ratio", "ratio": None}),
     "rank strategy 'ratio' needs 'ratio' >= 1, got None"),
    (lambda d: d["compression"].update(rank={"strategy": "ratio", "ratio": 0.5}), "needs 'ratio' >= 1, got 0.5"),
    (lambda d: d["compression"].update(methods=["tuker2"]), "compression.methods: unknown method 'tuker2'; accepted: cp3"),
    (lambda d: d["compression"]["options"].update({"cp3-epc": {"epc_sweeps": 3}}), "unknown option(s) ['epc_sweeps']"),
    (lambda d: d["dataset"].update(kind="cifar10"), "dataset kind 'cifar10' needs 'root'"),
    (lambda d: d.update(latency={"batches": [8, 64]}),
     "latency.batches: [8, 64] has no batch 1; accepted: a list of batch sizes with 1 among them (speedup_b1, the tag versions are compared by, is batch 1's), e.g. [1, 64]"),
    (lambda d: d["dataset"].update(kind="svhn"),
     "dataset.kind: Input should be 'digits', 'cifar10', 'imagefolder', 'mnist', 'fashion-mnist' or 'images'"),
])
def test_invalid_specs_exit_2_with_one_line_naming_the_key(tmp_path, capsys, mutate, expected):
    data = _base()
    mutate(data)
    with pytest.raises(SpecError, match=None) as e:
        parse_spec(data, "spec.yaml")
    assert expected in str(e.value)
    p = _write(tmp_path, data)
    for cmd in ("validate", "run"):
        assert main([cmd, str(p)]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "mlflow.db").exists()


def test_not_yaml_and_missing_file(tmp_path, capsys):
    assert main(["validate", str(_write(tmp_path, "name: [unclosed"))]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_as_a_process_prints_no_traceback_and_starts_nothing(tmp_path):
    data = _base()
    data["models"][0]["name"] = "resnet19"
    p = _write(tmp_path, data)
    out = subprocess.run([sys.executable, "-m", "jobs", "run", str(p)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: ") and "Traceback" not in out.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".cache").exists()
