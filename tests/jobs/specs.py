"""The one way tests write a spec: a file from tests/specs, its MLflow store and caches moved
into the test's own folder, then changed by ``mutate``."""
from pathlib import Path

import yaml

SPECS = Path(__file__).resolve().parents[1] / "specs"


def write_spec(folder: Path, base: str = "tiny.yaml", mutate=None, name: str | None = None):
    data = yaml.safe_load((SPECS / base).read_text())
    data["mlflow"]["tracking_uri"] = f"sqlite:///{folder}/mlflow.db"
    data["pretrain"]["cache_dir"] = str(Path(folder) / "cache" / "pretrained")
    if mutate:
        mutate(data)
    p = Path(folder) / (name or base)
    p.write_text(yaml.safe_dump(data))
    return p, data
