"""The models the package carries, and ``hnseg models``.

Each released model is a folder under ``hnseg_keras/released/`` (package data, so a wheel installed on a planning machine without
internet has it): ``model.keras`` (weights only), ``metadata.json`` (what an export records, plus
``prediction``, the post-processing chosen on validation cases and applied by default, and ``release``,
how it was trained and what it scored) and ``MODEL_CARD.md``, rendered from ``metadata.json`` by
``model_card`` so the two cannot disagree. ``hnseg predict`` without ``--model`` uses ``DEFAULT``.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

from hnseg_keras.errors import HnsegError
from hnseg_keras.inference.model_io import METADATA_FILE, MODEL_FILE, read_metadata

DEFAULT = "openkbp-hn7-s"
CARD_FILE = "MODEL_CARD.md"
HEADLINE_ORGANS = ("BrainStem", "Mandible", "Parotid_L", "Parotid_R")  # the four organs all results quote


def root() -> Path:
    return Path(str(resources.files("hnseg_keras.released")))


def names() -> list[str]:
    """Released models present in this installation, sorted."""
    return sorted(p.name for p in root().iterdir() if (p / METADATA_FILE).is_file() and (p / MODEL_FILE).is_file())


def path(name: str | None = None) -> Path:
    """The folder of a released model (``DEFAULT`` when ``name`` is None); one-line error when absent."""
    name = name or DEFAULT
    found = names()
    if name not in found:
        from hnseg_keras import __version__

        carried = ", ".join(found) or "none"
        raise HnsegError(f"hnseg-keras {__version__} carries no released model {name!r} (carried: {carried}); "
                         "give --model with an export folder, a run folder or a .keras file")
    return root() / name


def metadata(name: str | None = None) -> dict:
    return read_metadata(path(name))


def written_organs(meta: dict) -> list[str]:
    """The organs ``hnseg predict`` writes by default: the release's ``prediction.organs``, else all."""
    return list(meta.get("prediction", {}).get("organs", meta["organs"]))


def describe(name: str) -> dict:
    """One row of ``hnseg models``: organs, spacing, measured Dice, licence, file size."""
    meta = metadata(name)
    release, geometry = meta.get("release", {}), meta.get("training_geometry") or {}
    native = geometry.get("native_spacing_mm") or {}
    spacing = geometry.get("spacing_mm") or meta["slicing"].get("spacing_mm")
    folder = path(name)
    return {
        "name": name, "default": name == DEFAULT, "organs": list(meta["organs"]),
        "written_by_default": written_organs(meta),
        "spacing": (f"{spacing:g} mm" if spacing else
                    f"{native.get('min', 0):.2f}-{native.get('max', 0):.2f} mm as trained; others resampled to "
                    f"{native.get('median', 0):.2f} mm"),
        "headline_dice": release.get("headline_dice"), "evaluated_on": release.get("evaluated_on"),
        "licence": release.get("licence"), "prediction": meta.get("prediction", {}),
        "size_mb": sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 2**20,
        "card": str(folder / CARD_FILE),
    }


def model_card(meta: dict) -> str:
    """MODEL_CARD.md of a released model, every fact read from its metadata.json."""
    release, organs = meta["release"], meta["organs"]
    evaluation = release["evaluation"]
    geometry = meta.get("training_geometry") or {}
    native = geometry.get("native_spacing_mm") or {}
    prediction = meta.get("prediction", {})
    chosen = ", ".join(k for k in ("largest_component", "tta") if prediction.get(k)) or "none"
    tg263 = release.get("tg263_names", {})
    written = written_organs(meta)
    left_out = [o for o in organs if o not in written]
    lines = [
        f"# Model card: {release['name']}",
        "",
        f"{release['summary']}",
        "",
        "**Not a medical device.** For research use only: every contour must be reviewed and edited by a "
        "qualified person before any clinical use. It has not been cleared or approved by any regulator.",
        "",
        "## Organs",
        "",
        "| channel | organ | TG-263 name | label value | written by default |",
        "|---|---|---|---|---|",
        *(f"| {i} | {o} | {tg263.get(o, o)} | {meta['labels'][o]} | {'yes' if o in written else 'no'} |"
          for i, o in enumerate(organs)),
        "",
        *([f"{', '.join(left_out)}: the model has their channels, but their validation Dice (below) is under "
           f"{100 * prediction.get('minimum_dice', 0):.0f} %, too low to be of use, so `hnseg predict` leaves them "
           "out unless `--organs` names them.", ""] if left_out else []),
        "## Training data and its terms",
        "",
        f"{release['data']['description']}",
        "",
        f"Terms: {release['licence']}. Cite: {release['data']['citation']}",
        "",
        "## What it was trained on",
        "",
        f"- Population: {release['data']['population']}",
        f"- Resolution: in-plane {native.get('min', 0):.2f}-{native.get('max', 0):.2f} mm "
        f"(median {native.get('median', 0):.2f} mm over {native.get('cases', '?')} training CTs), each CT at its own "
        f"spacing; at prediction a CT outside that range (a planning CT at 0.5-1 mm) is resampled to "
        f"{native.get('median', 0):.2f} mm and the contours are returned on the CT's own grid. Slices of "
        f"{meta['slicing']['size']} px, {2 * meta['slicing']['neighbours'] + 1} neighbouring slices as input, "
        f"patient orientation {geometry.get('orientation', 'LPS')} (any stored orientation is read into it).",
        f"- Recipe: `{release['recipe']['command']}`: {release['recipe']['description']}",
        f"- Steps: {release['recipe']['steps']:,} of {release['recipe']['batch_size']} slices; training took "
        f"{release['training']['minutes']:.0f} min on {release['training']['cpu']} "
        f"({release['training']['date']}, commit `{release['training']['commit']}`).",
        f"- Parameters: {release['parameters']:,}; weights {release['weights_mb']:.1f} MB (no optimizer state).",
        "",
        "## Measured accuracy",
        "",
        f"{evaluation['description']}",
        "",
        f"Prediction defaults chosen on those cases and applied by `hnseg predict`: {chosen}.",
        "",
        "| organ | n | 3D Dice (%) | HD95 (mm) |",
        "|---|---|---|---|",
        *(f"| {o} | {evaluation['organs'][o]['n']} | {100 * evaluation['organs'][o]['dice']:.2f} | "
          f"{_mm(evaluation['organs'][o]['hd95_mm'])} |" for o in organs if o in evaluation["organs"]),
        f"| mean of {', '.join(HEADLINE_ORGANS)} | | **{100 * release['headline_dice']:.2f}** | |",
        *([f"| mean of all {len(organs)} | | {100 * evaluation['mean_dice']:.2f} | |"]
          if set(organs) != set(HEADLINE_ORGANS) else []),
        "",
        *_blanked_section(release.get("blanked_slices"), organs),
        "## Intended use",
        "",
        "Research on head-and-neck organ-at-risk contouring; a first draft of these organs on CT for a "
        "person to review; a baseline to compare methods with.",
        "",
        "## Known failure modes",
        "",
        *(f"- {item}" for item in release["failure_modes"]),
        "",
    ]
    return "\n".join(lines)


def _blanked_section(record: dict | None, organs) -> list[str]:
    """Card lines on blanked validation slices (``evaluation.blanked``); none for models without the record."""
    if not record:
        return []
    rows = [(o, record["organs"][o]) for o in organs if o in record["organs"]]
    return [
        "### Without the slices where the image gives the contour away",
        "",
        "In the OpenKBP CTs, some slices at the top and bottom of the contours hold less than "
        f"{record['area_cm2']:g} cm2 of tissue (the rest is stored as air, -1024 HU): the organ and a few voxels "
        "around it, so the image outlines the organ. In "
        f"{record['cases_affected']} of the {record['cases']} validation cases an organ has more than a fifth of "
        "its voxels on such slices. A clinical CT has full anatomy there, so the Dice without those slices is the "
        "better guide to it:",
        "",
        "| organ | organ voxels on such slices | 3D Dice, all slices (%) | without them (%) | on them only (%, cases) |",
        "|---|---|---|---|---|",
        *(f"| {o} | {row['voxels_on_blanked_slices_percent']:.1f} % | {_percent(row['all'])} | "
          f"{_percent(row['clinical_like'])} | {_on_blanked(row)} |" for o, row in rows),
        *([f"| mean of {', '.join(HEADLINE_ORGANS)} | | {_percent(_mean_of(record, 'all'))} | "
           f"**{_percent(_mean_of(record, 'clinical_like'))}** | |"]
          if all(o in record["organs"] for o in HEADLINE_ORGANS) else []),
        "",
    ]


def _mean_of(record: dict, part: str) -> float:
    return sum(record["organs"][o][part] for o in HEADLINE_ORGANS) / len(HEADLINE_ORGANS)


def _on_blanked(row: dict) -> str:
    return f"{_percent(row['blanked'])} ({row['blanked_cases']})" if row["blanked_cases"] else "-"


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _mm(value) -> str:
    """A distance for the card; None where the organ was never predicted (no surface to measure)."""
    return "n/a (never predicted)" if value is None else f"{value:.2f}"


# ----------------------------------------------------------------------------- hnseg models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the table as JSON")


def run(args) -> int:
    rows = [describe(name) for name in names()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("this installation carries no released model")
        return 0
    for row in rows:
        dice = row["headline_dice"]
        print(f"{row['name']}{'  (default)' if row['default'] else ''}")
        left_out = [o for o in row["organs"] if o not in row["written_by_default"]]
        print(f"  organs:     {', '.join(row['written_by_default'])}"
              + (f" (also {', '.join(left_out)}: low validation Dice, only with --organs)" if left_out else ""))
        print(f"  spacing:    {row['spacing']}")
        if dice is not None:
            print(f"  3D Dice:    {100 * dice:.1f} % mean of {', '.join(HEADLINE_ORGANS)} on {row['evaluated_on']}")
        applied = ", ".join(k for k, v in row["prediction"].items() if v is True) or "none"
        print(f"  applied:    {applied} (post-processing chosen on the validation cases)")
        print(f"  licence:    {row['licence']}")
        print(f"  size:       {row['size_mb']:.1f} MB")
        print(f"  card:       {row['card']}")
    return 0
