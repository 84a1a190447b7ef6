"""The image layout: CT image files (NRRD / NIfTI / MHA) without contours, one case per file.

The root is one file, or a folder whose image files are read (not its subfolders); a file's case id
is its name without the image suffix. These cases can be predicted, not prepared or scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hnseg_keras.data import cases, orientation
from hnseg_keras.data.cases import Case, CaseRef, Reading


def detect(root: Path) -> bool:
    return root.is_file() or bool(_image_files(root))


def find(root: Path, reading: Reading) -> list[CaseRef]:
    files = [root] if root.is_file() else _image_files(root)
    return [CaseRef(cases.strip_suffix(path.name), path, None, "image") for path in files]


def _image_files(root: Path) -> list[Path]:
    return [p for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")
            and p.name.lower().endswith(cases.IMAGE_SUFFIXES)]


def describe(ref: CaseRef, reading: Reading) -> dict:
    return cases.describe_image(ref.path, reading)


def read(ref: CaseRef, organs: Sequence[str], reading: Reading) -> Case:
    """The CT in LPS; ``organs`` is ignored (an image file carries no contours)."""
    case = cases.case_from_image(ref.case_id, cases.read_image(ref.path), ref.path)
    return orientation.canonical_case(case, reading.oblique, str(ref.path))
