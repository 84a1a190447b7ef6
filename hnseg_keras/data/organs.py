"""Organ catalogue: canonical PDDCA names, aliases, label values, left/right partners.

Every stage refers to organs by their canonical name; the order of an organ list is
the channel order of masks, distance maps and model outputs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

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
        Organ("BrainStem", 1, ("Brainstem", "Brain_Stem", "Brain Stem", "Tronc"), None, 2.50, (230, 159, 0)),
        Organ("Chiasm", 2, ("OpticChiasm", "Optic_Chiasm", "Chiasma"), None, 2.50, (240, 228, 66)),
        Organ("Mandible", 3, ("Bone_Mandible", "Jaw", "Mandibula"), None, 1.01, (241, 214, 145)),
        Organ("OpticNerve_L", 4, ("LeftOpticNerve", "OpticNrv_L", "Optic_Nerve_L", "OpticNerve_Lt"), "OpticNerve_R", 2.50, (0, 158, 115)),
        Organ("OpticNerve_R", 5, ("RightOpticNerve", "OpticNrv_R", "Optic_Nerve_R", "OpticNerve_Rt"), "OpticNerve_L", 2.50, (86, 180, 233)),
        Organ("Parotid_L", 6, ("LeftParotid", "Parotid_Left", "Glnd_Parotid_L"), "Parotid_R", 2.85, (204, 121, 167)),
        Organ("Parotid_R", 7, ("RightParotid", "Parotid_Right", "Glnd_Parotid_R"), "Parotid_L", 2.85, (213, 94, 0)),
        Organ(
            "Submandibular_L", 8, ("Submandible_L", "LeftSubmandibular", "Glnd_Submand_L", "Submandibular_Gland_L"),
            "Submandibular_R", 4.01, (0, 114, 178)),
        Organ(
            "Submandibular_R", 9, ("Submandible_R", "RightSubmandibular", "Glnd_Submand_R", "Submandibular_Gland_R"),
            "Submandibular_L", 4.01, (120, 220, 90)),
        Organ("SpinalCord", 10, ("Spinal_Cord", "Cord", "Spinal Canal Cord"), None, 2.93, (255, 255, 100)),
        Organ("Larynx", 11, ("Glottis_Larynx",), None, 2.50, (150, 90, 220)),
        Organ("Esophagus", 12, ("Oesophagus", "Esophagus_Cervical"), None, 2.50, (170, 90, 50)),
    )
}

# The nine MICCAI 2015 / PDDCA organs, in the order of the challenge's tables.
DEFAULT_ORGANS: tuple[str, ...] = tuple(list(CATALOGUE)[:9])

def canonical_name(name: str, catalogue: Mapping[str, Organ] | None = None) -> str | None:
    """Catalogue name for ``name`` or an alias of it (see ``match_organ``); None if unknown."""
    return match_organ(name, catalogue)


def resolve_organs(names: Sequence[str] | None, catalogue: Mapping[str, Organ] | None = None) -> tuple[str, ...]:
    """Validate a user-given organ list and return catalogue names in the given order.

    None gives the nine default organs. Raises HnsegError for unknown or repeated names.
    """
    if names is None:
        return DEFAULT_ORGANS
    known = CATALOGUE if catalogue is None else catalogue
    resolved = []
    for name in names:
        canonical = canonical_name(name, known)
        if canonical is None:
            raise HnsegError(f"unknown organ {name!r}; known organs: {', '.join(known)} (add your own with "
                             "--organs-file)")
        if canonical in resolved:
            raise HnsegError(f"organ {canonical!r} is listed twice")
        resolved.append(canonical)
    if not resolved:
        raise HnsegError("the organ list is empty; name at least one organ")
    return tuple(resolved)


def label_value(name: str, catalogue: Mapping[str, Organ] | None = None) -> int:
    """Label-map value of an organ name."""
    return (CATALOGUE if catalogue is None else catalogue)[name].label


def colour_of(name: str, catalogue: Mapping[str, Organ] | None = None) -> tuple[int, int, int]:
    """RGB 0-255 of an organ name."""
    return (CATALOGUE if catalogue is None else catalogue)[name].colour


def flip_permutation(organs: Sequence[str], catalogue: Mapping[str, Organ] | None = None) -> list[int]:
    """Channel permutation that swaps left/right partners after a left-right image flip.

    An organ whose partner is absent from ``organs`` (or that the catalogue does not know) maps to itself.
    """
    known = CATALOGUE if catalogue is None else catalogue
    index = {name: i for i, name in enumerate(organs)}
    return [index.get(getattr(known.get(name), "partner", None) or name, i) for i, name in enumerate(organs)]


# ----------------------------------------------------------------------------- name matching

_SIDE_WORDS = {"left": "L", "lt": "L", "l": "L", "right": "R", "rt": "R", "r": "R"}
_ATTACHED_SIDES = (("left", "L"), ("right", "R"), ("lt", "L"), ("rt", "R"))  # glued to the name: "ParotidLt"


def normalise(name: str) -> str:
    """Lower case with spaces, underscores and hyphens removed: the form names are compared in."""
    return re.sub(r"[\s_\-]+", "", str(name)).lower()


def _side_keys(name: str) -> list[tuple[str, str]]:
    """(base, side) readings of ``name``: a side word as first or last token, or glued on as Lt/Left."""
    tokens = [token for token in re.split(r"[\s_\-]+", str(name).strip().lower()) if token]
    keys = []
    if len(tokens) > 1 and tokens[-1] in _SIDE_WORDS:
        keys.append(("".join(tokens[:-1]), _SIDE_WORDS[tokens[-1]]))
    if len(tokens) > 1 and tokens[0] in _SIDE_WORDS:
        keys.append(("".join(tokens[1:]), _SIDE_WORDS[tokens[0]]))
    joined = "".join(tokens)
    for word, side in _ATTACHED_SIDES:
        if joined.endswith(word) and len(joined) > len(word) + 2:
            keys.append((joined[: -len(word)], side))
        if joined.startswith(word) and len(joined) > len(word) + 2:
            keys.append((joined[len(word):], side))
    return keys


def _spelling_tables(catalogue: Mapping[str, Organ]) -> tuple[dict[str, str], dict[tuple[str, str], str]]:
    """Exact normalised spellings -> organ, and (base, side) -> organ for sided organs."""
    exact: dict[str, str] = {}
    sided: dict[tuple[str, str], str] = {}
    for organ in catalogue.values():
        for spelling in (organ.name, *organ.aliases):
            exact.setdefault(normalise(spelling), organ.name)
            for key in _side_keys(spelling):
                sided.setdefault(key, organ.name)
    return exact, sided


def match_organ(name: str, catalogue: Mapping[str, Organ] | None = None) -> str | None:
    """The organ a structure name stands for, or None (never a guess).

    Case, spaces, underscores and hyphens are ignored; a side (L/R, Lt/Rt, Left/Right) may be a
    prefix or a suffix ("PAROTID LT", "Rt Parotid", "Parotid_Right"). Anything else must be the
    organ's name or one of its aliases.
    """
    exact, sided = _spelling_tables(CATALOGUE if catalogue is None else catalogue)
    hit = exact.get(normalise(name))
    if hit is not None:
        return hit
    hits = {sided[key] for key in _side_keys(name) if key in sided}
    return hits.pop() if len(hits) == 1 else None


def read_organ_map(path: str | os.PathLike, catalogue: Mapping[str, Organ] | None = None) -> dict[str, str | None]:
    """{normalised local name: organ or None (ignore)} from a JSON ``{"local name": "Organ"}`` file."""
    catalogue = CATALOGUE if catalogue is None else catalogue
    data = _read_json_object(path, '{"local name": "Organ"}')
    table: dict[str, str | None] = {}
    for local, organ in data.items():
        if organ is None or organ == "":
            table[normalise(local)] = None
            continue
        canonical = match_organ(str(organ), catalogue)
        if canonical is None:
            raise HnsegError(f"{path}: {local!r} maps to unknown organ {organ!r}; known organs: "
                             f"{', '.join(catalogue)} (add it with --organs-file)")
        table[normalise(local)] = canonical
    return table


def match_names(names: Sequence[str], catalogue: Mapping[str, Organ] | None = None,
                organ_map: Mapping[str, str | None] | None = None, where: str = "") -> tuple[dict[str, str], list[str]]:
    """({organ: local name}, [unmatched names]) for the structure names of one case.

    The organ map (``read_organ_map``) is consulted first; a name it maps to None is ignored. Two
    names for one organ raise an error naming both.
    """
    organ_map = organ_map or {}
    matched: dict[str, str] = {}
    unmatched: list[str] = []
    for name in names:
        key = normalise(name)
        organ = organ_map[key] if key in organ_map else match_organ(name, catalogue)
        if key in organ_map and organ is None:
            continue
        if organ is None:
            unmatched.append(name)
        elif organ in matched:
            raise HnsegError(f"{where}: {matched[organ]!r} and {name!r} both match {organ}; rename or map one away "
                             f'with --organ-map (e.g. {{"{name}": null}})')
        else:
            matched[organ] = name
    return matched, unmatched


# ----------------------------------------------------------------------------- user organs


def _read_json_object(path: str | os.PathLike, shape: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise HnsegError(f"{path}: cannot read this JSON file ({error})") from None
    if not isinstance(data, dict):
        raise HnsegError(f"{path}: expected a JSON object {shape}")
    return data


def _organ_from_dict(entry: dict, where: str, default_label: int) -> Organ:
    known = {"name", "label", "aliases", "partner", "tolerance_mm", "colour"}
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
        raise HnsegError(f"{where}: each organ needs a \"name\" (and optionally {', '.join(sorted(known - {'name'}))})")
    unknown = sorted(set(entry) - known)
    if unknown:
        raise HnsegError(f"{where}: organ {entry['name']!r} has unknown key(s) {unknown}; accepted: {sorted(known)}")
    try:
        colour = tuple(int(v) for v in entry.get("colour", (255, 255, 255)))
        organ = Organ(entry["name"].strip(), int(entry.get("label", default_label)),
                      tuple(str(a) for a in entry.get("aliases", ())), entry.get("partner"),
                      float(entry.get("tolerance_mm", 2.5)), colour)
    except (TypeError, ValueError) as error:
        raise HnsegError(f"{where}: organ {entry['name']!r} has a bad value ({error})") from None
    if len(colour) != 3 or not all(0 <= v <= 255 for v in colour):
        raise HnsegError(f"{where}: organ {organ.name!r}: colour must be three integers 0-255")
    if not 1 <= organ.label <= 255 or organ.tolerance_mm <= 0:
        raise HnsegError(f"{where}: organ {organ.name!r}: label must be 1-255 and tolerance_mm positive")
    return organ


def with_organs(extra: Sequence[Organ], base: Mapping[str, Organ] | None = None) -> dict[str, Organ]:
    """A new catalogue: ``base`` (default the built-in one) plus ``extra``; checks labels and partners."""
    catalogue = dict(CATALOGUE if base is None else base)
    for organ in extra:
        catalogue[organ.name] = organ
    labels: dict[int, str] = {}
    for organ in catalogue.values():
        if organ.label in labels:
            raise HnsegError(f"organs {labels[organ.label]!r} and {organ.name!r} share label {organ.label}; "
                             "give each its own \"label\"")
        labels[organ.label] = organ.name
        if organ.partner is not None and organ.partner not in catalogue:
            raise HnsegError(f"organ {organ.name!r}: partner {organ.partner!r} is not defined; add it too")
    return catalogue


def read_organs_file(path: str | os.PathLike) -> dict[str, Organ]:
    """The built-in catalogue plus the organs of a JSON file ``{"organs": [{"name": ..., ...}]}`` (or a list)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise HnsegError(f"{path}: cannot read the organs file ({error})") from None
    entries = data.get("organs") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise HnsegError(f'{path}: expected {{"organs": [{{"name": "Cochlea_L", ...}}]}}')
    next_label = max(organ.label for organ in CATALOGUE.values()) + 1
    extra = []
    for entry in entries:
        extra.append(_organ_from_dict(entry, str(path), next_label))
        next_label = max(next_label, extra[-1].label) + 1
    try:
        return with_organs(extra)
    except HnsegError as error:
        raise HnsegError(f"{path}: {error}") from None


def definitions(organs: Sequence[str], catalogue: Mapping[str, Organ] | None = None) -> dict[str, dict]:
    """{name: {"label", "aliases", "partner", "tolerance_mm", "colour"}}: what manifests and exports carry."""
    catalogue = CATALOGUE if catalogue is None else catalogue
    return {name: {"label": catalogue[name].label, "aliases": list(catalogue[name].aliases),
                   "partner": catalogue[name].partner, "tolerance_mm": catalogue[name].tolerance_mm,
                   "colour": list(catalogue[name].colour)} for name in organs}


def catalogue_from(defs: Mapping[str, Mapping] | None) -> dict[str, Organ]:
    """The catalogue described by ``definitions`` output (manifest or export metadata); built-in if None."""
    if not defs:
        return dict(CATALOGUE)
    extra = [_organ_from_dict({"name": name, **entry}, "organ_definitions", 1) for name, entry in defs.items()]
    return with_organs(extra, {name: organ for name, organ in CATALOGUE.items() if name not in defs
                               and organ.label not in {e.label for e in extra}})


def added_definitions(catalogue: Mapping[str, Organ]) -> dict[str, dict]:
    """``definitions`` of the organs of ``catalogue`` that the built-in catalogue lacks or defines otherwise."""
    added = [name for name, organ in catalogue.items() if CATALOGUE.get(name) != organ]
    return definitions(added, catalogue)


# ----------------------------------------------------------------------------- TG-263 names

# AAPM TG-263 standard names of the catalogue organs: the names planning systems and clinical trials expect.
TG263_NAMES: dict[str, str] = {
    "BrainStem": "Brainstem", "Chiasm": "OpticChiasm", "Mandible": "Bone_Mandible",
    "OpticNerve_L": "OpticNrv_L", "OpticNerve_R": "OpticNrv_R", "Parotid_L": "Parotid_L",
    "Parotid_R": "Parotid_R", "Submandibular_L": "Glnd_Submand_L", "Submandibular_R": "Glnd_Submand_R",
    "SpinalCord": "SpinalCord", "Larynx": "Larynx", "Esophagus": "Esophagus",
}
ROI_NAME_STYLES = ("catalogue", "tg263")


def roi_name(name: str, style: str, catalogue: Mapping[str, Organ] | None = None) -> str:
    """An organ's ROI name: its catalogue name, or with ``style="tg263"`` its TG-263 name so that planning
    systems' templates and trial checks recognise it; an organ TG-263 does not list (a user's own) keeps its
    name."""
    if style not in ROI_NAME_STYLES:
        raise HnsegError(f"ROI name style {style!r}: expected one of {', '.join(ROI_NAME_STYLES)}")
    if name not in (CATALOGUE if catalogue is None else catalogue):
        raise HnsegError(f"unknown organ {name!r}; add it with --organs-file")
    return TG263_NAMES.get(name, name) if style == "tg263" else name
