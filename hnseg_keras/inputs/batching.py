"""How training examples are read, shuffled and batched; kept free of TensorFlow so that a train
config loads (and arrays train) on a machine without it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hnseg_keras.errors import HnsegError


@dataclass(frozen=True)
class PipelineConfig:
    """How examples are read, shuffled, batched and buffered.

    Attributes:
        batch_size: slices per batch (training drops the last incomplete batch).
        shuffle_buffer: examples in the shuffle buffer (memory: about 1.6 MB per 280^2 slice, 9 organs).
        seed: seeds the shard order, the shuffle and every batch's augmentation seed.
        parallel_reads: shards read at once (interleave cycle length).
        parallel_calls: threads per map stage; -1 lets tf.data tune it (AUTOTUNE).
        prefetch: batches prepared ahead; -1 = AUTOTUNE.
        cache: None (no cache), "memory", or a file path prefix for tf.data's on-disk cache of the
            parsed examples (before shuffling, so each epoch is still reshuffled and re-augmented).
        augment_on_device: training yields ``(batch, seed)`` of windowed, uncropped batches; the
            train step applies ``train_step.device_augment`` (crop, warp, mixup on the accelerator).
        rare_organ_repeats: show a slice that holds a rare organ up to this many times per pass, in
            proportion to how much rarer than the median organ it is (1: every slice once). Small
            organs present in few slices (submandibular glands) then get gradient as often as the
            large ones instead of being learned last; the number of steps per epoch is unchanged.
        jit_compile: run the deterministic part of the augmentation (resampling, mixup, packing) as
            an XLA-compiled function inside tf.data (several times faster on CPU). The random draws
            stay outside XLA: TF's default stateless generator under XLA on CPU is very slow.
    """

    batch_size: int = 16
    shuffle_buffer: int = 512
    seed: int = 0
    parallel_reads: int = 8
    parallel_calls: int = -1
    prefetch: int = -1
    cache: str | None = None
    augment_on_device: bool = False
    jit_compile: bool = True
    rare_organ_repeats: int = 1

    def __post_init__(self):
        if self.batch_size < 1:
            raise HnsegError(f"batch_size={self.batch_size}: must be >= 1")
        if self.shuffle_buffer < 1:
            raise HnsegError(f"shuffle_buffer={self.shuffle_buffer}: must be >= 1 (1 = no shuffling)")
        if self.rare_organ_repeats < 1:
            raise HnsegError(f"rare_organ_repeats={self.rare_organ_repeats}: must be >= 1 (1 = no oversampling)")


def organ_repeats(organ_weights, max_repeats: int) -> np.ndarray:
    """int32 [O]: times per pass a slice holding each organ is shown, from ``organ_weights`` (1 / the
    organ's foreground-slice count): the median organ's count over this organ's, rounded, in
    ``[1, max_repeats]``. A slice with several organs takes the largest of theirs (:func:`slice_repeats`)."""
    weights = np.asarray(organ_weights, dtype=np.float64)
    return np.clip(np.rint(weights / np.median(weights)), 1, max_repeats).astype(np.int32)


def slice_repeats(present, repeats) -> np.ndarray:
    """int32 [N] repeats of each slice from ``present`` [N, O] (organ foreground in the slice)."""
    present = np.asarray(present, dtype=bool)
    return np.where(present, np.asarray(repeats)[None, :], 1).max(axis=1, initial=1).astype(np.int32)
