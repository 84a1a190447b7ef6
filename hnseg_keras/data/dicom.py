"""DICOM trees: find each patient's CT series and RTSTRUCT, check the geometry, read both.

A patient folder may hold its files at any depth and under any names; what a file is comes from
its header only. The CT series is the one the RTSTRUCT references; without an RTSTRUCT a single
image series is taken, and several are an error unless ``series`` names one. Every check here
reads headers only, so a bad case is refused before anything is written.

RTSTRUCT contours are rasterised with rt-utils onto the CT grid (polygon fill per slice, holes
included). Contours that do not name their CT slice (ContourImageSequence is optional) are given
the slice at their z position first.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from hnseg_keras.data import cases, orientation
from hnseg_keras.data import organs as organ_catalogue
from hnseg_keras.data.cases import Case, CaseRef, Reading
from hnseg_keras.errors import HnsegError

RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
HEADER_TAGS = ("Modality", "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "SeriesDescription", "PatientID",
               "StudyInstanceUID", "ImageType",
               "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "PatientPosition")
# Supine positions: the direction cosines place the anatomy, so orientation.canonical_case handles them.
SUPINE_POSITIONS = ("HFS", "FFS")
POSITION_NAMES = {"HFP": "head first, prone", "FFP": "feet first, prone", "HFDR": "head first, decubitus right",
                  "HFDL": "head first, decubitus left", "FFDR": "feet first, decubitus right",
                  "FFDL": "feet first, decubitus left"}
ORIENTATION_ATOL = 1e-4
POSITION_ATOL_MM = 0.05  # duplicate slices, in-plane drift of the slice origins
SPACING_RTOL = 0.01  # spacing between neighbours may vary by 1 % of the median (or 0.01 mm)
SERIES_FOLDER = re.compile(r"^([\d.]+|ct|rt|rs|rtss|rtstruct|dicom|images?|(series|study|scan)[\w.-]*|s\d+)$",
                           re.IGNORECASE)  # names of folders inside one patient
GAP_FACTOR = 1.5  # a step this many times the median spacing is a missing slice


@dataclass(frozen=True)
class Series:
    """One image series of a patient: files in header order (unsorted)."""

    uid: str
    modality: str
    description: str
    files: tuple[Path, ...]

    def label(self) -> str:
        return f"{self.uid} ({self.modality}, {len(self.files)} files{', ' + self.description if self.description else ''})"


@dataclass(frozen=True)
class Geometry:
    """Checked geometry of a series: files sorted along the slice normal, size (x, y, z), spacing (x, y, z) mm,
    direction cosines (9, row-major: columns are the row, column and slice directions) and PatientPosition."""

    files: tuple[Path, ...]
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    position: str = ""


@dataclass(frozen=True)
class DicomPatient:
    """What a patient folder holds once its series is chosen and checked."""

    case_id: str
    folder: Path
    series: Series
    geometry: Geometry
    rtstruct: Path | None


# ----------------------------------------------------------------------------- discovery


def is_dicom_file(path: Path) -> bool:
    """A Part-10 file (``DICM`` after the 128-byte preamble)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files(folder: Path, first_only: bool = False) -> list[Path]:
    """Part-10 files under ``folder`` at any depth (hidden names skipped), sorted by path."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if not name.startswith(".") and is_dicom_file(path):
                found.append(path)
                if first_only:
                    return found
    return found


def _header(path: Path) -> pydicom.Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None


def find_patients(root: Path) -> list[Path]:
    """Patient folders of a DICOM tree: ``root`` itself when it is one patient, else its subfolders with DICOM.

    ``root`` is one patient when it holds DICOM files directly, when its only DICOM subfolder has a
    study/series-like name (a UID, ``CT``, ``RTSTRUCT``, ...), or when its DICOM subfolders carry one
    PatientID and either one study or a subfolder with no images (``CT/`` + ``RTSTRUCT/``). Patients
    anonymised to one PatientID still differ by study.
    """
    if any(p.is_file() and is_dicom_file(p) for p in root.iterdir()):
        return [root]
    subfolders = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    holders = [(p, dicom_files(p, first_only=True)) for p in subfolders]
    holders = [(p, _header(files[0])) for p, files in holders if files]
    if not holders:
        return []
    if len(holders) == 1:
        return [root] if SERIES_FOLDER.match(holders[0][0].name) else [holders[0][0]]
    patient_ids = {str(header.get("PatientID", "")) for _, header in holders if header is not None}
    studies = {str(header.get("StudyInstanceUID", "")) for _, header in holders if header is not None}
    imageless = any(header is not None and "ImagePositionPatient" not in header for _, header in holders)
    if len(patient_ids) == 1 and (len(studies) == 1 or imageless):
        return [root]
    return [p for p, _ in holders]


def scan_patient(folder: Path) -> tuple[list[Series], list[Path]]:
    """(image series, RTSTRUCT files) found under a patient folder."""
    by_uid: dict[str, list] = {}
    rtstructs = []
    for path in dicom_files(folder):
        header = _header(path)
        if header is None:
            continue
        if str(header.get("SOPClassUID", "")) == RTSTRUCT_CLASS or header.get("Modality") == "RTSTRUCT":
            rtstructs.append(path)
        elif "ImagePositionPatient" in header and "SeriesInstanceUID" in header and not _is_localizer(header):
            by_uid.setdefault(str(header.SeriesInstanceUID), []).append((path, header))
    series = [Series(uid, str(items[0][1].get("Modality", "?")), str(items[0][1].get("SeriesDescription", "")),
                     tuple(path for path, _ in items)) for uid, items in sorted(by_uid.items())]
    return series, rtstructs


def _is_localizer(header: pydicom.Dataset) -> bool:
    """Scout / topogram images, which some scanners store inside the axial series."""
    return "LOCALIZER" in [str(v).upper() for v in header.get("ImageType", [])]


def open_patient(folder: str | os.PathLike, series_uid: str | None = None, case_id: str | None = None) -> DicomPatient:
    """Choose and check the CT series of a patient folder (headers only); one-line errors name the folder."""
    folder = Path(folder)
    series, rtstructs = scan_patient(folder)
    if not series:
        raise HnsegError(f"{folder}: no DICOM image series found; give a folder with the CT's DICOM files")
    if len(rtstructs) > 1:
        raise HnsegError(f"{folder}: {len(rtstructs)} RTSTRUCT files for one patient ("
                         f"{', '.join(str(p.relative_to(folder)) for p in rtstructs)}); keep one")
    rtstruct = rtstructs[0] if rtstructs else None
    chosen = _choose_series(folder, series, rtstruct, series_uid)
    if chosen.modality != "CT":
        raise HnsegError(f"{folder}: series {chosen.uid} has Modality {chosen.modality}, not CT; "
                         "hnseg segments CT only")
    return DicomPatient(case_id or folder.name, folder, chosen, check_geometry(chosen, folder), rtstruct)


def _choose_series(folder: Path, series: list[Series], rtstruct: Path | None, series_uid: str | None) -> Series:
    by_uid = {s.uid: s for s in series}
    if series_uid is not None and series_uid not in by_uid:
        raise HnsegError(f"{folder}: --series {series_uid} is not here; series found: "
                         f"{'; '.join(s.label() for s in series)}")
    wanted = referenced_series(read_rtstruct_dataset(rtstruct), series) if rtstruct is not None else None
    if wanted is not None:
        if wanted not in by_uid:
            raise HnsegError(f"{rtstruct}: references CT series {wanted}, which is not in {folder} (found: "
                             f"{'; '.join(s.label() for s in series)}); put the RTSTRUCT beside its own CT")
        if series_uid is not None and series_uid != wanted:
            raise HnsegError(f"{rtstruct}: references series {wanted}, not the chosen --series {series_uid}")
        return by_uid[wanted]
    if series_uid is not None:
        return by_uid[series_uid]
    if len(series) > 1:
        raise HnsegError(f"{folder}: {len(series)} image series and no RTSTRUCT to choose between them: "
                         f"{'; '.join(s.label() for s in series)}; choose one with --series UID")
    return series[0]


def check_geometry(series: Series, folder: Path) -> Geometry:
    """Sort the slices along their normal and refuse what cannot form one regular grid."""
    headers = [_header(path) for path in series.files]
    if len(headers) < 2:
        raise HnsegError(f"{folder}: series {series.uid} has {len(headers)} slice(s); a CT needs at least 2")
    orientations = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_ATOL:
        raise HnsegError(f"{folder}: series {series.uid} mixes slice orientations (ImageOrientationPatient); "
                         "re-export it as one axial series")
    shapes = {(int(h.Rows), int(h.Columns), *(round(float(v), 4) for v in h.PixelSpacing)) for h in headers}
    if len(shapes) > 1:
        raise HnsegError(f"{folder}: series {series.uid} mixes image sizes or pixel spacings {sorted(shapes)}")
    row, column = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row, column)
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    along = positions @ normal
    order = np.argsort(along)
    along, positions = along[order], positions[order]
    in_plane = positions - np.outer(along, normal)
    if np.abs(in_plane - in_plane[0]).max() > POSITION_ATOL_MM:
        raise HnsegError(f"{folder}: series {series.uid}: slice origins drift across slices (gantry tilt or "
                         "mixed stacks); resample it onto a regular grid first")
    steps = np.diff(along)
    if steps.min() < POSITION_ATOL_MM:
        where = float(along[int(np.argmin(steps))])
        raise HnsegError(f"{folder}: series {series.uid}: two slices at the same position ({where:.2f} mm); "
                         "remove the duplicate")
    median = float(np.median(steps))
    if steps.max() > GAP_FACTOR * median:
        k = int(np.argmax(steps))
        raise HnsegError(f"{folder}: series {series.uid}: missing slice(s) between {along[k]:.2f} and "
                         f"{along[k + 1]:.2f} mm (step {steps[k]:.2f} mm, usual {median:.2f} mm); re-export the series")
    if steps.max() - steps.min() > max(0.01, SPACING_RTOL * median):
        raise HnsegError(f"{folder}: series {series.uid}: uneven slice spacing ({steps.min():.3f} to "
                         f"{steps.max():.3f} mm); resample it onto a regular grid first")
    first = headers[0]
    position = str(first.get("PatientPosition", "") or "").strip().upper()
    if position and position not in SUPINE_POSITIONS:
        raise HnsegError(f"{folder}: PatientPosition {position} ({POSITION_NAMES.get(position, 'not supine')}) is "
                         "not supported: the models are trained on supine CTs (HFS, FFS); segment a supine scan")
    spacing = (float(first.PixelSpacing[1]), float(first.PixelSpacing[0]), median)
    size = (int(first.Columns), int(first.Rows), len(headers))
    direction = tuple(float(v) for v in np.stack([row, column, normal], axis=1).ravel())
    return Geometry(tuple(series.files[i] for i in order), size, spacing, direction, position)


# ----------------------------------------------------------------------------- reading


def read_ct(patient: DicomPatient) -> sitk.Image:
    """The CT in HU (rescale slope/intercept applied), slices in the checked order."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(path) for path in patient.geometry.files])
    try:
        image = reader.Execute()
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise HnsegError(f"{patient.folder}: cannot read the CT series ({(lines or ['?'])[-1][:200]})") from None
    if not np.isclose(image.GetSpacing()[2], patient.geometry.spacing[2], rtol=SPACING_RTOL):
        raise HnsegError(f"{patient.folder}: the series reads with slice spacing {image.GetSpacing()[2]:.3f} mm, "
                         f"not {patient.geometry.spacing[2]:.3f} mm; re-export the series")
    return image


def read_rtstruct_dataset(path: Path) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as error:
        raise HnsegError(f"{path}: unreadable RTSTRUCT ({error})") from None
    if "StructureSetROISequence" not in ds:
        raise HnsegError(f"{path}: RTSTRUCT without StructureSetROISequence; re-export it")
    return ds


def referenced_series(ds: pydicom.Dataset, series: Sequence[Series] = ()) -> str | None:
    """SeriesInstanceUID the RTSTRUCT was drawn on (its referenced frame, else its contours' images)."""
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for item in study.get("RTReferencedSeriesSequence", []):
                if "SeriesInstanceUID" in item:
                    return str(item.SeriesInstanceUID)
    instances = {str(image.ReferencedSOPInstanceUID) for roi in ds.get("ROIContourSequence", [])
                 for contour in roi.get("ContourSequence", []) for image in contour.get("ContourImageSequence", [])}
    for candidate in series:
        if instances and instances & {str(_header(p).SOPInstanceUID) for p in candidate.files}:
            return candidate.uid
    return None


def roi_names(ds: pydicom.Dataset) -> list[str]:
    return [str(roi.ROIName) for roi in ds.StructureSetROISequence]


def _contours_by_name(ds: pydicom.Dataset) -> dict[str, list]:
    """ROI name -> its contour items (empty when the ROI has no ROIContourSequence entry or no contours)."""
    by_number = {str(item.ReferencedROINumber): list(item.get("ContourSequence", []))
                 for item in ds.get("ROIContourSequence", [])}
    return {str(roi.ROIName): by_number.get(str(roi.ROINumber), []) for roi in ds.StructureSetROISequence}


def match_rois(patient: DicomPatient, ds: pydicom.Dataset, catalogue: Mapping | None = None,
               organ_map: Mapping | None = None) -> tuple[dict[str, str], list[str]]:
    """({organ: ROI name}, [unmatched ROI names]); two ROIs for one organ are refused, naming both."""
    return organ_catalogue.match_names(roi_names(ds), catalogue, organ_map, where=str(patient.rtstruct))


def check_contours(patient: DicomPatient, ds: pydicom.Dataset, matched: Mapping[str, str]) -> None:
    """Refuse a matched ROI without contours: it would train as 'organ absent'."""
    contours = _contours_by_name(ds)
    for organ, name in matched.items():
        if not contours.get(name):
            raise HnsegError(f"{patient.rtstruct}: ROI {name!r} ({organ}) has no contours; delete it or map it "
                             f'away with --organ-map ({{"{name}": null}})')


def read_masks(patient: DicomPatient, ds: pydicom.Dataset, matched: Mapping[str, str]) -> dict[str, np.ndarray]:
    """{organ: uint8 [Z, Y, X]} rasterised with rt-utils on the CT grid (slices in the checked order)."""
    from rt_utils import image_helper

    x_spacing, y_spacing, _ = patient.geometry.spacing
    if not np.isclose(x_spacing, y_spacing, rtol=1e-4) or patient.geometry.size[0] != patient.geometry.size[1]:
        raise HnsegError(f"{patient.folder}: {patient.geometry.size[:2]} pixels of {x_spacing}x{y_spacing} mm; "
                         "RTSTRUCT reading needs square images with square pixels")
    series_data = [pydicom.dcmread(path, stop_before_pixels=True) for path in patient.geometry.files]
    contours = _contours_by_name(ds)
    masks = {}
    for organ, name in matched.items():
        items = [item for item in contours.get(name, []) if "ContourData" in item
                 and item.get("ContourGeometricType", "CLOSED_PLANAR") == "CLOSED_PLANAR"]  # open lines enclose nothing
        _link_contours(items, series_data, patient)
        volume = image_helper.create_series_mask_from_contour_sequence(series_data, items)  # [rows, cols, z]
        masks[organ] = np.ascontiguousarray(np.moveaxis(volume, -1, 0)).astype(np.uint8)
    return masks


def _link_contours(items: list, series_data: list, patient: DicomPatient) -> None:
    """Give contours without ContourImageSequence the CT slice at their z (rt-utils matches by SOP UID)."""
    normal = np.cross(*np.reshape([float(v) for v in series_data[0].ImageOrientationPatient], (2, 3)))
    along = np.array([np.dot(normal, [float(v) for v in ds.ImagePositionPatient]) for ds in series_data])
    for item in items:
        if item.get("ContourImageSequence"):
            continue
        points = np.reshape([float(v) for v in item.ContourData], (-1, 3)) @ normal
        k = int(np.argmin(np.abs(along - points.mean())))
        if abs(along[k] - points.mean()) > patient.geometry.spacing[2] / 2:
            raise HnsegError(f"{patient.rtstruct}: a contour at {points.mean():.2f} mm lies outside the CT's slices")
        reference = pydicom.Dataset()
        reference.ReferencedSOPInstanceUID = series_data[k].SOPInstanceUID
        item.ContourImageSequence = pydicom.Sequence([reference])


def new_rtstruct(series):
    """An empty rt-utils RTStruct for a CT series: a folder holding only that series, or its files."""
    from rt_utils import RTStruct, RTStructBuilder, ds_helper, image_helper

    if isinstance(series, str | os.PathLike):
        return RTStructBuilder.create_new(str(series))
    series_data = sorted((pydicom.dcmread(path) for path in series), key=image_helper.get_slice_position)
    return RTStruct(series_data, ds_helper.create_rtstruct_dataset(series_data))


# ----------------------------------------------------------------------------- the dicom layout (``layouts``)


def detect(root: Path) -> bool:
    return bool(dicom_files(root, first_only=True))


def find(root: Path, reading: Reading) -> list[CaseRef]:
    """Patient folders, also under train/ validation/ test/ (their split hint)."""
    if not root.is_dir():
        return []
    split_roots = [(root / name, split) for name, split in cases.SPLIT_FOLDERS.items() if (root / name).is_dir()]
    refs = []
    for folder, split in split_roots or [(root, None)]:
        refs += [CaseRef(p.name, p, split, "dicom", None, reading.series) for p in find_patients(folder)]
    return refs


def describe(ref: CaseRef, reading: Reading) -> dict:
    """Geometry from the CT headers, the chosen series, and the RTSTRUCT's ROIs matched to organs and checked."""
    patient = open_patient(ref.path, ref.series, ref.case_id)
    geometry = patient.geometry
    info = {"size": list(geometry.size), "spacing_mm": cases.rounded(geometry.spacing),
            "orientation": cases.stored_orientation(geometry.size, geometry.spacing, geometry.direction, reading,
                                                    ref.path),
            "patient_position": geometry.position or None, "series": patient.series.uid, "organs": {},
            "unmatched": []}
    if patient.rtstruct is not None:
        ds = read_rtstruct_dataset(patient.rtstruct)
        matched, info["unmatched"] = match_rois(patient, ds, reading.catalogue, reading.organ_map)
        check_contours(patient, ds, matched)
        info["organs"] = matched
    return info


def read(ref: CaseRef, organs: Sequence[str], reading: Reading) -> Case:
    """The CT series in HU with the requested organs rasterised from the RTSTRUCT, in LPS."""
    patient = open_patient(ref.path, ref.series, ref.case_id)
    case = cases.case_from_image(ref.case_id, read_ct(patient), ref.path)
    if patient.rtstruct is not None and organs:
        ds = read_rtstruct_dataset(patient.rtstruct)
        matched, _ = match_rois(patient, ds, reading.catalogue, reading.organ_map)
        matched = {organ: name for organ, name in matched.items() if organ in organs}
        check_contours(patient, ds, matched)
        masks = read_masks(patient, ds, matched)
        for organ, mask in masks.items():
            if mask.shape != case.ct.shape:
                raise HnsegError(f"{patient.rtstruct}: {organ} mask shape {mask.shape} differs from the CT's "
                                 f"{case.ct.shape}")
        case.masks = {organ: masks[organ] for organ in organs if organ in masks}
    return orientation.canonical_case(case, reading.oblique, str(ref.path))
