"""tf.data input pipelines for training and validation, ending in Keras ``(x, y)`` pairs.

The core builders take any ``tf.data.Dataset`` of parsed example dicts (the table in
docs/ARCHITECTURE.md: ``image`` int16 HU [H,W,C], ``masks`` uint8 [H,W,O], ``dist_maps`` int8
[H,W,O], ``annotated`` uint8 [O], plus ids that are dropped here); thin wrappers read them from a
manifest with ``shards.read_split``. Training::

    examples -> (repeat rare-organ slices) -> shuffle -> batch (drop remainder) -> draw
        -> augment.OPS (window, crop + rotation/zoom + warp, the intensity ops noise, blur, brightness,
           shift, contrast, inverted gamma, gamma, mixup) -> pack

where each batch carries its own stateless seed, so the stream is reproducible for a
``PipelineConfig.seed`` and still differs from epoch to epoch. ``x`` is the windowed HU image
[B,S,S,C] float32 (the model normalises it with :func:`intensity_stats`), ``y`` the packed target of
``targets.pack_targets``.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from hnseg_keras.data.splits import TRAIN, VALIDATION
from hnseg_keras.errors import HnsegError
from hnseg_keras.inputs import augment, targets
from hnseg_keras.inputs.augment import AugmentConfig, cast_and_window
from hnseg_keras.inputs.batching import PipelineConfig, organ_repeats

EXAMPLE_KEYS: tuple[str, ...] = ("image", "masks", "dist_maps", "annotated")
_SEED_MODULUS = 2**31 - 1


def _tune(value: int) -> int:
    return tf.data.AUTOTUNE if value < 0 else value


def select_examples(examples: tf.data.Dataset) -> tf.data.Dataset:
    """Keep only the tensors training uses (ids and spacing are dropped)."""
    return examples.map(lambda example: {key: example[key] for key in EXAMPLE_KEYS})


def _cache(dataset: tf.data.Dataset, cache: str | None, split: str) -> tf.data.Dataset:
    """No cache, tf.data's memory cache, or its file cache at ``<cache>-<split>`` (one file set per split)."""
    if cache is None:
        return dataset
    return dataset.cache("" if cache == "memory" else f"{cache}-{split}")


def repeat_rare(examples: tf.data.Dataset, repeats) -> tf.data.Dataset:
    """Each example repeated by the largest ``repeats`` [O] entry among the organs with foreground
    in it (1 when none), as ``batching.slice_repeats`` counts for the arrays path."""
    repeats = tf.constant(np.asarray(repeats, np.int64))

    def times(example):
        masks = example["masks"]
        present = tf.reduce_any(tf.reshape(masks > 0, [-1, tf.shape(masks)[-1]]), axis=0)
        return tf.reduce_max(tf.where(present, repeats, tf.ones_like(repeats)))

    return examples.flat_map(lambda example: tf.data.Dataset.from_tensors(example).repeat(times(example)))


def batch_seeds(seed: int) -> tf.data.Dataset:
    """Endless int32 [2] seeds, one per batch: (random draw, batch counter).

    ``Dataset.random`` with ``rerandomize_each_iteration`` gives new draws each epoch, reproducibly
    for ``seed``; the counter keeps seeds within an epoch distinct.
    """
    draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    counter = tf.data.Dataset.counter()
    return tf.data.Dataset.zip(draws, counter).map(
        lambda draw, count: tf.cast(tf.stack([draw % _SEED_MODULUS, count % _SEED_MODULUS]), tf.int32))


def _op_stage(op: augment.AugmentOp, config: AugmentConfig, weights, jit_compile: bool):
    """A map function ``(batch, params) -> (batch, params)`` running one augmentation op."""
    def stage(batch, params):
        return op.apply(batch, params.get(op.name, {}), config, weights), params

    return tf.function(stage, jit_compile=True) if jit_compile and op.compilable else stage


def build_train_dataset(examples: tf.data.Dataset, pipeline_config: PipelineConfig | None = None,
                        augment_config: AugmentConfig | None = None, organ_weights=None) -> tf.data.Dataset:
    """Training batches ``(x, y)`` from a dataset of example dicts.

    Args:
        examples: dataset of example dicts with static spatial shapes.
        pipeline_config: batching, shuffling, seeds, parallelism (None: defaults).
        augment_config: window, crop, warp and mixup settings (None: paper defaults).
        organ_weights: [O] mixup organ weights (:func:`organ_weights_from_manifest`) or None (uniform).

    Returns:
        ``(x [B,S,S,C], y [B,S,S,4O+1])`` float32 with S = crop size; with ``augment_on_device``
        ``(batch dict at the input size, seed int32 [2])`` instead.
    """
    cfg, augment_config = pipeline_config or PipelineConfig(), augment_config or AugmentConfig()
    calls = _tune(cfg.parallel_calls)
    weights = None if organ_weights is None else tf.constant(np.asarray(organ_weights, np.float32))
    ds = _cache(select_examples(examples), cfg.cache, TRAIN)
    if cfg.rare_organ_repeats > 1 and organ_weights is not None:
        ds = repeat_rare(ds, organ_repeats(organ_weights, cfg.rare_organ_repeats))
    ds = ds.shuffle(cfg.shuffle_buffer, seed=cfg.seed, reshuffle_each_iteration=True)
    ds = ds.batch(cfg.batch_size, drop_remainder=True)
    ds = tf.data.Dataset.zip(ds, batch_seeds(cfg.seed))
    window = augment_config.window
    if cfg.augment_on_device:
        return ds.map(lambda b, s: (cast_and_window(b, window), s), num_parallel_calls=calls).prefetch(
            _tune(cfg.prefetch))
    ds = ds.map(lambda b, s: (b, augment.draw_params(b, s, augment_config)), num_parallel_calls=calls)
    for op in augment.active_ops(augment_config):
        ds = ds.map(_op_stage(op, augment_config, weights, cfg.jit_compile), num_parallel_calls=calls)
    return ds.map(lambda b, _: targets.to_keras(b), num_parallel_calls=calls).prefetch(_tune(cfg.prefetch))


def build_validation_dataset(examples: tf.data.Dataset, pipeline_config: PipelineConfig | None = None,
                             augment_config: AugmentConfig | None = None) -> tf.data.Dataset:
    """Validation batches ``(x, y)``: no augmentation, centre crop to the training crop size, window.

    The last batch may be smaller; ``y`` carries no mixup partner (lam = 1).
    """
    cfg, augment_config = pipeline_config or PipelineConfig(), augment_config or AugmentConfig()
    calls = _tune(cfg.parallel_calls)
    ds = _cache(select_examples(examples), cfg.cache, VALIDATION).batch(cfg.batch_size)

    def prepare(batch):
        return targets.to_keras(augment.centre_crop(cast_and_window(batch, augment_config.window), augment_config.crop_size))

    return ds.map(prepare, num_parallel_calls=calls).prefetch(_tune(cfg.prefetch))


# ----------------------------------------------------------------------------- manifest wrappers


def organ_weights_from_manifest(manifest, split: str = TRAIN) -> np.ndarray:
    """float32 [O] mixup weights: 1 / foreground-slice count of each organ in ``split``.

    An organ without foreground slices gets weight 1 (it never appears, so only the empty-slice
    fallback of ``augment.slice_weights`` could see it).
    """
    if split not in manifest.splits:
        raise HnsegError(f"manifest has no {split!r} split (it has {sorted(manifest.splits)}); prepare one")
    organs = manifest.splits[split]["organs"]
    counts = np.array([organs[name]["foreground_slices"] for name in manifest.organs], dtype=np.float64)
    return (1.0 / np.maximum(counts, 1.0)).astype(np.float32)


def intensity_stats(manifest, window: tuple[float, float] | None) -> tuple[float, float]:
    """Exact mean and std (HU) of the train-split CT after clipping to ``window``.

    Computed from the manifest's 1-HU ``intensity_histogram``; None clips to ``augment.HU_RANGE``.
    The model's first layer clips to the same window and normalises with these two numbers.
    """
    histogram = manifest.intensity_histogram
    counts = np.asarray(histogram.get("counts", []), dtype=np.float64)
    if counts.sum() <= 0:
        raise HnsegError("manifest intensity_histogram is empty (no train slices); prepare a train split")
    hu = histogram["first_hu"] + histogram.get("bin_hu", 1) * np.arange(counts.size, dtype=np.float64)
    low, high = window if window is not None else augment.HU_RANGE
    clipped = np.clip(hu, low, high)
    mean = float(np.sum(counts * clipped) / counts.sum())
    std = float(np.sqrt(np.sum(counts * (clipped - mean) ** 2) / counts.sum()))
    return mean, std


def train_dataset(manifest_path: str | os.PathLike, pipeline_config: PipelineConfig | None = None,
                  augment_config: AugmentConfig | None = None, split: str = TRAIN,
                  manifest=None) -> tf.data.Dataset:
    """:func:`build_train_dataset` over ``split`` of a manifest (``manifest``: the loaded one, if the
    caller holds it), with the train split's organ weights."""
    from hnseg_keras.data.shards import Manifest, read_split

    pipeline_config, augment_config = pipeline_config or PipelineConfig(), augment_config or AugmentConfig()
    manifest = manifest or Manifest.load(manifest_path)
    examples = read_split(manifest_path, split, shuffle_seed=pipeline_config.seed,
                          cycle_length=pipeline_config.parallel_reads, manifest=manifest)
    return build_train_dataset(examples, pipeline_config, augment_config, organ_weights_from_manifest(manifest))


def validation_dataset(manifest_path: str | os.PathLike, pipeline_config: PipelineConfig | None = None,
                       augment_config: AugmentConfig | None = None, split: str = VALIDATION,
                       manifest=None) -> tf.data.Dataset:
    """:func:`build_validation_dataset` over ``split`` of a manifest (fixed order)."""
    from hnseg_keras.data.shards import read_split

    pipeline_config, augment_config = pipeline_config or PipelineConfig(), augment_config or AugmentConfig()
    examples = read_split(manifest_path, split, cycle_length=pipeline_config.parallel_reads, manifest=manifest)
    return build_validation_dataset(examples, pipeline_config, augment_config)
