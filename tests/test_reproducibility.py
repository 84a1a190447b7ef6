"""Same seed, same machine: two trainings write the same history, with and without op determinism."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hnseg_keras.data.prepare import PrepareConfig, prepare
from hnseg_keras.data.slicing import SlicingConfig

TINY = ["model.filters=[4,8,16,32]", "augment.crop_size=32", "pipeline.batch_size=4", "pipeline.shuffle_buffer=64",
        "pipeline.parallel_reads=2", "image_slices=2", "seed=3", "pipeline.seed=3"]


def history_without_times(path: Path) -> list[dict[str, str]]:
    """history.csv rows without ``epoch_time_s`` (wall time is the one column that may differ)."""
    with path.open(newline="") as handle:
        return [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in csv.DictReader(handle)]


def train(manifest: Path, out: Path, *extra: str) -> list[dict[str, str]]:
    command = [sys.executable, "-m", "hnseg_keras.cli", "train", "--variant", "S", "--data", str(manifest),
               "--epochs", "2", "--out", str(out)]
    for item in [*TINY, *extra]:
        command += ["--set", item]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=600)
    return history_without_times(out / "history.csv")


@pytest.mark.slow
def test_two_runs_with_the_same_seed_write_identical_histories(tiny_phantom_root, tmp_path):
    prepare(tiny_phantom_root, tmp_path / "shards", PrepareConfig(
        organs=("BrainStem", "Mandible", "Parotid_L"),
        slicing=SlicingConfig(size=40, spacing_mm=5.0, empty_slice_share=0.0)))
    manifest = tmp_path / "shards" / "manifest.json"
    first, second = train(manifest, tmp_path / "a"), train(manifest, tmp_path / "b")
    assert len(first) == 2 and float(first[-1]["loss"]) > 0
    assert first == second
    strict = train(manifest, tmp_path / "c", "deterministic=true")
    assert strict == train(manifest, tmp_path / "d", "deterministic=true")
    other_seed = train(manifest, tmp_path / "e", "seed=4", "pipeline.seed=4")
    assert other_seed != first  # the histories do depend on the seed: equality above is not vacuous
