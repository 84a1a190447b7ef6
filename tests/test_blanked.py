"""Blanked slices (CT tissue only around the contours) and the three-way score, on hand-built cases."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hnseg_keras.evaluation import blanked
from hnseg_keras.inference import released
from hnseg_keras.inference.model_io import read_metadata

SPACING = (5.0, 5.0, 3.0)  # 25 mm2 per pixel: a full 20 x 20 slice holds 100 cm2


def _ct_and_organ():
    """4 slices: 0 full body, 1 tissue only on the organ (blanked), 2 full + organ, 3 nearly empty, no organ."""
    ct = np.full((4, 20, 20), -1024, np.int16)
    ct[0] = ct[2] = 40
    organ = np.zeros(ct.shape, bool)
    organ[1, 8:12, 8:12] = organ[2, 8:12, 8:12] = True
    ct[1][organ[1]] = 30
    ct[3, :2, :2] = 30
    return ct, organ


def _write_case(folder, ct, masks):
    (folder / "structures").mkdir(parents=True)
    image = sitk.GetImageFromArray(ct)
    image.SetSpacing(SPACING)
    sitk.WriteImage(image, str(folder / "img.nrrd"))
    for name, mask in masks.items():
        out = sitk.GetImageFromArray(mask.astype(np.uint8))
        out.CopyInformation(image)
        sitk.WriteImage(out, str(folder / "structures" / f"{name}.nrrd"))
    return image


def test_a_slice_is_blanked_when_it_carries_a_contour_and_little_tissue():
    ct, organ = _ct_and_organ()
    # Slice 1: 16 pixels = 4 cm2 of tissue, with the contour; slice 3: 1 cm2 but no contour.
    assert blanked.blanked_slices(ct, organ, 25.0).tolist() == [False, True, False, False]
    assert blanked.blanked_slices(ct, organ, 25.0, area_cm2=3.0).tolist() == [False, False, False, False]


def test_audit_and_three_way_score(tmp_path):
    ct, organ = _ct_and_organ()
    image = _write_case(tmp_path / "data" / "pt_1", ct, {"BrainStem": organ})
    record = blanked.audit([tmp_path / "data" / "pt_1"])
    assert record["organs"]["BrainStem"] == {"voxels_on_blanked_slices_percent": 50.0,
                                             "cases_over_20_percent": 1, "cases": 1}
    assert record["per_case"] == {"pt_1": {"BrainStem": 0.5}} and record["cases_affected"] == 1
    # The prediction finds the organ on the blanked slice only: 16 of 32 voxels.
    label_map = np.zeros(ct.shape, np.uint8)
    label_map[1][organ[1]] = 1
    prediction = sitk.GetImageFromArray(label_map)
    prediction.CopyInformation(image)
    (tmp_path / "pred").mkdir()
    sitk.WriteImage(prediction, str(tmp_path / "pred" / "pt_1.nrrd"))
    scores = blanked.score_predictions([tmp_path / "data" / "pt_1"], tmp_path / "pred", {"BrainStem": 1})
    assert scores["BrainStem"]["all"] == pytest.approx(2 * 16 / (32 + 16))
    assert scores["BrainStem"]["clinical_like"] == 0.0
    assert scores["BrainStem"]["blanked"] == 1.0 and scores["BrainStem"]["blanked_cases"] == 1


def test_dice_of_two_empty_masks_is_left_out():
    empty = np.zeros((2, 2), bool)
    assert blanked.dice(empty, empty) is None
    assert blanked._mean([None, 0.5, 1.0]) == 0.75


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "blanked_slices.py"


def _script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_script_scores_with_the_released_models_labels_and_refuses_a_bad_model(tmp_path):
    ct, organ = _ct_and_organ()
    image = _write_case(tmp_path / "data" / "pt_1", ct, {"BrainStem": organ})
    model = released.path()
    label_map = np.zeros(ct.shape, np.uint8)
    label_map[organ] = read_metadata(model)["labels"]["BrainStem"]
    prediction = sitk.GetImageFromArray(label_map)
    prediction.CopyInformation(image)
    (tmp_path / "pred").mkdir()
    sitk.WriteImage(prediction, str(tmp_path / "pred" / "pt_1.nrrd"))

    done = _script(tmp_path / "data", "--predictions", tmp_path / "pred", "--model", model,
                   "--out", tmp_path / "table.json")
    assert done.returncode == 0, done.stderr
    scores = json.loads((tmp_path / "table.json").read_text())["scores"]["BrainStem"]
    assert scores["all"] == scores["clinical_like"] == scores["blanked"] == 1.0

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "metadata.json").write_text("{not json")
    for bad in (["--model", tmp_path / "junk"], [], ["--model", tmp_path / "pred"]):
        refused = _script(tmp_path / "data", "--predictions", tmp_path / "pred", *bad, "--out", tmp_path / "x.json")
        assert refused.returncode == 2 and refused.stderr.startswith("error: ")
        assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    assert not (tmp_path / "x.json").exists()
