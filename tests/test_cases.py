"""Reading cases through ``layouts`` (PDDCA folders, image files, DICOM series), the label-map helper and the
writers of cases.py: exact round trips, annotation semantics, one-line errors."""

from __future__ import annotations

import json
import logging

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from own_data_builders import read_one, write_dicom_series

from hnseg_keras.data import layouts
from hnseg_keras.data.cases import (
    Case,
    image_like,
    read_image,
    read_label_map,
    reference_image,
    write_label_map,
    write_pddca_case,
)
from hnseg_keras.data.organs import label_value, normalise
from hnseg_keras.errors import HnsegError


def small_case(case_id="c1") -> Case:
    """A 4x6x5 case with known HU and two box masks, non-trivial geometry."""
    ct = (np.arange(4 * 6 * 5, dtype=np.int16).reshape(4, 6, 5) * 7 - 500).astype(np.int16)
    brainstem = np.zeros(ct.shape, np.uint8)
    brainstem[1:3, 2:4, 1:3] = 1
    parotid = np.zeros(ct.shape, np.uint8)
    parotid[0:2, 0:2, 3:5] = 1
    return Case(case_id, ct, (0.8, 0.7, 2.5), (-12.5, 30.25, -80.0),
                masks={"BrainStem": brainstem, "Parotid_L": parotid})


def write_image(array, path, case, **geometry):
    """Write ``array`` with the geometry of ``case``, optionally overriding spacing/origin/direction."""
    image = image_like(array, case) if array.shape == case.ct.shape else sitk.GetImageFromArray(array)
    if array.shape != case.ct.shape:
        image.SetSpacing(case.spacing)
        image.SetOrigin(case.origin)
    for key, value in geometry.items():
        getattr(image, f"Set{key}")(value)
    sitk.WriteImage(image, str(path))
    return path


# ----------------------------------------------------------------------------- PDDCA


def test_pddca_round_trip_is_exact(tmp_path, tiny_case):
    folder = write_pddca_case(tiny_case, tmp_path / tiny_case.case_id)
    back = read_one(folder)
    assert back.case_id == tiny_case.case_id
    assert back.ct.dtype == np.int16 and np.array_equal(back.ct, tiny_case.ct)
    assert back.spacing == pytest.approx(tiny_case.spacing) and back.origin == pytest.approx(tiny_case.origin)
    assert back.direction == pytest.approx(tiny_case.direction)
    assert sorted(back.masks) == sorted(tiny_case.masks)
    for name, mask in tiny_case.masks.items():
        assert back.masks[name].dtype == np.uint8 and np.array_equal(back.masks[name], mask), name


def test_missing_structure_file_means_not_annotated(tmp_path):
    folder = write_pddca_case(small_case(), tmp_path / "c1")
    (folder / "structures" / "Parotid_L.nrrd").unlink()
    case = read_one(folder)
    assert list(case.masks) == ["BrainStem"]
    assert case.annotated(["BrainStem", "Parotid_L", "Chiasm"]).tolist() == [True, False, False]


def test_aliases_resolved_unknown_files_logged_once(tmp_path, caplog):
    source = small_case()
    folder = write_pddca_case(source, tmp_path / "c1")
    structures = folder / "structures"
    (structures / "BrainStem.nrrd").rename(structures / "Brainstem.nrrd")
    (structures / "Parotid_L.nrrd").rename(structures / "LeftParotid.nrrd")
    write_image(source.masks["BrainStem"], structures / "Tumour.nrrd", source)
    write_image(source.masks["BrainStem"], structures / "Eye_L.nrrd", source)
    with caplog.at_level(logging.INFO, logger="hnseg_keras.data.pddca"):
        case = read_one(folder)
    assert sorted(case.masks) == ["BrainStem", "Parotid_L"]
    assert np.array_equal(case.masks["Parotid_L"], source.masks["Parotid_L"])
    unknown_lines = [r.getMessage() for r in caplog.records if "unknown structure" in r.getMessage()]
    assert len(unknown_lines) == 1 and "Tumour.nrrd" in unknown_lines[0] and "Eye_L.nrrd" in unknown_lines[0]


def test_only_requested_organs_are_kept(tmp_path):
    folder = write_pddca_case(small_case(), tmp_path / "c1")
    assert list(read_one(folder, organs=("Parotid_L",)).masks) == ["Parotid_L"]


def test_organ_map_applies_to_reading_as_to_describing(tmp_path):
    """``scan`` (describe) and ``prepare`` (read) match a PDDCA structure file through the same organ map."""
    source = small_case()
    folder = write_pddca_case(source, tmp_path / "c1")
    (folder / "structures" / "BrainStem.nrrd").rename(folder / "structures" / "Stem.nrrd")
    reading = layouts.Reading(organ_map={normalise("Stem"): "BrainStem", normalise("Parotid_L"): None})
    (ref,) = layouts.find_refs(folder, reading)
    assert layouts.describe(ref, reading)["organs"] == {"BrainStem": "Stem"}
    case = layouts.read_ref(ref, ("BrainStem", "Parotid_L"), reading)
    assert list(case.masks) == ["BrainStem"] and np.array_equal(case.masks["BrainStem"], source.masks["BrainStem"])


def test_mask_of_0_255_becomes_0_1(tmp_path):
    source = small_case()
    folder = write_pddca_case(Case("c1", source.ct, source.spacing, source.origin), tmp_path / "c1")
    write_image(source.masks["BrainStem"] * np.uint8(255), folder / "structures" / "BrainStem.nrrd", source)
    assert np.array_equal(read_one(folder).masks["BrainStem"], source.masks["BrainStem"])


def test_write_pddca_refuses_existing_folder(tmp_path):
    write_pddca_case(small_case(), tmp_path / "c1")
    with pytest.raises(HnsegError, match="already exists"):
        write_pddca_case(small_case(), tmp_path / "c1")
    other = small_case()
    other.ct = other.ct + np.int16(1)
    write_pddca_case(other, tmp_path / "c1", overwrite=True)
    assert np.array_equal(read_one(tmp_path / "c1").ct, other.ct)
    assert [p.name for p in tmp_path.iterdir()] == ["c1"]  # no temporary folders left


# ----------------------------------------------------------------------------- label maps


def label_array(case: Case, values: dict[str, int]) -> np.ndarray:
    labels = np.zeros(case.ct.shape, np.uint8)
    for name, value in values.items():
        labels[case.masks[name] > 0] = value
    return labels


@pytest.mark.parametrize("ct_name,label_name", [("ct.nii.gz", "labels.nii.gz"), ("ct.nrrd", "labels.nrrd")])
def test_image_file_and_label_map_round_trip(tmp_path, ct_name, label_name):
    source = small_case()
    sitk.WriteImage(reference_image(source), str(tmp_path / ct_name))
    values = {name: label_value(name) for name in source.masks}
    write_label_map(label_array(source, values), source, tmp_path / label_name)
    case = read_one(tmp_path / ct_name)
    assert case.case_id == "ct" and np.array_equal(case.ct, source.ct) and case.masks == {}  # no contours
    table = {value: name for name, value in values.items()}
    masks = read_label_map(tmp_path / label_name, read_image(tmp_path / ct_name), table, list(source.masks),
                           {0, *table})
    for name in source.masks:
        assert np.array_equal(masks[name], source.masks[name]), name


def test_label_map_table_semantics(tmp_path, caplog):
    source = small_case()
    sitk.WriteImage(reference_image(source), str(tmp_path / "ct.nrrd"))
    labels = label_array(source, {"BrainStem": 20, "Parotid_L": 30})
    labels[3, 5, 4] = 99  # a value the table does not map
    write_label_map(labels, source, tmp_path / "labels.nii.gz")
    ct_image = read_image(tmp_path / "ct.nrrd")
    table = {20: "BrainStem", 30: "Parotid_L", 40: "Chiasm"}
    with caplog.at_level(logging.INFO, logger="hnseg_keras.data.cases"):
        masks = read_label_map(tmp_path / "labels.nii.gz", ct_image, table, ("Chiasm", "Parotid_L", "BrainStem"),
                               {0, 20, 30, 40, 99})
    assert list(masks) == ["Chiasm", "Parotid_L", "BrainStem"]  # the requested order
    assert np.array_equal(masks["BrainStem"], source.masks["BrainStem"])
    assert np.array_equal(masks["Parotid_L"], source.masks["Parotid_L"])
    assert masks["Chiasm"].sum() == 0  # listed in the table: annotated, and empty
    assert any("[99]" in r.getMessage() for r in caplog.records)
    assert list(read_label_map(tmp_path / "labels.nii.gz", ct_image, table, ("BrainStem",), {0, 20, 30, 40, 99})) == [
        "BrainStem"]
    with pytest.raises(HnsegError, match=r"labels\.nii\.gz: holds label value\(s\) \[99\]"):
        read_label_map(tmp_path / "labels.nii.gz", ct_image, table, ("BrainStem",), {0, 20, 30, 40})


def test_write_label_map_is_atomic_and_refuses_overwrite(tmp_path):
    source = small_case()
    labels = label_array(source, {"BrainStem": 1})
    path = write_label_map(labels, source, tmp_path / "out.nrrd")
    with pytest.raises(HnsegError, match="out.nrrd: already exists"):
        write_label_map(labels * 2, source, path)
    write_label_map(labels * 2, source, path, overwrite=True)
    image = sitk.ReadImage(str(path))
    assert np.array_equal(sitk.GetArrayFromImage(image), labels * 2)
    assert image.GetOrigin() == pytest.approx(source.origin)
    assert [p.name for p in tmp_path.iterdir()] == ["out.nrrd"]
    with pytest.raises(HnsegError, match="out.png"):
        write_label_map(labels, source, tmp_path / "out.png")


# ----------------------------------------------------------------------------- DICOM


def test_dicom_round_trip_applies_rescale(tmp_path):
    source = small_case()
    folder = write_dicom_series(source, tmp_path / "dicom")
    assert len(list(folder.glob("*.dcm"))) == 4
    first = pydicom.dcmread(sorted(folder.glob("*.dcm"))[0])
    assert float(first.RescaleIntercept) == -1024.0
    assert np.array_equal(first.pixel_array.astype(int) - 1024, source.ct[0])  # stored != HU
    assert [float(v) for v in first.ImagePositionPatient] == pytest.approx(source.origin)
    back = read_one(folder)
    assert back.case_id == "dicom" and back.ct.dtype == np.int16
    assert np.array_equal(back.ct, source.ct)
    assert back.spacing == pytest.approx(source.spacing) and back.origin == pytest.approx(source.origin)


def test_dicom_slope_two(tmp_path):
    source = small_case()
    source.ct = (source.ct // 2 * 2).astype(np.int16)  # even HU: exact on a slope-2 grid
    folder = write_dicom_series(source, tmp_path / "dicom", rescale_slope=2.0)
    first = pydicom.dcmread(sorted(folder.glob("*.dcm"))[0])
    assert np.array_equal(first.pixel_array.astype(int) * 2 - 1024, source.ct[0])
    assert np.array_equal(read_one(folder).ct, source.ct)


def test_rt_utils_reads_written_series(tmp_path):
    rt_utils = pytest.importorskip("rt_utils")
    # rt-utils 1.2.x assumes Rows == Columns and equal row/column spacing (as in clinical CT).
    square = Case("sq", np.zeros((4, 8, 8), np.int16), (0.8, 0.8, 2.5), (-12.5, 30.25, -80.0))
    folder = write_dicom_series(square, tmp_path / "dicom")
    rtstruct = rt_utils.RTStructBuilder.create_new(dicom_series_path=str(folder))
    mask = np.zeros((8, 8, 4), bool)  # rt-utils order: rows (y), columns (x), slices (z)
    mask[1:5, 2:7, 1:3] = True
    rtstruct.add_roi(mask=mask, name="BrainStem")
    rtstruct.save(str(tmp_path / "rt.dcm"))
    reread = rt_utils.RTStructBuilder.create_from(str(folder), str(tmp_path / "rt.dcm"))
    assert np.array_equal(reread.get_roi_mask_by_name("BrainStem"), mask)


# ----------------------------------------------------------------------------- bad inputs


def _pddca_with_bad_mask(tmp_path, array=None, **geometry):
    source = small_case()
    folder = write_pddca_case(source, tmp_path / "c1")
    bad = source.masks["BrainStem"] if array is None else array
    write_image(bad, folder / "structures" / "BrainStem.nrrd", source, **geometry)
    return folder


BAD_MASKS = {
    "size": dict(array=np.zeros((4, 6, 4), np.uint8)),
    "spacing": dict(Spacing=(0.8, 0.7, 2.53)),
    "origin": dict(Origin=(-12.5, 30.25, -80.5)),
    "direction": dict(Direction=(-1.0, 0, 0, 0, 1, 0, 0, 0, 1)),
    "not binary": dict(array=np.arange(120, dtype=np.uint8).reshape(4, 6, 5) % 3),
    "NaN": dict(array=np.where(np.arange(120).reshape(4, 6, 5) == 7, np.nan, 0.0)),
}


@pytest.mark.parametrize("problem", list(BAD_MASKS))
def test_bad_mask_gives_one_line_error_naming_file(tmp_path, problem):
    folder = _pddca_with_bad_mask(tmp_path, **BAD_MASKS[problem])
    with pytest.raises(HnsegError) as error:
        read_one(folder)
    message = str(error.value)
    assert "BrainStem.nrrd" in message and "\n" not in message
    assert problem.split()[-1].lower() in message.lower()


def test_geometry_within_tolerance_is_accepted(tmp_path):
    folder = _pddca_with_bad_mask(tmp_path, Origin=(-12.503, 30.25, -80.0), Spacing=(0.8002, 0.7, 2.5))
    assert "BrainStem" in read_one(folder).masks


def test_bad_ct_inputs(tmp_path):
    source = small_case()
    nan_ct = source.ct.astype(np.float32)
    nan_ct[2, 3, 1] = np.inf
    write_image(nan_ct, tmp_path / "inf.nrrd", source)
    with pytest.raises(HnsegError, match=r"inf\.nrrd: 1 NaN/inf voxels"):
        read_one(tmp_path / "inf.nrrd")
    sitk.WriteImage(sitk.GetImageFromArray(source.ct[0]), str(tmp_path / "flat.nrrd"))
    with pytest.raises(HnsegError, match=r"flat\.nrrd: image is 2D"):
        read_one(tmp_path / "flat.nrrd")
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image at all")
    with pytest.raises(HnsegError, match=r"junk\.nii\.gz: unreadable"):
        read_one(tmp_path / "junk.nii.gz")


def test_truncated_file(tmp_path):
    folder = write_pddca_case(small_case(), tmp_path / "c1")
    img = folder / "img.nrrd"
    data = img.read_bytes()
    img.write_bytes(data[: len(data) - 30])
    with pytest.raises(HnsegError, match=r"img\.nrrd: unreadable or truncated"):
        read_one(folder)


def test_case_folder_without_img_and_missing_path(tmp_path):
    folder = write_pddca_case(small_case(), tmp_path / "c1")
    (folder / "img.nrrd").unlink()
    with pytest.raises(HnsegError, match=r"c1: case folder has no img\.nrrd"):
        read_one(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HnsegError, match="empty: no cases found"):
        read_one(tmp_path / "empty")
    with pytest.raises(HnsegError, match="nowhere: no such file"):
        read_one(tmp_path / "nowhere")
    with pytest.raises(HnsegError, match="layout 'pdf' is unknown"):
        read_one(tmp_path / "c1", layout="pdf")


# ----------------------------------------------------------------------------- finding cases


def test_pddca_cases_with_split_hints(tmp_path):
    for relative in ("flat1", "train/a", "val/b", "validation/c", "test/d"):
        write_pddca_case(small_case(relative.split("/")[-1]), tmp_path / relative)
    (tmp_path / "train" / "notes").mkdir()  # no img.nrrd, no structures/: not a case
    refs = layouts.find_refs(tmp_path)
    assert [(r.case_id, r.split) for r in refs] == [
        ("flat1", None), ("a", "train"), ("c", "validation"), ("b", "validation"), ("d", "test"),
    ]
    assert refs[1].path == tmp_path / "train" / "a"
    assert [r.case_id for r in layouts.find_refs(tmp_path / "train" / "a")] == ["a"]


def test_duplicate_case_ids_and_bad_root(tmp_path):
    write_pddca_case(small_case("x"), tmp_path / "train" / "x")
    write_pddca_case(small_case("x"), tmp_path / "test" / "x")
    with pytest.raises(HnsegError, match="case id 'x'"):
        layouts.find_refs(tmp_path)
    with pytest.raises(HnsegError, match="nothing: no such file or folder"):
        layouts.find_refs(tmp_path / "nothing")


def test_every_layout_module_has_the_reader_functions():
    """Adding a layout is one module with these four functions plus its line in ``layouts.LAYOUTS``."""
    for name, module in layouts.LAYOUTS.items():
        assert all(callable(getattr(module, function, None)) for function in ("detect", "find", "describe", "read")), name


# ----------------------------------------------------------------------------- organ names and user organs


@pytest.mark.parametrize("name, organ", [
    ("Brainstem", "BrainStem"), ("Brain Stem", "BrainStem"), ("BRAIN-STEM", "BrainStem"), ("OpticChiasm", "Chiasm"),
    ("Bone_Mandible", "Mandible"), ("OpticNrv_L", "OpticNerve_L"), ("Optic Nerve Rt", "OpticNerve_R"),
    ("PAROTID LT", "Parotid_L"), ("Rt Parotid", "Parotid_R"), ("Parotid_Right", "Parotid_R"),
    ("L Parotid", "Parotid_L"), ("ParotidLt", "Parotid_L"), ("Glnd_Submand_L", "Submandibular_L"),
    ("Submandibular Right", "Submandibular_R"), ("Cord", "SpinalCord"), ("SpinalCord", "SpinalCord"),
    ("larynx", "Larynx"), ("Esophagus", "Esophagus"),
    ("External", None), ("PTV_70", None), ("z_opt", None), ("Ring_PTV70", None), ("Parotid_L_PRV", None),
    ("Parotids", None), ("Heart", None), ("Lt", None), ("Parotid", None),
])
def test_structure_names_match_organs_or_nothing(name, organ):
    from hnseg_keras.data.organs import match_organ

    assert match_organ(name) == organ


def test_organs_file_adds_organs_and_checks_them(tmp_path):
    from hnseg_keras.data.organs import catalogue_from, definitions, match_organ, read_organs_file

    path = tmp_path / "organs.json"
    path.write_text(json.dumps({"organs": [{"name": "Lens_L", "partner": "Lens_R"}, {"name": "Lens_R",
                                                                                   "partner": "Lens_L"}]}))
    catalogue = read_organs_file(path)
    assert (catalogue["Lens_L"].label, catalogue["Lens_R"].label) == (13, 14)  # next free label values
    assert match_organ("LENS LT", catalogue) == "Lens_L" and match_organ("LENS LT") is None
    assert catalogue_from(definitions(["BrainStem", "Lens_L", "Lens_R"], catalogue))["Lens_R"] == catalogue["Lens_R"]
    for entries, message in [([{"name": "Lens_L", "partner": "Lens_X"}], "partner 'Lens_X' is not defined"),
                             ([{"name": "Lens_L", "label": 1}], "share label 1"),
                             ([{"name": "Lens_L", "colour": [1, 2]}], "three integers"),
                             ([{"name": "Lens_L", "size": 3}], "unknown key")]:
        path.write_text(json.dumps({"organs": entries}))
        with pytest.raises(HnsegError, match=message):
            read_organs_file(path)
