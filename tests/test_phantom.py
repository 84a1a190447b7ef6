"""The synthetic phantom: determinism, missing annotations, anatomy, HU overlap, writer and CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from hnseg_keras import configs
from hnseg_keras.cli import main
from hnseg_keras.data.layouts import find_refs, read_ref
from hnseg_keras.data.organs import DEFAULT_ORGANS
from hnseg_keras.data.phantom import (
    MISSABLE,
    PhantomConfig,
    case_is_missing,
    generate_case,
    write_phantom,
)
from hnseg_keras.data.splits import split_counts
from hnseg_keras.errors import HnsegError

TINY = PhantomConfig(size=48, spacing_mm=5.0, slice_spacing_mm=(6.0, 8.0), seed=0)
SMALL = PhantomConfig(size=96, spacing_mm=2.5, slice_spacing_mm=(3.0, 3.0), seed=3)


def centroid_mm(case, name):
    """Physical (x, y, z) mm centroid of a mask (identity direction)."""
    index_zyx = np.argwhere(case.masks[name]).mean(axis=0)
    return np.asarray(case.origin) + index_zyx[::-1] * np.asarray(case.spacing)


def test_config_round_trip_and_validation():
    assert configs.from_dict(PhantomConfig, configs.to_dict(TINY)) == TINY
    for bad in (dict(size=4), dict(spacing_mm=0.0), dict(slice_spacing_mm=(3.0, 2.0)), dict(missing_share=1.5)):
        with pytest.raises(HnsegError, match="phantom config"):
            PhantomConfig(**bad)


def test_deterministic_by_seed_and_index():
    a, b = generate_case(2, TINY), generate_case(2, TINY)
    assert np.array_equal(a.ct, b.ct) and a.spacing == b.spacing
    assert all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)
    other_seed = generate_case(2, replace(TINY, seed=1))
    other_index = generate_case(3, TINY)
    for other in (other_seed, other_index):
        same_shape = other.ct.shape == a.ct.shape
        assert not same_shape or not np.array_equal(other.ct, a.ct)
        assert other.masks["BrainStem"].shape != a.masks["BrainStem"].shape or not np.array_equal(
            other.masks["BrainStem"], a.masks["BrainStem"])


def test_geometry_and_dtypes():
    case = generate_case(0, TINY)
    depth = case.ct.shape[0]
    assert case.ct.dtype == np.int16 and case.ct.shape[1:] == (48, 48)
    assert case.spacing[:2] == (5.0, 5.0) and 6.0 <= case.spacing[2] <= 8.0
    assert depth == round(120.0 / case.spacing[2])
    assert case.ct[0, 0, 0] == pytest.approx(-1000, abs=80)  # air in the corner (noise only)
    assert case.case_id == "phantom_0000"


def test_missing_share_is_honoured():
    flags = [case_is_missing(i, TINY) for i in range(20)]
    assert 3 <= sum(flags) <= 5  # 20 x 0.2 = 4
    for i in range(20):
        case = generate_case(i, TINY)
        expected = set(DEFAULT_ORGANS) - (set(MISSABLE) if flags[i] else set())
        assert set(case.masks) == expected, i
        assert all(case.masks[name].sum() >= 1 for name in case.masks), i
        stacked = np.sum([m.astype(int) for m in case.masks.values()], axis=0)
        assert stacked.max() <= 1  # organs never overlap
    none = replace(TINY, missing_share=0.0)
    every = replace(TINY, missing_share=1.0)
    assert not any(case_is_missing(i, none) for i in range(50))
    assert all(case_is_missing(i, every) for i in range(50))


@pytest.mark.parametrize("index", [0, 1, 2])
def test_organ_positions_are_plausible(index):
    config = replace(SMALL, missing_share=0.0)
    case = generate_case(index, config)
    c = {name: centroid_mm(case, name) for name in DEFAULT_ORGANS}
    x, y, z = 0, 1, 2
    for left, right in (("Parotid_L", "Parotid_R"), ("Submandibular_L", "Submandibular_R"),
                        ("OpticNerve_L", "OpticNerve_R")):
        assert c[left][x] > c[right][x] + 10, (left, right)  # LPS: +x is patient left
    for nerve in ("OpticNerve_L", "OpticNerve_R", "Chiasm"):
        assert c[nerve][z] > c["Mandible"][z] + 30 and c[nerve][z] > c["Parotid_L"][z]
        assert c[nerve][y] < c["BrainStem"][y]  # anterior of the brain stem
    assert c["OpticNerve_L"][y] < c["Chiasm"][y]  # nerves run forward from the chiasm
    for gland in ("Submandibular_L", "Submandibular_R"):
        assert c[gland][z] < c["Mandible"][z] and c[gland][z] < c["Parotid_L"][z] - 20
    assert c["Mandible"][y] < c["Parotid_L"][y]  # jaw in front of the parotids


def best_threshold_dice(ct, mask):
    """Best Dice of any HU interval [lo, hi] as a classifier of ``mask`` (exhaustive on a 5 HU grid)."""
    bins = np.arange(-1025, 3076, 5)
    everything = np.cumsum(np.histogram(ct, bins)[0])
    organ = np.cumsum(np.histogram(ct[mask > 0], bins)[0])
    lo, hi = np.meshgrid(np.arange(len(bins) - 1), np.arange(len(bins) - 1), indexing="ij")
    keep = lo <= hi
    tp = organ[hi] - np.where(lo > 0, organ[lo - 1], 0)
    predicted = everything[hi] - np.where(lo > 0, everything[lo - 1], 0)
    dice = np.where(keep, 2 * tp / np.maximum(predicted + organ[-1], 1), 0)
    return float(dice.max())


def test_organs_are_not_separable_by_hu_alone():
    config = replace(SMALL, missing_share=0.0)
    case = generate_case(0, config)
    soft = ("BrainStem", "Chiasm", "OpticNerve_L", "Parotid_L", "Parotid_R", "Submandibular_L", "Submandibular_R")
    scores = {name: best_threshold_dice(case.ct, case.masks[name]) for name in soft}
    # Measured over 20 cases at this size: parotids <= 0.35, the others <= 0.04.
    assert scores["Parotid_L"] < 0.4 and scores["Parotid_R"] < 0.4, scores
    assert max(scores[name] for name in soft if not name.startswith("Parotid")) < 0.1, scores
    # Sanity of the measure: an organ with its own HU band would score high.
    fake = case.ct.copy()
    fake[case.masks["Parotid_L"] > 0] = 2500
    assert best_threshold_dice(fake, case.masks["Parotid_L"]) > 0.99


def test_thin_structures_present_at_default_size():
    """PDDCA-like 512 x 512 at 0.9 mm with the coarsest 3 mm slices: no fallback voxel needed."""
    case = generate_case(0, PhantomConfig(slice_spacing_mm=(3.0, 3.0), missing_share=0.0))
    assert case.ct.shape == (40, 512, 512)
    for name in ("Chiasm", "OpticNerve_L", "OpticNerve_R"):
        assert case.masks[name].sum() >= 20, name
    nerve_slices = np.nonzero(case.masks["OpticNerve_L"].any(axis=(1, 2)))[0]
    assert len(nerve_slices) >= 2  # the nerve rises: seen in more than one slice
    widths_mm = np.ptp(np.argwhere(case.masks["BrainStem"]), axis=0)[1:] * 0.9
    assert 15 < widths_mm.min() < 40  # ~25 mm wide tube


def test_split_counts_known_answers():
    assert split_counts(10) == (6, 2, 2)
    assert split_counts(5) == (3, 1, 1)
    assert split_counts(4) == (2, 1, 1)
    assert split_counts(3) == (1, 1, 1)
    assert split_counts(1) == (1, 0, 0)
    assert split_counts(7, (1.0, 0.0, 0.0)) == (7, 0, 0)
    with pytest.raises(HnsegError):
        split_counts(5, (0.5, 0.5))


def test_tiny_phantom_root_layout(tiny_phantom_root, tiny_phantom_config):
    refs = find_refs(tiny_phantom_root)
    assert [(r.case_id, r.split) for r in refs] == [
        ("phantom_0000", "train"), ("phantom_0001", "train"), ("phantom_0002", "train"),
        ("phantom_0003", "validation"), ("phantom_0004", "test"),
    ]
    back = read_ref(refs[1], DEFAULT_ORGANS)
    source = generate_case(1, tiny_phantom_config)
    assert np.array_equal(back.ct, source.ct)
    assert all(np.array_equal(back.masks[k], source.masks[k]) for k in source.masks)
    assert "Mandible" not in read_ref(refs[0], DEFAULT_ORGANS).masks  # phantom_0000 is a missing-annotation case
    assert json.loads((tiny_phantom_root / "phantom.json").read_text())["num_cases"] == 5


def test_write_phantom_resumes_and_refuses_other_settings(tmp_path, capsys):
    config = PhantomConfig(size=32, spacing_mm=7.0, slice_spacing_mm=(10.0, 10.0))
    write_phantom(tmp_path / "p", 2, config, splits=None)
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["phantom.json", "phantom_0000", "phantom_0001"]
    capsys.readouterr()
    write_phantom(tmp_path / "p", 2, config, splits=None)
    assert capsys.readouterr().err.count("skipped") == 2
    with pytest.raises(HnsegError, match="other settings"):
        write_phantom(tmp_path / "p", 3, config, splits=None)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    with pytest.raises(HnsegError, match="not a phantom folder"):
        write_phantom(tmp_path / "mine", 1, config)


def test_cli_writes_cases_with_progress(tmp_path, capsys):
    out = tmp_path / "ph"
    code = main(["phantom", "--out", str(out), "--cases", "3", "--size", "32", "--spacing", "7",
                 "--slice-spacing", "10", "10", "--seed", "5"])
    assert code == 0
    err = capsys.readouterr().err
    assert "phantom 3/3 phantom_0002 -> test" in err
    assert [r.split for r in find_refs(out)] == ["train", "validation", "test"]
    saved = json.loads((out / "phantom.json").read_text())
    assert saved["config"]["seed"] == 5 and saved["config"]["size"] == 32


@pytest.mark.parametrize("bad", [
    ["--cases", "0"], ["--size", "4"], ["--spacing", "-1"], ["--missing-share", "1.5"],
    ["--slice-spacing", "3", "2"], ["--splits", "0.6,x,0.2"], ["--splits", "0.5,0.5"],
])
def test_cli_bad_arguments_one_line_nothing_written(tmp_path, capsys, bad):
    out = tmp_path / "ph"
    code = main(["phantom", "--out", str(out), "--size", "32", "--spacing", "7", *bad])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("hnseg phantom: error:")
    assert not out.exists()


def test_cli_out_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["phantom", "--out", str(tmp_path / "file"), "--cases", "1"]) == 2
    assert "not a folder" in capsys.readouterr().err
