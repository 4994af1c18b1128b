"""The architecture as a checked contract: the import-linter contracts in pyproject.toml (layers,
independence, no cycles, no MLflow below the runtime), modules small enough to read in one
sitting, and no function-level import except a heavy dependency deferred on purpose."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for pkg in ("jobs", "lowrank") for p in (ROOT / pkg).rglob("*.py"))
MAX_LINES = 350
# what may be imported inside a function, because it is heavy and not always needed
DEFERRABLE = ("ray", "mlflow", "matplotlib", "pyarrow", "sklearn", "torchvision", "jobs.driver", "timm", "huggingface_hub",
              "onnx", "onnxruntime")


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_are_small(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (at most {MAX_LINES})"


def _function_imports(tree):
    """``(function, import node)`` for every import inside a function (the innermost function)."""
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in fn.body:
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        yield fn, sub


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_function_level_imports_are_heavy_deps_deferred_with_a_reason(path):
    src = path.read_text()
    for fn, node in _function_imports(ast.parse(src)):
        if isinstance(node, ast.ImportFrom):
            name = ("jobs." if node.level and "jobs" in path.parts else "") + (node.module or "")
        else:
            name = node.names[0].name
        where = f"{path.relative_to(ROOT)}:{node.lineno} imports {name} inside {fn.name}()"
        assert name.split(".")[0] in DEFERRABLE or name in DEFERRABLE, where + "; import it at module level"
        assert "# deferred" in ast.get_source_segment(src, fn), where + " without a '# deferred: why' comment"
