"""The one way this project draws organs on CT: gray window, one-pixel contours, catalogue colours.

Used by ``hnseg preview``, the TensorBoard validation images, ``hnseg predict --preview``, the
evaluation overlays and the notebooks, so an organ has the same colour everywhere
(``organs.colour_of``). Pure numpy for the pixels; PIL only to add text (legends, labels).

The gray window is a display choice (``DISPLAY_WINDOW`` unless a caller passes one), not the model's input
window (``inputs.augment.HU_WINDOW``): a picture of what the model sees passes that window explicitly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from hnseg_keras.data.organs import CATALOGUE, colour_of
from hnseg_keras.files import atomic_path

DISPLAY_WINDOW = (-160.0, 240.0)  # HU: the usual soft-tissue viewing window (width 400, level 40)
LEGEND_ROW_PX = 18
LEGEND_ITEM_PX = 150


def organ_colour(name: str) -> tuple[int, int, int]:
    """RGB 0-255 of ``name`` from the catalogue; white for a name the catalogue does not know."""
    return colour_of(name) if name in CATALOGUE else (255, 255, 255)


def contour(mask: np.ndarray) -> np.ndarray:
    """bool [H, W]: pixels of ``mask`` with a 4-neighbour outside it (the image border counts as outside)."""
    mask = np.asarray(mask) > 0.5
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def to_gray(image: np.ndarray, window: tuple[float, float] = DISPLAY_WINDOW) -> np.ndarray:
    """uint8 [H, W] of an HU slice mapped linearly from ``window`` (HU) to 0..255."""
    low, high = window
    scaled = (np.asarray(image, np.float64) - low) / (high - low)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def overlay(image: np.ndarray, masks: np.ndarray, organs: Sequence[str],
            window: tuple[float, float] = DISPLAY_WINDOW) -> np.ndarray:
    """uint8 RGB [H, W, 3]: an HU slice [H, W] in gray with each organ's contour in its colour.

    masks [H, W, O] (any values; > 0.5 is inside), channel ``o`` is organ ``organs[o]``. Later
    organs draw over earlier ones where contours touch.
    """
    gray = to_gray(image, window)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    for channel, name in enumerate(organs):
        rgb[contour(masks[..., channel])] = organ_colour(name)
    return rgb


def mosaic(tiles: Sequence[np.ndarray], columns: int | None = None, gap: int = 2) -> np.ndarray:
    """uint8 [rows*H, columns*W, 3] grid of equally sized RGB tiles, black gaps and empty cells."""
    count = len(tiles)
    if count == 0:
        raise ValueError("mosaic needs at least one tile")
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    height, width = tiles[0].shape[:2]
    canvas = np.zeros((rows * height + (rows - 1) * gap, columns * width + (columns - 1) * gap, 3), np.uint8)
    for index, tile in enumerate(tiles):
        top, left = (index // columns) * (height + gap), (index % columns) * (width + gap)
        canvas[top:top + height, left:left + width] = tile
    return canvas


def with_legend(rgb: np.ndarray, organs: Sequence[str], title: str | None = None):
    """PIL image: ``rgb`` [H, W, 3] with an optional title line above and a colour legend of ``organs`` below."""
    from PIL import Image, ImageDraw

    height, width = rgb.shape[:2]
    per_row = max(1, width // LEGEND_ITEM_PX)
    legend_rows = math.ceil(len(organs) / per_row)
    top = LEGEND_ROW_PX if title else 0
    canvas = Image.new("RGB", (width, top + height + legend_rows * LEGEND_ROW_PX + 4), (0, 0, 0))
    canvas.paste(Image.fromarray(rgb), (0, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 3), title, fill=(255, 255, 255))
    for index, name in enumerate(organs):
        left = (index % per_row) * LEGEND_ITEM_PX + 4
        row_top = top + height + 4 + (index // per_row) * LEGEND_ROW_PX
        draw.rectangle((left, row_top + 2, left + 11, row_top + 13), fill=organ_colour(name))
        draw.text((left + 16, row_top + 1), name, fill=(255, 255, 255))
    return canvas


def label(rgb: np.ndarray, text: str, colour: tuple[int, int, int] = (255, 255, 0)) -> np.ndarray:
    """uint8 [H, W, 3]: a copy of ``rgb`` with ``text`` written in its top-left corner."""
    from PIL import Image, ImageDraw

    picture = Image.fromarray(np.ascontiguousarray(rgb))
    ImageDraw.Draw(picture).text((3, 2), text, fill=colour)
    return np.asarray(picture)


def save_png(picture, path: str | os.PathLike) -> None:
    """Write a PIL image (or a uint8 RGB array) to ``path`` through a temporary name, so no half PNG exists."""
    from PIL import Image

    if isinstance(picture, np.ndarray):
        picture = Image.fromarray(picture)
    with atomic_path(path) as temp:
        picture.save(temp, format="PNG", optimize=True)


def fit(image: np.ndarray, shape: tuple[int, int], order: int) -> np.ndarray:
    """``image`` [H, W, ...] resampled to ``shape`` (rows, columns): order 1 for CT, 0 for masks."""
    factors = (shape[0] / image.shape[0], shape[1] / image.shape[1]) + (1.0,) * (image.ndim - 2)
    out = ndimage.zoom(np.asarray(image, np.float32), factors, order=order, grid_mode=True, mode="nearest")
    return out[: shape[0], : shape[1]]


def pad_to(rgb: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """uint8 [rows, columns, 3]: ``rgb`` centred on black (it must fit)."""
    canvas = np.zeros((*shape, 3), np.uint8)
    top, left = (shape[0] - rgb.shape[0]) // 2, (shape[1] - rgb.shape[1]) // 2
    canvas[top:top + rgb.shape[0], left:left + rgb.shape[1]] = rgb
    return canvas


def save_figure(figure, path: str | os.PathLike) -> Path:
    """PNG of a matplotlib Figure through a temporary name."""
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png")
    return Path(path)
