"""benchmarks/label_sensitivity.py: one-voxel perturbations of known masks give known Dice values."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "label_sensitivity.py"
spec = importlib.util.spec_from_file_location("label_sensitivity", SCRIPT)
label_sensitivity = importlib.util.module_from_spec(spec)
spec.loader.exec_module(label_sensitivity)


def _square_stack():
    """3 slices of a 5 x 5 square, well inside a 9 x 12 x 12 volume."""
    mask = np.zeros((9, 12, 12), bool)
    mask[3:6, 4:9, 3:8] = True
    return mask


@pytest.mark.parametrize("name, expected", [
    ("shift x", 2 * 60 / 150),          # 5 of 25 voxels per slice leave the overlap
    ("shift y", 2 * 60 / 150),
    ("shift z", 2 * 50 / 150),          # one of three slices leaves it
    ("erode in-plane", 2 * 27 / 102),   # 5 x 5 -> 3 x 3 per slice, z untouched
    ("dilate in-plane", 2 * 75 / 210),  # 25 + 4 x 5 = 45 per slice
])
def test_one_voxel_perturbations_of_a_square_stack(name, expected):
    mask = _square_stack()
    changed = label_sensitivity.PERTURBATIONS[name](mask)
    assert changed.shape == mask.shape
    assert label_sensitivity.dice(changed, mask) == pytest.approx(expected)


def test_shift_drops_what_leaves_the_volume_instead_of_wrapping():
    mask = np.zeros((2, 3, 4), bool)
    mask[:, :, -1] = True
    assert not label_sensitivity._shift(mask, 2).any()


def test_missing_folder_is_one_line_and_exit_2(tmp_path, capsys):
    assert label_sensitivity.main([str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
