"""The main job on the built-in phantom: train the small model, export, segment the test cases, evaluate.

Each step is the same ``hnseg`` subcommand a user would run, so the demo doubles as an end-to-end check
of the whole data path. Everything goes into a new folder (``runs/demo-<time>`` unless ``--out``);
the prepared phantom shards are cached under ``tfrecords/`` and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hnseg_keras import cli
from hnseg_keras.errors import HnsegError
from hnseg_keras.files import refuse_existing


def step(title: str, argv: list[str]) -> None:
    print(f"\n=== {title}: hnseg {' '.join(argv)}", file=sys.stderr, flush=True)
    status = cli.main(argv)
    if status != 0:
        raise SystemExit(status)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="new folder for the run, model, predictions and evaluation")
    parser.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "configs" /
                                                "phantom_demo.json"), help="training config (JSON)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="training config override, repeatable (e.g. epochs=5)")
    args = parser.parse_args()
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    refuse_existing(out, hint="give a new --out")
    started = time.perf_counter()
    run, model, predictions = out / "run", out / "model", out / "predictions"
    overrides = [item for pair in args.set for item in ("--set", pair)]
    step("train", ["train", "--variant", "S", "--config", args.config, "--out", str(run), *overrides])
    trained = time.perf_counter()
    manifest = Path(json.loads((run / "config.json").read_text())["data"])
    test_cases = manifest.parent / "phantom-cases" / "test"
    step("export", ["export", str(run), "--out", str(model)])
    step("predict", ["predict", str(test_cases), "--model", str(model), "--out", str(predictions),
                     "--preview"])
    # evaluate scores the organs each <case>.qa.json of predict names, where the test cases annotate them
    step("evaluate", ["evaluate", "--pred", str(predictions), "--gt", str(test_cases),
                      "--out", str(out / "evaluation"), "--plots"])
    total = time.perf_counter() - started
    print(f"\ndemo finished in {total / 60:.1f} min (training {(trained - started) / 60:.1f} min); "
          f"everything is in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HnsegError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        sys.exit(2)
