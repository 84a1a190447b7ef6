"""``hnseg preview``: a PNG grid of augmented training slices with coloured organ contours.

Each tile is the centre CT channel of one training batch sample exactly as the model sees it
(windowed, cropped, warped, mixed), in gray over the window, with the contour of each organ in its
own colour; with mixup the tile shows lambda and outlines the target with the larger weight. A
legend names the organs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hnseg_keras import configs
from hnseg_keras.errors import HnsegError

# Distinct, colour-blind-aware colours (Okabe-Ito plus extras), one per organ channel.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
    (204, 121, 167), (255, 255, 255), (255, 0, 0), (0, 255, 0), (160, 32, 240), (0, 255, 255),
)
LEGEND_ROW_PX = 18


def contours(mask: np.ndarray) -> np.ndarray:
    """bool [H, W]: the pixels of a binary mask that touch the background (4-neighbourhood)."""
    from scipy import ndimage

    mask = np.asarray(mask) > 0.5
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def to_gray(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """uint8 [H, W] of an HU slice mapped linearly from ``window`` to 0..255."""
    low, high = window
    scaled = (np.asarray(image, np.float64) - low) / (high - low)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def render_tile(image: np.ndarray, masks: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """uint8 RGB [H, W, 3]: centre channel of ``image`` [H,W,C] in gray with each organ's contour.

    masks [H, W, O] in {0, 1}.
    """
    gray = to_gray(image[..., image.shape[-1] // 2], window)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    for organ in range(masks.shape[-1]):
        rgb[contours(masks[..., organ])] = PALETTE[organ % len(PALETTE)]
    return rgb


def render_grid(images: np.ndarray, masks: np.ndarray, organs: Sequence[str], window: tuple[float, float],
                lams: np.ndarray | None = None):
    """PIL RGB image: tiles of ``images`` [N,H,W,C] with ``masks`` [N,H,W,O], a legend of ``organs`` below."""
    from PIL import Image, ImageDraw

    count, height, width = images.shape[:3]
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    legend_columns = max(1, (columns * width) // 150)
    legend_rows = math.ceil(len(organs) / legend_columns)
    canvas = Image.new("RGB", (columns * width, rows * height + legend_rows * LEGEND_ROW_PX + 4), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for index in range(count):
        left, top = (index % columns) * width, (index // columns) * height
        canvas.paste(Image.fromarray(render_tile(images[index], masks[index], window)), (left, top))
        if lams is not None:
            label = "" if lams[index] >= 0.5 else " (partner outlined)"
            draw.text((left + 3, top + 2), f"lam={float(lams[index]):.2f}{label}", fill=(255, 255, 0))
    for index, name in enumerate(organs):
        left = (index % legend_columns) * 150 + 4
        top = rows * height + 4 + (index // legend_columns) * LEGEND_ROW_PX
        draw.rectangle((left, top + 2, left + 11, top + 13), fill=PALETTE[index % len(PALETTE)])
        draw.text((left + 16, top + 1), name, fill=(255, 255, 255))
    return canvas


def preview_batch(manifest_path, count: int, seed: int, augment_config, split: str = "train"):
    """One augmented training batch of ``count`` slices: (images, masks, lam or None, organ names).

    masks are those of the target with the larger mixup weight (the first one when lam >= 0.5).
    """
    from hnseg_keras.data.shards import Manifest
    from hnseg_keras.inputs import pipeline, targets

    manifest = Manifest.load(manifest_path)
    available = int(manifest.splits.get(split, {}).get("slices", 0))
    if available < 1:
        raise HnsegError(f"{manifest_path}: split {split!r} has no slices; choose another --split")
    pipe = pipeline.PipelineConfig(batch_size=min(count, available), shuffle_buffer=min(available, 1024),
                                   seed=seed)
    x, y = next(iter(pipeline.train_dataset(manifest_path, pipe, augment_config, split=split)))
    unpacked = targets.unpack_targets(y, len(manifest.organs))
    # Contour the dominant target of each mixed image (0 where an organ is not annotated: no contour).
    lams = np.asarray(unpacked.lam) if augment_config.mixup else None
    masks = np.asarray(unpacked.masks)
    if lams is not None:
        masks = np.where((lams >= 0.5)[:, None, None, None], masks, np.asarray(unpacked.partner_masks))
    return np.asarray(x), masks, lams, list(manifest.organs)


def write_png_atomic(image, path: Path, force: bool) -> None:
    """Save a PIL image to ``path`` through a temporary file in the same folder; refuse to overwrite."""
    if path.exists() and not force:
        raise HnsegError(f"{path}: exists; choose another --out or pass --force to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="manifest.json (or its folder) written by `hnseg prepare`")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--count", type=int, default=16, help="number of slices (one training batch)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle and augmentation seed")
    parser.add_argument("--split", default="train", help="split to draw from")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="AugmentConfig override, repeatable (e.g. mixup=false, warp_probability=1)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")


def run(args: argparse.Namespace) -> int:
    from hnseg_keras.data.shards import Manifest
    from hnseg_keras.inputs.augment import HU_RANGE, AugmentConfig

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise HnsegError(f"--out {out}: give a .png file name")
    if out.exists() and not args.force:
        raise HnsegError(f"{out}: exists; choose another --out or pass --force to overwrite")
    if args.count < 1:
        raise HnsegError(f"--count {args.count}: give at least 1")
    manifest = Manifest.load(args.data)
    config = configs.replace_from_overrides(AugmentConfig(), args.set)
    if config.crop_size and config.crop_size > min(manifest.image_shape[:2]):
        config = dataclasses.replace(config, crop_size=min(manifest.image_shape[:2]))
    images, masks, lams, organs = preview_batch(args.data, args.count, args.seed, config, args.split)
    window = config.window if config.window is not None else HU_RANGE
    write_png_atomic(render_grid(images, masks, organs, window, lams), out, args.force)
    print(f"wrote {out}: {images.shape[0]} augmented {args.split} slices, {len(organs)} organs")
    return 0
