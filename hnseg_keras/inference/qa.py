"""Anatomical sanity checks on one predicted case: side, volume, emptiness and fragmentation of each organ.

A network trained on slices happily segments a mirrored, flipped or transposed image, and Dice against
nothing cannot tell: a prediction whose left parotid lies on the patient's right, or whose direction
matrix was dropped on the way to the file, looks like a perfectly good mask. These checks run on the
masks and the CT geometry alone (numpy and scipy, no model), so that such a prediction never passes
silently.

Geometry is SimpleITK's: ``spacing``, ``origin`` and ``direction`` in (x, y, z) order, arrays in
[Z, Y, X] order, and the physical point of index (i, j, k) is ``origin + D @ (i*sx, j*sy, k*sz)``. The CT
is in LPS, so +x is the patient's left.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from hnseg_keras.data.organs import CATALOGUE, Organ, _side_keys, match_organ
from hnseg_keras.errors import HnsegError

CHECKS = ("empty", "side", "volume", "pieces")  # the order of one organ's findings

# side
BODY_HU = -500.0  # CT voxels above this are body (or couch / head rest: see body_midline_x)
MIDLINE_TOLERANCE_MM = 2.0  # a single organ whose centroid is this close to the midline passes ("on the midline")
MIDLINE_GRID_MM = 2.0  # in-plane sampling of the coarse body copy (at most half of this is the midline's bias)
MIDLINE_SLICE_MM = 5.0  # sampling along the head-feet axis of the coarse body copy

# volume: plausible = [low * VOLUME_LOW_FACTOR, high * VOLUME_HIGH_FACTOR] of the training range (low, high)
VOLUME_LOW_FACTOR = 0.5
VOLUME_HIGH_FACTOR = 2.0

# pieces: 26-connected components holding at least PIECE_MIN_SHARE of the organ count as pieces
PIECE_MIN_SHARE = 0.05
MAX_PIECES = 2

_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
_SIDE_WORD = {"L": "left", "R": "right"}
_OTHER_SIDE = {"L": "R", "R": "L"}


def side_of(name: str, catalogue: Mapping[str, Organ] | None = None) -> str | None:
    """"L" or "R": the patient side of a paired organ, read from its name (_L/_R, Left/Right, Lt/Rt, prefix or suffix).

    None for an organ without a partner in the catalogue, an unknown name, or a name whose side is
    missing or ambiguous. An alias ("LeftParotid") is read as the catalogue organ it names.
    """
    catalogue = CATALOGUE if catalogue is None else catalogue
    organ = catalogue.get(name)
    if organ is None:
        canonical = match_organ(name, catalogue)
        organ = None if canonical is None else catalogue[canonical]
    if organ is None or not organ.partner or organ.partner not in catalogue:
        return None
    own, theirs = _side_keys(organ.name), set(_side_keys(organ.partner))
    # a reading whose base the partner shares with the other side ("parotid": L here, R there) wins
    sides = {side for base, side in own if (base, _OTHER_SIDE[side]) in theirs}
    sides = sides or {side for _, side in own} or {side for _, side in _side_keys(name)}
    return sides.pop() if len(sides) == 1 else None


def organ_volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Volume of a mask in millilitres (voxel count times the voxel volume of ``spacing`` in mm)."""
    return float(np.count_nonzero(mask)) * float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0


def body_midline_x(ct: np.ndarray, spacing: Sequence[float], origin: Sequence[float],
                   direction: Sequence[float]) -> float | None:
    """Physical x (mm) of the body's midline; None when no voxel of ``ct`` lies above ``BODY_HU``.

    On a coarse copy of the CT (every ``MIDLINE_GRID_MM`` in plane, every ``MIDLINE_SLICE_MM`` along
    the head-feet axis), voxels above ``BODY_HU`` are labelled (26-connected) and the largest component
    is the body, which drops a couch separated by air and stray bright voxels. The midline is the median
    over slices of the per-slice centroid's physical x: shoulders, arms or an attached head rest
    shift a few slices, not the median. The coarse grid biases it by at most half a grid step.
    """
    ct = np.asarray(ct)
    axes, spacing, origin = _geometry(spacing, origin, direction)
    head_feet = int(np.argmax(np.abs(axes[2])))  # index axis (x=0, y=1, z=2) most along the patient's z
    steps = [max(1, int(MIDLINE_GRID_MM / spacing[a])) for a in range(3)]
    steps[head_feet] = max(1, int(MIDLINE_SLICE_MM / spacing[head_feet]))
    array_steps = steps[::-1]  # array order [Z, Y, X]
    coarse = ct[::array_steps[0], ::array_steps[1], ::array_steps[2]] > BODY_HU
    labels, count = ndimage.label(coarse, structure=_CONNECTIVITY_26)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    del labels
    slice_axis = 2 - head_feet
    per_slice = np.moveaxis(body, slice_axis, 0).reshape(body.shape[slice_axis], -1).sum(axis=1)
    present = per_slice > 0
    x = np.full(per_slice.shape, origin[0], dtype=np.float64)
    for axis in range(3):  # array axis; index axis 2 - axis
        coefficient = axes[0, 2 - axis] * spacing[2 - axis] * array_steps[axis]
        if coefficient == 0.0:
            continue
        if axis == slice_axis:
            mean_index = np.arange(body.shape[axis], dtype=np.float64)
        else:
            marginal = np.moveaxis(body, (slice_axis, axis), (0, 1)).sum(axis=2)  # [slice, position]
            mean_index = marginal @ np.arange(body.shape[axis], dtype=np.float64) / np.maximum(per_slice, 1)
        x += coefficient * mean_index
    return float(np.median(x[present]))


def check_case(masks: Mapping[str, np.ndarray], spacing: Sequence[float], origin: Sequence[float],
               direction: Sequence[float], ct: np.ndarray | None = None,
               volume_ranges_ml: Mapping[str, Sequence[float]] | None = None,
               catalogue: Mapping[str, Organ] | None = None) -> list[dict]:
    """Findings ``{"organ", "check", "status", "detail"}`` for every organ of ``masks`` and every check.

    Per organ, in the order of ``CHECKS``:

    * empty: fail when no voxel is predicted; the organ's other checks are then skipped.
    * side (paired organs only, see ``side_of``): with both partners predicted, the left organ's
      centroid must lie at a larger physical x than the right one's (each gets a finding). With one of
      them, its centroid must lie on its side of ``body_midline_x(ct)``, or within
      ``MIDLINE_TOLERANCE_MM`` of it. Skipped for unpaired organs, and without a partner and a CT.
    * volume: fail outside [low * VOLUME_LOW_FACTOR, high * VOLUME_HIGH_FACTOR] ml for
      ``volume_ranges_ml[organ] = (low, high)``; skipped for an organ without a range.
    * pieces: fail when more than ``MAX_PIECES`` 26-connected components each hold at least
      ``PIECE_MIN_SHARE`` of the organ's voxels (small specks are ignored).

    Masks are [Z, Y, X] on the CT grid (bool, or anything whose non-zero voxels are the organ).
    Raises HnsegError for masks or a CT of different shapes, bad geometry or a bad volume range.
    """
    catalogue = CATALOGUE if catalogue is None else catalogue
    axes, spacing, origin = _geometry(spacing, origin, direction)
    volume_ranges_ml = volume_ranges_ml or {}
    shapes = {name: np.shape(mask) for name, mask in masks.items()}
    if ct is not None:
        shapes["the CT"] = np.shape(ct)
    if len(set(shapes.values())) > 1 or any(len(shape) != 3 for shape in shapes.values()):
        raise HnsegError("check_case: masks and CT must be 3D arrays of one shape [Z, Y, X]; got "
                         + ", ".join(f"{name} {shape}" for name, shape in shapes.items()))

    stats = {name: _organ_stats(mask, spacing, origin, axes) for name, mask in masks.items()}
    midline: list[float | None] = []  # computed once, when first needed

    def midline_x() -> float | None:
        if not midline:
            midline.append(body_midline_x(ct, spacing, origin, axes.ravel()))
        return midline[0]

    findings = []
    for name, stat in stats.items():
        def finding(check: str, status: str, detail: str, organ: str = name) -> dict:
            return {"organ": organ, "check": check, "status": status, "detail": detail}

        if stat is None:
            findings.append(finding("empty", "fail", "no voxel predicted"))
            findings.extend(finding(check, "skip", "skipped: no voxel predicted") for check in CHECKS[1:])
            continue
        count, volume, centroid, crop = stat
        findings.append(finding("empty", "pass", f"{volume:.1f} ml in {count} voxels"))
        findings.append(finding("side", *_side_finding(name, centroid, stats, ct is not None, midline_x,
                                                       catalogue)))
        findings.append(finding("volume", *_volume_finding(name, volume, volume_ranges_ml)))
        findings.append(finding("pieces", *_pieces_finding(crop, count)))
    return findings


def summarise(findings: Iterable[Mapping]) -> dict:
    """{"failed", "passed", "skipped": counts, "failures": ["Parotid_L side: detail", ...]}."""
    findings = list(findings)
    return {
        "failed": sum(f["status"] == "fail" for f in findings),
        "passed": sum(f["status"] == "pass" for f in findings),
        "skipped": sum(f["status"] == "skip" for f in findings),
        "failures": [f"{f['organ']} {f['check']}: {f['detail']}" for f in findings if f["status"] == "fail"],
    }


# ----------------------------------------------------------------------------- helpers


def _geometry(spacing, origin, direction) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(3x3 direction, spacing, origin) as float arrays, checked."""
    axes = np.asarray(direction, dtype=np.float64).ravel()
    spacing = np.asarray(spacing, dtype=np.float64).ravel()
    origin = np.asarray(origin, dtype=np.float64).ravel()
    if axes.size != 9 or spacing.size != 3 or origin.size != 3 or not np.all(spacing > 0) \
            or not np.all(np.isfinite(np.concatenate([axes, spacing, origin]))):
        raise HnsegError(f"check_case: expected 3 positive spacings, 3 origin values and 9 direction cosines; got "
                         f"spacing {tuple(spacing)}, origin {tuple(origin)}, direction {tuple(axes)}")
    return axes.reshape(3, 3), spacing, origin


def _organ_stats(mask, spacing, origin, axes):
    """(voxel count, volume ml, physical centroid, bool crop to the bounding box), or None when empty.

    Only the z-slab holding the organ is scanned for the in-plane box; nothing full-size is copied
    for a bool mask.
    """
    mask = np.asarray(mask)
    if mask.dtype != bool:
        mask = mask != 0
    in_z = np.flatnonzero(mask.any(axis=(1, 2)))
    if in_z.size == 0:
        return None
    slab = mask[in_z[0]:in_z[-1] + 1]
    in_y = np.flatnonzero(slab.any(axis=(0, 2)))
    in_x = np.flatnonzero(slab.any(axis=(0, 1)))
    crop = slab[:, in_y[0]:in_y[-1] + 1, in_x[0]:in_x[-1] + 1]
    count = int(np.count_nonzero(crop))
    starts = (in_z[0], in_y[0], in_x[0])
    mean_index = np.empty(3)  # array order [Z, Y, X]
    for axis in range(3):
        marginal = crop.sum(axis=tuple(a for a in range(3) if a != axis))
        mean_index[axis] = starts[axis] + marginal @ np.arange(crop.shape[axis], dtype=np.float64) / count
    centroid = origin + axes @ (mean_index[::-1] * spacing)
    volume = count * float(np.prod(spacing)) / 1000.0
    return count, volume, centroid, crop


def _side_finding(name, centroid, stats, have_ct, midline_x, catalogue) -> tuple[str, str]:
    side = side_of(name, catalogue)
    if side is None:
        return "skip", "not a left/right organ"
    expected = _SIDE_WORD[side]
    sign = 1.0 if side == "L" else -1.0  # +x is the patient's left
    partner = catalogue[name].partner if name in catalogue else None
    if partner in stats and stats[partner] is not None and side_of(partner, catalogue) == _OTHER_SIDE[side]:
        offset = centroid[0] - stats[partner][2][0]
        where = "at the same x as" if offset == 0 else f"{abs(offset):.1f} mm {_lateral(offset)} of"
        if sign * offset > 0:
            return "pass", f"centroid {where} {partner}'s, as expected"
        return "fail", f"centroid {where} {partner}'s, expected {expected} (mirrored or flipped prediction?)"
    if not have_ct:
        return "skip", f"no {partner or 'partner'} prediction and no CT to find the body midline"
    midline = midline_x()
    if midline is None:
        return "skip", f"no body (above {BODY_HU:g} HU) in the CT to find the midline"
    offset = centroid[0] - midline
    if abs(offset) <= MIDLINE_TOLERANCE_MM:
        return "pass", f"centroid {abs(offset):.1f} mm from the body midline: on the midline"
    where = f"centroid {abs(offset):.1f} mm {_lateral(offset)} of the body midline"
    if sign * offset > 0:
        return "pass", f"{where}, as expected"
    return "fail", f"{where}, expected {expected} (mirrored or flipped prediction?)"


def _lateral(offset: float) -> str:
    return "left" if offset > 0 else "right"


def _volume_finding(name, volume, volume_ranges_ml) -> tuple[str, str]:
    if name not in volume_ranges_ml or volume_ranges_ml[name] is None:
        return "skip", "no volume range for this organ"
    try:
        low, high = (float(v) for v in volume_ranges_ml[name])
    except (TypeError, ValueError):
        raise HnsegError(f"volume range of {name}: expected two numbers (low, high) in ml, got "
                         f"{volume_ranges_ml[name]!r}") from None
    if not 0 <= low <= high:
        raise HnsegError(f"volume range of {name}: expected 0 <= low <= high, got ({low:g}, {high:g}) ml")
    lowest, highest = low * VOLUME_LOW_FACTOR, high * VOLUME_HIGH_FACTOR
    plausible = f"the plausible {lowest:.1f}-{highest:.1f} ml (training {low:.1f}-{high:.1f} ml)"
    if volume < lowest:
        return "fail", f"{volume:.1f} ml, below {plausible}"
    if volume > highest:
        return "fail", f"{volume:.1f} ml, above {plausible}"
    return "pass", f"{volume:.1f} ml, within {plausible}"


def _pieces_finding(crop, count) -> tuple[str, str]:
    labels, number = ndimage.label(crop, structure=_CONNECTIVITY_26)
    sizes = np.bincount(labels.ravel())[1:]
    pieces = int(np.count_nonzero(sizes >= PIECE_MIN_SHARE * count))
    largest = 100.0 * sizes.max() / count
    specks = number - pieces
    detail = (f"{pieces} piece{'s' * (pieces != 1)} of at least {100 * PIECE_MIN_SHARE:g} % of the volume "
              f"(largest {largest:.1f} %)" + (f", {specks} smaller" if specks else ""))
    if pieces > MAX_PIECES:
        return "fail", f"{detail}, expected at most {MAX_PIECES}"
    return "pass", detail
