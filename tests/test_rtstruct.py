"""RTSTRUCT files a planning system imports: predict's structure set passes the RT Structure Set IOD against
its CT, names ROIs by the catalogue or TG-263, and one that fails the IOD is never written.

The predictions come from the oracle model of test_prediction, so every ROI and contour is known to exist.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from own_data_builders import write_dicom_series
from pydicom.uid import generate_uid
from test_prediction import ORGANS, oracle_case, oracle_file  # noqa: F401  (oracle_file is a fixture)

from hnseg_keras.cli import main
from hnseg_keras.data import organs
from hnseg_keras.errors import HnsegError
from hnseg_keras.inference import rtstruct
from hnseg_keras.inference.prediction import Segmentation

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def predict_dicom(folder, model, *options) -> tuple[pydicom.Dataset, list[pydicom.Dataset]]:
    """`hnseg predict` on the oracle phantom written as a DICOM series: (its RTSTRUCT, the CT's datasets)."""
    case, _ = oracle_case("dicom_case")
    series = write_dicom_series(case, folder / "dicom_case")
    assert main(["predict", str(series), "--model", str(model), "--out", str(folder / "pred"), *options]) == 0
    cts = [pydicom.dcmread(path) for path in sorted(series.iterdir())]
    return pydicom.dcmread(folder / "pred" / "dicom_case_rtstruct.dcm"), cts


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, oracle_file):  # noqa: F811
    return predict_dicom(tmp_path_factory.mktemp("rtstruct"), oracle_file)


@pytest.mark.parametrize("style", ["catalogue", "tg263"])
def test_predicted_rtstruct_passes_the_iod_with_organ_rois(style, predicted, tmp_path,
                                                           oracle_file):  # noqa: F811
    if style == "catalogue":
        ds, cts = predicted
    else:
        ds, cts = predict_dicom(tmp_path, oracle_file, "--roi-names", style)
    assert rtstruct.validate_rtstruct(ds, cts) == []
    expected = {organ: organ if style == "catalogue" else organs.TG263_NAMES[organ] for organ in ORGANS}
    assert expected["BrainStem"] == ("BrainStem" if style == "catalogue" else "Brainstem")
    names = {int(roi.ROINumber): str(roi.ROIName) for roi in ds.StructureSetROISequence}
    assert sorted(names.values()) == sorted(expected.values())
    for observation in ds.RTROIObservationsSequence:
        assert observation.RTROIInterpretedType == "ORGAN" and "ROIInterpreter" in observation
    organ_of = {name: organ for organ, name in expected.items()}
    for contour in ds.ROIContourSequence:  # colours stay the catalogue's, whatever the names
        organ = organ_of[names[int(contour.ReferencedROINumber)]]
        assert tuple(int(c) for c in contour.ROIDisplayColor) == organs.colour_of(organ)
    # the readers map the TG-263 names back to the organs
    assert all(organs.match_organ(name) == organ for organ, name in expected.items())


def test_roi_names_known_answers():
    assert set(organs.TG263_NAMES) == set(organs.CATALOGUE)
    chosen = ("Mandible", "Chiasm", "OpticNerve_R", "Submandibular_L", "Larynx")
    assert [organs.roi_name(organ, "tg263") for organ in chosen] == [
        "Bone_Mandible", "OpticChiasm", "OpticNrv_R", "Glnd_Submand_L", "Larynx"]
    assert organs.roi_name("Mandible", "catalogue") == "Mandible"
    own = organs.with_organs([organs.Organ("Cochlea_L", 20)])
    assert organs.roi_name("Cochlea_L", "tg263", own) == "Cochlea_L"  # no TG-263 entry: keeps its name
    with pytest.raises(HnsegError, match="'Cochlea_L'"):
        organs.roi_name("Cochlea_L", "tg263")
    with pytest.raises(HnsegError, match="'rtog'"):
        organs.roi_name("Mandible", "rtog")


def _contour(ds):
    return ds.ROIContourSequence[0].ContourSequence[0]


def _shorten_contour(ds):
    _contour(ds).ContourData = _contour(ds).ContourData[:-1]


def _renumber(ds):
    """ROI 2 (its contours and observation too) numbered 1, like ROI 1."""
    for item in (ds.StructureSetROISequence[1], ds.ROIContourSequence[1], ds.RTROIObservationsSequence[1]):
        setattr(item, "ROINumber" if "ROINumber" in item else "ReferencedROINumber", 1)


def _set(keyword, value, *where):
    """A change that sets ``keyword`` of the item reached by ``where`` (sequence, index, ...) of a dataset."""
    def change(ds):
        item = ds
        for sequence, index in zip(where[::2], where[1::2], strict=True):
            item = item[sequence][index]
        setattr(item, keyword, value)
    return change


CONTOUR = "ROI Contour: ROIContourSequence[0].ContourSequence[0]."
BROKEN = {
    "no label": (lambda ds: delattr(ds, "StructureSetLabel"),
                 "Structure Set: StructureSetLabel (Type 1) is missing"),
    "empty label": (_set("StructureSetLabel", ""), "Structure Set: StructureSetLabel (Type 1) is empty"),
    "no patient name": (lambda ds: delattr(ds, "PatientName"), "Patient: PatientName (Type 2) is missing"),
    "wrong modality": (_set("Modality", "CT"), "RT Series: Modality is 'CT', expected 'RTSTRUCT'"),
    "short contour": (_shorten_contour,
                      CONTOUR + "ContourData has {n} values, expected 3 * NumberOfContourPoints = {m}"),
    "no geometric type": (lambda ds: delattr(_contour(ds), "ContourGeometricType"),
                          CONTOUR + "ContourGeometricType (Type 1) is missing"),
    "observation of no ROI": (_set("ReferencedROINumber", 99, "RTROIObservationsSequence", 1),
                              "RT ROI Observations: RTROIObservationsSequence[1].ReferencedROINumber 99 "
                              "names no ROI of StructureSetROISequence"),
    "repeated ROI number": (_renumber, "Structure Set: ROINumber 1 is used more than once"),
    "colour out of range": (_set("ROIDisplayColor", [0, 0, 300], "ROIContourSequence", 2),
                            "ROI Contour: ROIContourSequence[2].ROIDisplayColor [0, 0, 300] is not three "
                            "values 0-255"),
    "no interpreter": (lambda ds: delattr(ds.RTROIObservationsSequence[0], "ROIInterpreter"),
                       "RT ROI Observations: RTROIObservationsSequence[0].ROIInterpreter (Type 2) is "
                       "missing"),
    "wrong SOP class": (_set("SOPClassUID", CT_IMAGE_STORAGE),
                        f"SOP Common: SOPClassUID is '{CT_IMAGE_STORAGE}', expected "
                        f"'{rtstruct.RT_STRUCTURE_SET_STORAGE}'"),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_each_broken_dataset_gives_its_known_problem(broken, predicted):
    good, cts = predicted
    ds = pydicom.dcmread(good.filename)
    n = len(_contour(ds).ContourData)
    change, problem = BROKEN[broken]
    change(ds)
    expected = [problem.format(n=n - 1, m=n)]
    if broken == "wrong SOP class":  # the file meta then names another class than the dataset
        expected.append(f"File Meta: MediaStorageSOPClassUID {rtstruct.RT_STRUCTURE_SET_STORAGE} differs "
                        f"from SOPClassUID {CT_IMAGE_STORAGE}")
    assert rtstruct.validate_rtstruct(ds) == expected
    assert rtstruct.validate_rtstruct(ds, cts) == expected


def test_a_frame_of_reference_or_image_not_the_cts_is_found_against_the_ct(predicted):
    good, cts = predicted
    ds = pydicom.dcmread(good.filename)
    uid, ct_uid = generate_uid(), cts[0].FrameOfReferenceUID
    ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = uid
    for roi in ds.StructureSetROISequence:
        roi.ReferencedFrameOfReferenceUID = uid
    assert rtstruct.validate_rtstruct(ds) == []  # consistent in itself
    not_the_cts = f"{uid} is not the CT's FrameOfReferenceUID {ct_uid}"
    assert rtstruct.validate_rtstruct(ds, cts) == [
        f"Frame of Reference: ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID {not_the_cts}",
        *(f"Frame of Reference: StructureSetROISequence[{i}].ReferencedFrameOfReferenceUID {not_the_cts}"
          for i in range(len(ORGANS)))]
    ds = pydicom.dcmread(good.filename)
    image = _contour(ds).ContourImageSequence[0]
    image.ReferencedSOPInstanceUID = generate_uid()
    assert rtstruct.validate_rtstruct(ds, cts) == [
        "Structure Set: ROIContourSequence[0].ContourSequence[0].ContourImageSequence[0]."
        f"ReferencedSOPInstanceUID {image.ReferencedSOPInstanceUID} is not an image of the CT"]


@pytest.mark.parametrize("breakage, problem", [
    ("label", "Structure Set: StructureSetLabel (Type 1) is missing"),
    ("uncompleted", "General Study: ReferringPhysicianName (Type 2) is missing; 2 more"),
])
def test_write_rtstruct_refuses_a_structure_set_that_fails_the_iod(breakage, problem, tmp_path, monkeypatch):
    case, truth = oracle_case("broken")
    series = write_dicom_series(case, tmp_path / "ct")
    seg = Segmentation(case.case_id, ORGANS, np.stack([truth[o].astype(bool) for o in ORGANS]),
                       np.zeros(case.ct.shape, np.uint8), 0.0, case.ct.shape[0])
    if breakage == "label":
        monkeypatch.setattr(rtstruct, "stamp_software", lambda ds: delattr(ds, "StructureSetLabel"))
    else:  # rt-utils' own output, without what complete_iod adds
        monkeypatch.setattr(rtstruct, "complete_iod", lambda ds, ct: None)
    path = tmp_path / "out" / "broken_rtstruct.dcm"
    with pytest.raises(HnsegError) as raised:
        rtstruct.write_rtstruct(seg, case, series, path)
    assert str(raised.value) == (f"{path}: the RTSTRUCT fails the RT Structure Set IOD ({problem}); "
                                 "nothing written")
    assert list(path.parent.iterdir()) == []  # no file, no temporary


def test_predict_writes_nothing_when_the_rtstruct_fails(tmp_path, oracle_file, monkeypatch,  # noqa: F811
                                                        capsys):
    monkeypatch.setattr(rtstruct, "complete_iod", lambda ds, ct: None)
    case, _ = oracle_case("dicom_case")
    series = write_dicom_series(case, tmp_path / "dicom_case")
    out = tmp_path / "pred"
    assert main(["predict", str(series), "--model", str(oracle_file), "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "the RTSTRUCT fails the RT Structure Set IOD (General Study: ReferringPhysicianName" in err
    assert [p for p in out.rglob("*") if p.is_file()] == []
