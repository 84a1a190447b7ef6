"""Where training batches come from: prepared shards (tf.data) or an ``hnseg arrays`` file (numpy).

Both answer the same questions for ``trainer``: the organs, the slicing and image shape, the HU
statistics for the model's normalisation, and the batches of one run. Only the shard source needs
TensorFlow, and it imports it only when asked for batches, so an ``.npz`` trains under any Keras
backend on a machine without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from hnseg_keras import configs
from hnseg_keras.data.shards import Manifest, sha256_file, verify_data
from hnseg_keras.data.splits import TRAIN, VALIDATION
from hnseg_keras.errors import HnsegError
from hnseg_keras.inputs.arrays import RawBatches, SliceArrays


def open_data(path: str | os.PathLike | None):
    """The data source ``path`` names: an ``.npz`` from ``hnseg arrays``, else a manifest (file or folder)."""
    if path is None:
        raise HnsegError("no training data: pass --data MANIFEST (run `hnseg prepare` first), or use `hnseg train` "
                         "without --data to train on the built-in phantom")
    return ArrayData(path) if str(path).endswith(".npz") else ShardData(path)


class ShardData:
    """A prepared data set (``manifest.json`` + TFRecord shards), its manifest read once."""

    needs_tensorflow = True

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.path = path / "manifest.json" if path.is_dir() else path
        if not self.path.is_file():
            raise HnsegError(f"{path}: manifest not found; run `hnseg prepare INPUT --out DIR` and pass "
                             "--data DIR/manifest.json, or leave --data out to use the built-in phantom")
        self.manifest = Manifest.load(self.path)
        if not self.manifest.complete:
            raise HnsegError(f"{self.path}: data set is incomplete; rerun `hnseg prepare` to finish it")
        for split in (TRAIN, VALIDATION):
            if not self.manifest.splits.get(split, {}).get("slices"):
                raise HnsegError(f"{self.path}: split {split!r} has no slices; prepare more cases")
        self.organs = tuple(self.manifest.organs)
        self.slicing = configs.to_dict(self.manifest.slicing)
        self.image_shape = tuple(int(v) for v in self.manifest.image_shape)
        self.organ_definitions = self.manifest.organ_definitions
        self.training_geometry = self.manifest.training_geometry()
        self.name, self.sha256 = self.path.resolve().parent.name, sha256_file(self.path)

    def slices(self, split: str) -> int:
        return int(self.manifest.splits[split]["slices"])

    def verify(self) -> None:
        """Size + sha256 of the train and validation shards against the manifest (cached while unchanged)."""
        verify_data(self.path, (TRAIN, VALIDATION), manifest=self.manifest)

    def hu_stats(self, window) -> tuple[float, float]:
        from hnseg_keras.inputs.pipeline import intensity_stats

        return intensity_stats(self.manifest, window)

    def organ_weights(self):
        from hnseg_keras.inputs.pipeline import organ_weights_from_manifest

        return organ_weights_from_manifest(self.manifest)

    def augments_on_device(self, config) -> bool:
        return config.pipeline.augment_on_device

    def batches(self, config, multi_worker: bool = False):
        """``(train, validation, steps_per_epoch, validation_steps, example)``; training repeats endlessly."""
        import tensorflow as tf

        from hnseg_keras.inputs.cache_budget import fit_cache
        from hnseg_keras.inputs.pipeline import train_dataset, validation_dataset

        config = dataclasses.replace(config, pipeline=fit_cache(config.pipeline, self.path))  # memory budget
        batch = config.pipeline.batch_size
        steps = config.steps_per_epoch or self.slices(TRAIN) // batch
        train_ds = train_dataset(self.path, config.pipeline, config.augment, manifest=self.manifest).repeat()
        val_ds = validation_dataset(self.path, config.pipeline, config.augment, manifest=self.manifest)
        val_steps = config.validation_steps
        if multi_worker:
            # Every worker must run the same number of steps (whole batches only). Training batches are
            # sharded by element; validation is not sharded, so every worker scores the whole split and
            # all take the same ReduceLROnPlateau decisions.
            val_steps = val_steps or max(1, self.slices(VALIDATION) // batch)
            train_ds = train_ds.with_options(_shard_options(tf.data.experimental.AutoShardPolicy.DATA))
            val_ds = val_ds.with_options(_shard_options(tf.data.experimental.AutoShardPolicy.OFF))
        if val_steps:
            val_ds = val_ds.repeat()
        else:  # a known length spares Keras an end-of-data warning in the first epoch
            val_ds = val_ds.apply(tf.data.experimental.assert_cardinality(-(-self.slices(VALIDATION) // batch)))
        return train_ds, val_ds, steps, val_steps, None


def _shard_options(policy):
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = policy
    return options


class ArrayData:
    """One split written by ``hnseg arrays`` (uint8 planes over its window); no validation split, no
    distance maps (the boundary term sees zeros). Batches are whole slices; the train step augments."""

    needs_tensorflow = False

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.arrays = SliceArrays.load(self.path)
        meta = self.arrays.meta
        self.organs = tuple(self.arrays.organs)
        self.slicing = dict(meta["slicing"])
        self.image_shape = (*self.arrays.planes.shape[1:], int(self.arrays.channels.shape[1]))
        self.organ_definitions = meta.get("organ_definitions")
        self.training_geometry = meta.get("training_geometry")
        self.name, self.sha256 = meta.get("manifest"), meta.get("manifest_sha256")

    def slices(self, split: str) -> int:
        return len(self.arrays) if split == TRAIN else 0

    def verify(self) -> None:
        """Nothing to check beyond loading: the .npz is read whole (zip CRCs) when opened."""

    def hu_stats(self, window) -> tuple[float, float]:
        if window is None or tuple(window) != self.arrays.window:
            raise HnsegError(f"{self.path}: planes are stored over the HU window {list(self.arrays.window)}; set "
                             f"augment.window to it (got {window}) or rewrite it with "
                             "`hnseg arrays --window LOW HIGH`")
        return float(self.arrays.meta["hu_mean"]), float(self.arrays.meta["hu_std"])

    def organ_weights(self):
        return self.arrays.organ_weights()

    def augments_on_device(self, config) -> bool:
        return True

    def batches(self, config, multi_worker: bool = False):
        """``(train, None, steps_per_epoch, None, example)``; ``example`` is one raw batch for the train step."""
        if multi_worker:
            raise HnsegError(f"{self.path}: arrays train on one worker; unset TF_CONFIG")
        cfg = config.pipeline
        steps = config.steps_per_epoch or max(1, len(self.arrays) // cfg.batch_size)
        batches = RawBatches(self.arrays, cfg.batch_size, steps, seed=cfg.seed,
                             rare_organ_repeats=cfg.rare_organ_repeats, use_multiprocessing=False,
                             workers=4 if cfg.parallel_calls < 0 else cfg.parallel_calls)
        return batches, None, steps, None, batches[0]

