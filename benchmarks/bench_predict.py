"""Benchmark `hnseg predict`: seconds per case and peak RSS of whole-volume prediction.

Cases are synthetic (noise + a body ellipse with a bone ring). The model is the package's released
model (``--model released``, default; its recorded post-processing unless --tta / --largest-component say
otherwise, and a 0.9 mm CT resampled to its 3.9 mm as `hnseg predict` does), or ``--model untrained``:
the S variant with random weights sliced at 280 x 280 at 1 mm (nine organs, sigmoid ~0.5 almost
everywhere: every organ plane is mapped back, the worst case for time and memory), or an export folder.
Each case runs in a fresh subprocess so its peak RSS (``ru_maxrss``, TensorFlow runtime included) is its own:

    python benchmarks/bench_predict.py --out bench_predict.json
    python benchmarks/bench_predict.py --model untrained --cases pddca --tta --batch-size 16

Cases: ``pddca`` 512 x 512 x 200 at 0.9 x 0.9 x 2.5 mm (budget: under 15 s and peak RSS <= 4 GB), ``ct300``
512 x 512 x 300 at the same spacing and ``coarse`` 128 x 128 x 128 at 4 mm.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CASES = {  # name: (X = Y, Z, in-plane mm, slice mm)
    "pddca": (512, 200, 0.9, 2.5),
    "ct300": (512, 300, 0.9, 2.5),  # a long head-and-neck scan (vertex to carina)
    "coarse": (128, 128, 4.0, 4.0),
}
BUDGET_RSS_GB = 4.0
BUDGET_SECONDS = 15.0  # per 512 x 512 x 200 case on a 2-core CPU


def synthetic_case(name: str, seed: int = 0):
    """int16 CT: air, a water-like ellipse (40 HU +- 20 noise) and a 700 HU ring, filled per slice."""
    from hnseg_keras.data.cases import Case

    size, depth, spacing, slice_mm = CASES[name]
    rng = np.random.default_rng(seed)
    ct = np.full((depth, size, size), -1000, np.int16)
    y, x = np.ogrid[:size, :size]
    centre = (size - 1) / 2
    radial = ((y - centre) / (0.32 * size)) ** 2 + ((x - centre) / (0.40 * size)) ** 2
    body, ring = radial <= 1.0, (radial <= 0.55) & (radial >= 0.45)
    for z in range(depth):
        plane = ct[z]
        plane[body] = (40 + 20 * rng.standard_normal(int(body.sum()))).astype(np.int16)
        plane[ring] = 700
    return Case(name, ct, (spacing, spacing, slice_mm))


def run_one(name: str, batch_size: int, tta: bool | None, largest_component: bool | None, model: str) -> dict:
    """One case in this process: load the model, segment, write the label map; returns the figures."""
    started = time.perf_counter()
    from hnseg_keras.data.cases import write_label_map
    from hnseg_keras.inference.prediction import segment_case

    predictor = load(model)
    tta, largest_component = predictor.post_processing(tta, largest_component)
    size = predictor.slicing.size
    predictor.predict_slices(np.zeros((batch_size, size, size, predictor.channels), np.int16), batch_size)  # trace
    case = synthetic_case(name)
    setup_s = time.perf_counter() - started
    seg = segment_case(case, predictor, batch_size, tta, largest_component)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as work:
        write_label_map(seg.label_map(), case, Path(work) / f"{name}.nrrd")
    write_s = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "case": name, "model": model, "organs": len(predictor.organs), "shape_zyx": list(case.ct.shape),
        "spacing_mm": list(case.spacing),
        "batch_size": batch_size, "tta": tta, "largest_component": largest_component,
        "setup_seconds": round(setup_s, 2), "segment_seconds": round(seg.seconds, 2),
        "write_seconds": round(write_s, 2), "seconds_per_case": round(seg.seconds + write_s, 2),
        "slices_per_second": round(seg.slices / seg.seconds, 2),
        "peak_rss_gb": round(peak_kb / 2**20, 3), "budget_rss_gb": BUDGET_RSS_GB,
        "budget_seconds": BUDGET_SECONDS,
    }


def load(model: str):
    """The Predictor ``--model`` names."""
    from hnseg_keras.inference import released
    from hnseg_keras.inference.prediction import Predictor, load_predictor

    if model == "untrained":
        from hnseg_keras.data.organs import DEFAULT_ORGANS
        from hnseg_keras.data.slicing import SlicingConfig
        from hnseg_keras.model.unet import build_unet, variant_config

        network = build_unet(variant_config("S", num_organs=len(DEFAULT_ORGANS)))
        return Predictor.from_keras_model(network, DEFAULT_ORGANS, SlicingConfig(size=280, spacing_mm=1.0), "S untrained")
    return load_predictor(released.path() if model == "released" else model)


def _flag(name: str, value: bool | None) -> list[str]:
    return [] if value is None else [f"--{name}" if value else f"--no-{name}"]


def run_in_subprocess(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--one", name, "--batch-size", str(args.batch_size), "--model", args.model]
    command += _flag("tta", args.tta) + _flag("largest-component", args.largest_component)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench_predict: case {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["pddca", "coarse"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default="released", help="released (default), untrained, or an export folder")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--largest-component", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--one", choices=sorted(CASES), help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.batch_size, args.tta, args.largest_component, args.model)))
        return 0
    results = [run_in_subprocess(name, args) for name in args.cases]
    first = results[0]
    print(f"predict benchmark: model {args.model} ({first['organs']} organs), batch {args.batch_size}, "
          f"tta={first['tta']}, largest_component={first['largest_component']}, {os.cpu_count()} CPU(s) {cpu_name()}")
    print(f"  {'case':<8} {'shape (z,y,x)':<16} {'s/case':>8} {'< 15 s':>7} {'slices/s':>9} {'peak RSS GB':>12} "
          f"{'<= 4 GB':>8}")
    for row in results:
        shape = "x".join(str(v) for v in row["shape_zyx"])
        print(f"  {row['case']:<8} {shape:<16} {row['seconds_per_case']:>8} "
              f"{str(row['seconds_per_case'] < BUDGET_SECONDS):>7} {row['slices_per_second']:>9} "
              f"{row['peak_rss_gb']:>12} {str(row['peak_rss_gb'] <= BUDGET_RSS_GB):>8}")
    if args.out:
        from hnseg_keras import configs

        configs.write_json_atomic(args.out, {
            "results": results, "python": platform.python_version(), "cpus": os.cpu_count(),
            "machine": cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        })
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
