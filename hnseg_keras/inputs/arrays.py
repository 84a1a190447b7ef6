"""A prepared split as one compressed ``.npz`` of plain arrays, for backends without TensorFlow.

The GPU machine this project borrows runs Keras on JAX and has no TensorFlow, so it cannot read the
TFRecord shards. ``hnseg arrays`` (run where TensorFlow is) turns one split of a manifest into an
``.npz`` that numpy alone reads; :class:`SliceArrays` loads it and :class:`RawBatches` hands whole
slices to ``model.fit`` under any backend, whose train step augments them (``train_step``: the
window, crop, rotation, zoom, warps, intensity ops and mixup of ``augment.OPS``).
``hnseg train --data FILE.npz`` trains from it (``training.sources.ArrayData``).

Compact on purpose (a call to that machine carries at most 64 MiB):

- ``planes`` uint8 [P, H, W]: every CT plane once (a 2.5D example's neighbours are shared with the
  examples next to it), quantised over the training window (``window``; 350 HU / 255 = 1.4 HU steps,
  well under CT noise; the model clips to the same window first, so nothing outside it is lost);
- ``channels`` int32 [N, 2k+1]: each example's planes, centre at k; a smaller k is a view (`neighbours`);
- ``masks`` uint8 [N, H, W]: bit o set where organ o is inside (at most 8 organs);
- ``annotated`` uint8 [N, O]; ``case_ids``, ``slice_index`` [N]; ``meta``: JSON (organs, slicing,
  window, HU statistics of the train split, source data folder name and manifest checksum).

Distance maps are not carried: the boundary loss cannot train from this format (targets hold zeros).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from hnseg_keras import configs
from hnseg_keras.errors import HnsegError
from hnseg_keras.files import atomic_path, refuse_existing
from hnseg_keras.inputs.batching import organ_repeats, slice_repeats

FORMAT = "hnseg-slice-arrays/1"
MAX_ORGANS = 8


@dataclass
class SliceArrays:
    """One split in memory; see the module docstring for each field."""

    planes: np.ndarray
    channels: np.ndarray
    masks: np.ndarray
    annotated: np.ndarray
    case_ids: np.ndarray
    slice_index: np.ndarray
    meta: dict

    @property
    def organs(self) -> list[str]:
        return list(self.meta["organs"])

    @property
    def window(self) -> tuple[float, float]:
        low, high = self.meta["window"]
        return float(low), float(high)

    def __len__(self) -> int:
        return int(self.channels.shape[0])

    def neighbours(self, k: int) -> SliceArrays:
        """The same examples with k neighbours each side (k at most the stored k)."""
        stored = (self.channels.shape[1] - 1) // 2
        if not 0 <= k <= stored:
            raise HnsegError(f"arrays hold {stored} neighbour(s) each side; choose --neighbours 0..{stored}")
        meta = dict(self.meta, slicing=dict(self.meta["slicing"], neighbours=k))
        return SliceArrays(self.planes, self.channels[:, stored - k:stored + k + 1], self.masks, self.annotated,
                           self.case_ids, self.slice_index, meta)

    def images(self, index) -> np.ndarray:
        """float32 HU [n, H, W, C] of the examples in ``index`` (within the window)."""
        low, high = self.window
        planes = self.planes[self.channels[index]]  # [n, C, H, W]
        return np.moveaxis(planes, 1, -1).astype(np.float32) * np.float32((high - low) / 255.0) + np.float32(low)

    def organ_masks(self, index) -> np.ndarray:
        """uint8 [n, H, W, O] binary masks of the examples in ``index``."""
        bits = np.arange(len(self.organs), dtype=np.uint8)
        return (self.masks[index][..., None] >> bits) & 1

    def organ_presence(self) -> np.ndarray:
        """bool [N, O]: which organs have foreground in each slice."""
        return np.stack([((self.masks >> bit) & 1).any(axis=(1, 2)) for bit in range(len(self.organs))], axis=1)

    def organ_weights(self, presence: np.ndarray | None = None) -> np.ndarray:
        """float32 [O] mixup weights: 1 / the number of slices that hold each organ (as the pipeline's).
        ``presence``: :meth:`organ_presence`, when the caller already has it."""
        counts = np.count_nonzero(self.organ_presence() if presence is None else presence, axis=0)
        return (1.0 / np.maximum(counts, 1)).astype(np.float32)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file beside ``path``, then rename)."""
        with atomic_path(path) as temp, open(temp, "wb") as handle:
            np.savez_compressed(handle, planes=self.planes, channels=self.channels, masks=self.masks,
                                annotated=self.annotated, case_ids=self.case_ids,
                                slice_index=self.slice_index, meta=np.array(json.dumps(self.meta)))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SliceArrays:
        path = Path(path)
        if not path.is_file():
            raise HnsegError(f"{path}: no such arrays file; write one with `hnseg arrays MANIFEST --out FILE`")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                fields = {key: data[key] for key in ("planes", "channels", "masks", "annotated", "case_ids",
                                                     "slice_index")}
        except (OSError, ValueError, KeyError) as error:
            raise HnsegError(f"{path}: not a readable hnseg arrays file ({error})") from None
        if meta.get("format") != FORMAT:
            raise HnsegError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}; rewrite it with "
                             "`hnseg arrays`")
        return cls(meta=meta, **fields)


def quantise(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """uint8 codes of HU clipped to ``window`` (0 = low end, 255 = high end)."""
    low, high = window
    scaled = (np.clip(hu.astype(np.float32), low, high) - low) * np.float32(255.0 / (high - low))
    return np.rint(scaled).astype(np.uint8)


def from_examples(examples, organs, slicing: dict, window: tuple[float, float], extra_meta: dict | None = None
                  ) -> SliceArrays:
    """Build arrays from parsed example dicts (numpy: image [H,W,C] int16, masks [H,W,O], annotated,
    case_id, slice_index), deduplicating the planes a 2.5D example shares with its neighbours."""
    if len(organs) > MAX_ORGANS:
        raise HnsegError(f"{len(organs)} organs: the arrays format packs at most {MAX_ORGANS} per pixel")
    plane_ids: dict[tuple[str, int], int] = {}
    planes, channels, masks, annotated, case_ids, slice_index = [], [], [], [], [], []
    bits = (1 << np.arange(len(organs))).astype(np.uint8)
    for example in examples:
        image = np.asarray(example["image"])
        case_id = example["case_id"]
        case_id = case_id.decode() if isinstance(case_id, bytes) else str(case_id)
        centre, k = int(example["slice_index"]), (image.shape[-1] - 1) // 2
        row = []
        for j in range(image.shape[-1]):
            key = (case_id, centre + j - k)  # unclamped: planes repeated at the volume ends stay distinct
            if key not in plane_ids:
                plane_ids[key] = len(planes)
                planes.append(quantise(image[..., j], window))
            row.append(plane_ids[key])
        channels.append(row)
        masks.append((np.asarray(example["masks"]).astype(np.uint8) * bits).sum(axis=-1, dtype=np.uint8))
        annotated.append(np.asarray(example["annotated"]).astype(np.uint8))
        case_ids.append(case_id)
        slice_index.append(centre)
    if not channels:
        raise HnsegError("no examples to write")
    meta = {"format": FORMAT, "organs": list(organs), "slicing": dict(slicing), "window": [float(v) for v in window],
            **(extra_meta or {})}
    return SliceArrays(np.stack(planes), np.asarray(channels, np.int32), np.stack(masks), np.stack(annotated),
                       np.asarray(case_ids), np.asarray(slice_index, np.int32), meta)


class _UniformBatches(keras.utils.PyDataset):
    """``steps`` batches per epoch of examples drawn with replacement (uniformly, or weighted by rare organs). Batch ``i`` of epoch ``e``
    depends only on ``(seed, e * steps + i)``, so workers may build batches in any order and every epoch
    draws new ones."""

    def __init__(self, arrays: SliceArrays, batch_size: int, steps: int, seed: int = 0,
                 rare_organ_repeats: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.arrays, self.batch_size, self.steps, self.seed, self.epoch = arrays, batch_size, steps, seed, 0
        self.probabilities = None
        if rare_organ_repeats > 1:  # as the tf.data pipeline's repeat_rare: slices weighted by their repeats
            presence = arrays.organ_presence()
            repeats = organ_repeats(arrays.organ_weights(presence), rare_organ_repeats)
            weights = slice_repeats(presence, repeats).astype(np.float64)
            self.probabilities = weights / weights.sum()

    def __len__(self) -> int:
        return self.steps

    def on_epoch_end(self):
        self.epoch += 1

    def _draw(self, i):
        rng = np.random.default_rng([self.seed, self.epoch * self.steps + i])
        if self.probabilities is None:
            return rng, rng.integers(0, len(self.arrays), self.batch_size)
        return rng, rng.choice(len(self.arrays), self.batch_size, p=self.probabilities)


class RawBatches(_UniformBatches):
    """Whole-slice batches ``(batch dict, seed int32 [2])`` for ``train_step.augment_in_train_step``,
    which crops, warps and mixes them inside the train step. Distance maps are zeros (not stored)."""

    def __getitem__(self, i):
        rng, index = self._draw(i)
        masks = self.arrays.organ_masks(index).astype(np.float32)
        batch = {"image": self.arrays.images(index), "masks": masks, "dist_maps": np.zeros_like(masks),
                 "annotated": self.arrays.annotated[index].astype(np.float32)}
        return batch, rng.integers(0, 2**31 - 1, 2).astype(np.int32)


# ----------------------------------------------------------------------------- CLI (TensorFlow side)


def export_split(manifest_path: str | os.PathLike, split: str, out: str | os.PathLike,
                 window: tuple[float, float] | None = None, force: bool = False, neighbours: int | None = None) -> Path:
    """Write ``split`` of a shard manifest to ``out`` (needs TensorFlow to read the shards), with
    ``neighbours`` planes each side (None: as prepared)."""
    from hnseg_keras.data.shards import Manifest, read_split, sha256_file
    from hnseg_keras.inputs import augment, pipeline

    out = Path(out)
    refuse_existing(out, force, "pass --force to replace it")
    manifest_path = Path(manifest_path)
    if manifest_path.is_dir():
        manifest_path = manifest_path / "manifest.json"
    manifest = Manifest.load(manifest_path)
    window = tuple(window) if window is not None else augment.HU_WINDOW
    hu_mean, hu_std = pipeline.intensity_stats(manifest, window)
    examples = read_split(manifest_path, split).as_numpy_iterator()
    arrays = from_examples(examples, manifest.organs, configs.to_dict(manifest.slicing), window,
                           {"split": split, "hu_mean": hu_mean, "hu_std": hu_std,
                            "manifest": manifest_path.resolve().parent.name,
                            "manifest_sha256": sha256_file(manifest_path),
                            "organ_definitions": manifest.organ_definitions,
                            "training_geometry": manifest.training_geometry()})
    return (arrays if neighbours is None else arrays.neighbours(neighbours)).save(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", metavar="MANIFEST", help="manifest.json (or its folder) from `hnseg prepare`")
    parser.add_argument("--out", required=True, help=".npz file to write")
    parser.add_argument("--split", default="train", help="split to write (default train)")
    parser.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                        help="HU window the planes are quantised over (default: the training window, -155 195)")
    parser.add_argument("--neighbours", type=int, help="keep k neighbouring planes each side (default: as prepared)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")


def run(args: argparse.Namespace) -> int:
    if args.window is not None and not args.window[0] < args.window[1]:
        raise HnsegError(f"--window {args.window[0]:g} {args.window[1]:g}: LOW must be below HIGH")
    path = export_split(args.manifest, args.split, args.out, args.window, args.force, args.neighbours)
    arrays = SliceArrays.load(path)
    print(f"wrote {path}: {len(arrays)} {args.split} slices, {arrays.planes.shape[0]} planes, "
          f"{path.stat().st_size / 2**20:.1f} MiB", file=sys.stderr)
    return 0
