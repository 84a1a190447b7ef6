"""``hnseg preview``: a PNG grid of augmented training slices with coloured organ contours.

Each tile is the centre CT channel of one training batch sample exactly as the model sees it
(windowed, cropped, warped, mixed), in gray over the window, with the contour of each organ in its
own colour; with mixup the tile shows lambda and outlines the target with the larger weight. A
legend names the organs.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hnseg_keras import configs, render
from hnseg_keras.data.splits import TRAIN
from hnseg_keras.errors import HnsegError
from hnseg_keras.files import refuse_existing


def render_tile(image: np.ndarray, masks: np.ndarray, organs: Sequence[str],
                window: tuple[float, float]) -> np.ndarray:
    """uint8 RGB [H, W, 3]: centre channel of ``image`` [H,W,C] in gray with each organ's contour.

    masks [H, W, O] in {0, 1}, channel ``o`` is ``organs[o]`` (its catalogue colour).
    """
    return render.overlay(image[..., image.shape[-1] // 2], masks, organs, window)


def render_grid(images: np.ndarray, masks: np.ndarray, organs: Sequence[str], window: tuple[float, float],
                lams: np.ndarray | None = None):
    """PIL RGB image: tiles of ``images`` [N,H,W,C] with ``masks`` [N,H,W,O], a legend of ``organs`` below."""
    tiles = []
    for index in range(images.shape[0]):
        tile = render_tile(images[index], masks[index], organs, window)
        if lams is not None:
            note = "" if lams[index] >= 0.5 else " (partner outlined)"
            tile = render.label(tile, f"lam={float(lams[index]):.2f}{note}")
        tiles.append(tile)
    return render.with_legend(render.mosaic(tiles, gap=0), organs)


def preview_batch(manifest_path, count: int, seed: int, augment_config, split: str = TRAIN):
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
    refuse_existing(out, args.force)
    if args.count < 1:
        raise HnsegError(f"--count {args.count}: give at least 1")
    manifest = Manifest.load(args.data)
    config = configs.replace_from_overrides(AugmentConfig(), args.set)
    if config.crop_size and config.crop_size > min(manifest.image_shape[:2]):
        config = dataclasses.replace(config, crop_size=min(manifest.image_shape[:2]))
    images, masks, lams, organs = preview_batch(args.data, args.count, args.seed, config, args.split)
    window = config.window if config.window is not None else HU_RANGE
    render.save_png(render_grid(images, masks, organs, window, lams), out)
    print(f"wrote {out}: {images.shape[0]} augmented {args.split} slices, {len(organs)} organs")
    return 0
