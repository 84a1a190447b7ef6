"""Bring your own data end to end: prepare on each layout, evaluate --gt on a DICOM tree equals evaluate on the
PDDCA copy, a user-defined organ (organs file) through prepare, prediction outputs and evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from own_data_builders import small_case, write_dicom_tree, write_nnunet, write_patient
from scipy import ndimage

from hnseg_keras import cli, configs
from hnseg_keras.data import layouts
from hnseg_keras.data.cases import write_label_map, write_pddca_case
from hnseg_keras.data.organs import CATALOGUE, DEFAULT_ORGANS, definitions, label_value, read_organs_file
from hnseg_keras.data.shards import Manifest
from hnseg_keras.inference import batch, prediction
from hnseg_keras.inference.rtstruct import write_rtstruct

TINY = ["--size", "32", "--spacing", "8", "--workers", "1"]
ORGANS_FILE = {"organs": [
    {"name": "Cochlea_L", "aliases": ["Cochlea Left"], "partner": "Cochlea_R", "tolerance_mm": 1.0,
     "colour": [200, 10, 10], "label": 20},
    {"name": "Cochlea_R", "partner": "Cochlea_L", "tolerance_mm": 1.0, "colour": [10, 200, 10], "label": 21}]}


def _one_error(capsys, argv, *words):
    assert cli.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hnseg")]
    assert len(lines) == 1 and all(word in lines[0] for word in words), lines


def test_prepare_on_a_dicom_tree_and_an_nnunet_dataset(tmp_path, capsys):
    write_dicom_tree(tmp_path / "tree", (0, 1, 2), "split")
    assert cli.main(["prepare", str(tmp_path / "tree"), "--out", str(tmp_path / "s1"), *TINY,
                     "--split-fractions", "0.34,0.33,0.33", "--seed", "4"]) == 0
    manifest = Manifest.load(tmp_path / "s1")
    assert manifest.complete and sorted(manifest.cases) == ["patient00", "patient01", "patient02"]
    assert sorted(entry["split"] for entry in manifest.cases.values()) == ["test", "train", "validation"]
    assert manifest.split_rule["seed"] == 4 and manifest.split_rule["fractions"] == [0.34, 0.33, 0.33]
    assert manifest.organ_definitions == definitions(DEFAULT_ORGANS)
    assert manifest.splits["train"]["organs"]["Parotid_L"]["foreground_pixels"] > 0
    write_nnunet(tmp_path / "nn", indices=(0, 1), test_indices=(2,))
    (tmp_path / "folds.json").write_text(json.dumps([{"train": ["HN_000"], "val": ["HN_001"]}]))
    assert cli.main(["prepare", str(tmp_path / "nn"), "--out", str(tmp_path / "s2"), *TINY,
                     "--splits", str(tmp_path / "folds.json")]) == 0
    assert "skipping 1 case(s) without contours (HN_002)" in capsys.readouterr().err
    manifest = Manifest.load(tmp_path / "s2")
    assert {case: entry["split"] for case, entry in manifest.cases.items()} == {"HN_000": "train",
                                                                               "HN_001": "validation"}
    assert manifest.split_rule == {"method": "file", "file": "folds.json", "fold": 0}


def _eroded_label_map(case) -> np.ndarray:
    """A 'prediction': every organ eroded by one voxel in-plane (tiny organs vanish), catalogue label values."""
    labels = np.zeros(case.ct.shape, dtype=np.uint8)
    for organ, mask in case.masks.items():
        labels[ndimage.binary_erosion(mask, np.ones((1, 3, 3), bool))] = label_value(organ)
    return labels


def test_evaluate_gt_on_dicom_tree_equals_evaluate_on_pddca_copy(tmp_path):
    planted = write_dicom_tree(tmp_path / "tree", (1, 2), "nested")
    for name, case in planted.items():
        case.case_id = name
        write_pddca_case(case, tmp_path / "pddca" / name)
        write_label_map(_eroded_label_map(case), case, tmp_path / "pred" / f"{name}.nrrd")
    scores = {}
    for gt in ("tree", "pddca"):
        assert cli.main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / gt),
                         "--organs", *DEFAULT_ORGANS, "--out", str(tmp_path / f"eval-{gt}")]) == 0
        scores[gt] = json.loads((tmp_path / f"eval-{gt}" / "results.json").read_text())
    for organ in DEFAULT_ORGANS:
        tree, pddca = scores["tree"]["summary"][organ]["dice"], scores["pddca"]["summary"][organ]["dice"]
        assert tree["n"] == pddca["n"] > 0 and abs(tree["mean"] - pddca["mean"]) * 100 < 0.5, organ
    assert 0.1 < scores["tree"]["summary"]["mean"]["dice"]["mean"] < 0.9  # the erosion is visible


def _cochlea_patient(root: Path):
    """A DICOM patient with two extra clinic-named ROIs for a user-defined organ pair."""
    case = small_case(1)
    left, right = np.zeros_like(case.ct, np.uint8), np.zeros_like(case.ct, np.uint8)
    left[8:10, 30:33, 40:43] = 1
    right[8:10, 30:33, 20:23] = 1
    write_patient(case, root / "ear01", "split", extra={"COCHLEA LT": left, "Rt Cochlea": right})
    case.masks.update(Cochlea_L=left, Cochlea_R=right)
    case.case_id = "ear01"
    return case


def test_user_organs_through_prepare_prediction_outputs_and_evaluate(tmp_path, capsys):
    organs_file = tmp_path / "organs.json"
    organs_file.write_text(json.dumps(ORGANS_FILE))
    case = _cochlea_patient(tmp_path / "tree")
    organs = ["BrainStem", "Cochlea_L", "Cochlea_R"]
    _one_error(capsys, ["prepare", str(tmp_path / "tree"), "--out", str(tmp_path / "x"), "--organs", *organs],
               "unknown organ 'Cochlea_L'", "--organs-file")
    assert cli.main(["prepare", str(tmp_path / "tree"), "--out", str(tmp_path / "s"), *TINY, "--organs", *organs,
                     "--organs-file", str(organs_file)]) == 0
    manifest = Manifest.load(tmp_path / "s")
    assert manifest.organs == organs and manifest.organ_definitions["Cochlea_L"] == {
        "label": 20, "aliases": ["Cochlea Left"], "partner": "Cochlea_R", "tolerance_mm": 1.0,
        "colour": [200, 10, 10]}
    assert manifest.organ_definitions["BrainStem"]["label"] == CATALOGUE["BrainStem"].label
    assert manifest.splits["train"]["organs"]["Cochlea_R"]["foreground_pixels"] > 0
    # prediction code takes names, label values and colours from the definitions a model carries
    metadata = {"organs": organs, "organ_definitions": manifest.organ_definitions,
                "slicing": configs.to_dict(manifest.slicing),
                "input": {"channels": 1}}
    names, _, _ = prediction._metadata_parts(metadata)
    catalogue = read_organs_file(organs_file)
    masks = np.stack([case.masks[name].astype(bool) for name in names])
    seg = prediction.Segmentation("ear01", names, masks, np.zeros(case.ct.shape, np.uint8), 0.0, len(case.ct),
                                  catalogue)
    labels = seg.label_map()
    assert set(np.unique(labels[case.masks["Cochlea_L"] > 0])) == {20}
    assert set(np.unique(labels[case.masks["Cochlea_R"] > 0])) == {21}
    write_label_map(labels, case, tmp_path / "pred" / "ear01.nrrd")
    item = batch.find_inputs(tmp_path / "tree")[0]
    (tmp_path / "pred-rt").mkdir()
    rtstruct = write_rtstruct(seg, case, item.series_files, tmp_path / "pred-rt" / "ear01_rtstruct.dcm")
    rois = {str(r.ROIName): r for r in pydicom.dcmread(rtstruct).StructureSetROISequence}
    colours = {str(r.ReferencedROINumber): [int(v) for v in r.ROIDisplayColor]
               for r in pydicom.dcmread(rtstruct).ROIContourSequence}
    assert colours[str(rois["Cochlea_L"].ROINumber)] == [200, 10, 10]
    # evaluate --gt reads the ROIs by the user's names; tolerances come from the organs file
    assert cli.main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "tree"), "--organs",
                     *organs, "--organs-file", str(organs_file), "--out", str(tmp_path / "ev")]) == 0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["tolerances_mm"]["Cochlea_L"] == 1.0
    assert results["cases"]["ear01"]["Cochlea_L"]["dice"] == 1.0 and results["cases"]["ear01"]["Cochlea_R"]["dice"] == 1.0


@pytest.mark.slow
def test_dicom_tree_prepare_train_export_predict_evaluate(tmp_path):
    """prepare -> 1 epoch of 2 steps -> export -> predict on the DICOM tree (label maps + RTSTRUCT) -> evaluate
    --gt on the tree gives the same Dice as evaluate on the PDDCA copy of the same cases."""
    planted = write_dicom_tree(tmp_path / "tree", (0, 1, 2, 3), "nested")
    for name, case in planted.items():
        case.case_id = name
        write_pddca_case(case, tmp_path / "pddca" / name)

    def hnseg(*args):
        result = subprocess.run([sys.executable, "-m", "hnseg_keras.cli", *map(str, args)], capture_output=True,
                                text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        assert result.returncode == 0, result.stderr[-2000:]

    hnseg("prepare", tmp_path / "tree", "--out", tmp_path / "shards", "--size", "64", "--spacing", "4",
          "--workers", "1", "--split-fractions", "0.5,0.5,0")
    tiny = ["model.filters=[4,8,16,32]", "augment.crop_size=32", "augment.warp_probability=0.0",
            "pipeline.shuffle_buffer=64", "pipeline.parallel_reads=2"]
    hnseg("train", "--data", tmp_path / "shards" / "manifest.json", "--epochs", "1", "--steps-per-epoch", "2",
          "--batch-size", "4", "--out", tmp_path / "run", *[arg for item in tiny for arg in ("--set", item)])
    hnseg("export", tmp_path / "run", "--out", tmp_path / "export")
    hnseg("predict", tmp_path / "tree", "--model", tmp_path / "export", "--out", tmp_path / "pred")
    for name in planted:
        assert (tmp_path / "pred" / f"{name}.nrrd").is_file() and (tmp_path / "pred" / f"{name}_rtstruct.dcm").is_file()
    scores = {}
    for gt in ("tree", "pddca"):
        hnseg("evaluate", "--pred", tmp_path / "pred", "--gt", tmp_path / gt, "--out", tmp_path / f"ev-{gt}")
        scores[gt] = json.loads((tmp_path / f"ev-{gt}" / "results.json").read_text())["summary"]
    assert list(scores["tree"]) == list(scores["pddca"])  # the model's organs that both annotate
    for organ in scores["pddca"]:
        assert scores["tree"][organ]["n"] == scores["pddca"][organ]["n"]
        tree, pddca = scores["tree"][organ]["dice"]["mean"], scores["pddca"][organ]["dice"]["mean"]
        assert (tree is None and pddca is None) or abs(tree - pddca) * 100 < 0.5, organ
    # the RTSTRUCT written for a patient is read back as that patient's ground truth would be
    refs = layouts.find_refs(tmp_path / "tree")
    assert len(refs) == 4
