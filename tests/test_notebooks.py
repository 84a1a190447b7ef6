"""Every notebook runs top to bottom (nbclient) on a tiny phantom, so none of them can rot.

The values appended to each notebook's ``parameters`` cell shrink the work to seconds: a 64-pixel
phantom, and for the quickstart one epoch of two steps. Notebook 4 evaluates what 3 predicted.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
TIMEOUT_S = 300


def run_notebook(name: str, parameters: dict) -> nbformat.NotebookNode:
    """Execute notebooks/``name`` with ``parameters`` set after its own; returns the executed notebook."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += "\n# injected by tests/test_notebooks.py\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    client = nbclient.NotebookClient(notebook, timeout=TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    return notebook


def outputs_of(notebook, kind: str) -> list:
    return [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == kind]


def images_in(notebook) -> int:
    return sum("image/png" in o.get("data", {}) for c in notebook.cells if c.cell_type == "code"
               for o in c.get("outputs", []))


def test_committed_notebooks_carry_no_outputs_and_match_their_generator():
    spec = importlib.util.spec_from_file_location("notebook_build", NOTEBOOKS / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    for name, cells in build.NOTEBOOKS.items():
        committed = nbformat.read(NOTEBOOKS / name, as_version=4)
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in committed.cells if c.cell_type == "code")
        assert nbformat.writes(committed) == nbformat.writes(build.build(cells)), f"{name}: run notebooks/build.py"


def test_data_notebook_counts_missing_annotations(tmp_path):
    notebook = run_notebook("01_data.ipynb", {"PHANTOM_CASES": 5, "PHANTOM_SIZE": 64})
    text = "".join(o.get("text", "") for o in outputs_of(notebook, "stream"))
    assert "5 cases" in text and "Mandible         missing in   1 of 5 cases" in text  # phantom: 20 % missing
    assert images_in(notebook) == 3


def test_augmentation_notebook_is_reproducible():
    notebook = run_notebook("02_augmentation.ipynb", {"PHANTOM_SIZE": 64, "SLICE_SIZE": 64, "SLICE_SPACING": 3.2,
                                                      "CROP": 48})
    text = "".join(o.get("text", "") for o in outputs_of(notebook, "stream"))
    assert "identical image, masks and distance maps: True" in text and "changes the image: True" in text
    assert images_in(notebook) == 1


def test_evaluation_notebook_on_known_predictions(tmp_path):
    """Predictions copied from the ground truth, with Parotid_R left out of one case: known scores."""
    from hnseg_keras.data import phantom
    from hnseg_keras.data.cases import write_label_map
    from hnseg_keras.data.layouts import read_ref
    from hnseg_keras.data.organs import label_value

    organs = ["BrainStem", "Parotid_L", "Parotid_R"]
    refs = phantom.write_phantom(tmp_path / "gt", 3, phantom.PhantomConfig(size=64, spacing_mm=3.2), splits=None,
                                 progress=False)
    for number, ref in enumerate(refs):
        case = read_ref(ref, organs)
        labels = np.zeros(case.ct.shape, np.uint8)
        for name in organs[:2] if number == 0 else organs:
            labels[case.masks[name] > 0] = label_value(name)
        write_label_map(labels, case, tmp_path / "pred" / f"{case.case_id}.nrrd")
    notebook = run_notebook("04_evaluation.ipynb", {
        "PREDICTIONS": str(tmp_path / "pred"), "GROUND_TRUTH": str(tmp_path / "gt"), "ORGANS": organs})
    text = "".join(o.get("text", "") for o in outputs_of(notebook, "stream"))
    assert "| BrainStem | 3 | 100.00 ± 0.00 |" in text and "| Parotid_R | 3 | 66.67 ± 57.74 |" in text
    assert images_in(notebook) == 3  # box plots, best case, worst case


def test_quickstart_trains_predicts_and_previews(tmp_path):
    work = tmp_path / "quick"
    notebook = run_notebook("03_quickstart.ipynb", {
        "WORK": str(work), "PHANTOM_CASES": 5, "PHANTOM_SIZE": 64, "SLICE_SIZE": 48, "SLICE_SPACING": 4.0,
        "EPOCHS": 1, "STEPS_PER_EPOCH": 2, "CROP": 32, "ORGANS": ["BrainStem", "Parotid_L", "Parotid_R"],
        "TRAIN_OPTIONS": ["--set", "validation_steps=1", "--set", "pipeline.jit_compile=false",
                          "--set", "image_slices=1"]})
    assert images_in(notebook) == 2  # training curves and one prediction preview
    assert (work / "run" / "training_curves.png").is_file() and len(list(work.glob("predictions/*.seg.nrrd"))) == 1
