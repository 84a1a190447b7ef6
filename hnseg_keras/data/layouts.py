"""Which layout an input folder has, its cases, and reading one case whatever the layout.

Layouts: ``pddca`` (``<case>/img.nrrd`` + ``structures/``), ``dicom`` (patient folders with a CT
series and at most one RTSTRUCT at any depth), ``nnunet`` (nnU-Net v2 raw: ``dataset.json``,
``imagesTr``, ``labelsTr``, ``imagesTs``) and ``image`` (CT image files, no contours). Commands
that read cases detect the layout; ``--layout`` forces one.

Organ names found in a case (structure files, ROI names, dataset.json labels) are matched to the
catalogue by ``organs.match_names``; ``describe`` reports the matching without reading pixels, so
``scan`` and ``prepare`` refuse bad cases before anything is written.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from hnseg_keras.data import cases, dicom, nnunet, orientation
from hnseg_keras.data import organs as organ_catalogue
from hnseg_keras.data.cases import Case, CaseRef
from hnseg_keras.errors import HnsegError

LAYOUTS = ("pddca", "dicom", "nnunet", "image")


@dataclass(frozen=True)
class Reading:
    """How to read cases: forced layout, chosen DICOM series, organ catalogue, the user's name map and
    what to do with oblique image axes (``orientation.OBLIQUE_CHOICES``)."""

    layout: str | None = None
    series: str | None = None
    catalogue: Mapping = field(default_factory=lambda: dict(organ_catalogue.CATALOGUE))
    organ_map: Mapping = field(default_factory=dict)
    oblique: str = "refuse"

    def to_job(self) -> dict:
        """A plain dict for worker processes."""
        return {"layout": self.layout, "series": self.series, "organ_map": dict(self.organ_map),
                "definitions": organ_catalogue.definitions(list(self.catalogue), self.catalogue),
                "oblique": self.oblique}

    @classmethod
    def from_job(cls, data: dict) -> Reading:
        return cls(data["layout"], data["series"], organ_catalogue.catalogue_from(data["definitions"]),
                   data["organ_map"], data.get("oblique", "refuse"))


def add_arguments(parser: argparse.ArgumentParser, organ_options: bool = True) -> None:
    """The options every case-reading command shares."""
    parser.add_argument("--layout", choices=LAYOUTS, help="input layout (default: detected)")
    parser.add_argument("--series", metavar="UID", help="DICOM: the CT SeriesInstanceUID to read when a patient "
                        "folder holds several series and no RTSTRUCT")
    parser.add_argument("--oblique", choices=orientation.OBLIQUE_CHOICES, default="refuse",
                        help="a CT whose axes are tilted against the patient axes: refuse it (default) or resample "
                             "it onto an axis-aligned grid (outputs are resampled back onto the CT's own grid)")
    if organ_options:
        parser.add_argument("--organ-map", metavar="FILE.json", help='local structure names: {"local name": '
                            '"Organ"} (null ignores a structure)')
        parser.add_argument("--organs-file", metavar="FILE.json", help="your own organs: {\"organs\": [{\"name\", "
                            "\"aliases\", \"partner\", \"tolerance_mm\", \"colour\", \"label\"}]}")


def reading_from_args(args: argparse.Namespace, catalogue: Mapping | None = None) -> Reading:
    """A Reading from parsed options; ``catalogue`` overrides ``--organs-file`` (e.g. from a model's metadata)."""
    if catalogue is None:
        organs_file = getattr(args, "organs_file", None)
        catalogue = organ_catalogue.read_organs_file(organs_file) if organs_file else organ_catalogue.CATALOGUE
    organ_map = getattr(args, "organ_map", None)
    names = organ_catalogue.read_organ_map(organ_map, catalogue) if organ_map else {}
    return Reading(getattr(args, "layout", None), getattr(args, "series", None), dict(catalogue), names,
                   getattr(args, "oblique", None) or "refuse")


# ----------------------------------------------------------------------------- discovery


def detect_layout(root: Path) -> str:
    """The layout of ``root``; a one-line error when it holds no cases of any layout."""
    if root.is_file():
        return "image"
    if nnunet.is_nnunet(root):
        return "nnunet"
    if cases.find_cases(root):
        return "pddca"
    if dicom.dicom_files(root, first_only=True):
        return "dicom"
    if _image_files(root):
        return "image"
    raise HnsegError(f"{root}: no cases found; expected PDDCA folders (<case>/img.nrrd), a DICOM tree "
                     "(<patient>/... CT + RTSTRUCT), an nnU-Net dataset (dataset.json, imagesTr/) or CT image files")


def find_refs(root: str | os.PathLike, reading: Reading = Reading()) -> list[CaseRef]:
    """Every case of ``root`` (a folder, or one CT file) in the detected or forced layout."""
    root = Path(root)
    if not root.exists():
        raise HnsegError(f"{root}: no such file or folder; give a folder of cases or a CT file")
    layout = reading.layout or detect_layout(root)
    if layout == "nnunet":
        if not nnunet.is_nnunet(root):
            raise HnsegError(f"{root}: not an nnU-Net raw dataset (dataset.json + imagesTr/); drop --layout nnunet")
        refs = nnunet.find_cases(root)
    elif layout == "pddca":
        refs = cases.find_cases(root) if root.is_dir() else []
    elif layout == "dicom":
        refs = _dicom_refs(root, reading.series)
    else:
        refs = ([CaseRef(cases._strip_suffix(root.name), root, None, "image")] if root.is_file() else
                [CaseRef(cases._strip_suffix(p.name), p, None, "image") for p in _image_files(root)])
    if not refs:
        raise HnsegError(f"{root}: no {layout} cases found; check the folder or --layout")
    return cases.unique_ids(refs)


def _image_files(root: Path) -> list[Path]:
    return [p for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")
            and p.name.lower().endswith(cases.IMAGE_SUFFIXES)]


def _dicom_refs(root: Path, series: str | None) -> list[CaseRef]:
    """Patient folders, also under train/ validation/ test/ (their split hint)."""
    split_roots = [(root / name, split) for name, split in cases.SPLIT_FOLDERS.items() if (root / name).is_dir()]
    groups = split_roots or [(root, None)]
    refs = []
    for folder, split in groups:
        refs += [CaseRef(p.name, p, split, "dicom", None, series) for p in dicom.find_patients(folder)]
    return refs


# ----------------------------------------------------------------------------- describing and reading


def describe(ref: CaseRef, reading: Reading = Reading(), label_values: bool = True) -> dict:
    """Layout, size, spacing, {organ: source name}, unmatched names; raises HnsegError for a refused case.

    Reads headers only, except an nnU-Net label map (``label_values``: its values are checked
    against dataset.json).
    """
    info: dict = {"layout": ref.layout}
    if ref.layout == "dicom":
        patient = dicom.open_patient(ref.path, ref.series, ref.case_id)
        geometry = patient.geometry
        info.update(size=list(geometry.size), spacing_mm=_rounded(geometry.spacing),
                    orientation=_orientation(geometry.size, geometry.spacing, geometry.direction, reading, ref.path),
                    patient_position=geometry.position or None, series=patient.series.uid, organs={}, unmatched=[])
        if patient.rtstruct is not None:
            ds = dicom.read_rtstruct_dataset(patient.rtstruct)
            matched, info["unmatched"] = dicom.match_rois(patient, ds, reading.catalogue, reading.organ_map)
            dicom.check_contours(patient, ds, matched)
            info["organs"] = matched
        return info
    image_path = ref.path / "img.nrrd" if ref.layout == "pddca" else ref.path
    if not image_path.is_file():
        raise HnsegError(f"{ref.path}: case folder has no img.nrrd; add the CT as img.nrrd or remove the folder")
    size, spacing, direction = image_information(image_path)
    info.update(size=size, spacing_mm=spacing, orientation=_orientation(size, spacing, direction, reading, image_path),
                organs={}, unmatched=[])
    if ref.layout == "pddca":
        names = [cases._strip_suffix(p.name) for p in sorted((ref.path / "structures").glob("*"))
                 if p.is_file() and p.name.lower().endswith(cases.IMAGE_SUFFIXES)]
        info["organs"], info["unmatched"] = organ_catalogue.match_names(names, reading.catalogue, reading.organ_map,
                                                                        where=str(ref.path / "structures"))
    elif ref.layout == "nnunet" and ref.label is not None:
        dataset = nnunet.read_dataset(ref.path.parent.parent)
        info["organs"], info["unmatched"] = nnunet.match_labels(dataset, reading.catalogue, reading.organ_map)
        if label_values:
            cases.read_case(ref.path, (), label_map=ref.label, labels={}, known_values=set(dataset.labels.values()))
    return info


def image_information(path: Path) -> tuple[list[int], list[float], tuple[float, ...]]:
    """(size, spacing, direction) from an image file's header."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise HnsegError(f"{path}: unreadable image header; re-export or re-download it") from None
    return list(reader.GetSize()), _rounded(reader.GetSpacing()), tuple(reader.GetDirection())


def _orientation(size, spacing, direction, reading: Reading, where) -> str:
    """The stored orientation ("RAS", ...); an oblique one is refused here unless ``reading`` resamples it."""
    if len(size) != 3:
        return "?"
    storage = orientation.storage_of(tuple(reversed(size)), spacing, (0.0, 0.0, 0.0), direction, reading.oblique,
                                     str(where))
    return storage.code


def _rounded(values: Sequence[float]) -> list[float]:
    return [round(float(v), 4) for v in values]


def read_ref(ref: CaseRef, organs: Sequence[str], reading: Reading = Reading()) -> Case:
    """The Case of ``ref`` with masks of the annotated organs among ``organs``."""
    if ref.layout == "pddca":
        return cases.read_case(ref.path, organs, catalogue=reading.catalogue, oblique=reading.oblique)
    if ref.layout == "image":
        case = cases.read_case(ref.path, (), oblique=reading.oblique)
    elif ref.layout == "nnunet":
        case = _read_nnunet(ref, organs, reading)
    else:
        case = _read_dicom(ref, organs, reading)
    case.case_id = ref.case_id
    return case


def _read_nnunet(ref: CaseRef, organs: Sequence[str], reading: Reading) -> Case:
    if ref.label is None or not organs:
        return cases.read_case(ref.path, (), oblique=reading.oblique)
    dataset = nnunet.read_dataset(ref.path.parent.parent)
    matched, _ = nnunet.match_labels(dataset, reading.catalogue, reading.organ_map)
    table = {value: organ for value, organ in nnunet.value_table(dataset, matched).items() if organ in organs}
    return cases.read_case(ref.path, organs, label_map=ref.label, labels=table, catalogue=reading.catalogue,
                           known_values=set(dataset.labels.values()), oblique=reading.oblique)


def _read_dicom(ref: CaseRef, organs: Sequence[str], reading: Reading) -> Case:
    patient = dicom.open_patient(ref.path, ref.series, ref.case_id)
    case = cases.case_from_image(ref.case_id, dicom.read_ct(patient), ref.path)
    if patient.rtstruct is None or not organs:
        return orientation.canonical_case(case, reading.oblique, str(ref.path))
    ds = dicom.read_rtstruct_dataset(patient.rtstruct)
    matched, _ = dicom.match_rois(patient, ds, reading.catalogue, reading.organ_map)
    matched = {organ: name for organ, name in matched.items() if organ in organs}
    dicom.check_contours(patient, ds, matched)
    masks = dicom.read_masks(patient, ds, matched)
    for organ, mask in masks.items():
        if mask.shape != case.ct.shape:
            raise HnsegError(f"{patient.rtstruct}: {organ} mask shape {mask.shape} differs from the CT's "
                             f"{case.ct.shape}")
    case.masks = {organ: masks[organ] for organ in organs if organ in masks}
    return orientation.canonical_case(case, reading.oblique, str(ref.path))

