"""Benchmark `hnseg prepare`: cases per minute and compressed bytes per slice on phantom cases.

Generates phantom cases at PDDCA size (512 x 512 at 0.9 mm, 2-3 mm slices) into a temporary folder,
converts them with the default slicing (280 x 280 at 1 mm, nine organs) and reports:

    python benchmarks/bench_prepare.py --cases 3 --out bench_prepare.json

Budget (issue #2): at most 0.6 MB per 280 x 280 slice with nine organs in the compressed shards.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

from hnseg_keras import configs
from hnseg_keras.data.cases import write_pddca_case
from hnseg_keras.data.organs import DEFAULT_ORGANS
from hnseg_keras.data.phantom import PhantomConfig, generate_case
from hnseg_keras.data.prepare import PrepareConfig, prepare
from hnseg_keras.data.slicing import SlicingConfig

BUDGET_BYTES_PER_SLICE = 0.6e6


def run_benchmark(num_cases: int, phantom: PhantomConfig, config: PrepareConfig, workers: int, work: Path) -> dict:
    import tensorflow as tf  # import (seconds) outside the timed conversion

    tf.constant(0)
    start = time.perf_counter()
    for index in range(num_cases):
        write_pddca_case(generate_case(index, phantom), work / "cases" / f"phantom_{index:04d}")
    generate_s = time.perf_counter() - start
    start = time.perf_counter()
    manifest = prepare(work / "cases", work / "out", config, workers=workers)
    prepare_s = time.perf_counter() - start
    slices = sum(split["slices"] for split in manifest.splits.values())
    shard_bytes = sum(info["bytes"] for split in manifest.splits.values() for info in split["shards"])
    channels = 2 * config.slicing.neighbours + 1
    raw = config.slicing.size**2 * (2 * channels + 2 * len(config.organs))  # int16 CT, uint8 masks, int8 dist
    return {
        "cases": num_cases,
        "slices": slices,
        "workers": workers,
        "generate_seconds": round(generate_s, 2),
        "prepare_seconds": round(prepare_s, 2),
        "cases_per_minute": round(60 * num_cases / prepare_s, 2),
        "slices_per_second": round(slices / prepare_s, 1),
        "bytes_per_slice": round(shard_bytes / max(slices, 1)),
        "raw_bytes_per_slice": raw,
        "budget_bytes_per_slice": BUDGET_BYTES_PER_SLICE,
        "within_budget": shard_bytes / max(slices, 1) <= BUDGET_BYTES_PER_SLICE,
        "phantom": configs.to_dict(phantom),
        "prepare": configs.to_dict(config),
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--phantom-size", type=int, default=512, help="in-plane voxels of the phantom")
    parser.add_argument("--phantom-spacing", type=float, default=0.9, help="in-plane mm of the phantom")
    parser.add_argument("--size", type=int, default=280)
    parser.add_argument("--spacing", type=float, default=1.0)
    parser.add_argument("--neighbours", type=int, default=0)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    phantom = PhantomConfig(size=args.phantom_size, spacing_mm=args.phantom_spacing)
    config = PrepareConfig(organs=DEFAULT_ORGANS,
                           slicing=SlicingConfig(size=args.size, spacing_mm=args.spacing, neighbours=args.neighbours))
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as work:
        result = run_benchmark(args.cases, phantom, config, args.workers, Path(work))
    rows = [("cases", result["cases"]), ("slices", result["slices"]), ("workers", result["workers"]),
            ("phantom generation (s)", result["generate_seconds"]), ("prepare (s)", result["prepare_seconds"]),
            ("cases / min", result["cases_per_minute"]), ("slices / s", result["slices_per_second"]),
            ("bytes / slice (gzip shards)", result["bytes_per_slice"]),
            ("bytes / slice (raw)", result["raw_bytes_per_slice"]),
            ("within 0.6 MB budget", result["within_budget"])]
    print(f"prepare benchmark: phantom {args.phantom_size}x{args.phantom_size} at {args.phantom_spacing} mm -> "
          f"{args.size}x{args.size} at {args.spacing} mm, {len(DEFAULT_ORGANS)} organs")
    for name, value in rows:
        print(f"  {name:<30} {value}")
    if args.out:
        configs.write_json_atomic(args.out, result)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
