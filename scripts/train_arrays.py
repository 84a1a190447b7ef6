#!/usr/bin/env python
"""Train the U-Net from an ``hnseg arrays`` file under any Keras backend (the GPU machine runs JAX).

The same model, masked loss and metrics as ``hnseg train``; the input side is numpy (uniform draws,
new ones each epoch; no distance maps, so no boundary term): ``arrays.RandomCropBatches`` crops on the
host, or with --warp-probability or --mixup ``arrays.RawBatches`` hands whole slices to the train step,
which crops, warps and mixes them on the device (``train_step``, as ``pipeline.augment_on_device``).
The learning rate is a half-cosine from --lr to 1 % of it over --steps. Writes to --out: ``final.keras``,
``metadata.json`` (so ``hnseg predict --model OUT/final.keras`` runs it on CT volumes) and
``summary.json`` (steps done, wall time, last training metrics, backend and device).

    KERAS_BACKEND=jax python scripts/train_arrays.py train.npz --out runs/x --neighbours 2 --steps 21500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import keras

from hnseg_keras import configs
from hnseg_keras.errors import HnsegError
from hnseg_keras.inference.export import METADATA_FORMAT, model_metadata
from hnseg_keras.inputs.arrays import RandomCropBatches, RawBatches, SliceArrays
from hnseg_keras.inputs.augment import AugmentConfig
from hnseg_keras.inputs.train_step import augment_in_train_step, augmenter
from hnseg_keras.model.losses import SegmentationLoss
from hnseg_keras.model.metrics import dice_metrics
from hnseg_keras.model.unet import UNetConfig, build_unet


class WallClockStop(keras.callbacks.Callback):
    """Stop after the batch that passes ``seconds`` of training, so a lease limit still leaves a model."""

    def __init__(self, seconds: float | None):
        super().__init__()
        self.seconds, self.start, self.steps, self.stopped = seconds, time.monotonic(), 0, False

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.seconds is not None and time.monotonic() - self.start > self.seconds:
            self.model.stop_training = self.stopped = True


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arrays", help=".npz from `hnseg arrays` (train split)")
    parser.add_argument("--out", required=True, help="folder to write (must not exist unless --force)")
    parser.add_argument("--filters", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--convs-per-unit", type=int, default=2)
    parser.add_argument("--units-per-level", type=int, default=1)
    parser.add_argument("--neighbours", type=int, default=None, help="k (default: as stored)")
    parser.add_argument("--steps", type=int, default=21500)
    parser.add_argument("--epochs", type=int, default=10, help="logging chunks the steps are split into")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--crop", type=int, default=80)
    parser.add_argument("--warp-probability", type=float, default=0.0,
                        help="share of samples warped (elastic or grid distortion, one of them), on the device")
    parser.add_argument("--mixup", action="store_true", help="class-weighted mixup, on the device")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--focal-weight", type=float, default=1.0)
    parser.add_argument("--dice-weight", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=2.0, help="focal exponent (0 = cross-entropy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop early after this much training")
    parser.add_argument("--workers", type=int, default=4, help="threads building batches")
    parser.add_argument("--force", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in ("steps", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise HnsegError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if not args.lr > 0:
        raise HnsegError(f"--lr {args.lr}: must be positive")
    if not 0.0 <= args.warp_probability <= 1.0:
        raise HnsegError(f"--warp-probability {args.warp_probability}: must be within 0..1")
    out = Path(args.out)
    if out.exists() and not args.force:
        raise HnsegError(f"{out} exists; pass --force to replace what is in it")
    arrays = SliceArrays.load(args.arrays)
    if args.neighbours is not None:
        arrays = arrays.neighbours(args.neighbours)
    keras.utils.set_random_seed(args.seed)
    organs = arrays.organs
    model_config = UNetConfig(filters=tuple(args.filters), units_per_level=args.units_per_level,
                              convs_per_unit=args.convs_per_unit, input_channels=arrays.channels.shape[1],
                              num_organs=len(organs), window=arrays.window, hu_mean=arrays.meta["hu_mean"],
                              hu_std=arrays.meta["hu_std"], name="unet_arrays")
    model = build_unet(model_config)
    epochs = max(1, min(args.epochs, args.steps))
    per_epoch = args.steps // epochs
    schedule = keras.optimizers.schedules.CosineDecay(args.lr, decay_steps=per_epoch * epochs, alpha=0.01)
    loss = SegmentationLoss(len(organs), focal_weight=args.focal_weight, dice_weight=args.dice_weight,
                            gamma=args.gamma)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=loss, metrics=dice_metrics(organs))
    workers = {"workers": args.workers, "use_multiprocessing": False}
    if args.warp_probability > 0 or args.mixup:
        if not 0 < args.crop <= min(arrays.planes.shape[1:]):
            raise HnsegError(f"--crop {args.crop} must be 1..{min(arrays.planes.shape[1:])} for these slices")
        augment = AugmentConfig(window=arrays.window, crop_size=args.crop, warp_probability=args.warp_probability,
                                mixup=args.mixup)
        batches = RawBatches(arrays, args.batch_size, per_epoch, seed=args.seed, **workers)
        augment_in_train_step(model, augmenter(augment, arrays.organ_weights()), example=batches[0])
    else:
        batches = RandomCropBatches(arrays, args.batch_size, per_epoch, args.crop, seed=args.seed, **workers)
    clock = WallClockStop(None if args.max_minutes is None else 60.0 * args.max_minutes)
    print(f"{keras.backend.backend()} | {model.count_params():,} parameters | {len(arrays)} slices | "
          f"{per_epoch * epochs} steps of {args.batch_size}", file=sys.stderr, flush=True)
    start = time.monotonic()
    history = model.fit(batches, epochs=epochs, callbacks=[clock], verbose=2)
    seconds = time.monotonic() - start
    out.mkdir(parents=True, exist_ok=True)
    inference = build_unet(model_config)  # weights only: no optimizer state in the file (a third the size)
    inference.set_weights(model.get_weights())
    tmp = out / ".final.keras.tmp.keras"
    inference.save(tmp)
    tmp.replace(out / "final.keras")
    height, width = arrays.planes.shape[1:]
    metadata = model_metadata(arrays.organs, arrays.meta["slicing"], (height, width, model_config.input_channels),
                              arrays.meta.get("manifest"), configs.to_dict(model_config))
    metadata["format"] = METADATA_FORMAT  # read_metadata's marker; a .keras file with it needs no run folder
    configs.write_json_atomic(out / "metadata.json", metadata)
    last = {key: float(values[-1]) for key, values in history.history.items()}
    summary = {"args": vars(args), "backend": keras.backend.backend(), "device": _device(),
               "parameters": int(model.count_params()), "steps_done": clock.steps,
               "stopped_by_clock": clock.stopped, "train_seconds": round(seconds, 1),
               "ms_per_step": round(1000 * seconds / max(1, clock.steps), 2), "last_epoch": last}
    configs.write_json_atomic(out / "summary.json", summary)
    print(json.dumps({k: summary[k] for k in ("steps_done", "train_seconds", "ms_per_step")}), file=sys.stderr)
    return 0


def _device() -> str:
    if keras.backend.backend() == "jax":
        import jax

        return str(jax.devices()[0])
    return "cpu"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HnsegError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
