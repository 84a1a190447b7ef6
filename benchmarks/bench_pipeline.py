"""Throughput of the training input pipeline on phantom shards, with the cost of each stage.

Builds phantom shards with ``prepare`` (280^2 slices, nine organs) unless ``--data`` names a
manifest, then measures on this machine:

* stage costs: each stage as one traced function on a fixed in-memory batch (ms per batch and
  per slice): read+parse (shard records -> example dicts), cast+window, random draws + warp
  fields, crop+warp resampling (XLA unless --no-jit), mixup, packing;
* the full ``pipeline.train_dataset`` rate in slices/s (with tf.data parallelism and prefetch);
* optionally (``--model M``) the rate at which a CPU train step of that U-Net variant consumes
  slices, so the pipeline can be compared with what training needs.

Usage: ``python benchmarks/bench_pipeline.py --out bench.json [--cases 4] [--batches 20] [--model M]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from hnseg_keras.configs import write_json_atomic  # noqa: E402
from hnseg_keras.data import shards
from hnseg_keras.inputs import (
    augment,  # noqa: E402
    pipeline,
    targets,
)
from hnseg_keras.inputs.augment import AugmentConfig  # noqa: E402
from hnseg_keras.inputs.pipeline import PipelineConfig  # noqa: E402


def build_phantom_shards(out: Path, cases: int) -> Path:
    """Phantom cases -> shards + manifest (280^2 slices at 1 mm, nine organs) via ``prepare``."""
    from hnseg_keras.data.phantom import PREPARED_INPUT, write_phantom
    from hnseg_keras.data.prepare import PrepareConfig, prepare

    write_phantom(out / PREPARED_INPUT, cases)
    prepare(out / PREPARED_INPUT, out, PrepareConfig(validation_fraction=0.0), workers=1)
    return out / "manifest.json"


def _time(function, repeats: int) -> float:
    """Median wall seconds of ``function()`` over ``repeats`` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def stage_costs(manifest_path: Path, batch_size: int, config: AugmentConfig, weights, repeats: int,
                jit: bool) -> dict:
    """Seconds per batch of each stage, each traced once and run on the same batch (resampling in XLA if jit)."""
    records = [r.numpy() for r in _raw_records(manifest_path).take(batch_size)]
    manifest = shards.Manifest.load(manifest_path)
    records = tf.constant((records * batch_size)[:batch_size])
    shape, organs = manifest.image_shape, len(manifest.organs)
    parse = tf.function(lambda r: tf.map_fn(lambda s: _keep(shards.parse_example(s, shape, organs)), r,
                                            fn_output_signature={k: _spec(k, shape, organs) for k in _KEYS}))
    raw = parse(records)
    window = tf.function(lambda b: pipeline.cast_and_window(b, config.window))
    windowed = window(raw)
    seed = tf.constant([1, 2], tf.int32)
    ops = {op.name: op for op in augment.OPS}
    draw = tf.function(lambda b, s: augment.draw_params(b, s, config))
    params = draw(windowed, seed)
    resample = pipeline._op_stage(ops["crop_and_warp"], config, tf.constant(weights), jit)
    resample = resample if jit else tf.function(resample)
    warped, _ = resample(windowed, params)
    mix = tf.function(lambda b, p: augment.apply_mixup(b, p["mixup"], tf.constant(weights), config.mixup_alpha))
    mixed = mix(warped, params)
    pack = tf.function(targets.to_keras)
    stages = {
        "read+parse": lambda: parse(records),
        "cast+window": lambda: window(raw),
        "draws+fields": lambda: draw(windowed, seed),
        "crop+warp": lambda: resample(windowed, params),
        "mixup": lambda: mix(warped, params),
        "packing": lambda: pack(mixed),
    }
    return {name: _time(function, repeats) for name, function in stages.items()}


_KEYS = ("image", "masks", "dist_maps", "annotated")


def _keep(example):
    return {key: example[key] for key in _KEYS}


def _spec(key, shape, organs):
    height, width, channels = shape
    return {"image": tf.TensorSpec([height, width, channels], tf.int16),
            "masks": tf.TensorSpec([height, width, organs], tf.uint8),
            "dist_maps": tf.TensorSpec([height, width, organs], tf.int8),
            "annotated": tf.TensorSpec([organs], tf.uint8)}[key]


def _raw_records(manifest_path: Path) -> tf.data.Dataset:
    manifest = shards.Manifest.load(manifest_path)
    paths = [str(manifest_path.parent / info.file) for info in manifest.shards("train")]
    return tf.data.TFRecordDataset(paths, compression_type="GZIP").repeat()


def pipeline_rate(manifest_path: Path, pipe: PipelineConfig, config: AugmentConfig, batches: int) -> dict:
    """Slices/s of the full training dataset and of reading+parsing alone (both repeated, warm)."""
    def rate(dataset, per_item):
        iterator = iter(dataset.repeat())
        for _ in range(3):
            next(iterator)
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        return batches * per_item / (time.perf_counter() - start)

    examples = shards.read_split(manifest_path, "train").map(_keep).batch(pipe.batch_size)
    return {"read+parse only": rate(examples, pipe.batch_size),
            "full pipeline": rate(pipeline.train_dataset(manifest_path, pipe, config), pipe.batch_size)}


def model_rate(variant: str, crop: int, organs: int, batch_size: int, steps: int) -> dict:
    """Slices/s one CPU train step of the U-Net ``variant`` consumes (BCE on the masks as the loss)."""
    import keras

    from hnseg_keras.model.unet import build_unet, variant_config

    model = build_unet(variant_config(variant, num_organs=organs), image_size=crop)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy")
    x = np.random.default_rng(0).normal(0, 100, (batch_size, crop, crop, 1)).astype(np.float32)
    y = (np.random.default_rng(1).random((batch_size, crop, crop, organs)) > 0.9).astype(np.float32)
    seconds = _time(lambda: model.train_on_batch(x, y), steps)
    return {"variant": variant, "batch_size": batch_size, "seconds_per_step": seconds,
            "slices_per_s": batch_size / seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="existing manifest.json (default: build phantom shards in a temp folder)")
    parser.add_argument("--cases", type=int, default=4, help="phantom cases to build")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=20, help="timed batches of the full pipeline")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per stage")
    parser.add_argument("--model", default=None, help="also time a CPU train step of this variant (S/M/L)")
    parser.add_argument("--model-batch", type=int, default=2)
    parser.add_argument("--no-jit", action="store_true", help="resample in graph mode instead of XLA")
    parser.add_argument("--out", required=True, help="JSON file for the figures")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        manifest_path = Path(args.data) if args.data else build_phantom_shards(Path(tmp) / "phantom", args.cases)
        if manifest_path.is_dir():
            manifest_path = manifest_path / "manifest.json"
        manifest = shards.Manifest.load(manifest_path)
        config = AugmentConfig()
        pipe = PipelineConfig(batch_size=args.batch_size, shuffle_buffer=256, jit_compile=not args.no_jit)
        weights = pipeline.organ_weights_from_manifest(manifest)
        costs = stage_costs(manifest_path, args.batch_size, config, weights, args.repeats, pipe.jit_compile)
        rates = pipeline_rate(manifest_path, pipe, config, args.batches)
    result = {
        "machine": {"cpus": os.cpu_count(), "tensorflow": tf.__version__},
        "data": {"manifest": str(args.data or f"phantom x{args.cases} (temporary)"),
                 "image_shape": manifest.image_shape, "organs": len(manifest.organs),
                 "train_slices": manifest.splits["train"]["slices"], "crop": config.crop_size},
        "batch_size": args.batch_size,
        "jit_compile": pipe.jit_compile,
        "stage_seconds_per_batch": costs,
        "stage_slices_per_s": {name: args.batch_size / s for name, s in costs.items()},
        "slices_per_s": rates,
    }
    if args.model:
        result["model_train_step"] = model_rate(args.model, config.crop_size, len(manifest.organs),
                                                args.model_batch, max(2, args.repeats // 2))
    print_table(result)
    write_json_atomic(args.out, result)
    return 0


def print_table(result: dict) -> None:
    batch = result["batch_size"]
    print(f"{'stage':<18}{'ms/batch':>10}{'ms/slice':>10}{'slices/s':>10}   (batch {batch}, "
          f"{result['data']['image_shape'][0]}^2 -> {result['data']['crop']}^2, {result['data']['organs']} organs)")
    for name, seconds in result["stage_seconds_per_batch"].items():
        print(f"{name:<18}{seconds * 1e3:>10.1f}{seconds * 1e3 / batch:>10.2f}{batch / seconds:>10.1f}")
    total = sum(result["stage_seconds_per_batch"].values())
    print(f"{'sum of stages':<18}{total * 1e3:>10.1f}{total * 1e3 / batch:>10.2f}{batch / total:>10.1f}")
    for name, rate in result["slices_per_s"].items():
        print(f"{name + ' (tf.data)':<38}{rate:>10.1f} slices/s")
    if "model_train_step" in result:
        step = result["model_train_step"]
        print(f"model {step['variant']} CPU train step (batch {step['batch_size']}): "
              f"{step['seconds_per_step']:.2f} s/step = {step['slices_per_s']:.2f} slices/s; pipeline / model = "
              f"{result['slices_per_s']['full pipeline'] / step['slices_per_s']:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
