"""Orientation: every stored orientation reaches the model as LPS, and every output goes back to the input's grid.

SimpleITK's ``DICOMOrient`` (an independent implementation) makes the reference storages; the oracle
model of test_prediction splits the parotids by image side, so a mirrored slice swaps left and right.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from own_data_builders import write_dicom_series
from test_prediction import ORGANS, dice, oracle_case, oracle_file  # noqa: F401  (oracle_file is a fixture)

from hnseg_keras.cli import main
from hnseg_keras.data import layouts, orientation
from hnseg_keras.data.cases import Case, image_like, write_pddca_case
from hnseg_keras.data.organs import label_value
from hnseg_keras.errors import HnsegError
from hnseg_keras.inference import qa
from hnseg_keras.inference.prediction import Predictor

STORAGES = ("LPS", "RAS", "LPI", "RAI", "PLS")  # PLS: rows and columns swapped


def reference_image(shape=(7, 5, 6)) -> sitk.Image:
    values = np.random.default_rng(0).integers(-1000, 1000, shape).astype(np.int16)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.9, 1.1, 2.5))
    image.SetOrigin((-10.0, 20.0, 30.0))
    return image


@pytest.mark.parametrize("code", [*STORAGES, "SLP", "ILA", "ASR", "RPI"])
def test_every_axis_permutation_and_flip_reads_back_as_lps_exactly(code):
    lps = reference_image()
    stored = sitk.DICOMOrient(lps, code)
    assert orientation.orientation_code(stored.GetDirection()) == code
    array = sitk.GetArrayFromImage(stored)
    storage = orientation.storage_of(array.shape, stored.GetSpacing(), stored.GetOrigin(), stored.GetDirection())
    assert storage.code == code and storage.is_canonical == (code == "LPS")
    assert np.array_equal(storage.to_canonical(array), sitk.GetArrayFromImage(lps))
    np.testing.assert_allclose(storage.canonical_origin, lps.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(storage.canonical_spacing, lps.GetSpacing())
    np.testing.assert_allclose(storage.canonical_direction, lps.GetDirection(), atol=1e-12)
    # back to the storage, also with a leading organ axis
    canonical = storage.to_canonical(array)
    assert np.array_equal(storage.to_storage(canonical), array)
    assert np.array_equal(storage.to_storage(np.stack([canonical, -canonical]))[1], -array)


def test_oblique_axes_are_refused_in_one_line_or_resampled_on_request():
    angle = math.radians(10)
    direction = (math.cos(angle), -math.sin(angle), 0.0, math.sin(angle), math.cos(angle), 0.0, 0.0, 0.0, 1.0)
    with pytest.raises(HnsegError, match=r"10\.0 degrees off the patient axes.*--oblique resample"):
        orientation.storage_of((4, 20, 20), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), direction, where="ct.nii.gz")
    storage = orientation.storage_of((4, 20, 20), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), direction, "resample")
    assert storage.resampled and storage.code == "oblique (near LPS)"
    # the axis-aligned grid covers the tilted one: 19 mm * (cos + sin) wide
    assert storage.canonical_size[0] == math.floor(19 * (math.cos(angle) + math.sin(angle))) + 1
    block = np.zeros((4, 20, 20), np.uint8)
    block[:, 5:15, 5:15] = 1
    back = storage.to_storage(storage.to_canonical(block))
    assert back.shape == block.shape and dice(back, block) >= 0.9
    # a tilt below the tolerance (float noise of a DICOM header) is taken as axis-aligned
    noisy = (1.0, 2e-4, 0.0, -2e-4, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert orientation.storage_of((4, 20, 20), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), noisy).is_canonical


def stored_case_folder(case: Case, truth: dict, folder, code: str) -> None:
    """Write ``case`` + ``truth`` as a PDDCA folder whose files are stored in orientation ``code``."""
    (folder / "structures").mkdir(parents=True)
    sitk.WriteImage(sitk.DICOMOrient(image_like(case.ct, case), code), str(folder / "img.nrrd"), True)
    for name, mask in truth.items():
        oriented = sitk.DICOMOrient(image_like(mask, case), code)
        sitk.WriteImage(oriented, str(folder / "structures" / f"{name}.nrrd"), True)


def physical_centroid_x(image: sitk.Image, value: int) -> float:
    z, y, x = np.nonzero(sitk.GetArrayFromImage(image) == value)
    return image.TransformContinuousIndexToPhysicalPoint((x.mean(), y.mean(), z.mean()))[0]


def test_the_same_ct_in_five_storages_gives_the_same_dice_and_never_swaps_sides(tmp_path, oracle_file):  # noqa: F811
    case, truth = oracle_case()
    root = tmp_path / "data"
    for code in STORAGES:
        stored_case_folder(case, truth, root / f"case_{code}", code)
    out = tmp_path / "pred"
    assert main(["predict", str(root), "--model", str(oracle_file), "--out", str(out)]) == 0
    for code in STORAGES:
        labels = sitk.ReadImage(str(out / f"case_{code}.nrrd"))
        ct = sitk.ReadImage(str(root / f"case_{code}" / "img.nrrd"))
        assert labels.GetSize() == ct.GetSize(), code  # on the input's own grid, voxel for voxel
        np.testing.assert_allclose(labels.GetDirection(), ct.GetDirection())
        np.testing.assert_allclose(labels.GetOrigin(), ct.GetOrigin(), atol=1e-6)
        assert physical_centroid_x(labels, label_value("Parotid_L")) > 5.0 > physical_centroid_x(
            labels, label_value("Parotid_R")), code  # LPS: +x is the patient's left
        record = json.loads((out / f"case_{code}.qa.json").read_text())
        assert record["stored_orientation"] == code and record["summary"]["failed"] == 0, code
    assert main(["evaluate", "--pred", str(out), "--gt", str(root), "--organs", *ORGANS,
                 "--out", str(tmp_path / "scores")]) == 0
    cases = json.loads((tmp_path / "scores" / "results.json").read_text())["cases"]
    for organ in ORGANS:
        scores = [cases[f"case_{code}"][organ]["dice"] for code in STORAGES]
        assert min(scores) >= 0.99 and max(scores) - min(scores) <= 0.01, (organ, scores)


def test_a_prediction_stored_otherwise_than_its_ground_truth_is_scored_in_lps(tmp_path, oracle_file):  # noqa: F811
    case, truth = oracle_case("case_a")
    stored_case_folder(case, truth, tmp_path / "ras" / "case_a", "RAS")
    case.masks = dict(truth)
    write_pddca_case(case, tmp_path / "lps" / "case_a")
    out = tmp_path / "pred"
    assert main(["predict", str(tmp_path / "ras"), "--model", str(oracle_file), "--out", str(out)]) == 0
    assert main(["evaluate", "--pred", str(out), "--gt", str(tmp_path / "lps"), "--organs", *ORGANS,
                 "--out", str(tmp_path / "scores")]) == 0
    scores = json.loads((tmp_path / "scores" / "results.json").read_text())["cases"]["case_a"]
    assert min(scores[organ]["dice"] for organ in ORGANS) >= 0.99


def test_dicom_feet_first_series_is_read_into_lps(tmp_path, oracle_file):  # noqa: F811
    from rt_utils import RTStructBuilder

    case, truth = oracle_case("ffs")
    # Feet first supine: columns run to the patient's right; the same anatomy, so the same voxels in LPS.
    flipped = Case("ffs", case.ct[:, :, ::-1].copy(), case.spacing, (case.origin[0] + (case.ct.shape[2] - 1)
                                                                      * case.spacing[0], *case.origin[1:]),
                   (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    series = write_dicom_series(flipped, tmp_path / "ffs")
    read = layouts.read_ref(layouts.find_refs(series)[0], ())
    assert read.storage.code == "RPI" and np.array_equal(read.ct, case.ct)  # normal = row x column points down
    out = tmp_path / "pred"
    assert main(["predict", str(series), "--model", str(oracle_file), "--out", str(out)]) == 0
    rtstruct = RTStructBuilder.create_from(str(series), str(out / "ffs_rtstruct.dcm"))
    for name in ORGANS:  # the RTSTRUCT masks are in the series' own (mirrored) storage
        mask = np.moveaxis(rtstruct.get_roi_mask_by_name(name), -1, 0)
        assert dice(mask, truth[name][::-1, :, ::-1]) >= 0.9, name  # rt-utils sorts along the normal: z down


@pytest.mark.parametrize("position", ["HFP", "FFDL"])
def test_prone_and_decubitus_series_are_refused_naming_the_position(tmp_path, oracle_file, capsys, position):  # noqa: F811
    case, _ = oracle_case("prone")
    series = write_dicom_series(case, tmp_path / "prone")
    for path in series.iterdir():
        ds = pydicom.dcmread(path)
        ds.PatientPosition = position
        ds.save_as(path)
    out = tmp_path / "pred"
    assert main(["predict", str(series), "--model", str(oracle_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"PatientPosition {position}" in err and "supine" in err
    assert not out.exists() or not any(out.iterdir())
    assert main(["scan", str(series)]) == 1
    assert f"PatientPosition {position}" in capsys.readouterr().out


def test_scan_reports_the_stored_orientation(tmp_path, capsys):
    case, truth = oracle_case()
    stored_case_folder(case, truth, tmp_path / "data" / "case_ras", "RAS")
    assert main(["scan", str(tmp_path / "data")]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("case_ras"))
    assert " RAS " in line


def test_a_mirrored_prediction_is_caught_by_the_side_check(tmp_path, oracle_file, monkeypatch, capsys):  # noqa: F811
    case, truth = oracle_case("mirrored")
    case.masks = dict(truth)
    write_pddca_case(case, tmp_path / "data" / "mirrored")
    plain = Predictor.predict_slices

    def mirrored(self, slices, batch_size):  # what a model that learned on mirrored slices would answer
        return plain(self, slices, batch_size)[:, :, ::-1]

    monkeypatch.setattr(Predictor, "predict_slices", mirrored)
    out = tmp_path / "pred"
    assert main(["predict", str(tmp_path / "data"), "--model", str(oracle_file), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "QA failed on 1 of 1 case(s)" in err and "Parotid_L side" in err
    record = json.loads((out / "mirrored.qa.json").read_text())
    failed = {(f["organ"], f["check"]) for f in record["checks"] if f["status"] == "fail"}
    assert failed == {("Parotid_L", "side"), ("Parotid_R", "side")}
    assert main(["predict", str(tmp_path / "data"), "--model", str(oracle_file), "--out", str(tmp_path / "strict"),
                 "--strict-qa"]) == 1
    assert "anatomical check failed (--strict-qa)" in capsys.readouterr().err
    assert (tmp_path / "strict" / "mirrored.qa.json").is_file()  # outputs are kept for review


OPENKBP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "openkbp-hn" / "train"


@pytest.mark.realdata
@pytest.mark.skipif(not OPENKBP.is_dir(), reason=f"OpenKBP data not found at {OPENKBP}")
def test_real_ct_in_five_storages_reads_back_identically_and_its_anatomy_passes_the_side_check(tmp_path):
    source = OPENKBP / "pt_1"
    reference = layouts.read_ref(layouts.find_refs(source)[0], ("BrainStem", "Mandible", "Parotid_L", "Parotid_R"))
    for code in STORAGES:
        folder = tmp_path / code / "pt_1"
        stored_case_folder(reference, reference.masks, folder, code)
        case = layouts.read_ref(layouts.find_refs(folder)[0], tuple(reference.masks))
        assert case.storage.code == code and np.array_equal(case.ct, reference.ct)
        assert all(np.array_equal(case.masks[name], mask) for name, mask in reference.masks.items())
        findings = qa.check_case(case.masks, case.spacing, case.origin, case.direction, case.ct)
        assert qa.summarise(findings)["failed"] == 0, (code, qa.summarise(findings))
    mirrored = {name: mask[:, :, ::-1] for name, mask in reference.masks.items()}
    findings = qa.check_case(mirrored, reference.spacing, reference.origin, reference.direction, reference.ct)
    assert {(f["organ"], f["check"]) for f in findings if f["status"] == "fail"} == {("Parotid_L", "side"),
                                                                                   ("Parotid_R", "side")}
