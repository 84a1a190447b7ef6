"""``hnseg predict --preview``: one PNG per case to look at before opening a viewer.

Three rows: axial, coronal and sagittal slices through the predicted organs (evenly spaced over the
organs' extent along each axis), each drawn in the soft-tissue window with the organs' contours in
their catalogue colours, at the physical aspect ratio (mm), head up. The evaluation notebook uses
the same picture with ground truth beside the prediction.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hnseg_keras import render
from hnseg_keras.files import refuse_existing

VIEWS = ("axial", "coronal", "sagittal")
TILE_PX = 160


def slice_positions(masks: np.ndarray, axis: int, count: int) -> list[int]:
    """``count`` indices along ``axis`` (0 z, 1 y, 2 x of [O, Z, Y, X]) evenly inside the organs' extent.

    With no organ predicted, evenly inside the whole volume.
    """
    size = masks.shape[axis + 1]
    occupied = np.flatnonzero(masks.any(axis=tuple(a for a in range(4) if a != axis + 1)))
    low, high = (int(occupied[0]), int(occupied[-1])) if occupied.size else (0, size - 1)
    return sorted({int(math.floor(low + (high - low) * (i + 1) / (count + 1) + 0.5)) for i in range(count)})


def view_slice(ct: np.ndarray, masks: np.ndarray, view: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(HU [rows, columns], masks [rows, columns, O]) of one slice; coronal and sagittal with the head up."""
    if view == "axial":
        return ct[index], np.moveaxis(masks[:, index], 0, -1)
    if view == "coronal":
        image, organ_masks = ct[:, index, :], masks[:, :, index, :]
    else:
        image, organ_masks = ct[:, :, index], masks[:, :, :, index]
    return image[::-1], np.moveaxis(organ_masks, 0, -1)[::-1]


def display_shape(shape: tuple[int, int], pixel_mm: tuple[float, float], tile: int) -> tuple[int, int]:
    """(rows, columns) in pixels that keep the physical aspect and fit in ``tile`` x ``tile``."""
    height_mm, width_mm = shape[0] * pixel_mm[0], shape[1] * pixel_mm[1]
    scale = tile / max(height_mm, width_mm)
    return max(1, int(round(height_mm * scale))), max(1, int(round(width_mm * scale)))


def view_tile(ct, masks, organs, view: str, index: int, spacing, tile: int, window) -> np.ndarray:
    """uint8 [tile, tile, 3]: one slice with contours, resampled to its physical aspect, labelled."""
    sx, sy, sz = spacing
    pixel_mm = {"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)}[view]
    image, organ_masks = view_slice(ct, masks, view, index)
    shape = display_shape(image.shape, pixel_mm, tile)
    rgb = render.overlay(render.fit(image, shape, 1), render.fit(organ_masks, shape, 0), organs, window)
    return render.label(render.pad_to(rgb, (tile, tile)), f"{view[0]}{index}")


def case_preview(ct: np.ndarray, masks: np.ndarray, organs: Sequence[str], spacing, title: str = "",
                 per_view: int = 4, tile: int = TILE_PX, window=render.DISPLAY_WINDOW):
    """PIL image: rows of axial, coronal and sagittal tiles with a legend.

    ct: HU [Z, Y, X]; masks: bool [O, Z, Y, X] in the order of ``organs``; spacing (x, y, z) mm.
    """
    tiles = []
    for axis, view in enumerate(VIEWS):
        positions = slice_positions(masks, axis, per_view)
        row = [view_tile(ct, masks, organs, view, i, spacing, tile, window) for i in positions]
        tiles += row + [np.zeros((tile, tile, 3), np.uint8)] * (per_view - len(row))
    return render.with_legend(render.mosaic(tiles, columns=per_view), organs, title)


def write_case_preview(case, seg, path: str | os.PathLike, force: bool = False) -> Path:
    """Write the preview PNG of one predicted case (``prediction.Segmentation``) on its CT."""
    path = Path(path)
    refuse_existing(path, force)
    present = [name for o, name in enumerate(seg.organs) if seg.masks[o].any()]
    title = f"{case.case_id}: predicted {len(present)} of {len(seg.organs)} organs"
    render.save_png(case_preview(case.ct, seg.masks, seg.organs, case.spacing, title), path)
    return path


def preview_paths(out_dir: Path, case_ids: Sequence[str], force: bool = False) -> dict[str, Path]:
    """``OUT/preview/<case>.png`` per case, refused up front (before any prediction) when one exists."""
    paths = {case_id: Path(out_dir) / "preview" / f"{case_id}.png" for case_id in case_ids}
    for path in paths.values():
        refuse_existing(path, force)
    return paths
