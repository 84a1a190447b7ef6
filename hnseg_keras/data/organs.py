"""Organ catalogue: canonical PDDCA names, aliases, label values, left/right partners.

Every stage refers to organs by their canonical name; the order of an organ list is
the channel order of masks, distance maps and model outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hnseg_keras.errors import HnsegError


@dataclass(frozen=True)
class Organ:
    """One structure of the catalogue.

    Attributes:
        name: canonical PDDCA file stem, e.g. ``"Parotid_L"``.
        label: value of this organ in label-map files.
        aliases: other spellings accepted when reading (compared case-insensitively).
        partner: the mirrored organ (``"Parotid_R"`` for ``"Parotid_L"``), or None.
        tolerance_mm: surface-Dice tolerance (Nikolov et al. 2018 where they give one).
        colour: RGB 0-255, the one colour of this organ in previews, TensorBoard images, RTSTRUCT ROIs
            and Slicer segmentations.
    """

    name: str
    label: int
    aliases: tuple[str, ...] = ()
    partner: str | None = None
    tolerance_mm: float = 2.5
    colour: tuple[int, int, int] = (255, 255, 255)


CATALOGUE: dict[str, Organ] = {
    organ.name: organ
    for organ in (
        Organ("BrainStem", 1, ("Brainstem", "Brain_Stem", "brain stem"), None, 2.50, (230, 159, 0)),
        Organ("Chiasm", 2, ("OpticChiasm", "Optic_Chiasm"), None, 2.50, (240, 228, 66)),
        Organ("Mandible", 3, ("Bone_Mandible", "Jaw"), None, 1.01, (241, 214, 145)),
        Organ("OpticNerve_L", 4, ("LeftOpticNerve", "OpticNrv_L", "Optic_Nerve_L"), "OpticNerve_R", 2.50, (0, 158, 115)),
        Organ("OpticNerve_R", 5, ("RightOpticNerve", "OpticNrv_R", "Optic_Nerve_R"), "OpticNerve_L", 2.50, (86, 180, 233)),
        Organ("Parotid_L", 6, ("LeftParotid", "Parotid_Left", "Glnd_Parotid_L"), "Parotid_R", 2.85, (204, 121, 167)),
        Organ("Parotid_R", 7, ("RightParotid", "Parotid_Right", "Glnd_Parotid_R"), "Parotid_L", 2.85, (213, 94, 0)),
        Organ(
            "Submandibular_L", 8, ("Submandible_L", "LeftSubmandibular", "Glnd_Submand_L"),
            "Submandibular_R", 4.01, (0, 114, 178)),
        Organ(
            "Submandibular_R", 9, ("Submandible_R", "RightSubmandibular", "Glnd_Submand_R"),
            "Submandibular_L", 4.01, (120, 220, 90)),
        Organ("SpinalCord", 10, ("Spinal_Cord", "Cord"), None, 2.93, (255, 255, 100)),
        Organ("Larynx", 11, (), None, 2.50, (150, 90, 220)),
        Organ("Esophagus", 12, ("Oesophagus",), None, 2.50, (170, 90, 50)),
    )
}

# The nine MICCAI 2015 / PDDCA organs, in the order of the challenge's tables.
DEFAULT_ORGANS: tuple[str, ...] = tuple(list(CATALOGUE)[:9])

_BY_LOWER_NAME = {
    spelling.lower(): organ.name for organ in CATALOGUE.values() for spelling in (organ.name, *organ.aliases)
}


def canonical_name(name: str) -> str | None:
    """Canonical catalogue name for ``name`` or an alias of it; None if unknown."""
    return _BY_LOWER_NAME.get(name.strip().lower())


def resolve_organs(names: Sequence[str] | None) -> tuple[str, ...]:
    """Validate a user-given organ list and return canonical names in the given order.

    None gives the nine default organs. Raises HnsegError for unknown or repeated names.
    """
    if names is None:
        return DEFAULT_ORGANS
    resolved = []
    for name in names:
        canonical = canonical_name(name)
        if canonical is None:
            raise HnsegError(f"unknown organ {name!r}; known organs: {', '.join(CATALOGUE)}")
        if canonical in resolved:
            raise HnsegError(f"organ {canonical!r} is listed twice")
        resolved.append(canonical)
    if not resolved:
        raise HnsegError("the organ list is empty; name at least one organ")
    return tuple(resolved)


def label_value(name: str) -> int:
    """Label-map value of a canonical organ name."""
    return CATALOGUE[name].label


def colour_of(name: str) -> tuple[int, int, int]:
    """RGB 0-255 of a canonical organ name."""
    return CATALOGUE[name].colour


def flip_permutation(organs: Sequence[str]) -> list[int]:
    """Channel permutation that swaps left/right partners after a left-right image flip.

    An organ whose partner is absent from ``organs`` maps to itself.
    """
    index = {name: i for i, name in enumerate(organs)}
    return [index.get(CATALOGUE[name].partner or name, i) for i, name in enumerate(organs)]
