"""Audit a PDDCA-layout dataset for blanked slices (CT tissue only around the contours; see
``hnseg_keras.evaluation.blanked``) and, with ``--predictions``, score label maps with and without them.

    python scripts/blanked_slices.py ../shared/data/openkbp-hn --out results/openkbp_blanked_slices.json
    python scripts/blanked_slices.py ../shared/data/openkbp-hn/validation --predictions PRED \
        --model hnseg_keras/released/openkbp-hn7-s
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hnseg_keras.errors import HnsegError
from hnseg_keras.evaluation import blanked
from hnseg_keras.files import write_json_atomic
from hnseg_keras.inference.model_io import read_metadata


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="dataset folder: [<split>/]<case>/img.nrrd + structures/*.nrrd")
    parser.add_argument("--area", type=float, default=blanked.AREA_CM2, help="tissue area (cm2) under which a "
                        "slice with a contour is blanked")
    parser.add_argument("--predictions", type=Path, help="folder of <case>.nrrd label maps (hnseg predict) to score")
    parser.add_argument("--model", type=Path, help="the predicting model's export or released folder (its "
                        "metadata.json gives the label values)")
    parser.add_argument("--out", type=Path, help="JSON file for the tables")
    args = parser.parse_args()
    folders = sorted(path.parent for path in args.root.glob("**/img.nrrd"))
    if not folders:
        print(f"error: {args.root}: no <case>/img.nrrd below it", file=sys.stderr)
        return 2
    if args.predictions and not args.model:
        print("error: --predictions needs --model, the folder of the model that wrote them", file=sys.stderr)
        return 2
    if args.predictions and not args.predictions.is_dir():
        print(f"error: --predictions {args.predictions}: no such folder", file=sys.stderr)
        return 2
    try:
        labels = read_metadata(args.model)["labels"] if args.predictions else {}
    except HnsegError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    def progress(done, total):
        print(f"\r{done}/{total} cases", end="" if done < total else "\n", file=sys.stderr, flush=True)

    record = blanked.audit(folders, args.area, progress)
    print("| organ | voxels on blanked slices | cases with > 20 % of the organ there |\n|---|---|---|")
    for organ, row in record["organs"].items():
        print(f"| {organ} | {row['voxels_on_blanked_slices_percent']} % | "
              f"{row['cases_over_20_percent']} of {row['cases']} |")
    print(f"cases with an organ > 20 % on blanked slices: {record['cases_affected']} of {record['cases']}")
    if args.predictions:
        record["scores"] = blanked.score_predictions(folders, args.predictions, labels, args.area)
        print("\n| organ | 3D Dice, all slices | slices not blanked | blanked slices (cases) |\n|---|---|---|---|")
        for organ, row in record["scores"].items():
            print(f"| {organ} | {_percent(row['all'])} | {_percent(row['clinical_like'])} | "
                  f"{_percent(row['blanked'])} ({row['blanked_cases']}) |")
    if args.out:
        write_json_atomic(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
