"""Synthetic head-and-neck CT phantom with the nine PDDCA organs (the built-in default data).

Anatomy is drawn in an "anatomical frame" (mm, LPS: +x patient left, +y posterior, +z
superior; z = 0 at the optic chiasm) from a tissue-class volume that is then mapped to HU
plus noise. Organ masks are read off the final class volume, so they never overlap.
Organ HU deliberately overlap neighbouring tissue (brain stem ~ brain, submandibular ~
muscle, parotid ~ muscle/fat mix): a model has to use shape and context.
Each case is deterministic by ``(config.seed, index)``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hnseg_keras import configs
from hnseg_keras.data.cases import Case, CaseRef, write_pddca_case
from hnseg_keras.data.splits import DEFAULT_SPLITS, SPLITS, parse_fractions, split_counts
from hnseg_keras.errors import HnsegError
from hnseg_keras.files import LOCK_NAME, FolderLock

# The phantom folder inside a prepare output that was made from it (``hnseg prepare --phantom N``, ``demo_set``).
PREPARED_INPUT = "phantom-cases"


@dataclass(frozen=True)
class PhantomConfig:
    """Geometry and variation of the phantom.

    Attributes:
        size: in-plane voxels (square image).
        spacing_mm: in-plane voxel size, mm.
        slice_spacing_mm: (min, max) slice spacing drawn per case, mm.
        z_extent_mm: covered height (skull base region down below the mandible), mm.
        missing_share: share of cases without Mandible and Submandibular_L/R annotations.
        noise_hu: standard deviation of Gaussian voxel noise, HU.
        seed: base seed; case ``i`` uses the generator seeded with ``(seed, i)``.
    """

    size: int = 512
    spacing_mm: float = 0.9
    slice_spacing_mm: tuple[float, float] = (2.0, 3.0)
    z_extent_mm: float = 120.0
    missing_share: float = 0.2
    noise_hu: float = 15.0
    seed: int = 0

    def __post_init__(self):
        low, high = self.slice_spacing_mm
        checks = (
            (self.size >= 8, f"size={self.size}: use at least 8 voxels"),
            (self.spacing_mm > 0, f"spacing_mm={self.spacing_mm}: must be positive"),
            (0 < low <= high, f"slice_spacing_mm={self.slice_spacing_mm}: need 0 < min <= max"),
            (self.z_extent_mm >= 2 * high, f"z_extent_mm={self.z_extent_mm}: must cover at least two slices"),
            (0.0 <= self.missing_share <= 1.0, f"missing_share={self.missing_share}: must be in [0, 1]"),
            (self.noise_hu >= 0, f"noise_hu={self.noise_hu}: must be >= 0"),
        )
        for ok, message in checks:
            if not ok:
                raise HnsegError(f"phantom config: {message}")


# Tissue classes and their mean HU (per-case jitter is added).
AIR, FAT, SKIN, MUSCLE, BRAIN, BONE, CSF, ORBIT_FAT, GLOBE = range(9)
VERT_BODY, DISC, VERT_ARCH, CORD, MAND_CORTEX, MAND_MARROW = range(9, 15)
BRAINSTEM, CHIASM, OPTIC_L, OPTIC_R, PAROTID_L, PAROTID_R, SUBMAND_L, SUBMAND_R = range(15, 23)
MEAN_HU = np.array(
    [-1000, -100, 20, 45, 35, 800, 8, -80, 12, 280, 90, 550, 33, 950, 380, 33, 35, 32, 32, 12, 12, 42, 42],
    dtype=np.float32,
)
ORGAN_CLASSES = {
    "BrainStem": (BRAINSTEM,), "Chiasm": (CHIASM,), "Mandible": (MAND_CORTEX, MAND_MARROW),
    "OpticNerve_L": (OPTIC_L,), "OpticNerve_R": (OPTIC_R,), "Parotid_L": (PAROTID_L,),
    "Parotid_R": (PAROTID_R,), "Submandibular_L": (SUBMAND_L,), "Submandibular_R": (SUBMAND_R,),
}
MISSABLE = ("Mandible", "Submandibular_L", "Submandibular_R")
# Body outline: z knots (mm) -> semi-axes x, y and centre y of the skin ellipse.
BODY_Z = (-90.0, -80.0, -66.0, -40.0, -15.0, 10.0, 35.0)
BODY_AX = (58.0, 60.0, 66.0, 70.0, 74.0, 74.0, 68.0)
BODY_AY = (60.0, 66.0, 78.0, 88.0, 96.0, 96.0, 88.0)
BODY_YC = (12.0, 8.0, 4.0, 0.0, 0.0, 2.0, 4.0)
Z_CENTRE_MM = -27.0  # centre of the covered z range in the anatomical frame


def plate_z(y):
    """Skull-base plate height (mm) at anatomical y: high in front, low at the back."""
    return np.clip(-8.0 - 0.45 * (y + 16.0), -45.0, 25.0)


class _Grid:
    """Anatomical coordinates of the voxel centres, with crop-by-bounding-box painting."""

    def __init__(self, shape, spacing, origin, angle, shift, scale):
        depth, height, width = shape
        px = origin[0] + spacing[0] * np.arange(width) - shift[0]
        py = origin[1] + spacing[1] * np.arange(height) - shift[1]
        pz = origin[2] + spacing[2] * np.arange(depth) - shift[2]
        c, s = math.cos(angle), math.sin(angle)
        # anatomical = R^T (physical - shift) / scale; rotation only about z, so x/y are 2D.
        self.x = ((c * px[None, :] + s * py[:, None]) / scale).astype(np.float32)
        self.y = ((-s * px[None, :] + c * py[:, None]) / scale).astype(np.float32)
        self.z = (pz / scale).astype(np.float32)
        self.labels = np.full(shape, AIR, dtype=np.uint8)
        self.frame = (np.asarray(origin), np.asarray(spacing), angle, np.asarray(shift), scale)

    def paint(self, cls, box, shape_fn, only=None):
        """Set class ``cls`` where ``shape_fn(x, y, z)`` holds inside the anatomical ``box``.

        box = (x0, x1, y0, y1, z0, z1) mm; ``only`` restricts painting to voxels of these classes.
        """
        zs = np.nonzero((self.z >= box[4]) & (self.z <= box[5]))[0]
        inside = (self.x >= box[0]) & (self.x <= box[1]) & (self.y >= box[2]) & (self.y <= box[3])
        rows, cols = np.nonzero(inside.any(axis=1))[0], np.nonzero(inside.any(axis=0))[0]
        if zs.size == 0 or rows.size == 0 or cols.size == 0:
            return
        sy, sx = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
        sz = slice(zs[0], zs[-1] + 1)
        mask = shape_fn(self.x[None, sy, sx], self.y[None, sy, sx], self.z[sz, None, None])
        target = self.labels[sz, sy, sx]
        if only is not None:
            mask = mask & np.isin(target, only)
        target[mask] = cls

    def to_index(self, point):
        """Nearest voxel index (z, y, x) of an anatomical point, clipped to the grid."""
        origin, spacing, angle, shift, scale = self.frame
        c, s = math.cos(angle), math.sin(angle)
        ax, ay, az = np.asarray(point) * scale
        physical = np.array([c * ax - s * ay, s * ax + c * ay, az]) + shift
        index = np.round((physical - origin) / spacing).astype(int)
        return tuple(int(np.clip(i, 0, n - 1)) for i, n in zip(index[::-1], self.labels.shape, strict=True))


# ----------------------------------------------------------------------------- shapes


def ellipsoid(centre, semi, angle_deg=0.0):
    """Ellipsoid with semi-axes (x, y, z) mm, optionally rotated about z."""
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))

    def fn(x, y, z):
        dx, dy = x - centre[0], y - centre[1]
        u, v = c * dx + s * dy, -s * dx + c * dy
        return (u / semi[0]) ** 2 + (v / semi[1]) ** 2 + ((z - centre[2]) / semi[2]) ** 2 <= 1.0

    return fn


def segment_tube(start, end, radius):
    """Points within ``radius`` mm of the segment start-end (a capsule)."""
    a, b = np.asarray(start, np.float32), np.asarray(end, np.float32)
    axis = b - a
    length2 = float(axis @ axis)

    def fn(x, y, z):
        t = np.clip(((x - a[0]) * axis[0] + (y - a[1]) * axis[1] + (z - a[2]) * axis[2]) / length2, 0.0, 1.0)
        return (x - a[0] - t * axis[0]) ** 2 + (y - a[1] - t * axis[1]) ** 2 + (z - a[2] - t * axis[2]) ** 2 <= radius**2

    return fn


def z_tube(top, bottom, semi_xy):
    """Near-vertical tube with elliptical cross-section from ``top`` down to ``bottom`` (x, y, z)."""

    def fn(x, y, z):
        t = (top[2] - z) / (top[2] - bottom[2])
        cx, cy = top[0] + t * (bottom[0] - top[0]), top[1] + t * (bottom[1] - top[1])
        inside = ((x - cx) / semi_xy[0]) ** 2 + ((y - cy) / semi_xy[1]) ** 2 <= 1.0
        return inside & (t >= 0.0) & (t <= 1.0)

    return fn


def body_inset(inset_mm):
    """Inside the body outline shrunk by ``inset_mm`` (skin ellipse varies with z)."""

    def fn(x, y, z):
        inv_ax = (1.0 / (np.interp(z, BODY_Z, BODY_AX) - inset_mm)).astype(np.float32)
        inv_ay = (1.0 / (np.interp(z, BODY_Z, BODY_AY) - inset_mm)).astype(np.float32)
        yc = np.interp(z, BODY_Z, BODY_YC).astype(np.float32)
        u, v = x * inv_ax, (y - yc) * inv_ay
        return u * u + v * v <= 1.0

    return fn


def mandible_body(arch, thickness_mm, bottom_mm, height_mm):
    """U-shaped arch: elliptical ring (semi-axes arch = (A, B, yc)) in front of y = yc."""
    half_width, depth, yc = arch

    def fn(x, y, z):
        r = np.sqrt((x / half_width) ** 2 + ((y - yc) / depth) ** 2)
        side = np.clip(np.abs(x) / half_width, 0.0, 1.0)  # |sin t| along the arch
        low = bottom_mm + 5.0 * side
        high = low + height_mm - 8.0 * side
        return (np.abs(r - 1.0) * depth <= thickness_mm / 2) & (y <= yc + 1.0) & (z >= low) & (z <= high)

    return fn


def plate_between(start, end, half_thickness_x, half_width):
    """A flat bar (mandible ramus) from ``start`` to ``end``: thin in x, wide in the y-z plane."""
    a, b = np.asarray(start, np.float32), np.asarray(end, np.float32)
    axis = (b - a) / np.linalg.norm(b - a)
    across = np.cross(axis, np.array([1.0, 0.0, 0.0], np.float32))
    across /= np.linalg.norm(across)
    length = float(np.linalg.norm(b - a))

    def fn(x, y, z):
        d = (x - a[0], y - a[1], z - a[2])
        along = d[0] * axis[0] + d[1] * axis[1] + d[2] * axis[2]
        side = d[0] * across[0] + d[1] * across[1] + d[2] * across[2]
        ends = (along >= 0) & (along <= length)
        return ends & (np.abs(d[0]) <= half_thickness_x) & (np.abs(side) <= half_width * (1 - 0.35 * along / length))

    return fn


# ----------------------------------------------------------------------------- a case

_EVERYWHERE = (-1e4, 1e4, -1e4, 1e4, -1e4, 1e4)


class _Draw:
    """Per-case random variation, drawn in a fixed order from one generator."""

    def __init__(self, rng):
        self.rng = rng

    def at(self, point, sd=2.0):
        """A point jittered by N(0, sd) mm per axis, clipped at 2 sd."""
        return np.asarray(point, float) + np.clip(self.rng.normal(0.0, sd, 3), -2 * sd, 2 * sd)

    def size(self, semi, low=0.87, high=1.15):
        """Semi-axes scaled per axis by U(low, high)."""
        return np.asarray(semi, float) * self.rng.uniform(low, high, len(semi))


def _box(centre, reach):
    return (centre[0] - reach, centre[0] + reach, centre[1] - reach, centre[1] + reach,
            centre[2] - reach, centre[2] + reach)


def _paint_head(grid, draw):
    """Body fat, muscle, skull with its base plate and the brain above it; orbits and globes."""
    fat_mm, skull_mm = draw.rng.uniform(4.0, 8.0), draw.rng.uniform(5.0, 8.0)
    grid.paint(FAT, _EVERYWHERE, body_inset(0.0))
    grid.paint(MUSCLE, _EVERYWHERE, body_inset(2.0 + fat_mm))
    grid.paint(BONE, _EVERYWHERE, lambda x, y, z: body_inset(4.0)(x, y, z) & (z >= plate_z(y) - 2.5))
    brain = body_inset(4.0 + skull_mm)
    grid.paint(BRAIN, _EVERYWHERE, lambda x, y, z: brain(x, y, z) & (z > plate_z(y) + 2.5))
    for side in (1, -1):
        orbit = draw.at((30 * side, -62, 4))
        grid.paint(ORBIT_FAT, _box(orbit, 20), ellipsoid(orbit, draw.size((14, 16, 9))))
        globe = draw.at((30 * side, -76, 4), sd=1.0)
        grid.paint(GLOBE, _box(globe, 14), ellipsoid(globe, draw.size((11, 11, 11), 0.95, 1.05)))


def _paint_neuro(grid, draw):
    """Spinal canal and cord, brain stem in its CSF sheath, chiasm and optic nerves."""
    top, bottom = draw.at((0, 8, 8)), draw.at((0, 22, -36))
    cord_end = draw.at((0, 27, -100))
    semi = draw.size((13, 11))
    grid.paint(CSF, _box(bottom, 60), z_tube(bottom + (0, 0, 6), cord_end, (8, 8)))
    grid.paint(CORD, _box(bottom, 60), z_tube(bottom, cord_end, (5, 5)))
    grid.paint(CSF, _box((top + bottom) / 2, 40), z_tube(top + (0, 0, 2), bottom - (0, 0, 2), semi + 3))
    grid.paint(BRAINSTEM, _box((top + bottom) / 2, 40), z_tube(top, bottom, semi))
    chiasm = draw.at((0, -12, 0), sd=1.5)
    chiasm_semi = draw.size((7.0, 2.2, 2.0))
    for angle in (32, -32):  # the suprasellar cistern: CSF around the chiasm gives it an outline
        grid.paint(CSF, _box(chiasm, 14), ellipsoid(chiasm, chiasm_semi + 2.0, angle), only=(BRAIN,))
    for angle in (32, -32):  # two crossing bars: an X seen from above
        grid.paint(CHIASM, _box(chiasm, 12), ellipsoid(chiasm, chiasm_semi, angle))
    radius = 1.75 * draw.rng.uniform(0.87, 1.15)
    ends = {}
    for cls, side in ((OPTIC_L, 1), (OPTIC_R, -1)):
        start = chiasm + (6 * side, -5, 0)
        end = draw.at((27 * side, -58, 5))
        box = (min(start[0], end[0]) - 6, max(start[0], end[0]) + 6, end[1] - 6, start[1] + 6, -30, 30)
        grid.paint(ORBIT_FAT, box, segment_tube(start, end, radius + 1.5), only=(BONE,))  # optic canal
        grid.paint(cls, box, segment_tube(start, end, radius))
        ends[cls] = (start + end) / 2
    return {"BrainStem": (top + bottom) / 2, "Chiasm": chiasm,
            "OpticNerve_L": ends[OPTIC_L], "OpticNerve_R": ends[OPTIC_R]}


def _paint_neck(grid, draw):
    """Vertebral bodies with discs, the posterior arch around the canal, the airway."""
    cord = draw.at((0, 25, -60), sd=1.0)
    body_centre = cord - (0, 20, 0)
    radius = draw.rng.uniform(9.0, 11.0)
    disc_phase = draw.rng.uniform(0.0, 15.0)
    column = _box((0, body_centre[1], -70), 40)
    grid.paint(VERT_BODY, column, z_tube(body_centre + (0, 0, 22), body_centre - (0, 0, 40), (radius, radius)))
    grid.paint(DISC, column, lambda x, y, z: np.mod(z - disc_phase, 15.0) < 3.5, only=(VERT_BODY,))

    def arch(x, y, z):
        r2 = x**2 + (y - cord[1]) ** 2
        return (r2 >= 8.5**2) & (r2 <= 13**2) & (y >= cord[1] - 3) & (z <= -40)

    grid.paint(VERT_ARCH, _box((0, cord[1], -70), 40), arch, only=(MUSCLE,))
    airway = draw.at((0, -14, -20))
    semi = draw.size((10, 6))
    grid.paint(AIR, _box((0, -14, -60), 45), z_tube(airway, airway + (0, 2, -80), semi))


def _paint_glands(grid, draw):
    """Parotids (superficial + deep lobe) and submandibular glands."""
    centres = {}
    for cls, name, side in ((PAROTID_L, "Parotid_L", 1), (PAROTID_R, "Parotid_R", -1)):
        centre = draw.at((47 * side, -2, -33))
        grid.paint(cls, _box(centre, 35), ellipsoid(centre, draw.size((12.5, 20, 22.5)), 10 * side))
        deep = centre + (-11 * side, 6, -5)
        grid.paint(cls, _box(deep, 20), ellipsoid(deep, draw.size((6, 8, 12))), only=(MUSCLE, FAT))
        centres[name] = centre
    for cls, name, side in ((SUBMAND_L, "Submandibular_L", 1), (SUBMAND_R, "Submandibular_R", -1)):
        centre = draw.at((28 * side, -30, -75))
        semi = draw.size((11, 12.5, 9))
        # A thin fat plane separates the gland from the muscles around it, as in real CT; the gland's
        # own HU stays that of muscle, so only the outline and position tell it apart.
        grid.paint(FAT, _box(centre, 22), ellipsoid(centre, semi + 1.5, -20 * side), only=(MUSCLE,))
        grid.paint(cls, _box(centre, 20), ellipsoid(centre, semi, -20 * side))
        centres[name] = centre
    return centres


def _paint_mandible(grid, draw):
    """U-shaped body (cortex around marrow) with two rami rising back towards the skull base."""
    size = draw.rng.uniform(0.9, 1.1)
    half_width, depth, yc = 43 * size, 38 * size, -20 + draw.rng.normal(0, 2)
    bottom, height = -70 + draw.rng.normal(0, 2), 24 * size
    box = (-60, 60, yc - depth - 10, yc + 30, bottom - 5, -5)
    grid.paint(MAND_CORTEX, box, mandible_body((half_width, depth, yc), 10, bottom, height))
    grid.paint(MAND_MARROW, box, mandible_body((half_width, depth, yc), 5, bottom + 3, height - 6),
               only=(MAND_CORTEX,))
    for side in (1, -1):
        angle = (side * half_width, yc, bottom + 8)
        condyle = draw.at((side * (half_width + 3), yc + 14, -16))
        grid.paint(MAND_CORTEX, box, plate_between(angle, condyle, 3.5, 12))
        grid.paint(MAND_MARROW, box, plate_between(angle, condyle, 1.5, 8), only=(MAND_CORTEX,))
    return {"Mandible": np.array((0.0, yc - depth, bottom + height / 2))}


def case_is_missing(index: int, config: PhantomConfig) -> bool:
    """Whether case ``index`` lacks the mandible and submandibular annotations.

    Low-discrepancy (golden-ratio) sequence: any run of N consecutive cases holds
    ``round(N * missing_share)`` missing ones, give or take one.
    """
    offset = (config.seed * 0.7548776662466927) % 1.0
    return (offset + index * 0.6180339887498949) % 1.0 < config.missing_share


def generate_case(index: int, config: PhantomConfig = PhantomConfig()) -> Case:
    """One phantom case, deterministic by ``(config.seed, index)``.

    Returns a Case with int16 HU [Z, size, size], spacing (spacing_mm, spacing_mm, dz) and
    masks for all nine organs (no Mandible/Submandibular in a "missing" case). Every
    annotated organ has at least one voxel: if an organ is thinner than the grid, the
    voxel nearest its centre is assigned to it.
    """
    rng = np.random.default_rng([config.seed, index])
    dz = float(rng.uniform(*config.slice_spacing_mm))
    depth = max(2, int(round(config.z_extent_mm / dz)))
    shape = (depth, config.size, config.size)
    half = (config.size - 1) / 2 * config.spacing_mm
    spacing = (config.spacing_mm, config.spacing_mm, dz)
    origin = (-half, -half, Z_CENTRE_MM - (depth - 1) / 2 * dz)
    angle = math.radians(rng.uniform(-5.0, 5.0))
    shift = (rng.uniform(-8, 8), rng.uniform(-8, 8), rng.uniform(-3, 3))
    grid = _Grid(shape, spacing, origin, angle, shift, rng.uniform(0.95, 1.05))
    draw = _Draw(rng)
    _paint_head(grid, draw)
    centres = _paint_neuro(grid, draw)
    _paint_neck(grid, draw)
    centres.update(_paint_glands(grid, draw))
    centres.update(_paint_mandible(grid, draw))
    # Nothing outside the body outline; then the 2 mm skin rim over whatever lies beneath it.
    grid.paint(AIR, _EVERYWHERE, lambda x, y, z: ~body_inset(0.0)(x, y, z))
    grid.paint(SKIN, _EVERYWHERE, lambda x, y, z: body_inset(0.0)(x, y, z) & ~body_inset(2.0)(x, y, z))
    counts = np.bincount(grid.labels.ravel(), minlength=len(MEAN_HU))
    for name, classes in ORGAN_CLASSES.items():
        if counts[list(classes)].sum() == 0:
            grid.labels[grid.to_index(centres[name])] = classes[0]
    ct = _to_hu(grid.labels, rng, config.noise_hu)
    missing = case_is_missing(index, config)
    masks = {name: np.isin(grid.labels, classes).astype(np.uint8) for name, classes in ORGAN_CLASSES.items()
             if not (missing and name in MISSABLE)}
    return Case(f"phantom_{index:04d}", ct, spacing, origin, masks=masks)


def _to_hu(labels, rng, noise_hu):
    """int16 HU: per-case jittered class means + Gaussian noise; parotids get a fat-mix texture."""
    means = MEAN_HU + rng.normal(0.0, 4.0, MEAN_HU.shape).astype(np.float32)
    means[AIR] = MEAN_HU[AIR]
    hu = means[labels]
    hu += rng.standard_normal(labels.shape, dtype=np.float32) * np.float32(noise_hu)
    parotid = (labels == PAROTID_L) | (labels == PAROTID_R)
    hu[parotid] += rng.normal(0.0, 20.0, int(parotid.sum())).astype(np.float32)
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16)


# ----------------------------------------------------------------------------- writing + CLI

def write_phantom(
    out_dir, num_cases: int, config: PhantomConfig = PhantomConfig(),
    splits: tuple[float, float, float] | None = DEFAULT_SPLITS, overwrite: bool = False, progress: bool = True,
) -> list[CaseRef]:
    """Write ``num_cases`` phantom cases in PDDCA layout under ``out_dir/{train,validation,test}/``.

    ``splits=None`` writes the case folders directly under ``out_dir``. A ``phantom.json``
    records the settings; rerunning with the same settings skips finished cases (each case
    folder is written atomically), different settings are refused unless ``overwrite``.
    Returns the CaseRefs of all cases in index order.
    """
    out_dir = Path(out_dir)
    if num_cases < 1:
        raise HnsegError(f"--cases {num_cases}: write at least one case")
    if out_dir.exists() and not out_dir.is_dir():
        raise HnsegError(f"{out_dir}: exists and is not a folder; choose another --out")
    counts = split_counts(num_cases, splits) if splits is not None else (num_cases,)
    settings = {"config": configs.to_dict(config), "num_cases": num_cases,
                "splits": list(splits) if splits is not None else None}
    names = [name for name, count in zip(SPLITS, counts, strict=False) for _ in range(count)]
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if progress else (lambda line: None)
    refs = []
    with FolderLock(out_dir, "hnseg phantom"):  # one writer per folder
        _claim_folder(out_dir, settings, overwrite)
        for index in range(num_cases):
            case_id = f"phantom_{index:04d}"
            split = names[index] if splits is not None else None
            folder = out_dir / split / case_id if split else out_dir / case_id
            refs.append(CaseRef(case_id, folder, split))
            if folder.exists() and not overwrite:
                say(f"phantom {index + 1}/{num_cases} {case_id}: exists, skipped")
                continue
            start = time.perf_counter()
            write_pddca_case(generate_case(index, config), folder, overwrite=overwrite)
            seconds = time.perf_counter() - start
            say(f"phantom {index + 1}/{num_cases} {case_id} -> {folder.parent.name} ({seconds:.1f} s)")
    return refs


def _claim_folder(out_dir: Path, settings: dict, overwrite: bool) -> None:
    """Refuse a non-empty folder written with other settings (or not by us) unless overwrite."""
    record = out_dir / "phantom.json"
    if any(p.name != LOCK_NAME for p in out_dir.iterdir()) and not overwrite:
        if not record.is_file():
            raise HnsegError(f"{out_dir}: not empty and not a phantom folder; choose an empty --out or pass --overwrite")
        if configs.read_json(record) != settings:
            raise HnsegError(f"{record}: written with other settings; choose another --out or pass --overwrite")
    configs.write_json_atomic(record, settings)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hnseg phantom``."""
    default = PhantomConfig()
    parser.add_argument("--out", required=True, help="output folder (PDDCA layout, split subfolders)")
    parser.add_argument("--cases", type=int, default=10, help="number of cases (default 10)")
    parser.add_argument("--size", type=int, default=default.size, help="in-plane voxels (default 512)")
    parser.add_argument("--spacing", type=float, default=default.spacing_mm, help="in-plane spacing, mm (0.9)")
    parser.add_argument("--slice-spacing", type=float, nargs=2, metavar=("MIN", "MAX"),
                        default=default.slice_spacing_mm, help="slice spacing range, mm (2 3)")
    parser.add_argument("--z-extent", type=float, default=default.z_extent_mm, help="covered height, mm (120)")
    parser.add_argument("--missing-share", type=float, default=default.missing_share,
                        help="share of cases without mandible/submandibular annotations (0.2)")
    parser.add_argument("--noise", type=float, default=default.noise_hu, help="voxel noise sd, HU (15)")
    parser.add_argument("--seed", type=int, default=default.seed, help="random seed (0)")
    parser.add_argument("--splits", default="0.6,0.2,0.2",
                        help="train,validation,test fractions, or 'none' for a flat folder (0.6,0.2,0.2)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing case folders")


def run(args: argparse.Namespace) -> int:
    """``hnseg phantom``: build the config from the arguments and write the cases."""
    config = PhantomConfig(
        size=args.size, spacing_mm=args.spacing, slice_spacing_mm=tuple(args.slice_spacing),
        z_extent_mm=args.z_extent, missing_share=args.missing_share, noise_hu=args.noise, seed=args.seed,
    )
    splits = None if args.splits.strip().lower() == "none" else parse_fractions(args.splits, "--splits")
    refs = write_phantom(args.out, args.cases, config, splits, overwrite=args.overwrite)
    print(f"wrote {len(refs)} phantom cases to {args.out}", file=sys.stderr)
    return 0
