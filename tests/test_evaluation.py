"""Known-answer tests for the 3D metrics, the seed2d protocol and ``hnseg evaluate``."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from hnseg_keras.cli import main
from hnseg_keras.data.cases import Case, write_label_map, write_pddca_case
from hnseg_keras.evaluation import scores as ev


def box(shape, z, y, x):
    """bool [Z, Y, X] with ones on the half-open ranges z, y, x (pairs)."""
    mask = np.zeros(shape, bool)
    mask[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = True
    return mask


def brute_force_distances(pred, gt, spacing):
    """Independent reference: surface by 6-neighbour shifts, all pairwise distances in mm."""

    def points(mask):
        padded = np.pad(mask, 1)
        inner = np.ones_like(mask)
        for axis in range(3):
            for step in (1, -1):
                inner &= np.roll(padded, step, axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~inner) * np.array(spacing[::-1])

    distances = cdist(points(pred), points(gt))
    return distances.min(axis=1), distances.min(axis=0)


# ---------------------------------------------------------------- metric core ----


def test_dice_of_offset_cubes_is_analytic():
    shape = (20, 20, 20)
    gt = box(shape, (2, 12), (2, 12), (2, 12))
    assert ev.dice(box(shape, (5, 15), (2, 12), (2, 12)), gt) == pytest.approx(0.7)  # 2*7*10*10 / 2000
    assert ev.dice(box(shape, (5, 15), (4, 14), (2, 12)), gt) == pytest.approx(0.56)  # 2*7*8*10 / 2000
    assert ev.dice(gt, gt) == 1.0


@pytest.mark.parametrize("spacing, expected_mm", [((1.0, 1.0, 1.0), 3.0), ((0.7, 0.9, 2.5), 7.5)])
def test_slabs_three_slices_apart_have_all_distances_equal(spacing, expected_mm):
    # Two one-voxel-thick full planes: every surface voxel is exactly 3 slices from the other plane.
    shape = (12, 8, 8)
    pred, gt = box(shape, (5, 6), (0, 8), (0, 8)), box(shape, (8, 9), (0, 8), (0, 8))
    assert ev.hausdorff_95(pred, gt, spacing) == pytest.approx(expected_mm)
    assert ev.hausdorff_95(pred, gt, spacing, percentile=100) == pytest.approx(expected_mm)
    assert ev.average_surface_distance(pred, gt, spacing) == pytest.approx(expected_mm)
    assert ev.surface_dice(pred, gt, spacing, tolerance_mm=expected_mm) == 1.0
    assert ev.surface_dice(pred, gt, spacing, tolerance_mm=expected_mm - 0.1) == 0.0
    assert ev.dice(pred, gt) == 0.0


def test_cube_shifted_along_z_hausdorff_isotropic_vs_anisotropic():
    shape = (24, 16, 16)
    gt = box(shape, (4, 14), (3, 13), (3, 13))
    pred = box(shape, (7, 17), (3, 13), (3, 13))  # 3 slices further along z
    assert ev.hausdorff_95(pred, gt, (1.0, 1.0, 1.0), percentile=100) == pytest.approx(3.0)
    assert ev.hausdorff_95(pred, gt, (1.0, 1.0, 2.5), percentile=100) == pytest.approx(7.5)
    # An in-plane shift is unaffected by the z spacing.
    pred_x = box(shape, (4, 14), (3, 13), (5, 15))
    assert ev.hausdorff_95(pred_x, gt, (0.8, 1.0, 2.5), percentile=100) == pytest.approx(1.6)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.6, 0.8, 2.5)])
def test_distances_match_a_brute_force_reference(spacing):
    shape = (16, 16, 16)
    gt = box(shape, (3, 9), (4, 10), (2, 8))
    pred = box(shape, (5, 12), (3, 9), (4, 9))
    d_pg, d_gp = ev.surface_distances(pred, gt, spacing)
    ref_pg, ref_gp = brute_force_distances(pred, gt, spacing)
    np.testing.assert_allclose(np.sort(d_pg), np.sort(ref_pg), atol=1e-9)
    np.testing.assert_allclose(np.sort(d_gp), np.sort(ref_gp), atol=1e-9)
    expected_hd95 = max(np.percentile(ref_pg, 95), np.percentile(ref_gp, 95))
    assert ev.hausdorff_95(pred, gt, spacing) == pytest.approx(expected_hd95)
    expected_asd = (ref_pg.sum() + ref_gp.sum()) / (ref_pg.size + ref_gp.size)
    assert ev.average_surface_distance(pred, gt, spacing) == pytest.approx(expected_asd)


def test_masks_touching_the_volume_border_have_surface_there():
    mask = np.ones((2, 4, 5), bool)
    assert ev.surface(mask).all()  # every voxel touches the border: outside counts as outside
    assert ev.surface(np.ones((3, 5, 5), bool)).sum() == 2 * 25 + 16  # two faces + middle ring


def test_asd_and_surface_dice_of_a_two_slice_slab_over_a_one_slice_slab():
    # pred = slices 4 and 5 (both surface), gt = slice 4: distances pred->gt are 0 (n) and dz (n),
    # gt->pred all 0, so ASD = dz / 3, HD95 = dz, surface Dice @ 1 mm = 2n / 3n.
    shape, spacing = (10, 6, 6), (0.5, 0.5, 2.5)
    pred, gt = box(shape, (4, 6), (0, 6), (0, 6)), box(shape, (4, 5), (0, 6), (0, 6))
    assert ev.average_surface_distance(pred, gt, spacing) == pytest.approx(2.5 / 3)
    assert ev.hausdorff_95(pred, gt, spacing) == pytest.approx(2.5)
    assert ev.surface_dice(pred, gt, spacing, 1.0) == pytest.approx(2 / 3)
    assert ev.surface_dice(pred, gt, spacing, 2.5) == 1.0


def test_concentric_spheres_distance_is_the_radius_difference_in_mm():
    # Spheres in mm on an anisotropic grid (z spacing 2 mm): radii 9 mm and 5 mm.
    spacing = (1.0, 1.0, 2.0)
    zz, yy, xx = np.indices((16, 32, 32)) * np.array([2.0, 1.0, 1.0])[:, None, None, None]
    radius = np.sqrt((zz - 15.0) ** 2 + (yy - 15.5) ** 2 + (xx - 15.5) ** 2)
    outer, inner = radius <= 9.0, radius <= 5.0
    assert ev.hausdorff_95(inner, outer, spacing) == pytest.approx(4.0, abs=1.0)
    assert ev.average_surface_distance(inner, outer, spacing) == pytest.approx(4.0, abs=0.6)
    assert ev.surface_dice(inner, outer, spacing, 6.0) == 1.0
    assert ev.surface_dice(inner, outer, spacing, 1.0) < 0.2


def test_empty_mask_conventions():
    empty, cube = np.zeros((6, 6, 6), bool), box((6, 6, 6), (1, 4), (1, 4), (1, 4))
    both = ev.case_metrics(empty, empty, (1, 1, 1), 2.0)
    assert (both["dice"], both["hd95_mm"], both["asd_mm"], both["surface_dice"], both["flag"]) == (
        1.0, 0.0, 0.0, 1.0, "both_empty")
    missed = ev.case_metrics(empty, cube, (1, 1, 1), 2.0)
    assert missed["dice"] == 0.0 and missed["surface_dice"] == 0.0 and missed["flag"] == "pred_empty"
    assert math.isnan(missed["hd95_mm"]) and math.isnan(missed["asd_mm"])
    assert ev.case_metrics(cube, empty, (1, 1, 1), 2.0)["flag"] == "gt_empty"
    assert math.isnan(ev.hausdorff_95(cube, empty, (1, 1, 1)))
    assert ev.dice(empty, empty) == 1.0 and ev.surface_dice(empty, cube, (1, 1, 1), 5.0) == 0.0
    perfect = ev.case_metrics(cube, cube, (1, 1, 1), 2.0)
    assert (perfect["dice"], perfect["hd95_mm"], perfect["asd_mm"], perfect["surface_dice"]) == (1, 0, 0, 1)


def test_seed2d_averages_slice_dice_over_ground_truth_slices_only():
    gt = np.zeros((7, 4, 4), bool)
    gt[1:4, 0:2, 0:2] = True  # 4 voxels on slices 1, 2, 3
    pred = np.zeros_like(gt)
    pred[1, 0:2, 0:2] = True  # slice 1 exact: 1
    pred[2, 0:1, 0:2] = True  # slice 2 half: 2*2 / (2+4) = 2/3
    pred[5:7] = True  # slices 5-6 hold no ground truth: ignored; slice 3 empty: 0
    total, count = ev.slice_dice_sum(pred, gt)
    assert count == 3 and total == pytest.approx(1 + 2 / 3)
    assert ev.seed2d_dice(pred, gt) == pytest.approx((1 + 2 / 3) / 3)
    assert ev.dice(pred, gt) == pytest.approx(2 * 6 / (6 + 32 + 12))
    assert math.isnan(ev.seed2d_dice(pred, np.zeros_like(gt)))


def test_full_size_volume_is_fast():
    import time

    shape, spacing = (200, 512, 512), (0.98, 0.98, 2.5)
    gt = box(shape, (80, 110), (200, 260), (300, 350))
    pred = box(shape, (82, 112), (203, 262), (298, 349))
    start = time.perf_counter()
    metrics = ev.case_metrics(pred, gt, spacing, 2.85)
    assert time.perf_counter() - start < 10.0
    assert 0.8 < metrics["dice"] < 1.0 and 2.9 <= metrics["hd95_mm"] <= 6.5


# ---------------------------------------------------------------- hnseg evaluate ----

SHAPE, SPACING = (8, 24, 24), (1.0, 1.0, 2.5)


def make_case(case_id, mandible_z=(2, 4)):
    """Tiny case: a BrainStem cube and a two-slice Mandible slab (9x9 in plane)."""
    ct = np.full(SHAPE, -1000, np.int16)
    masks = {"BrainStem": box(SHAPE, (2, 6), (4, 10), (4, 10)).astype(np.uint8),
             "Mandible": box(SHAPE, mandible_z, (12, 21), (12, 21)).astype(np.uint8)}
    return Case(case_id, ct, SPACING, (-10.0, -20.0, 5.0), masks=masks)


@pytest.fixture()
def dataset(tmp_path):
    """GT root with split folders; predictions: case A shifted Mandible (label map), case B perfect (PDDCA)."""
    gt_a, gt_b = make_case("caseA"), make_case("caseB")
    write_pddca_case(gt_a, tmp_path / "gt" / "test" / "caseA")
    write_pddca_case(gt_b, tmp_path / "gt" / "validation" / "caseB")
    shifted = make_case("caseA", mandible_z=(3, 5))
    labels = sum(m.astype(np.uint8) * v for m, v in ((shifted.masks["BrainStem"], 1), (shifted.masks["Mandible"], 3)))
    write_label_map(labels, gt_a, tmp_path / "pred" / "caseA.nrrd")
    write_pddca_case(gt_b, tmp_path / "pred" / "caseB")
    return tmp_path


def run_cli(args, capsys):
    code = main(["evaluate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_evaluate_end_to_end_known_values(dataset, capsys):
    pred, gt, out = dataset / "pred", dataset / "gt", dataset / "out"
    code, stdout, stderr = run_cli(["--pred", str(pred), "--gt", str(gt), "--organs", "BrainStem", "Mandible",
                                    "Parotid_L", "--protocol", "seed2d", "--out", str(out)], capsys)
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    perfect = results["cases"]["caseB"]
    for organ in ("BrainStem", "Mandible"):
        assert (perfect[organ]["dice"], perfect[organ]["hd95_mm"], perfect[organ]["asd_mm"]) == (1.0, 0.0, 0.0)
    assert "Parotid_L" not in perfect  # not annotated: not evaluated
    # caseA Mandible: gt slices 2-3, pred slices 3-4 (2.5 mm apart): half of each surface at 0, half at 2.5 mm.
    shifted = results["cases"]["caseA"]["Mandible"]
    assert shifted["dice"] == pytest.approx(0.5)
    assert shifted["hd95_mm"] == pytest.approx(2.5) and shifted["asd_mm"] == pytest.approx(1.25)
    assert shifted["surface_dice"] == pytest.approx(0.5)  # Mandible tolerance 1.01 mm
    assert shifted["dice2d"] == pytest.approx(0.5)  # gt slice 2 missed (0), slice 3 exact (1)
    assert results["cases"]["caseA"]["BrainStem"]["dice"] == 1.0
    summary = results["summary"]
    assert summary["Mandible"]["dice"]["mean"] == pytest.approx(0.75) and summary["Mandible"]["n"] == 2
    assert summary["Mandible"]["dice2d_seed"] == {"mean": pytest.approx(0.75), "slices": 4}
    assert summary["Parotid_L"]["n"] == 0 and summary["Parotid_L"]["dice"]["mean"] is None
    assert summary["mean"]["dice"]["mean"] == pytest.approx((1.0 + 0.75) / 2)
    assert results["tolerances_mm"]["Mandible"] == 1.01 and "hd95_mm" in results["definitions"]
    assert "| Mandible | 2 | 75.00 ± 35.36 | 1.25 ± 1.77 |" in stdout
    assert (out / "results.md").read_text() == stdout
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("organ,n,no_surface,tolerance_mm,dice_mean,dice_std")
    assert csv_lines[0].endswith("dice2d_seed_mean,dice2d_seed_slices") and csv_lines[-1].startswith("mean,2,")
    assert "evaluate [2/2]" in stderr


def test_evaluate_flags_a_missed_organ(dataset, capsys):
    write_label_map(np.zeros(SHAPE, np.uint8), make_case("caseA"), dataset / "pred" / "caseA.nrrd", overwrite=True)
    code, stdout, _ = run_cli(["--pred", str(dataset / "pred"), "--gt", str(dataset / "gt"),
                               "--organs", "BrainStem", "Mandible"], capsys)
    assert code == 0
    results = json.loads((dataset / "pred" / "evaluation" / "results.json").read_text())
    missed = results["cases"]["caseA"]["BrainStem"]
    assert missed["dice"] == 0.0 and missed["hd95_mm"] is None and missed["flag"] == "pred_empty"
    assert results["summary"]["BrainStem"]["no_surface"] == 1
    assert results["summary"]["BrainStem"]["hd95_mm"] == {"mean": 0.0, "std": None, "median": 0.0, "n": 1}
    assert "caseA/BrainStem: pred empty" in stdout


def _assert_one_line_error(code, stderr, *fragments):
    assert code == 2 and "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert "error:" in last and all(f in last for f in fragments), stderr


def test_bad_inputs_give_one_line_errors(dataset, capsys):
    pred, gt = str(dataset / "pred"), str(dataset / "gt")
    _assert_one_line_error(*run_cli(["--pred", str(dataset / "nope"), "--gt", gt], capsys)[::2], "nope")
    _assert_one_line_error(*run_cli(["--pred", pred, "--gt", str(dataset / "nogt")], capsys)[::2], "nogt")
    (dataset / "pred" / "caseA.nrrd").unlink()
    _assert_one_line_error(*run_cli(["--pred", pred, "--gt", gt], capsys)[::2], "caseA", "--allow-missing")
    code, stdout, _ = run_cli(["--pred", pred, "--gt", gt, "--allow-missing"], capsys)
    assert code == 0 and "caseA" in stdout  # listed as skipped
    _assert_one_line_error(*run_cli(["--pred", pred, "--gt", gt, "--allow-missing"], capsys)[::2], "--force")
    assert run_cli(["--pred", pred, "--gt", gt, "--allow-missing", "--force"], capsys)[0] == 0


def test_geometry_mismatch_names_the_file(dataset, capsys):
    moved = make_case("caseA")
    moved.spacing = (1.0, 1.0, 3.0)
    write_label_map(np.zeros(SHAPE, np.uint8), moved, dataset / "pred" / "caseA.nrrd", overwrite=True)
    code, _, stderr = run_cli(["--pred", str(dataset / "pred"), "--gt", str(dataset / "gt")], capsys)
    _assert_one_line_error(code, stderr, "caseA.nrrd", "spacing")
    write_label_map(np.zeros((8, 24, 20), np.uint8), Case("x", np.zeros((8, 24, 20), np.int16), SPACING),
                    dataset / "pred" / "caseA.nrrd", overwrite=True)
    code, _, stderr = run_cli(["--pred", str(dataset / "pred"), "--gt", str(dataset / "gt")], capsys)
    _assert_one_line_error(code, stderr, "caseA.nrrd", "size")


def test_parallel_workers_give_the_same_results(dataset):
    serial = ev.evaluate(dataset / "pred", dataset / "gt", ["Mandible"], workers=1)
    parallel = ev.evaluate(dataset / "pred", dataset / "gt", ["Mandible"], workers=2)
    assert serial["cases"] == parallel["cases"]


def test_prediction_lookup_rules(dataset):
    pred = dataset / "pred"
    assert ev.find_prediction(pred, "caseA") == pred / "caseA.nrrd"
    assert ev.find_prediction(pred, "caseB") == pred / "caseB" and ev.find_prediction(pred, "caseC") is None
    (pred / "caseB" / "structures" / "Mandible.nrrd").unlink()  # no file: predicted empty
    results = ev.evaluate(pred, dataset / "gt", ["Mandible"])
    assert results["cases"]["caseB"]["Mandible"]["flag"] == "pred_empty"
    (pred / "caseB.nii.gz").write_bytes(b"")
    with pytest.raises(ev.HnsegError, match="caseB has several predictions"):
        ev.find_prediction(pred, "caseB")


def test_default_organs_are_the_predicted_ones(dataset):
    """caseA's label map holds labels 1 and 3, caseB has two structure files: no --organs needed."""
    pred = dataset / "pred"
    assert ev.predicted_organs(pred, "caseA", pred / "caseA.nrrd") == {"BrainStem", "Mandible"}
    assert ev.predicted_organs(pred, "caseB", pred / "caseB") == {"BrainStem", "Mandible"}
    results = ev.evaluate(pred, dataset / "gt")
    assert results["organs"] == ["BrainStem", "Mandible"] and list(results["tolerances_mm"]) == results["organs"]


def test_qa_record_names_the_model_organs_and_the_ground_truth_limits_them(dataset):
    """A model of three organs predicts no Mandible in caseA: scored as missed; Parotid_L is not annotated."""
    pred = dataset / "pred"
    brainstem_only = make_case("caseA").masks["BrainStem"]
    write_label_map(brainstem_only, make_case("caseA"), pred / "caseA.nrrd", overwrite=True)
    assert ev.predicted_organs(pred, "caseA", pred / "caseA.nrrd") == {"BrainStem"}  # labels alone miss Mandible
    (pred / "caseA.qa.json").write_text(json.dumps({"organs": ["BrainStem", "Mandible", "Parotid_L"]}))
    assert ev.predicted_organs(pred, "caseA", pred / "caseA.nrrd") == {"BrainStem", "Mandible", "Parotid_L"}
    shutil.rmtree(pred / "caseB")
    results = ev.evaluate(pred, dataset / "gt", allow_missing=True)
    assert results["organs"] == ["BrainStem", "Mandible"] and "Parotid_L" not in results["summary"]
    assert results["cases"]["caseA"]["Mandible"]["flag"] == "pred_empty"
    assert ev.evaluate(pred, dataset / "gt", ["Mandible", "Parotid_L"], allow_missing=True)["organs"] == [
        "Mandible", "Parotid_L"]  # a chosen list is scored as chosen


def test_predictions_without_organs_give_one_line_errors(dataset, capsys):
    pred, gt = dataset / "pred", str(dataset / "gt")
    (pred / "caseA.qa.json").write_text("{}")
    _assert_one_line_error(*run_cli(["--pred", str(pred), "--gt", gt], capsys)[::2], "caseA.qa.json", "--organs")
    (pred / "caseA.qa.json").unlink()
    write_label_map(np.zeros(SHAPE, np.uint8), make_case("caseA"), pred / "caseA.nrrd", overwrite=True)
    shutil.rmtree(pred / "caseB")
    _assert_one_line_error(*run_cli(["--pred", str(pred), "--gt", gt, "--allow-missing"], capsys)[::2],
                           "no organ of the catalogue", "--organs")
