"""How much 3D Dice a one-voxel disagreement costs on a data set's own contours.

A model's Dice is only readable against the resolution: at ~4 mm in-plane a parotid is ~8 voxels
across, and a contour moved by one voxel loses a quarter of its overlap. This script perturbs each
annotated ground-truth mask by one voxel (shift along x, y or z; in-plane erosion or dilation) and
scores the perturbed mask against the original with the evaluation's own Dice:

    python benchmarks/label_sensitivity.py ../shared/data/openkbp-hn --split validation \\
        --organs BrainStem Mandible Parotid_L Parotid_R --out label_sensitivity.json

Prints a table (mean Dice per organ and perturbation, and the mean over organs, as `hnseg evaluate`
averages) and writes the numbers, per case included, as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from hnseg_keras.data.layouts import find_refs, read_ref
from hnseg_keras.errors import HnsegError
from hnseg_keras.evaluation.scores import dice

IN_PLANE = np.zeros((3, 3, 3), bool)
IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)  # 4-neighbourhood in the [y, x] plane


def _shift(mask: np.ndarray, axis: int) -> np.ndarray:
    """The mask moved by one voxel along ``axis`` (array order z, y, x), nothing wrapped around."""
    moved = np.zeros_like(mask)
    source = [slice(None)] * 3
    target = [slice(None)] * 3
    source[axis], target[axis] = slice(0, -1), slice(1, None)
    moved[tuple(target)] = mask[tuple(source)]
    return moved


PERTURBATIONS = {
    "shift x": lambda m: _shift(m, 2),
    "shift y": lambda m: _shift(m, 1),
    "shift z": lambda m: _shift(m, 0),
    "erode in-plane": lambda m: ndimage.binary_erosion(m, IN_PLANE),
    "dilate in-plane": lambda m: ndimage.binary_dilation(m, IN_PLANE),
}


def sensitivity(root: Path, split: str | None, organs: list[str]) -> dict:
    refs = [ref for ref in find_refs(root) if split is None or ref.split == split]
    if not refs:
        raise HnsegError(f"{root}: no cases{f' in split {split!r}' if split else ''}")
    per_case: dict[str, dict] = {}
    for index, ref in enumerate(refs, 1):
        case = read_ref(ref, organs)
        per_case[ref.case_id] = {
            organ: {name: dice(change(mask > 0), mask > 0) for name, change in PERTURBATIONS.items()}
            for organ, mask in case.masks.items() if mask.any()}
        print(f"\r{index}/{len(refs)} cases", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    summary = {organ: {name: float(np.mean([c[organ][name] for c in per_case.values() if organ in c]))
                       for name in PERTURBATIONS} for organ in organs
               if any(organ in c for c in per_case.values())}
    summary["Mean"] = {name: float(np.mean([summary[o][name] for o in summary])) for name in PERTURBATIONS}
    return {"root": str(root), "split": split, "organs": organs, "summary": summary, "cases": per_case}


def table(result: dict) -> str:
    names = list(PERTURBATIONS)
    lines = ["| organ | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for organ, row in result["summary"].items():
        lines.append(f"| {organ} | " + " | ".join(f"{100 * row[n]:.1f}" for n in names) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="dataset folder (PDDCA layout)")
    parser.add_argument("--split", default=None, help="only this split (train, validation, test)")
    parser.add_argument("--organs", nargs="+", default=["BrainStem", "Mandible", "Parotid_L", "Parotid_R"])
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write (not overwritten)")
    args = parser.parse_args(argv)
    try:
        if args.out is not None and args.out.exists():
            raise HnsegError(f"{args.out} exists; choose another --out")
        result = sensitivity(args.root, args.split, args.organs)
    except HnsegError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("Dice (%) of each ground-truth mask against itself perturbed by one voxel")
    print(table(result))
    if args.out is not None:
        with tempfile.NamedTemporaryFile("w", dir=args.out.parent or ".", suffix=".tmp", delete=False) as handle:
            json.dump(result, handle, indent=1)
        os.replace(handle.name, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
