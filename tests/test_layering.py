"""Stages import in one direction only: every module's hnseg_keras imports, parsed with ``ast``, against a table."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hnseg_keras"
BASE = ("hnseg_keras", "hnseg_keras.errors", "hnseg_keras.configs", "hnseg_keras.files", "hnseg_keras.progress",
        "hnseg_keras.render")
DATA_READERS = ("hnseg_keras.data.organs", "hnseg_keras.data.slicing", "hnseg_keras.data.cases",
                "hnseg_keras.data.layouts", "hnseg_keras.data.dicom", "hnseg_keras.data.splits",
                "hnseg_keras.data.orientation")
# Module prefix -> prefixes it may import (besides BASE). The most specific prefix applies; the CLI
# joins stages and may import anything. Nothing but the CLI imports training.
ALLOWED: dict[str, tuple[str, ...]] = {
    "hnseg_keras": (),  # the shared base modules and any new top-level one
    "hnseg_keras.render": ("hnseg_keras.data.organs",),  # the one palette is the organ catalogue's
    "hnseg_keras.verify": ("hnseg_keras",),  # checks data, run and export folders, like the CLI
    "hnseg_keras.data": ("hnseg_keras.data",),
    "hnseg_keras.inputs": ("hnseg_keras.inputs", "hnseg_keras.data.shards", *DATA_READERS),
    # the model reads the target layout and the HU window constants from the input stage
    "hnseg_keras.model": ("hnseg_keras.model", "hnseg_keras.inputs.targets", "hnseg_keras.inputs.augment"),
    # training writes the run folder's data.json in the format model_io (a leaf module) defines
    "hnseg_keras.training": ("hnseg_keras.training", "hnseg_keras.inputs", "hnseg_keras.model",
                             "hnseg_keras.data.shards", "hnseg_keras.data.splits", "hnseg_keras.data.organs",
                             "hnseg_keras.data.slicing",
                             "hnseg_keras.inference.model_io"),
    "hnseg_keras.inference": ("hnseg_keras.inference", "hnseg_keras.model", *DATA_READERS),
    "hnseg_keras.evaluation": ("hnseg_keras.evaluation", *DATA_READERS),
    "hnseg_keras.cli": ("hnseg_keras",),
    "hnseg_keras.api": ("hnseg_keras",),  # the public Python API joins stages, like the CLI
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:]) if "." in name else Path()
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def imported_modules(source: str) -> set[str]:
    """hnseg_keras modules a source imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "hnseg_keras")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("hnseg_keras"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if _is_module(candidate) else node.module)
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(module: str, source: str) -> list[str]:
    """Imports of ``module`` that the table does not allow."""
    rule = max((prefix for prefix in ALLOWED if _within(module, prefix)), key=len, default=None)
    if rule is None:
        return [f"{module}: not in the layering table"]
    allowed = ALLOWED[rule]
    return sorted(f"{module} -> {name}" for name in imported_modules(source)
                  if name not in BASE and not any(_within(name, prefix) for prefix in allowed))


def test_every_module_imports_only_what_its_stage_may():
    problems = [problem for path in sorted(PACKAGE.rglob("*.py"))
                for problem in violations(_module_name(path), path.read_text())]
    assert problems == []


@pytest.mark.parametrize("module, line, target", [
    ("hnseg_keras.training.trainer", "from hnseg_keras.data import phantom", "hnseg_keras.data.phantom"),
    ("hnseg_keras.training.trainer", "def f():\n    from hnseg_keras.data.prepare import prepare",
     "hnseg_keras.data.prepare"),
    ("hnseg_keras.inference.prediction", "from hnseg_keras.training import trainer", "hnseg_keras.training.trainer"),
    ("hnseg_keras.inference.export", "import hnseg_keras.data.shards", "hnseg_keras.data.shards"),
    ("hnseg_keras.data.cases", "from hnseg_keras.model.unet import build_unet", "hnseg_keras.model.unet"),
    ("hnseg_keras.model.unet", "from hnseg_keras.inputs import pipeline", "hnseg_keras.inputs.pipeline"),
    ("hnseg_keras.files", "from hnseg_keras.data.organs import CATALOGUE", "hnseg_keras.data.organs"),
    ("hnseg_keras.training.tuning", "from hnseg_keras.inference import export", "hnseg_keras.inference.export"),
])
def test_a_backward_import_is_caught(module, line, target):
    assert violations(module, line) == [f"{module} -> {target}"]


def test_allowed_imports_pass():
    assert violations("hnseg_keras.training.trainer", "from hnseg_keras.data.shards import Manifest") == []
    assert violations("hnseg_keras.inference.prediction", "from hnseg_keras.inference import model_io") == []
    assert violations("hnseg_keras.cli", "from hnseg_keras.data import demo_set") == []
