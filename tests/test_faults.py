"""Fault injection: ``kill -9`` at a random moment of prepare, train and predict, then the same command again.

Each rerun must complete, its outputs must verify (shards against the manifest, every predicted
case present, no temporary or lock files left), and work finished before the kill is not redone.
Seeds fix the kill moments; every command runs in a subprocess on tiny phantom data.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hnseg_keras.data.cases import Case, image_like
from hnseg_keras.data.shards import verify_data

pytestmark = pytest.mark.slow
HNSEG = [sys.executable, "-m", "hnseg_keras.cli"]
PHANTOM = ["--phantom", "4", "--phantom-size", "48", "--phantom-spacing", "5", "--size", "32", "--spacing", "5",
           "--organs", "BrainStem", "Mandible", "--empty-share", "0", "--workers", "1"]


def run(args: list[str], timeout: float = 600) -> int:
    """Run ``hnseg args`` to the end; fails the test on a non-zero exit."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([*HNSEG, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        pytest.fail(f"hnseg {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.returncode


def run_and_kill(args: list[str], ready, delay: float, timeout: float = 600) -> bool:
    """Start ``hnseg args``, wait until ``ready()`` holds, ``delay`` seconds more, then SIGKILL it.

    Returns True when it was killed, False when it finished first.
    """
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.Popen([*HNSEG, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while process.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def count(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.is_dir() else 0


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if p.name != ".verified.json")


def mtimes(paths) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in paths}


@pytest.mark.parametrize("seed", [0, 2])
def test_prepare_killed_then_rerun(tmp_path, seed):
    out = tmp_path / "data"
    args = ["prepare", *PHANTOM, "--out", str(out)]
    rng = random.Random(seed)
    done_before_kill = rng.randint(0, 3)  # kill while case k+1 is being converted (or the manifest written)
    killed = run_and_kill(args, lambda: count(out / "cases", "*.json") >= done_before_kill, rng.uniform(0.0, 1.5))
    before = mtimes((out / "cases").glob("*.json")) if (out / "cases").is_dir() else {}
    assert run(args) == 0
    manifest = verify_data(out, use_cache=False)
    assert manifest.complete and len(manifest.cases) == 4
    assert {path: ns for path, ns in mtimes((out / "cases").glob("*.json")).items() if path in before} == before
    assert [name for name in leftovers(out) if not name.startswith("phantom-cases")] == []
    print(f"seed {seed}: {'killed' if killed else 'finished'} with {len(before)} case(s) done")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "data"
    run(["prepare", *PHANTOM, "--out", str(out)])
    return out


def test_train_killed_then_rerun(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--variant", "S", "--data", str(tiny_data / "manifest.json"), "--out", str(out), "--epochs", "3",
            "--steps-per-epoch", "3", "--set", "validation_steps=1", "--set", "model.filters=[4,8,16,32]",
            "--set", "augment.crop_size=32", "--set", "pipeline.batch_size=4", "--set", "image_slices=1"]
    backed_up = (out / "backup" / "training_metadata.json").is_file  # epoch 1 finished and backed up
    assert run_and_kill(args, backed_up, random.Random(0).uniform(0.0, 2.0))  # killed in epoch 2 or its backup
    assert run(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_run"] == 3 and summary["initial_epoch"] >= 1
    history = (out / "history.csv").read_text().strip().splitlines()
    assert [int(float(line.split(",")[0])) for line in history[1:]] == [0, 1, 2]  # every epoch once
    assert (out / "final.keras").is_file() and not (out / ".hnseg.lock").exists()


@pytest.fixture(scope="module")
def export(tiny_data, tmp_path_factory) -> Path:
    from hnseg_keras import configs
    from hnseg_keras.inference.export import export_run
    from hnseg_keras.model.unet import build_unet, variant_config
    from hnseg_keras.training.trainer import TrainConfig

    root = tmp_path_factory.mktemp("faults_export")
    model = variant_config("S", filters=(4, 8, 8, 8, 8), num_organs=2, input_channels=1)
    (root / "run").mkdir()
    configs.write_json_atomic(root / "run" / "config.json", configs.to_dict(
        TrainConfig(variant="S", model=model, data=str(tiny_data / "manifest.json"))))
    build_unet(model).save(root / "run" / "best.keras")
    return export_run(root / "run", root / "export")


@pytest.mark.parametrize("seed", [1])
def test_predict_killed_then_rerun(export, tmp_path, seed):
    cases = tmp_path / "cases"
    rng = np.random.default_rng(seed)
    for index in range(6):
        ct = rng.integers(-1000, 1200, size=(6, 48, 48)).astype(np.int16)
        (cases / f"case{index}").mkdir(parents=True)
        sitk.WriteImage(image_like(ct, Case("c", ct, (5.0, 5.0, 6.0))), str(cases / f"case{index}" / "img.nrrd"))
    out = tmp_path / "pred"
    args = ["predict", str(cases), "--model", str(export), "--out", str(out), "--pddca-masks"]
    rng = random.Random(seed)
    finished = rng.randint(1, 4)
    print(f"seed {seed}: killed" if run_and_kill(args, lambda: count(out, "*.nrrd") >= finished, rng.uniform(0.0, 1.0))
          else f"seed {seed}: finished before the kill")
    before = mtimes(out.glob("*.nrrd")) if out.is_dir() else {}
    for label_map in before:  # a label map is committed last: its masks are there too
        assert (out / "masks" / Path(label_map).name.removesuffix(".nrrd") / "structures").is_dir()
    time.sleep(0.01)
    assert run(args) == 0
    assert sorted(p.name for p in out.glob("*.nrrd")) == [f"case{i}.nrrd" for i in range(6)]
    assert {path: ns for path, ns in mtimes(out.glob("*.nrrd")).items() if path in before} == before
    assert leftovers(out) == []
    shutil.rmtree(cases)
