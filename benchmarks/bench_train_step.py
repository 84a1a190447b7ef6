"""Measure the train-step time per slice of the S, M and L U-Nets on this machine.

Each variant is compiled with Adam and the ``SegmentationLoss`` (focal + Dice + boundary), run on
random HU images with random packed targets for a few warm-up steps (tracing, first allocations) and
then timed over ``--steps`` steps. Prints a table and writes JSON to ``--out``.

    python benchmarks/bench_train_step.py --out bench_train_step.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from hnseg_keras.configs import write_json_atomic  # noqa: E402
from hnseg_keras.inputs.targets import pack_targets  # noqa: E402
from hnseg_keras.model.losses import SegmentationLoss  # noqa: E402
from hnseg_keras.model.unet import build_unet, variant_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["S", "M", "L"])
    parser.add_argument("--size", type=int, default=256, help="square slice size in pixels")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--organs", type=int, default=9)
    parser.add_argument("--channels", type=int, default=1, help="input slices (2k+1 for 2.5D)")
    parser.add_argument("--policy", default="float32", choices=("float32", "mixed_bfloat16", "mixed_float16"),
                        help="keras.mixed_precision policy the model is built under")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (the first one traces)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    return parser.parse_args(argv)


def random_batch(batch_size: int, size: int, organs: int, channels: int = 1, seed: int = 0):
    """Random HU images [B, S, S, C] and packed targets with square organs and flat distance maps."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1024, 1500, (batch_size, size, size, channels)).astype("float32")
    masks = np.zeros((batch_size, size, size, organs), "float32")
    for organ in range(organs):
        top = rng.integers(0, size // 2)
        masks[:, top : top + size // 8, top : top + size // 8, organ] = 1.0
    dist_maps = np.where(masks > 0, -1.0, 1.0).astype("float32")
    targets = pack_targets(masks, dist_maps, np.ones((batch_size, organs), "float32"))
    return images, keras.ops.convert_to_numpy(targets)


def time_variant(variant: str, args: argparse.Namespace) -> dict:
    """Build, compile and time one variant; returns its result row."""
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(args.policy)
    model = build_unet(variant_config(variant, num_organs=args.organs, input_channels=args.channels))
    loss = SegmentationLoss(args.organs, boundary_weight=0.01)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    images, targets = random_batch(args.batch_size, args.size, args.organs, args.channels)
    start = time.perf_counter()
    for _ in range(args.warmup):
        model.train_on_batch(images, targets)
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        model.train_on_batch(images, targets)
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    return {
        "variant": variant,
        "policy": args.policy,
        "parameters": int(model.count_params()),
        "warmup_s": round(warmup_s, 3),
        "step_s_median": round(step_s, 4),
        "step_s_min": round(min(times), 4),
        "step_s_all": [round(t, 4) for t in times],
        "s_per_slice": round(step_s / args.batch_size, 4),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    for variant in args.variants:
        print(f"timing {variant} ...", file=sys.stderr, flush=True)
        rows.append(time_variant(variant, args))
    print(f"\ntrain step, batch {args.batch_size} x {args.size}x{args.size}x{args.channels}, {args.organs} organs, "
          f"policy {args.policy}, {os.cpu_count()} CPUs, backend {keras.backend.backend()}")
    print(f"{'variant':<8}{'params':>12}{'step s (median)':>17}{'step s (min)':>14}{'s/slice':>10}")
    for row in rows:
        print(f"{row['variant']:<8}{row['parameters']:>12,}{row['step_s_median']:>17.3f}"
              f"{row['step_s_min']:>14.3f}{row['s_per_slice']:>10.3f}")
    if args.out is not None:
        write_json_atomic(args.out, {
            "benchmark": "train_step",
            "size": args.size,
            "batch_size": args.batch_size,
            "organs": args.organs,
            "channels": args.channels,
            "policy": args.policy,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "backend": keras.backend.backend(),
            "keras": keras.__version__,
            "cpu_count": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "results": rows,
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
