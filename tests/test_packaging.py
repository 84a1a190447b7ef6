"""The wheel works outside the source tree: whatever ``hnseg`` reads at run time ships inside hnseg_keras.

The package reads no file of the repository at run time (presets, organ catalogue and phantom settings are
Python); ``scripts/``, ``benchmarks/`` and the recipe examples in ``configs/`` are for a source checkout only.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from hnseg_keras.inference import released

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hnseg_keras"


def _package_files() -> list[Path]:
    """Every file under hnseg_keras/ that a wheel must carry (bytecode caches excluded)."""
    return sorted(path for path in PACKAGE.rglob("*")
                  if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc")


def test_package_data_is_declared_and_nothing_is_read_from_beside_the_package():
    """Any non-Python file inside hnseg_keras/ is declared package data in pyproject.toml, and no module finds
    files through ``__file__`` (which would reach into the source tree): data goes through importlib.resources."""
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"].get("package-data", {})
    for path in _package_files():
        if path.suffix == ".py":
            uses = [node.lineno for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.Name) and node.id == "__file__"]
            assert not uses, f"{path.relative_to(REPO)}:{uses}: read package data with importlib.resources"
            continue
        package_dir = next(folder for folder in path.parents if (folder / "__init__.py").is_file())
        package = ".".join(package_dir.relative_to(REPO).parts)
        relative = path.relative_to(package_dir).as_posix()  # setuptools globs are relative to the package
        patterns = [*declared.get(package, []), *declared.get("*", [])]
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), (
            f"{path.relative_to(REPO)}: not declared in [tool.setuptools.package-data] of pyproject.toml")


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} -> {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.mark.slow
def test_installed_wheel_runs_the_data_path_outside_the_source_tree(tmp_path):
    """sdist + wheel from ``python -m build``; the wheel in a fresh venv (dependencies borrowed from this one
    through a .pth path, so TensorFlow is not downloaded again) runs phantom -> prepare -> train -> export ->
    predict from a folder outside the repository."""
    from test_training import TINY_OVERRIDES  # the tiny model of the training tests

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(PYTHONNOUSERSITE="1", TF_CPP_MIN_LOG_LEVEL="2")
    dist, work = tmp_path / "dist", tmp_path / "work"
    work.mkdir()
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(REPO)], cwd=work, env=env)  # sdist, wheel from it
    assert len(list(dist.glob("hnseg_keras-*.tar.gz"))) == 1
    (wheel,) = dist.glob("hnseg_keras-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if name.startswith("hnseg_keras/")}
    assert shipped == {path.relative_to(REPO).as_posix() for path in _package_files()}

    target = tmp_path / "venv"
    venv.create(target, with_pip=False)
    python, hnseg = target / "bin" / "python", target / "bin" / "hnseg"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet",
          str(wheel)], cwd=work, env=env)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work, env).strip())
    # a path from a .pth is no site dir: this venv's editable-install finder (its own .pth) stays inactive
    (site / "dev_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = Path(_run([str(python), "-c", "import hnseg_keras; print(hnseg_keras.__file__)"], work, env).strip())
    assert where.is_relative_to(target), where

    assert _run([str(hnseg), "--version"], work, env).split() == ["hnseg-keras", wheel.name.split("-")[1]]
    _run([str(hnseg), "phantom", "--out", "phantom", "--cases", "5", "--size", "48", "--spacing", "5",
          "--slice-spacing", "6", "8"], work, env)
    _run([str(hnseg), "prepare", "phantom", "--out", "shards", "--organs", "BrainStem", "Mandible", "Parotid_L",
          "--size", "40", "--spacing", "5", "--empty-share", "0", "--workers", "1"], work, env)
    tiny = [item for override in TINY_OVERRIDES for item in ("--set", override)]
    _run([str(hnseg), "train", "--data", "shards/manifest.json", "--out", "run", "--epochs", "1",
          "--steps-per-epoch", "2", "--set", "validation_steps=1", *tiny], work, env)
    _run([str(hnseg), "export", "run", "--out", "model"], work, env)
    (case,) = sorted((work / "phantom" / "test").iterdir())
    _run([str(hnseg), "predict", str(case), "--model", "model", "--out", "predictions"], work, env)
    for suffix in (".nrrd", ".seg.nrrd", ".qa.json"):
        assert (work / "predictions" / f"{case.name}{suffix}").is_file(), suffix

    # The released model ships in the wheel: no --model, a DICOM series in, every output out.
    from own_data_builders import write_dicom_series
    from test_released import released_input_case

    write_dicom_series(released_input_case(), work / "dicom_ct")
    listed = json.loads(_run([str(hnseg), "models", "--json"], work, env))
    assert [row["name"] for row in listed] == released.names()
    _run([str(hnseg), "predict", "dicom_ct", "--out", "released", "--preview"], work, env)
    (label_map,) = (p for p in (work / "released").glob("*.nrrd") if not p.name.endswith(".seg.nrrd"))
    name = label_map.name.removesuffix(".nrrd")
    for output in (f"{name}.seg.nrrd", f"{name}.qa.json", f"{name}_rtstruct.dcm", f"preview/{name}.png"):
        assert (work / "released" / output).is_file(), output
