"""Pictures, Slicer files and progress lines: known inputs, checked pixel by pixel or line by line."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from hnseg_keras import render
from hnseg_keras.data.cases import Case
from hnseg_keras.data.organs import CATALOGUE, DEFAULT_ORGANS, colour_of
from hnseg_keras.progress import Progress, format_seconds

# ----------------------------------------------------------------------------- render


def test_catalogue_colours_are_distinct_for_the_nine_organs():
    colours = [colour_of(name) for name in DEFAULT_ORGANS]
    assert len(set(colours)) == 9 and render.organ_colour("not an organ") == (255, 255, 255)


def test_contour_is_the_inner_outline_and_the_border_counts_as_outside():
    mask = np.zeros((7, 7), bool)
    mask[1:6, 1:6] = True  # 5x5 square: 16 outline pixels around a 3x3 interior
    outline = render.contour(mask)
    assert outline.sum() == 16 and not outline[2:5, 2:5].any() and outline[1, 1:6].all()
    assert render.contour(np.ones((3, 3), bool)).sum() == 8


def test_overlay_draws_each_organ_in_its_catalogue_colour_over_the_window():
    image = np.full((10, 10), 40.0)  # middle of (-160, 240) -> gray 128
    masks = np.zeros((10, 10, 2))
    masks[2:6, 2:6, 0] = 1  # 4x4: 12 outline pixels
    masks[7:9, 7:9, 1] = 1  # 2x2: all 4 are outline
    rgb = render.overlay(image, masks, ["Mandible", "Parotid_R"])
    assert np.all(rgb == colour_of("Mandible"), axis=-1).sum() == 12
    assert np.all(rgb == colour_of("Parotid_R"), axis=-1).sum() == 4
    assert tuple(rgb[0, 0]) == (128, 128, 128) and tuple(rgb[3, 3]) == (128, 128, 128)
    assert render.to_gray(np.array([-1000.0, 1000.0])).tolist() == [0, 255]


def test_mosaic_places_tiles_in_rows_with_gaps():
    tiles = [np.full((2, 3, 3), value, np.uint8) for value in (10, 20, 30)]
    grid = render.mosaic(tiles, columns=2, gap=1)
    assert grid.shape == (5, 7, 3)
    assert grid[0, 0, 0] == 10 and grid[0, 4, 0] == 20 and grid[3, 0, 0] == 30
    assert grid[2, 0, 0] == 0 and grid[3, 4, 0] == 0  # the gap and the empty cell stay black


def test_with_legend_adds_a_swatch_per_organ_and_save_png_leaves_no_temporary(tmp_path):
    picture = render.with_legend(np.zeros((20, 300, 3), np.uint8), ["BrainStem", "Chiasm", "Mandible"], "title")
    pixels = np.asarray(picture)
    assert pixels.shape[0] == render.LEGEND_ROW_PX + 20 + 2 * render.LEGEND_ROW_PX + 4  # 2 per legend row
    for name in ("BrainStem", "Chiasm", "Mandible"):
        assert np.all(pixels == colour_of(name), axis=-1).sum() == 12 * 12
    render.save_png(picture, tmp_path / "a.png")
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"] and Image.open(tmp_path / "a.png").size == picture.size


# ----------------------------------------------------------------------------- prediction preview


def _box_case(depth=12, size=20, spacing=(1.0, 1.0, 3.0)):
    """A CT with a 4x6x8 box organ at z 2..5, y 5..10, x 6..13: (case, masks bool [1, Z, Y, X])."""
    ct = np.full((depth, size, size), -50, np.int16)
    masks = np.zeros((1, depth, size, size), bool)
    masks[0, 2:6, 5:11, 6:14] = True
    return Case("box", ct, spacing), masks


def test_slice_positions_spread_over_the_organ_extent():
    from hnseg_keras.inference.visual import slice_positions

    _, masks = _box_case()
    assert slice_positions(masks, 2, 3) == [8, 10, 11]  # x 6..13 at its quarters
    assert slice_positions(masks, 0, 1) == [4]  # z 2..5, middle (3.5 rounds up)
    assert slice_positions(np.zeros_like(masks), 0, 1) == [6]  # nothing predicted: the volume's middle


def test_views_keep_the_physical_aspect_and_put_the_head_up():
    from hnseg_keras.inference.visual import display_shape, view_slice

    case, masks = _box_case()
    image, organ = view_slice(case.ct, masks, "coronal", 8)
    assert image.shape == (12, 20) and organ.shape == (12, 20, 1)
    assert organ[12 - 1 - 2, 6, 0] and not organ[2, 6, 0]  # z 2 (inferior) drawn near the bottom
    assert display_shape((12, 20), (3.0, 1.0), 100) == (100, 56)  # 36 mm x 20 mm


def test_predict_preview_png_has_three_rows_with_the_organ_colour(tmp_path):
    from hnseg_keras.inference import visual
    from hnseg_keras.inference.prediction import Segmentation

    case, masks = _box_case()
    seg = Segmentation("box", ("Parotid_L",), masks, np.zeros(masks.shape[1:], np.uint8), 0.0, 12)
    path = visual.write_case_preview(case, seg, tmp_path / "preview" / "box.png")
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape[1] == 4 * visual.TILE_PX + 3 * 2
    legend_free = pixels[render.LEGEND_ROW_PX:render.LEGEND_ROW_PX + 3 * visual.TILE_PX + 4]
    rows_with_colour = [np.all(legend_free[r * (visual.TILE_PX + 2):(r + 1) * visual.TILE_PX] == colour_of("Parotid_L"),
                               axis=-1).any() for r in range(3)]
    assert rows_with_colour == [True, True, True]
    with pytest.raises(Exception, match="--force"):
        visual.preview_paths(tmp_path, ["box"])


# ----------------------------------------------------------------------------- Slicer


def test_seg_nrrd_carries_names_colours_labels_and_extents(tmp_path):
    from hnseg_keras.inference import slicer

    case = Case("c", np.zeros((4, 5, 6), np.int16), (0.5, 0.5, 2.0), origin=(10.0, -3.0, 7.0))
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1:3, 2, 3:5] = CATALOGUE["Mandible"].label
    path = slicer.write_segmentation(labels, ["BrainStem", "Mandible"], case, tmp_path / "c.seg.nrrd")
    assert slicer.read_segments(path) == {
        "BrainStem": {"label": 1, "colour": colour_of("BrainStem"), "extent": "0 -1 0 -1 0 -1"},
        "Mandible": {"label": 3, "colour": colour_of("Mandible"), "extent": "3 4 2 2 1 2"},
    }
    image = sitk.ReadImage(str(path))
    assert image.GetOrigin() == (10.0, -3.0, 7.0) and image.GetSpacing() == (0.5, 0.5, 2.0)
    assert np.array_equal(sitk.GetArrayFromImage(image), labels)
    assert image.GetMetaData("Segmentation_MasterRepresentation") == "Binary labelmap"
    with pytest.raises(Exception, match="already exists"):
        slicer.write_segmentation(labels, ["Mandible"], case, path)


# ----------------------------------------------------------------------------- evaluation plots


def _results():
    entry = lambda d, h: {"dice": d, "hd95_mm": h, "asd_mm": 1.0, "surface_dice": 0.9, "flag": None}  # noqa: E731
    return {"organs": ["BrainStem", "Mandible"], "cases": {
        "a": {"BrainStem": entry(0.8, 2.0), "Mandible": entry(0.9, math.nan)},
        "b": {"BrainStem": entry(0.6, 4.0), "Mandible": entry(0.7, 3.0)},
    }}


def test_long_csv_has_one_row_per_case_organ_and_metric():
    from hnseg_keras.evaluation import plots

    lines = plots.format_long_csv(_results()).splitlines()
    assert lines[0] == "case,organ,metric,value" and len(lines) == 1 + 4 * 4
    assert "a,BrainStem,dice,0.8" in lines and "a,Mandible,hd95_mm," in lines and "b,BrainStem,hd95_mm,4" in lines
    assert plots.values_by_organ(_results(), "hd95_mm") == {"BrainStem": [2.0, 4.0], "Mandible": [3.0]}


def test_box_plots_colour_each_organ(tmp_path):
    from hnseg_keras.evaluation import plots

    written = plots.write_all(_results(), tmp_path, with_plots=True)
    assert [p.name for p in written] == ["per_case.csv", "boxplots.png"]
    pixels = np.asarray(Image.open(tmp_path / "boxplots.png").convert("RGB")).astype(int)
    for name in ("BrainStem", "Mandible"):  # boxes at alpha 0.6 over white
        blended = np.round(0.6 * np.array(colour_of(name)) + 0.4 * 255)
        assert (np.abs(pixels - blended).max(axis=-1) <= 2).sum() > 50, name


# ----------------------------------------------------------------------------- training curves


def test_training_curves_png_from_history(tmp_path):
    from hnseg_keras.training import curves

    history = tmp_path / "history.csv"
    assert curves.write_curves(history, tmp_path / "c.png", ["Parotid_L"]) is None  # no epochs yet
    history.write_text("epoch,loss,val_loss,val_dice,val_dice_Parotid_L,learning_rate\n"
                       "0,1.0,1.1,0.2,0.3,0.001\n1,0.7,0.8,0.5,0.6,0.0005\n")
    path = curves.write_curves(history, tmp_path / "c.png", ["Parotid_L"])
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert (np.abs(pixels - colour_of("Parotid_L")).max(axis=-1) <= 2).sum() > 20


def test_training_curves_redraw_at_most_every_interval_and_at_the_end(tmp_path):
    from hnseg_keras.training import curves

    clock, history, png = _Clock(), tmp_path / "history.csv", tmp_path / "c.png"
    rows = ["epoch,loss,val_loss,val_dice,val_dice_Parotid_L,learning_rate"]
    callback = curves.TrainingCurves(history, png, ["Parotid_L"], every_s=30.0, clock=clock)

    def epoch_ends(at):
        clock.now = at
        rows.append(f"{len(rows) - 1},{1 / len(rows)},1.0,{0.1 * len(rows)},0.5,0.001")
        history.write_text("\n".join(rows) + "\n")
        callback.on_epoch_end(len(rows) - 2)
        return png.read_bytes()

    first = epoch_ends(0.0)  # the first epoch draws
    assert epoch_ends(10.0) == first  # 10 s later: not redrawn
    third = epoch_ends(31.0)  # 31 s after the last drawing: redrawn with three epochs
    assert third != first
    assert epoch_ends(40.0) == third
    callback.on_train_end()  # the end always draws the last epochs
    assert png.read_bytes() != third


# ----------------------------------------------------------------------------- progress


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_writes_a_line_per_item_with_time_left_and_a_summary():
    clock, stream = _Clock(), io.StringIO()
    progress = Progress("predict", 3, stream=stream, interactive=False, clock=clock)
    clock.now = 2.0
    progress.step("case_a", "12 slices")
    clock.now = 4.0
    progress.step("case_b")
    clock.now = 6.0
    progress.step("case_c")
    assert progress.finish("label maps in out") == "predict: 3 cases in 6.0 s; label maps in out"
    assert stream.getvalue().splitlines() == [
        "predict [1/3] case_a: 12 slices (2.0 s, ~4.0 s left)",
        "predict [2/3] case_b (4.0 s, ~2.0 s left)",
        "predict [3/3] case_c (6.0 s)",
        "predict: 3 cases in 6.0 s; label maps in out",
    ]


def test_progress_bar_redraws_in_place_on_a_terminal():
    stream = io.StringIO()
    progress = Progress("prepare", 4, stream=stream, interactive=True, clock=_Clock())
    progress.step("x")
    assert stream.getvalue().startswith("\r\x1b[Kprepare [######..................] 1/4 x") and "\n" not in stream.getvalue()
    assert [format_seconds(s) for s in (3.25, 42, 185, 3720)] == ["3.2 s", "42 s", "3 min 05 s", "1 h 02 min"]
