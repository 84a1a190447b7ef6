"""How training examples are read, shuffled and batched; kept free of TensorFlow so that a train
config loads (and arrays train) on a machine without it."""

from __future__ import annotations

from dataclasses import dataclass

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

    def __post_init__(self):
        if self.batch_size < 1:
            raise HnsegError(f"batch_size={self.batch_size}: must be >= 1")
        if self.shuffle_buffer < 1:
            raise HnsegError(f"shuffle_buffer={self.shuffle_buffer}: must be >= 1 (1 = no shuffling)")
