"""DICOM RTSTRUCT output that planning systems import: rt-utils draws the contours, this module completes
what rt-utils leaves out of the RT Structure Set IOD and checks the result against the IOD before a file
is written, since a planning system refuses (or, worse, half-imports) a structure set that misses a
required attribute or references a CT it cannot find.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom

from hnseg_keras.data.cases import Case
from hnseg_keras.data.organs import colour_of, roi_name
from hnseg_keras.errors import HnsegError
from hnseg_keras.files import atomic_path

if TYPE_CHECKING:
    from hnseg_keras.inference.prediction import Segmentation

log = logging.getLogger(__name__)
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
_REFERENCED_IMAGES = ("ReferencedFrameOfReferenceSequence/RTReferencedStudySequence/"
                      "RTReferencedSeriesSequence/ContourImageSequence")
_CONTOUR_IMAGES = "ROIContourSequence/ContourSequence/ContourImageSequence"

# (module, attribute, type) of the RT Structure Set IOD (DICOM PS3.3 A.19): Type 1 present and not empty,
# Type 2 present (may be empty). "A/B" is attribute B of every item of sequence A.
IOD: tuple[tuple[str, str, int], ...] = (
    ("Patient", "PatientName", 2),
    ("Patient", "PatientID", 2),
    ("Patient", "PatientBirthDate", 2),
    ("Patient", "PatientSex", 2),
    ("General Study", "StudyInstanceUID", 1),
    ("General Study", "StudyDate", 2),
    ("General Study", "StudyTime", 2),
    ("General Study", "ReferringPhysicianName", 2),
    ("General Study", "StudyID", 2),
    ("General Study", "AccessionNumber", 2),
    ("RT Series", "Modality", 1),
    ("RT Series", "SeriesInstanceUID", 1),
    ("RT Series", "SeriesNumber", 2),
    ("RT Series", "OperatorsName", 2),
    ("General Equipment", "Manufacturer", 2),
    ("Structure Set", "StructureSetLabel", 1),
    ("Structure Set", "StructureSetDate", 2),
    ("Structure Set", "StructureSetTime", 2),
    ("Structure Set", "ReferencedFrameOfReferenceSequence/FrameOfReferenceUID", 1),
    ("Structure Set", f"{_REFERENCED_IMAGES}/ReferencedSOPClassUID", 1),
    ("Structure Set", f"{_REFERENCED_IMAGES}/ReferencedSOPInstanceUID", 1),
    ("Structure Set", "StructureSetROISequence", 1),
    ("Structure Set", "StructureSetROISequence/ROINumber", 1),
    ("Structure Set", "StructureSetROISequence/ReferencedFrameOfReferenceUID", 1),
    ("Structure Set", "StructureSetROISequence/ROIName", 2),
    ("Structure Set", "StructureSetROISequence/ROIGenerationAlgorithm", 2),
    ("ROI Contour", "ROIContourSequence", 1),
    ("ROI Contour", "ROIContourSequence/ReferencedROINumber", 1),
    ("ROI Contour", "ROIContourSequence/ContourSequence/ContourGeometricType", 1),
    ("ROI Contour", "ROIContourSequence/ContourSequence/NumberOfContourPoints", 1),
    ("ROI Contour", "ROIContourSequence/ContourSequence/ContourData", 1),
    ("ROI Contour", f"{_CONTOUR_IMAGES}/ReferencedSOPClassUID", 1),
    ("ROI Contour", f"{_CONTOUR_IMAGES}/ReferencedSOPInstanceUID", 1),
    ("RT ROI Observations", "RTROIObservationsSequence", 1),
    ("RT ROI Observations", "RTROIObservationsSequence/ObservationNumber", 1),
    ("RT ROI Observations", "RTROIObservationsSequence/ReferencedROINumber", 1),
    ("RT ROI Observations", "RTROIObservationsSequence/RTROIInterpretedType", 2),
    ("RT ROI Observations", "RTROIObservationsSequence/ROIInterpreter", 2),
    ("SOP Common", "SOPClassUID", 1),
    ("SOP Common", "SOPInstanceUID", 1),
)
# Attributes the IOD fixes to one value.
FIXED = {"Modality": ("RT Series", "RTSTRUCT"), "SOPClassUID": ("SOP Common", RT_STRUCTURE_SET_STORAGE)}


def write_rtstruct(seg: Segmentation, case: Case, series_dir, path: Path, force: bool = False,
                   roi_names: str = "catalogue") -> Path:
    """DICOM RTSTRUCT (rt-utils) of the non-empty organs, referencing the CT series in ``series_dir``
    (a folder holding one series, or the series' files: ``CaseInput.series_files``).

    ROIs are named in the ``roi_names`` style (``organs.roi_name``) and coloured as in the catalogue.
    rt-utils wants masks [rows, cols, slices] with slices in its own order (sorted along the slice
    normal); each of its slices is matched to a z index of ``case`` by ImagePositionPatient. The file is
    read back and checked against the RT Structure Set IOD before it is renamed into place.
    """
    from hnseg_keras.data.dicom import new_rtstruct

    if path.exists() and not force:
        raise HnsegError(f"{path}: already exists; choose another --out or pass --force")
    names = {name: roi_name(name, roi_names, seg.catalogue) for name in seg.organs}
    try:
        rtstruct = new_rtstruct(series_dir)
    except Exception as error:  # noqa: BLE001  (rt-utils raises bare Exception)
        raise HnsegError(f"{case.case_id}: rt-utils cannot read the DICOM series ({error})") from None
    order = series_z_indices(rtstruct.series_data, case)
    for o, name in enumerate(seg.organs):
        if seg.masks[o].any():
            volume = np.moveaxis(seg.masks[o][order], 0, -1)  # [rows, cols, slices] = [Y, X, rt order]
            rtstruct.add_roi(mask=volume, name=names[name], color=list(colour_of(name, seg.catalogue)),
                             description="hnseg-keras prediction")
    rtstruct.set_series_description("hnseg-keras prediction")
    stamp_software(rtstruct.ds)
    complete_iod(rtstruct.ds, rtstruct.series_data[0])
    with atomic_path(path) as temp:
        rtstruct.ds.save_as(str(temp))
        problems = validate_rtstruct(pydicom.dcmread(temp), rtstruct.series_data)
        if problems:
            more = f"; {len(problems) - 1} more" if len(problems) > 1 else ""
            raise HnsegError(f"{path}: the RTSTRUCT fails the RT Structure Set IOD ({problems[0]}{more}); "
                             "nothing written")
    return path


def stamp_software(ds) -> None:
    """Name hnseg-keras (and its version) as the software that made an RTSTRUCT, not the rt-utils defaults."""
    from hnseg_keras import __version__

    ds.Manufacturer = "hnseg-keras"
    ds.ManufacturerModelName = "hnseg-keras"
    ds.SoftwareVersions = __version__
    ds.InstitutionName = ""


def complete_iod(ds, ct) -> None:
    """Add what rt-utils leaves out: the study's Type 2 attributes (the CT's, since the structure set joins
    the CT's study), an empty OperatorsName, and ORGAN as each ROI's interpreted type (rt-utils leaves it
    empty, which planning systems read as "unknown type")."""
    for keyword in ("ReferringPhysicianName", "AccessionNumber"):
        setattr(ds, keyword, getattr(ct, keyword, ""))
    ds.OperatorsName = ""
    for observation in ds.RTROIObservationsSequence:
        observation.RTROIInterpretedType = "ORGAN"
        observation.ROIInterpreter = ""


def validate_rtstruct(ds: pydicom.Dataset, series_data: Sequence[pydicom.Dataset] | None = None) -> list[str]:
    """Problems of ``ds`` against the RT Structure Set IOD's required attributes (``IOD``, ``FIXED``, ROI
    numbers and references, contour lengths, colours, file meta), as "<module>: <attribute> <problem>".

    With ``series_data`` (the CT's datasets) also: the frame of reference is the CT's and every referenced
    image is one of the CT's. An empty list means valid.
    """
    problems = []
    for module, attribute, kind in IOD:
        *sequences, keyword = attribute.split("/")
        for where, item in _items(ds, sequences):
            if keyword not in item:
                problems.append(f"{module}: {where}{keyword} (Type {kind}) is missing")
            elif kind == 1 and item[keyword].is_empty:
                problems.append(f"{module}: {where}{keyword} (Type 1) is empty")
    for keyword, (module, value) in FIXED.items():
        if keyword in ds and not ds[keyword].is_empty and ds[keyword].value != value:
            problems.append(f"{module}: {keyword} is {ds[keyword].value!r}, expected {value!r}")
    problems += _reference_problems(ds) + _contour_problems(ds) + _file_meta_problems(ds)
    if series_data is not None:
        problems += _series_problems(ds, series_data)
    return problems


def _items(ds, sequences: Sequence[str]) -> list[tuple[str, pydicom.Dataset]]:
    """("Seq[i].Sub[j].", item) for every item reached through ``sequences`` (just ("", ds) for none)."""
    found = [("", ds)]
    for keyword in sequences:
        found = [(f"{where}{keyword}[{i}].", child) for where, parent in found
                 for i, child in enumerate(parent.get(keyword) or ())]
    return found


def _number(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _reference_problems(ds) -> list[str]:
    """ROI numbers unique; every contour and observation names an ROI; ROIs on a listed frame of reference."""
    problems = []
    numbers = [_number(item.get("ROINumber")) for item in ds.get("StructureSetROISequence") or ()]
    numbers = [n for n in numbers if n is not None]
    repeated = sorted({n for n in numbers if numbers.count(n) > 1})
    if repeated:
        problems.append(f"Structure Set: ROINumber {', '.join(map(str, repeated))} is used more than once")
    referring = (("ROI Contour", "ROIContourSequence"), ("RT ROI Observations", "RTROIObservationsSequence"))
    for module, sequence in referring:
        for where, item in _items(ds, [sequence]):
            number = item.get("ReferencedROINumber")
            if number is not None and str(number) != "" and _number(number) not in numbers:
                problems.append(f"{module}: {where}ReferencedROINumber {number} names no ROI of "
                                "StructureSetROISequence")
    frames = {str(item.get("FrameOfReferenceUID"))
              for item in ds.get("ReferencedFrameOfReferenceSequence") or ()}
    for where, item in _items(ds, ["StructureSetROISequence"]) if frames else ():
        uid = item.get("ReferencedFrameOfReferenceUID")
        if uid and str(uid) not in frames:
            problems.append(f"Structure Set: {where}ReferencedFrameOfReferenceUID {uid} is not in "
                            "ReferencedFrameOfReferenceSequence")
    return problems


def _contour_problems(ds) -> list[str]:
    """Display colours are three values 0-255; ContourData holds 3 * NumberOfContourPoints values."""
    problems = []
    for where, item in _items(ds, ["ROIContourSequence"]):
        if "ROIDisplayColor" in item:
            colour = [_number(v) for v in item.get("ROIDisplayColor") or ()]
            if len(colour) != 3 or not all(v is not None and 0 <= v <= 255 for v in colour):
                problems.append(f"ROI Contour: {where}ROIDisplayColor {item.ROIDisplayColor} is not three "
                                "values 0-255")
    for where, contour in _items(ds, ["ROIContourSequence", "ContourSequence"]):
        points, data = _number(contour.get("NumberOfContourPoints")), contour.get("ContourData")
        if points is not None and data is not None and len(data) != 3 * points:
            problems.append(f"ROI Contour: {where}ContourData has {len(data)} values, expected 3 * "
                            f"NumberOfContourPoints = {3 * points}")
    return problems


def _file_meta_problems(ds) -> list[str]:
    """The file meta information names the dataset's own SOP class and instance and a transfer syntax."""
    meta = getattr(ds, "file_meta", None)
    if not meta:
        return ["File Meta: the file meta information is missing"]
    problems = [] if meta.get("TransferSyntaxUID") else ["File Meta: TransferSyntaxUID is missing"]
    for keyword, own in (("MediaStorageSOPClassUID", "SOPClassUID"),
                         ("MediaStorageSOPInstanceUID", "SOPInstanceUID")):
        if meta.get(keyword) != ds.get(own):
            problems.append(f"File Meta: {keyword} {meta.get(keyword)} differs from {own} {ds.get(own)}")
    return problems


def _series_problems(ds, series_data: Sequence[pydicom.Dataset]) -> list[str]:
    """The structure set's frames of reference are the CT's; every referenced image is one of the CT's."""
    problems = []
    ct_frames = {str(ct.get("FrameOfReferenceUID")) for ct in series_data}
    ct_images = {str(ct.get("SOPInstanceUID")) for ct in series_data}
    frames = [("", "FrameOfReferenceUID"), ("ReferencedFrameOfReferenceSequence", "FrameOfReferenceUID"),
              ("StructureSetROISequence", "ReferencedFrameOfReferenceUID")]
    for sequence, keyword in frames:
        for where, item in _items(ds, [sequence] if sequence else []):
            uid = item.get(keyword)
            if uid and str(uid) not in ct_frames:
                problems.append(f"Frame of Reference: {where}{keyword} {uid} is not the CT's "
                                f"FrameOfReferenceUID {', '.join(sorted(ct_frames))}")
    for path in (_REFERENCED_IMAGES, _CONTOUR_IMAGES):
        for where, item in _items(ds, path.split("/")):
            uid = item.get("ReferencedSOPInstanceUID")
            if uid and str(uid) not in ct_images:
                problems.append(f"Structure Set: {where}ReferencedSOPInstanceUID {uid} is not an image of "
                                "the CT")
    return problems


def series_z_indices(series_data: Sequence, case: Case) -> np.ndarray:
    """z index of ``case`` for each DICOM slice dataset, from ImagePositionPatient and the case geometry."""
    depth, rows, cols = case.ct.shape
    if len(series_data) != depth:
        raise HnsegError(f"case {case.case_id}: the DICOM folder holds {len(series_data)} images but the CT "
                         f"has {depth} slices; keep one CT series per folder")
    direction = np.asarray(case.direction, dtype=np.float64).reshape(3, 3)
    to_index = np.linalg.inv(direction @ np.diag(case.spacing))
    order = []
    for ds in series_data:
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise HnsegError(f"case {case.case_id}: DICOM image {ds.Rows}x{ds.Columns} differs from the "
                             f"CT's {rows}x{cols}; keep one CT series per folder")
        index = to_index @ (np.asarray(ds.ImagePositionPatient, dtype=np.float64) - np.asarray(case.origin))
        z = int(round(index[2]))
        if not 0 <= z < depth or np.abs(index - [0, 0, z]).max() > 0.1:
            raise HnsegError(f"case {case.case_id}: a DICOM slice at {list(ds.ImagePositionPatient)} is off "
                             "the CT grid; keep one CT series per folder")
        order.append(z)
    if len(set(order)) != depth:
        raise HnsegError(f"case {case.case_id}: DICOM slice positions repeat; keep one CT series per "
                         "folder")
    if not np.isclose(case.spacing[0], case.spacing[1], rtol=1e-4):
        log.warning("case %s has non-square pixels %s; rt-utils assumes square pixels, so check the RTSTRUCT "
                    "contours", case.case_id, case.spacing[:2])
    return np.asarray(order)
