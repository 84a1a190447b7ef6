"""The one way to find and read cases, whatever the input layout: ``find_refs``, ``describe``, ``read_ref``.

Layouts: ``pddca`` (``<case>/img.nrrd`` + ``structures/``), ``dicom`` (patient folders with a CT
series and at most one RTSTRUCT at any depth), ``nnunet`` (nnU-Net v2 raw: ``dataset.json``,
``imagesTr``, ``labelsTr``, ``imagesTs``) and ``image`` (CT image files, no contours). Each is one
module with the same four functions (``detect``, ``find``, ``describe``, ``read``) and one line in
``LAYOUTS``. Commands that read cases detect the layout; ``--layout`` forces one.

Organ names found in a case (structure files, ROI names, dataset.json labels) are matched to the
catalogue by ``organs.match_names``; ``describe`` reports the matching without reading pixels, so
``scan`` and ``prepare`` refuse bad cases before anything is written. Every case comes back from
``read_ref`` in LPS with ``Case.storage`` set (``orientation.canonical_case``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from hnseg_keras.data import cases, dicom, image, nnunet, orientation, pddca
from hnseg_keras.data import organs as organ_catalogue
from hnseg_keras.data.cases import Case, CaseRef, Reading
from hnseg_keras.errors import HnsegError

# Layout name -> its module, in the order detection tries them.
LAYOUTS = {"nnunet": nnunet, "pddca": pddca, "dicom": dicom, "image": image}


def add_arguments(parser: argparse.ArgumentParser, organ_options: bool = True) -> None:
    """The options every case-reading command shares."""
    parser.add_argument("--layout", choices=tuple(LAYOUTS), help="input layout (default: detected)")
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


def detect_layout(root: Path) -> str:
    """The layout of ``root``; a one-line error when it holds no cases of any layout."""
    for name, module in LAYOUTS.items():
        if module.detect(root):
            return name
    raise HnsegError(f"{root}: no cases found; expected PDDCA folders (<case>/img.nrrd), a DICOM tree "
                     "(<patient>/... CT + RTSTRUCT), an nnU-Net dataset (dataset.json, imagesTr/) or CT image files")


def find_refs(root: str | os.PathLike, reading: Reading | None = None) -> list[CaseRef]:
    """Every case of ``root`` (a folder, or one CT file) in the detected or forced layout."""
    root, reading = Path(root), reading or Reading()
    if not root.exists():
        raise HnsegError(f"{root}: no such file or folder; give a folder of cases or a CT file")
    layout = reading.layout or detect_layout(root)
    refs = _module(layout).find(root, reading)
    if not refs:
        raise HnsegError(f"{root}: no {layout} cases found; check the folder or --layout")
    return cases.unique_ids(refs)


def describe(ref: CaseRef, reading: Reading | None = None) -> dict:
    """Layout, size, spacing, stored orientation, {organ: source name}, unmatched names; raises HnsegError for
    a refused case.

    Reads headers only, except an nnU-Net label map (its values are checked against dataset.json).
    """
    return {"layout": ref.layout, **_module(ref.layout).describe(ref, reading or Reading())}


def read_ref(ref: CaseRef, organs: Sequence[str], reading: Reading | None = None) -> Case:
    """The Case of ``ref`` in LPS, with masks of the annotated organs among ``organs``."""
    return _module(ref.layout).read(ref, organs, reading or Reading())


def _module(layout: str):
    if layout not in LAYOUTS:
        raise HnsegError(f"layout {layout!r} is unknown; use one of {', '.join(LAYOUTS)}")
    return LAYOUTS[layout]
