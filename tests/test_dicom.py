"""DICOM trees: patient discovery in three arrangements, RTSTRUCT rasterisation against known masks
(orientation, slice order, holes), and the geometry / series / RTSTRUCT refusals."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pydicom
import pytest
from own_data_builders import (
    ARRANGEMENTS,
    CLINIC_NAMES,
    dice,
    small_case,
    write_dicom_series,
    write_patient,
    write_rtstruct,
)

from hnseg_keras import cli
from hnseg_keras.data import dicom, layouts
from hnseg_keras.errors import HnsegError

NINE = tuple(CLINIC_NAMES)


def _read(folder, organs=NINE, **reading):
    refs = layouts.find_refs(folder, layouts.Reading(**reading))
    return {ref.case_id: layouts.read_ref(ref, organs, layouts.Reading(**reading)) for ref in refs}


@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
def test_masks_read_back_match_the_masks_written(tmp_path, arrangement):
    truth = small_case(1)
    write_patient(truth, tmp_path / "root" / "HN-07", arrangement)
    assert layouts.detect_layout(tmp_path / "root") == "dicom"
    case = _read(tmp_path / "root")["HN-07"]
    assert np.array_equal(case.ct, truth.ct) and np.allclose(case.spacing, truth.spacing, atol=1e-4)
    assert sorted(case.masks) == sorted(truth.masks)
    for organ, mask in truth.masks.items():
        assert dice(case.masks[organ], mask) >= 0.99, organ
    # a single patient folder given directly is one case named after it
    assert [ref.case_id for ref in layouts.find_refs(tmp_path / "root" / "HN-07")] == ["HN-07"]


def _add_hand_contour(rs_path, name, polygons_mm):
    """Append an ROI whose contours are given in patient mm, without ContourImageSequence (optional in DICOM)."""
    ds = pydicom.dcmread(rs_path)
    number = max(int(roi.ROINumber) for roi in ds.StructureSetROISequence) + 1
    roi = pydicom.Dataset()
    roi.ROINumber, roi.ROIName = number, name
    roi.ReferencedFrameOfReferenceUID = ds.StructureSetROISequence[0].ReferencedFrameOfReferenceUID
    ds.StructureSetROISequence.append(roi)
    item = pydicom.Dataset()
    item.ReferencedROINumber = number
    item.ContourSequence = pydicom.Sequence()
    for polygon in polygons_mm:
        contour = pydicom.Dataset()
        contour.ContourGeometricType = "CLOSED_PLANAR"
        contour.NumberOfContourPoints = len(polygon)
        contour.ContourData = [f"{v:.4f}" for point in polygon for v in point]
        item.ContourSequence.append(contour)
    ds.ROIContourSequence.append(item)
    ds.save_as(rs_path)


def test_orientation_slice_order_and_holes_against_hand_made_contours(tmp_path):
    """A box drawn in patient mm on the patient's left (+x, LPS), anterior (-y), on one slice, in a series
    stored head-first (z decreasing with the file index); a ring keeps its hole."""
    source = small_case(2)
    flipped = dataclasses.replace(source, direction=(1, 0, 0, 0, 1, 0, 0, 0, -1))
    folder = tmp_path / "root" / "p1"
    write_patient(flipped, folder, "split")
    rs_path = folder / "RTSTRUCT" / "structures.dcm"
    k = 4  # file index of the box's slice; its z is origin_z - k * dz
    x0, y0, z0 = flipped.origin
    sx, sy, sz = flipped.spacing
    corners = [(44, 8), (55, 8), (55, 13), (44, 13)]  # (x index, y index): left, anterior, 12 x 6 voxels
    _add_hand_contour(rs_path, "Larynx", [[(x0 + i * sx, y0 + j * sy, z0 - k * sz) for i, j in corners]])
    case = _read(tmp_path / "root", organs=("Larynx", "BrainStem"), organ_map={"ringptv70": "Esophagus"})["p1"]
    # the reader stores slices in increasing z, so file index k is array index depth-1-k
    depth = source.ct.shape[0]
    assert np.array_equal(case.ct, source.ct[::-1]) and np.allclose(case.origin[2], z0 - (depth - 1) * sz)
    assert np.array_equal(case.masks["BrainStem"], source.masks["BrainStem"][::-1])
    expected = np.zeros_like(case.masks["Larynx"])
    expected[depth - 1 - k, 8:14, 44:56] = 1
    assert np.array_equal(case.masks["Larynx"], expected)
    ring = _read(tmp_path / "root", organs=("Esophagus",), organ_map={"ringptv70": "Esophagus"})["p1"]
    middle = ring.masks["Esophagus"][depth - 1 - depth // 2]
    assert middle[20:40, 20:40].sum() == 400 - 100 and middle[25:35, 25:35].sum() == 0


def _cli_refuses(capsys, argv, *words):
    assert cli.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hnseg")]
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _damaged_series(tmp_path, how):
    folder = tmp_path / "root" / "bad"
    write_patient(small_case(1), folder, "flat", rtstruct=False)
    files = sorted(folder.glob("CT*.dcm"))
    if how == "gap":
        files[len(files) // 2].unlink()
    elif how == "uneven":
        for path in files[len(files) // 2:]:
            ds = pydicom.dcmread(path)
            ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 1.0]
            ds.save_as(path)
    elif how == "orientation":
        ds = pydicom.dcmread(files[3])
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0.98, 0.198997]
        ds.save_as(files[3])
    elif how == "mr":
        for path in files:
            ds = pydicom.dcmread(path)
            ds.Modality = "MR"
            ds.save_as(path)
    return folder


@pytest.mark.parametrize("how, words", [("gap", ("missing slice",)), ("uneven", ("uneven slice spacing",)),
                                        ("orientation", ("orientations",)), ("mr", ("Modality MR", "not CT"))])
def test_geometry_and_modality_refusals_write_nothing(tmp_path, capsys, how, words):
    folder = _damaged_series(tmp_path, how)
    out = tmp_path / "pred"
    _cli_refuses(capsys, ["predict", str(folder.parent), "--model", str(tmp_path / "no-model"), "--out", str(out)],
                 str(folder), *words)
    assert not out.exists()
    _cli_refuses(capsys, ["prepare", str(folder.parent), "--out", str(tmp_path / "shards")], str(folder), *words)
    assert not (tmp_path / "shards").exists()


def test_several_series_need_a_choice_and_series_chooses(tmp_path, capsys):
    folder = tmp_path / "root" / "p1"
    write_patient(small_case(1), folder, "flat", rtstruct=False)
    write_dicom_series(dataclasses.replace(small_case(2), case_id=small_case(1).case_id), folder / "b")  # same patient
    uids = sorted(s.uid for s in dicom.scan_patient(folder)[0])
    line = _cli_refuses(capsys, ["prepare", str(folder), "--out", str(tmp_path / "o")], "2 image series", "--series")
    assert all(uid in line for uid in uids) and not (tmp_path / "o").exists()
    assert cli.main(["scan", str(folder)]) == 1 and "2 image series" in capsys.readouterr().out
    chosen = dicom.open_patient(folder, uids[1])
    assert chosen.series.uid == uids[1] and len(chosen.geometry.files) == chosen.geometry.size[2]
    with pytest.raises(HnsegError, match="--series 9.9 is not here"):
        dicom.open_patient(folder, "9.9")


def test_rtstruct_refusals_name_the_file(tmp_path, capsys):
    root = tmp_path / "root"
    write_patient(small_case(1), root / "two", "flat")
    shutil.copy(root / "two" / "RS.dcm", root / "two" / "RS2.dcm")
    _cli_refuses(capsys, ["predict", str(root / "two"), "--model", "m", "--out", str(tmp_path / "o0")],
                 "2 RTSTRUCT files", "RS.dcm", "RS2.dcm")
    # an RTSTRUCT drawn on another patient's CT
    write_patient(small_case(2), root / "other", "flat")
    write_patient(small_case(1), root / "mixed", "flat", rtstruct=False)
    shutil.copy(root / "other" / "RS.dcm", root / "mixed" / "RS.dcm")
    _cli_refuses(capsys, ["prepare", str(root / "mixed"), "--out", str(tmp_path / "o1")],
                 str(root / "mixed" / "RS.dcm"), "references CT series")
    # two ROIs for one organ, then an organ ROI without contours
    case = small_case(1)
    write_patient(case, root / "dup", "flat", extra={"Parotid_L": case.masks["Parotid_L"]})
    _cli_refuses(capsys, ["prepare", str(root / "dup"), "--out", str(tmp_path / "o2")], "'PAROTID LT'", "'Parotid_L'",
                 "both match Parotid_L")
    write_patient(case, root / "empty", "flat")
    _add_hand_contour(root / "empty" / "RS.dcm", "Larynx", [])
    _cli_refuses(capsys, ["prepare", str(root / "empty"), "--out", str(tmp_path / "o3"), "--organs", "Larynx",
                          "BrainStem"], "'Larynx'", "no contours")
    assert not any((tmp_path / name).exists() for name in ("o0", "o1", "o2", "o3"))


def test_organ_map_renames_ignores_and_refuses_unknown_organs(tmp_path, capsys):
    root = tmp_path / "root"
    write_patient(small_case(1), root / "p1", "flat", junk=True)
    good = tmp_path / "map.json"
    good.write_text('{"PTV_70": "Larynx", "Brain Stem": null}')
    info = layouts.describe(layouts.find_refs(root)[0], layouts.reading_from_args(
        _args(organ_map=str(good))))
    assert info["organs"]["Larynx"] == "PTV_70" and "BrainStem" not in info["organs"]
    assert "PTV_70" not in info["unmatched"] and "Brain Stem" not in info["unmatched"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"PTV_70": "Tumour"}')
    _cli_refuses(capsys, ["scan", str(root), "--organ-map", str(bad)], str(bad), "'Tumour'", "unknown organ")


def _args(**values):
    import argparse

    defaults = {"layout": None, "series": None, "organ_map": None, "organs_file": None}
    return argparse.Namespace(**{**defaults, **values})


def test_rtstruct_written_for_a_case_reads_back(tmp_path):
    """write_rtstruct in the builders and dicom.read_masks agree on a second, unrelated mask set."""
    case = small_case(3)
    write_dicom_series(case, tmp_path / "p" / "CT")
    rng = np.random.default_rng(0)
    blob = np.zeros(case.ct.shape, dtype=np.uint8)
    blob[5:9, 30:40, 12:20] = rng.random((4, 10, 8)) > -1
    write_rtstruct(dataclasses.replace(case, masks={"Larynx": blob}), tmp_path / "p" / "CT",
                   tmp_path / "p" / "RS" / "x", names={"Larynx": "LARYNX"}, junk=False)
    back = _read(tmp_path / "p", organs=("Larynx",))["p"]
    assert np.array_equal(back.masks["Larynx"], blob)


def test_predicted_rtstruct_references_the_chosen_series_and_reads_back(tmp_path):
    """predict's RTSTRUCT for a patient folder with two series (one chosen by --series) is drawn on that series;
    put beside it, it selects that series and its masks read back unchanged."""
    from hnseg_keras.inference import batch, prediction, rtstruct

    folder = tmp_path / "root" / "p1"
    truth = small_case(1)
    write_patient(truth, folder, "flat", rtstruct=False)
    write_dicom_series(dataclasses.replace(small_case(2), case_id=truth.case_id), folder / "other")
    uid = next(s.uid for s in dicom.scan_patient(folder)[0] if len(s.files) == truth.ct.shape[0])
    (item,) = batch.find_inputs(folder, reading=layouts.Reading(series=uid))
    assert len(item.series_files) == truth.ct.shape[0]
    case = layouts.read_ref(item.ref, ())
    organs = ("BrainStem", "Parotid_L", "Parotid_R")
    seg = prediction.Segmentation("p1", organs, np.stack([truth.masks[o].astype(bool) for o in organs]),
                                  np.zeros(truth.ct.shape, np.uint8), 0.0, truth.ct.shape[0])
    path = rtstruct.write_rtstruct(seg, case, item.series_files, folder / "pred_rtstruct.dcm")
    assert dicom.referenced_series(pydicom.dcmread(path)) == uid
    back = _read(tmp_path / "root", organs=organs)["p1"]
    for organ in organs:
        assert np.array_equal(back.masks[organ], truth.masks[organ]), organ


def test_patient_folders_found_in_a_tree_even_with_one_anonymised_patient_id(tmp_path):
    for index in (1, 2):
        write_patient(dataclasses.replace(small_case(index), case_id="ANON"), tmp_path / "tree" / f"P{index}", "split")
    assert [ref.case_id for ref in layouts.find_refs(tmp_path / "tree")] == ["P1", "P2"]  # one ID, two studies
    assert [ref.case_id for ref in layouts.find_refs(tmp_path / "tree" / "P1")] == ["P1"]  # CT/ + RTSTRUCT/


def test_a_localizer_inside_the_series_is_left_out(tmp_path):
    truth = small_case(1)
    folder = tmp_path / "p1"
    write_patient(truth, folder, "flat", rtstruct=False)
    scout = pydicom.dcmread(sorted(folder.glob("CT*.dcm"))[0])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal topogram
    scout.SOPInstanceUID = pydicom.uid.generate_uid()
    scout.save_as(folder / "scout.dcm")
    case = _read(folder, organs=())["p1"]
    assert np.array_equal(case.ct, truth.ct)
