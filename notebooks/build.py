"""Writes the four notebooks of this folder from the cell texts below (run it after editing them).

Keeping the source here keeps the ``.ipynb`` files clean (no outputs, no execution counts) and
their diffs readable: ``python notebooks/build.py``. The cell tagged ``parameters`` holds every
setting; ``tests/test_notebooks.py`` appends small values to it and runs each notebook.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

DATA_PARAMETER = '''# DATA = None uses the built-in synthetic phantom (no download). For real CT, give a dataset root in
# PDDCA layout (<case>/img.nrrd + structures/), e.g. DATA = "../../shared/data/openkbp-hn".
DATA = None'''

# ----------------------------------------------------------------------------- 01 data

DATA_CELLS = [
    ("md", """# 1. The data: intensities, organ sizes and missing annotations

What the model is up against, organ by organ: the CT numbers (HU) inside each organ, how small each
organ is next to the whole volume (the class imbalance behind the class-weighted mixup), on how many
slices it appears, and in how many cases it was never outlined (those cases still train the other
organs: a missing organ is masked out of the loss, not treated as background)."""),
    ("parameters", DATA_PARAMETER + '''
PHANTOM_CASES = 10  # phantom cases to generate (in memory)
PHANTOM_SIZE = 128  # phantom in-plane voxels (204.8 mm field of view)
MAX_CASES = 30  # cases read from DATA'''),
    ("code", '''import matplotlib.pyplot as plt
import numpy as np

from hnseg_keras.data import phantom
from hnseg_keras.data.layouts import find_refs, read_ref
from hnseg_keras.data.organs import DEFAULT_ORGANS
from hnseg_keras.render import organ_colour


def load_cases():
    """The cases to look at: phantom cases made in memory, or the first MAX_CASES of DATA."""
    if DATA is None:
        config = phantom.PhantomConfig(size=PHANTOM_SIZE, spacing_mm=204.8 / PHANTOM_SIZE)
        return [phantom.generate_case(index, config) for index in range(PHANTOM_CASES)]
    return [read_ref(ref, DEFAULT_ORGANS) for ref in find_refs(DATA)[:MAX_CASES]]


cases = load_cases()
organs = list(DEFAULT_ORGANS)
colours = [np.array(organ_colour(name)) / 255 for name in organs]
print(f"{len(cases)} cases; CT shapes {sorted({c.ct.shape for c in cases})[:3]} ...")'''),
    ("md", """## Missing annotations per organ
A case without an organ's outline still teaches the model every other organ; the loss ignores
that organ's channel there."""),
    ("code", '''missing = [sum(name not in case.masks for case in cases) for name in organs]
for name, count in zip(organs, missing, strict=True):
    print(f"{name:16s} missing in {count:3d} of {len(cases)} cases")
fig, ax = plt.subplots(figsize=(8, 2.5))
ax.bar(organs, missing, color=colours, edgecolor="black")
ax.set_ylabel("cases without outline")
ax.tick_params(axis="x", rotation=30)
plt.show()'''),
    ("md", """## CT numbers inside each organ
Soft tissue sits in a narrow band; the mandible is bone. The model sees HU clipped to a soft-tissue
window, so bone saturates and the glands' small contrast is stretched."""),
    ("code", '''rng = np.random.default_rng(0)
fig, ax = plt.subplots(figsize=(8, 3.5))
bins = np.linspace(-200, 1200, 141)
for name, colour in zip(organs, colours, strict=True):
    values = np.concatenate([case.ct[case.masks[name] > 0] for case in cases if name in case.masks] or [[]])
    if values.size:
        sample = rng.choice(values, size=min(values.size, 200_000), replace=False)
        ax.hist(sample, bins=bins, density=True, histtype="step", linewidth=1.5, color=colour, label=name)
ax.set_xlabel("HU")
ax.set_ylabel("density")
ax.legend(fontsize=7, ncols=3)
plt.show()'''),
    ("md", """## Class imbalance: organ volume share and slice count
The chiasm and optic nerves fill a few voxels in a million and appear on few slices. The
class-weighted mixup weighs each slice by 1 / (foreground-slice count) of the organs it holds, so
slices with rare organs are picked as mixup partners more often."""),
    ("code", '''share, slices = [], []
for name in organs:
    annotated = [case for case in cases if name in case.masks]
    share.append(np.mean([case.masks[name].mean() for case in annotated]) if annotated else np.nan)
    slices.append(sum(int(case.masks[name].any(axis=(1, 2)).sum()) for case in annotated))
weights = 1.0 / np.maximum(slices, 1)
for name, s, n, w in zip(organs, share, slices, weights / np.nanmin(weights), strict=True):
    print(f"{name:16s} {100 * s:8.4f} % of the volume   {n:5d} slices   mixup weight x{w:6.1f}")
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3))
left.bar(organs, 100 * np.array(share), color=colours, edgecolor="black")
left.set_yscale("log")
left.set_ylabel("% of the CT volume")
right.bar(organs, slices, color=colours, edgecolor="black")
right.set_ylabel("slices with the organ")
for ax in (left, right):
    ax.tick_params(axis="x", rotation=45)
plt.show()'''),
]

# ----------------------------------------------------------------------------- 02 augmentation

AUGMENT_CELLS = [
    ("md", """# 2. Augmentation: crop, elastic and grid warps, class-weighted mixup

One training slice through each random operation of `hnseg train`, with the organ contours and a
distance map carried along. Every random number comes from one seed: the same seed gives the same
picture (checked at the end), and every spatial key (image, masks, distance maps) moves with the
same field."""),
    ("parameters", DATA_PARAMETER + '''
PHANTOM_SIZE = 128  # phantom in-plane voxels (204.8 mm field of view)
SLICE_SIZE = 112  # slice grid of the training data (pixels), at SLICE_SPACING mm
SLICE_SPACING = 2.0
CROP = 96  # random crop (pixels)
SEED = 7
ELASTIC_ALPHA = 8.0  # twice the training default, so the warp is easy to see
ORGANS = ["BrainStem", "Mandible", "Parotid_L", "Parotid_R", "Submandibular_L", "Submandibular_R"]'''),
    ("code", '''import dataclasses

import matplotlib.pyplot as plt
import numpy as np

from hnseg_keras.data import phantom
from hnseg_keras.data.layouts import find_refs, read_ref
from hnseg_keras.data.slicing import SlicingConfig, slice_case
from hnseg_keras.inputs import augment
from hnseg_keras.render import overlay

case = (phantom.generate_case(0, phantom.PhantomConfig(size=PHANTOM_SIZE, spacing_mm=204.8 / PHANTOM_SIZE))
        if DATA is None else read_ref(find_refs(DATA)[0], ORGANS))
examples = list(slice_case(case, ORGANS, SlicingConfig(size=SLICE_SIZE, spacing_mm=SLICE_SPACING)))
organ_count = [int((e["masks"].max(axis=(0, 1)) > 0).sum()) for e in examples]
first = int(np.argmax(organ_count))  # the slice showing the most organs
second = int(np.argsort(organ_count)[len(organ_count) // 2])  # a mixup partner
batch = {key: np.stack([examples[first][key], examples[second][key]]).astype("float32")
         for key in ("image", "masks", "dist_maps", "annotated")}
print(f"case {case.case_id}: {len(examples)} slices; showing slice {examples[first]['slice_index']}")'''),
    ("code", '''BASE = augment.AugmentConfig(crop_size=CROP, warp_probability=0.0, mixup=False, elastic_alpha=ELASTIC_ALPHA)
STAGES = {
    "crop": BASE,
    "crop + elastic": dataclasses.replace(BASE, warp_probability=1.0, grid=False),
    "crop + grid": dataclasses.replace(BASE, warp_probability=1.0, elastic=False),
    "crop + mixup": dataclasses.replace(BASE, mixup=True, mixup_alpha=1.0),
}
weights = 1.0 / np.maximum(batch["masks"].max(axis=(1, 2)).sum(axis=0), 1.0)  # rare organs weigh more


def run(config, seed=SEED):
    """The augmented batch as numpy arrays (the training code, on a batch of two slices)."""
    out = augment.augment_batch(batch, augment.seed_pair(seed), config, weights)
    return {key: np.asarray(value) for key, value in out.items()}


def tile(image, masks, window=BASE.window):
    return overlay(image[..., image.shape[-1] // 2], masks, ORGANS, window)


results = {name: run(config) for name, config in STAGES.items()}
first_organ = ORGANS.index(max(ORGANS, key=lambda n: batch["masks"][0, ..., ORGANS.index(n)].sum()))
fig, axes = plt.subplots(2, 1 + len(STAGES), figsize=(3 * (1 + len(STAGES)), 6))
axes[0, 0].imshow(tile(np.asarray(augment.window_image(batch["image"], BASE.window))[0], batch["masks"][0]))
axes[0, 0].set_title("slice")
axes[1, 0].imshow(batch["dist_maps"][0, ..., first_organ], cmap="RdBu", vmin=-30, vmax=30)
for column, (name, out) in enumerate(results.items(), 1):
    lam = f" (lam {out['lam'][0]:.2f})" if "lam" in out else ""
    axes[0, column].imshow(tile(out["image"][0], out["masks"][0]))
    axes[0, column].set_title(name + lam)
    axes[1, column].imshow(out["dist_maps"][0, ..., first_organ], cmap="RdBu", vmin=-30, vmax=30)
axes[1, 0].set_ylabel(f"distance map, {ORGANS[first_organ]}")
for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
plt.tight_layout()
plt.show()'''),
    ("md", """With mixup the image is a blend of two slices and both targets are kept (`masks` and
`partner_masks`, weighed by lambda in the loss); the contours above are those of the first slice.

## Same seed, same picture"""),
    ("code", '''warp = STAGES["crop + elastic"]
again, other = run(warp), run(warp, seed=SEED + 1)
same = all(np.array_equal(results["crop + elastic"][key], again[key]) for key in ("image", "masks", "dist_maps"))
print("same seed gives identical image, masks and distance maps:", same)
print("another seed changes the image:", not np.array_equal(results["crop + elastic"]["image"], other["image"]))
assert same'''),
]

# ----------------------------------------------------------------------------- 03 quickstart

QUICK_CELLS = [
    ("md", """# 3. Quickstart: prepare, train, export, predict, look

The same `hnseg` commands as on the command line, called from Python. On the phantom the defaults
train the small model for about two minutes on a 2-core CPU; raise `EPOCHS` for a better model. The
last cells show the training curves and a predicted case. Everything goes to `WORK`; notebook 4
evaluates what this one predicts."""),
    ("parameters", DATA_PARAMETER + '''
WORK = "../runs/notebook-quickstart"  # a new folder for shards, run, model and predictions
PHANTOM_CASES = 16
PHANTOM_SIZE = 128
SLICE_SIZE = 112  # slice grid (pixels) at SLICE_SPACING mm
SLICE_SPACING = 2.0
ORGANS = ["BrainStem", "Mandible", "Parotid_L", "Parotid_R", "Submandibular_L", "Submandibular_R"]
EPOCHS = 8
STEPS_PER_EPOCH = None  # None: one pass over the training slices
CROP = 96
TRAIN_OPTIONS = []  # more `hnseg train` arguments, e.g. ["--set", "validation_steps=1"]'''),
    ("code", '''import json
from pathlib import Path

from IPython.display import Image, display

from hnseg_keras import cli

work = Path(WORK)
shards, run, model, predictions = work / "shards", work / "run", work / "model", work / "predictions"


def hnseg(*args):
    """Run one `hnseg` command; stop the notebook if it fails."""
    print("hnseg", *args)
    status = cli.main([str(a) for a in args])
    assert status == 0, f"hnseg {args[0]} failed with status {status}"'''),
    ("code", '''if not (shards / "manifest.json").is_file():
    source = (["--phantom", PHANTOM_CASES, "--phantom-size", PHANTOM_SIZE, "--phantom-spacing", 204.8 / PHANTOM_SIZE]
              if DATA is None else [DATA])
    hnseg("prepare", *source, "--out", shards, "--organs", *ORGANS, "--size", SLICE_SIZE,
          "--spacing", SLICE_SPACING, "--workers", 1)
cases = shards / "phantom-cases" if DATA is None else Path(DATA)
split = "test" if (cases / "test").is_dir() else "validation"
print(json.loads((shards / "manifest.json").read_text())["splits"].keys(), "- predicting split", split)'''),
    ("code", '''steps = [] if STEPS_PER_EPOCH is None else ["--steps-per-epoch", STEPS_PER_EPOCH]
hnseg("train", "--variant", "S", "--data", shards / "manifest.json", "--out", run, "--epochs", EPOCHS, *steps,
      "--set", f"augment.crop_size={CROP}", "--set", "augment.mixup=false", "--set", "pipeline.batch_size=8",
      *TRAIN_OPTIONS)
display(Image(filename=str(run / "training_curves.png")))'''),
    ("code", '''if not model.exists():
    hnseg("export", run, "--out", model)
if not predictions.exists():
    hnseg("predict", cases, "--split", split, "--model", model, "--out", predictions, "--preview")
previews = sorted((predictions / "preview").glob("*.png"))
display(Image(filename=str(previews[0])))'''),
    ("md", """Each case now has `<case>.nrrd` (a label map), `<case>.seg.nrrd` (open it in 3D Slicer: the organs
appear named and coloured), `<case>.qa.json` (the anatomical checks) and `preview/<case>.png`.
Notebook 4 scores them.

## The same from Python

`hnseg_keras.api` is the public Python API: `load_model` takes an export folder, `segment` a CT file,
a DICOM folder or a SimpleITK image, and returns the label map on the CT's own grid with its checks."""),
    ("code", '''import numpy as np
import SimpleITK as sitk

from hnseg_keras import api

segmenter = api.load_model(model)
case_folder = sorted(p for p in (cases / split).iterdir() if p.is_dir())[0]
result = api.segment(case_folder, segmenter)
print(result.case_id, "organs:", ", ".join(result.organs))
print("anatomical checks:", result.qa["summary"])
written = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / f"{result.case_id}.nrrd")))
print("same label map as `hnseg predict` wrote:", np.array_equal(result.labels, written))
assert np.array_equal(result.labels, written)'''),
]

# ----------------------------------------------------------------------------- 04 evaluation

EVAL_CELLS = [
    ("md", """# 4. Evaluation: per-organ scores, best and worst cases

3D Dice, HD95 and surface Dice per organ over the predicted cases (the same code as
`hnseg evaluate`), as box plots with one dot per case, then the best and the worst case side by side
with their ground truth, so a low number can be read off the picture."""),
    ("parameters", '''PREDICTIONS = "../runs/notebook-quickstart/predictions"  # written by notebook 3 (or `hnseg predict`)
GROUND_TRUTH = "../runs/notebook-quickstart/shards/phantom-cases/test"  # the same cases with outlines
ORGANS = ["BrainStem", "Mandible", "Parotid_L", "Parotid_R", "Submandibular_L", "Submandibular_R"]'''),
    ("code", '''import io
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

from hnseg_keras.data.layouts import find_refs, read_ref
from hnseg_keras.evaluation import plots, scores
from hnseg_keras.inference.visual import case_preview

results = scores.evaluate(PREDICTIONS, GROUND_TRUTH, ORGANS)
print(scores.format_markdown(results))'''),
    ("code", '''figure = plots.box_plot_figure(results, ("dice", "hd95_mm", "surface_dice"))
buffer = io.BytesIO()
figure.savefig(buffer, format="png")
display(Image(data=buffer.getvalue()))'''),
    ("md", "## Best and worst case by mean Dice (left: ground truth, right: prediction)"),
    ("code", '''mean_dice = {case: np.mean([entry["dice"] for entry in metrics.values()])
             for case, metrics in results["cases"].items()}
ranked = sorted(mean_dice, key=mean_dice.get)
refs = {ref.case_id: ref for ref in find_refs(GROUND_TRUTH)}
for label, case_id in (("best", ranked[-1]), ("worst", ranked[0])):
    truth = read_ref(refs[case_id], ORGANS)
    shown = [name for name in ORGANS if name in truth.masks]
    predicted = scores.read_prediction(scores.find_prediction(Path(PREDICTIONS), case_id), truth, shown)
    pictures = [case_preview(truth.ct, np.stack([masks[name] > 0 for name in shown]), shown, truth.spacing,
                             title=f"{label}: {case_id} {what}", per_view=3)
                for what, masks in (("ground truth", truth.masks), (f"prediction, mean Dice {mean_dice[case_id]:.3f}", predicted))]
    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    for ax, picture in zip(axes, pictures, strict=True):
        ax.imshow(picture)
        ax.axis("off")
    plt.tight_layout()
    plt.show()'''),
]

NOTEBOOKS = {
    "01_data.ipynb": DATA_CELLS,
    "02_augmentation.ipynb": AUGMENT_CELLS,
    "03_quickstart.ipynb": QUICK_CELLS,
    "04_evaluation.ipynb": EVAL_CELLS,
}


def build(cells) -> nbformat.NotebookNode:
    """A notebook of (kind, source) pairs; kind "parameters" is a code cell tagged ``parameters``."""
    notebook = new_notebook()
    for kind, source in cells:
        if kind == "md":
            notebook.cells.append(new_markdown_cell(source))
        else:
            cell = new_code_cell(source)
            if kind == "parameters":
                cell.metadata["tags"] = ["parameters"]
            notebook.cells.append(cell)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    for index, cell in enumerate(notebook.cells):
        cell["id"] = f"cell-{index:02d}"  # stable ids keep rebuilt notebooks byte-identical
    return notebook


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(cells), HERE / name)
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
