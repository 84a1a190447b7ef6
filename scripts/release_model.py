"""Turn an exported OpenKBP model into the package's released model (the last stage of `openkbp.sh release`).

1. choose: predict the validation cases with each post-processing (plain, largest component, left-right
   TTA, both) and score them with `hnseg evaluate`; the highest mean 3D Dice over the model's organs wins
   (on a tie, fewer steps). Each candidate's folder is kept, so a rerun scores only what is missing.
2. package: ``hnseg_keras/released/<name>/``: ``model.keras`` (weights only), ``metadata.json`` (the
   export's, with the chosen ``prediction`` defaults and a ``release`` record of data, recipe, machine
   and scores) and ``MODEL_CARD.md`` rendered from it. Written under a temporary name, then renamed.

    python scripts/release_model.py --run runs/openkbp/release/run --export runs/openkbp/release/export \
        --data ../shared/data/openkbp-hn --work runs/openkbp/release/choose
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from hnseg_keras import cli, configs
from hnseg_keras.data.organs import TG263_NAMES
from hnseg_keras.evaluation import blanked
from hnseg_keras.files import atomic_path
from hnseg_keras.inference import released, trust
from hnseg_keras.inference.model_io import METADATA_FILE, MODEL_FILE, load_keras_model, read_metadata
from hnseg_keras.model import losses
from hnseg_keras.training.run_folder import RunFolder, read_history, time_spent

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = {  # name -> (tta, largest_component); in order of cost, so a tie keeps the cheaper one
    "plain": (False, False),
    "largest_component": (False, True),
    "tta": (True, False),
    "tta_largest_component": (True, True),
}
DATA = {
    "description": "OpenKBP grand challenge head-and-neck CTs with clinical organ contours, 170 training cases "
                   "(the challenge's own training split); de-identified, derived from collections of The Cancer "
                   "Imaging Archive (TCIA). Partially annotated: each organ is missing in some cases, and a "
                   "missing organ contributes nothing to the loss.",
    "citation": "A. Babier et al., \"OpenKBP: The open-access knowledge-based planning grand challenge and "
                "dataset\", Medical Physics 48(9), 2021; and K. Clark et al., \"The Cancer Imaging Archive (TCIA)\", "
                "J Digit Imaging 26(6), 2013.",
    "population": "adult head-and-neck cancer patients treated with radiotherapy, supine, planning CT without "
                  "intravenous contrast in most cases, 128 x 128 x 128 voxels (in-plane 2.7-5.1 mm, slices "
                  "1.5-3.3 mm); one source, so scanners and contouring habits of other clinics are not represented",
}
LICENCE = "research use only, as the OpenKBP data it was trained on (cite the OpenKBP paper and TCIA)"
FAILURE_MODES = [
    "Trained and measured on ~4 mm in-plane CTs; on a 1 mm planning CT it works on a 3.9 mm resampled copy, so "
    "thin structures (the mandible's edge, the spinal cord, the oesophagus) are coarse. Its accuracy on such CTs "
    "is not measured.",
    "Brain stem: its upper end is drawn at different heights in the training contours; short or small brain "
    "stems score lowest (the prediction runs several slices further up or down than the contour).",
    "pt_221 (validation): a truncated scan whose contours lie 15-20 slices away from the visible anatomy; its "
    "organs score near 0, and it is kept in every figure.",
    "A truncated scan (head outside the field of view) can lose organs or place them wrongly; the QA checks "
    "(side, volume, emptiness, pieces) in <case>.qa.json flag most such cases.",
    "It does not contour the chiasm, optic nerves or submandibular glands (not annotated in OpenKBP).",
    "No contrast-enhanced, paediatric, prone or post-surgical anatomy was checked; metal artefacts (dental "
    "fillings) are in the data but not measured separately.",
]
WEAK_DICE = 0.5  # validation cases under this Dice are named in the card, organ by organ (the lowest few)
NAMED_CASES = 5
MINIMUM_DICE = 0.5  # an organ whose mean validation Dice is lower is left out of what predict writes by default


def hnseg(argv: list[str]) -> None:
    print(f"+ hnseg {' '.join(argv)}", file=sys.stderr, flush=True)
    status = cli.main(argv)
    if status != 0:
        raise SystemExit(status)


def choose(export: Path, data: Path, work: Path) -> tuple[str, dict[str, dict]]:
    """Score every candidate on the validation split; return the winner and every results.json."""
    results = {}
    for name, (tta, largest) in CANDIDATES.items():
        pred = work / name
        scores = pred / "evaluation" / "results.json"
        if not scores.is_file():
            hnseg(["predict", str(data), "--split", "validation", "--model", str(export), "--out", str(pred),
                   "--tta" if tta else "--no-tta", "--largest-component" if largest else "--no-largest-component"])
            hnseg(["evaluate", "--pred", str(pred), "--gt", str(data / "validation"), "--force"])
        results[name] = json.loads(scores.read_text())
    best = max(CANDIDATES, key=lambda n: (round(results[n]["summary"]["mean"]["dice"]["mean"], 4),
                                          -list(CANDIDATES).index(n)))
    return best, results


def weak_cases(result: dict, below: float = WEAK_DICE) -> list[str]:
    """One failure-mode line per organ naming the validation cases it scores under ``below`` on."""
    lines = []
    for organ in result["organs"]:
        scored = [(row[organ]["dice"], case) for case, row in result["cases"].items()
                  if organ in row and row[organ]["dice"] is not None]
        low = sorted(pair for pair in scored if pair[0] < below)
        if low:
            named = ", ".join(f"{case} {100 * dice:.0f} %" for dice, case in low[:NAMED_CASES])
            more = f", {len(low) - NAMED_CASES} more" if len(low) > NAMED_CASES else ""
            lines.append(f"{organ}: {len(low)} of {len(scored)} validation cases under {100 * below:.0f} % Dice "
                         f"({named}{more}).")
    return lines


def evaluation_record(result: dict, cases: int) -> dict:
    summary = result["summary"]
    organs = {o: {"n": row["n"], "dice": row["dice"]["mean"], "dice_std": row["dice"]["std"],
                  "hd95_mm": row["hd95_mm"]["mean"]} for o, row in summary.items() if o != "mean"}
    return {
        "description": f"3D Dice and HD95 on the {cases} OpenKBP validation cases (the challenge's validation split, "
                       "never seen in training), computed by `hnseg evaluate` on each CT's original grid; n = "
                       "cases in which the organ is annotated.",
        "organs": organs, "mean_dice": summary["mean"]["dice"]["mean"],
    }


def blanked_record(data: Path, predictions: Path, labels: dict[str, int]) -> dict:
    """How much of each organ's validation score rests on blanked slices (``evaluation.blanked``)."""
    folders = sorted(path.parent for path in (data / "validation").glob("*/img.nrrd"))
    audit = blanked.audit(folders)
    scores = blanked.score_predictions(folders, predictions, labels)
    return {"area_cm2": audit["area_cm2"], "cases_affected": audit["cases_affected"], "cases": audit["cases"],
            "organs": {organ: {**scores[organ], "voxels_on_blanked_slices_percent":
                               audit["organs"][organ]["voxels_on_blanked_slices_percent"]}
                       for organ in labels if organ in scores}}


def cpu_name() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    return f"{os.cpu_count()}-core {model} (no GPU)"


def training_record(run: Path, commit: str) -> dict:
    folder = RunFolder(run)
    config = json.loads(folder.config_file.read_text())
    rows = read_history(folder.history_file)
    finished = datetime.fromtimestamp(folder.history_file.stat().st_mtime, timezone.utc)
    return {
        "epochs": len(rows), "steps": len(rows) * config["steps_per_epoch"], "minutes": time_spent(rows) / 60.0,
        "cpu": cpu_name(), "commit": commit, "date": finished.strftime("%Y-%m-%d"), "config": config,
    }


def package(export: Path, run: Path, name: str, best: str, results: dict[str, dict], commit: str,
            out_root: Path, blanked_slices: dict) -> Path:
    metadata = read_metadata(export)
    training = training_record(run, commit)
    config = training.pop("config")
    model = load_keras_model(export / MODEL_FILE)  # loaded uncompiled: saving it writes the weights alone
    chosen = results[best]
    headline = [chosen["summary"][o]["dice"]["mean"] for o in released.HEADLINE_ORGANS]
    tta, largest = CANDIDATES[best]
    for key in ("saved_model", "signatures", "serving", "self_check_max_abs_diff",
                "segment_volume_self_check_max_abs_diff"):  # the package ships model.keras, no SavedModel
        metadata.pop(key, None)
    metadata["prediction"] = {
        "tta": tta, "largest_component": largest,
        "organs": [o for o in metadata["organs"] if chosen["summary"][o]["dice"]["mean"] >= MINIMUM_DICE],
        "minimum_dice": MINIMUM_DICE,
        "chosen_on": "mean 3D Dice over the model's organs on the OpenKBP validation cases",
        "candidates": {n: r["summary"]["mean"]["dice"]["mean"] for n, r in results.items()},
    }
    cases = len(chosen["cases"])
    metadata["release"] = {
        "name": name,
        "summary": f"{len(metadata['organs'])} head-and-neck organs at risk ({', '.join(metadata['organs'])}) on CT, "
                   "from a 2.5D "
                   f"residual U-Net (variant {config['variant']}) trained on the OpenKBP cases by "
                   f"`scripts/openkbp.sh release`.",
        "licence": LICENCE, "data": DATA, "failure_modes": [*FAILURE_MODES, *weak_cases(chosen)],
        "tg263_names": {o: TG263_NAMES.get(o, o) for o in metadata["organs"]},
        "recipe": {"command": "scripts/openkbp.sh release", "steps": training["steps"],
                   "batch_size": config["pipeline"]["batch_size"],
                   "description": f"{training['epochs']} epochs x {config['steps_per_epoch']} steps, Adam, half-cosine "
                                  f"learning rate {config['learning_rate']:g} -> {config['learning_rate'] / 100:g}, "
                                  f"focal + {losses.DICE_OVER[config['loss'].get('dice_over', 'slice')]} "
                                  f"loss, random {config['augment']['crop_size']} px crops; the final "
                                  "model (no epoch chosen on validation cases)"},
        "training": training,
        "parameters": int(model.count_params()),
        "evaluation": evaluation_record(chosen, cases),
        "evaluated_on": f"{cases} OpenKBP validation cases",
        "blanked_slices": blanked_slices,
        "headline_dice": sum(headline) / len(headline),
    }
    target = out_root / name
    with atomic_path(target) as tmp:
        tmp.mkdir()
        model.save(tmp / MODEL_FILE)
        metadata["release"]["weights_mb"] = (tmp / MODEL_FILE).stat().st_size / 2**20
        metadata[trust.FILES_KEY] = trust.fingerprint(tmp, (MODEL_FILE,))
        configs.write_json_atomic(tmp / METADATA_FILE, metadata)
        (tmp / released.CARD_FILE).write_text(released.model_card(metadata))
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="the training run folder")
    parser.add_argument("--export", type=Path, required=True, help="its export folder (hnseg export --which final)")
    parser.add_argument("--data", type=Path, required=True, help="the OpenKBP folder (train/ and validation/)")
    parser.add_argument("--work", type=Path, required=True, help="folder for the candidates' predictions")
    parser.add_argument("--name", default=released.DEFAULT)
    parser.add_argument("--commit", help="commit of the code that trained the model (default: HEAD)")
    parser.add_argument("--out-root", type=Path, default=REPO / "hnseg_keras" / "released")
    args = parser.parse_args()
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                           text=True).stdout.strip()
    best, results = choose(args.export, args.data, args.work)
    for name, result in results.items():
        print(f"{name:>24}: mean 3D Dice {100 * result['summary']['mean']['dice']['mean']:.2f} %", file=sys.stderr)
    labels = read_metadata(args.export)["labels"]
    target = package(args.export, args.run, args.name, best, results, commit, args.out_root,
                     blanked_record(args.data, args.work / best, labels))
    print(f"released {target} (prediction: {best})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
