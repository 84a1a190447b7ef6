"""Known-answer tests for the volume <-> slice transform, distance maps and slice selection."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hnseg_keras import configs
from hnseg_keras.data.cases import Case
from hnseg_keras.data.slicing import (
    SliceTransform,
    SlicingConfig,
    compute_transform,
    extract_slices,
    field_of_view,
    select_slices,
    signed_distance,
    slice_case,
    to_original_grid,
)
from hnseg_keras.errors import HnsegError


def _ellipsoid(shape, centre, radii):
    """bool [Z, Y, X] ellipsoid with centre / radii given in voxels (z, y, x)."""
    grid = np.indices(shape, dtype=np.float64)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0


def make_case(shape=(10, 40, 48), spacing=(1.0, 1.0, 2.5), body_centre=(20, 26), with_mandible=True):
    """Air volume with a cylindrical 40 HU body and two/three organs inside it."""
    depth, height, width = shape
    yy, xx = np.indices((height, width))
    body = ((yy - body_centre[0]) / 14.0) ** 2 + ((xx - body_centre[1]) / 16.0) ** 2 <= 1
    ct = np.where(body, 40, -1024).astype(np.int16)[None].repeat(depth, axis=0)
    cz, cy, cx = depth // 2, body_centre[0], body_centre[1]
    masks = {
        "BrainStem": _ellipsoid(shape, (cz, cy, cx - 5), (2.5, 6, 5)).astype(np.uint8),
        "Parotid_L": _ellipsoid(shape, (cz + 1, cy + 2, cx + 8), (1.5, 4, 3)).astype(np.uint8),
    }
    if with_mandible:
        masks["Mandible"] = _ellipsoid(shape, (cz - 1, cy - 6, cx), (1.2, 3, 7)).astype(np.uint8)
    return Case("c001", ct, spacing, (-10.0, 5.0, 30.0), masks=masks)


ORGANS = ("BrainStem", "Mandible", "Parotid_L")


def _brute_force_signed_distance(mask):
    inside = np.argwhere(mask)
    outside = np.argwhere(~mask)
    out = np.zeros(mask.shape)
    for y, x in np.ndindex(mask.shape):
        others = outside if mask[y, x] else inside
        nearest = np.sqrt(((others - (y, x)) ** 2).sum(axis=1)).min()
        out[y, x] = -nearest if mask[y, x] else nearest
    return out


def test_signed_distance_matches_brute_force():
    mask = np.zeros((9, 11), dtype=bool)
    mask[2:7, 3:8] = True
    mask[4, 8:10] = True
    mask[2, 3] = False
    dist = signed_distance(mask.astype(np.uint8))
    np.testing.assert_allclose(dist, _brute_force_signed_distance(mask), rtol=0, atol=1e-5)
    # hand-computed: the block centre's nearest outside pixel is the removed corner (2, 3)
    assert dist[4, 5] == pytest.approx(-2 * np.sqrt(2))
    assert dist[4, 4] == -2.0 and dist[4, 2] == 1.0 and dist[4, 10] == 1.0 and dist[4, 9] == -1.0
    assert dist[0, 0] == pytest.approx(3 * np.sqrt(2))  # nearest inside pixel (3, 3)


def test_signed_distance_empty_and_full_masks():
    assert np.all(signed_distance(np.zeros((4, 4), np.uint8)) == np.inf)
    assert np.all(signed_distance(np.ones((4, 4), np.uint8)) == -np.inf)


def test_transform_json_round_trip_and_labels_do_not_move_the_crop():
    config = SlicingConfig(size=32, spacing_mm=1.5)
    case = make_case()
    transform = compute_transform(case, config)
    assert SliceTransform.from_dict(json.loads(json.dumps(transform.to_dict()))) == transform
    unlabelled = Case(case.case_id, case.ct, case.spacing, case.origin, case.direction, masks={})
    assert compute_transform(unlabelled, config) == transform
    # body centre at (y=20, x=26) voxels of 1 mm: the crop centre lands within half an output pixel
    assert abs(transform.crop_centre_mm[0] - 26.0) <= 0.75 and abs(transform.crop_centre_mm[1] - 20.0) <= 0.75
    assert configs.to_dict(config)["spacing_mm"] == 1.5


def test_crop_follows_the_body_not_the_image_centre():
    config = SlicingConfig(size=24, spacing_mm=None)
    shifted = make_case(shape=(4, 40, 60), body_centre=(20, 40), with_mandible=False)
    transform = compute_transform(shifted, config)
    assert transform.start_index == (8.0, 28.0)  # 20 - 11.5 -> 8 (rounded), 40 - 11.5 -> 28
    image = extract_slices(shifted.ct, transform)[0, :, :, 0]
    np.testing.assert_array_equal(image, shifted.ct[0, 8:32, 28:52])


def test_extract_slices_neighbours_clamp_and_air_padding():
    ct = (np.arange(5, dtype=np.int16) * 10)[:, None, None] * np.ones((1, 6, 6), np.int16)
    case = Case("n", ct, (1.0, 1.0, 3.0))
    transform = compute_transform(case, SlicingConfig(size=10, spacing_mm=None, body_threshold_hu=-5000))
    slices = extract_slices(ct, transform, neighbours=1)
    assert slices.shape == (5, 10, 10, 3) and slices.dtype == np.int16
    # centre pixel values per channel: z-1, z, z+1 clamped to [0, 4]
    np.testing.assert_array_equal(slices[:, 5, 5, :], [[0, 0, 10], [0, 10, 20], [10, 20, 30],
                                                       [20, 30, 40], [30, 40, 40]])
    assert slices[0, 0, 0, 1] == -1024  # the 10-pixel FOV is wider than the 6-voxel CT


def test_select_slices_margin_and_share():
    foreground = np.zeros(30, dtype=bool)
    foreground[10:13] = True
    config = SlicingConfig(empty_slice_margin=2, empty_slice_share=0.0)
    np.testing.assert_array_equal(select_slices(foreground, config), np.arange(8, 15))
    config = SlicingConfig(empty_slice_margin=0, empty_slice_share=0.5)
    kept = select_slices(foreground, config)
    assert set(range(10, 13)) <= set(kept) and len(kept) == 3 + 14
    np.testing.assert_array_equal(kept, select_slices(foreground, config))  # deterministic
    assert len(select_slices(np.zeros(10, bool), SlicingConfig(empty_slice_share=1.0))) == 10


def _stack(examples, depth, key="masks"):
    first = examples[0][key]
    out = np.zeros((depth, *first.shape), dtype=first.dtype)
    for example in examples:
        out[example["slice_index"]] = example[key]
    return out


def test_round_trip_is_exact_at_equal_spacing():
    case = make_case()
    config = SlicingConfig(size=40, spacing_mm=1.0, empty_slice_margin=0, empty_slice_share=0.0)
    examples = list(slice_case(case, ORGANS, config))
    transform = compute_transform(case, config)
    back = to_original_grid(_stack(examples, case.ct.shape[0]), transform, order=0)
    for o, name in enumerate(ORGANS):
        np.testing.assert_array_equal(back[..., o], case.masks[name])
    image_back = to_original_grid(_stack(examples, 10, "image")[..., 0], transform, order=0)
    kept = [e["slice_index"] for e in examples]
    inside = back.any(axis=-1)
    np.testing.assert_array_equal(image_back[kept][inside[kept]], case.ct[kept][inside[kept]])


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize(
    ("spacing", "out_spacing", "order", "min_dice"),
    [
        ((0.9, 0.9, 2.0), 1.0, 1, 0.99),  # PDDCA-like 0.9 mm -> 1 mm, linear back then >= 0.5
        ((1.0, 1.0, 2.0), 0.7, 1, 0.99),  # upsampling
        ((1.0, 1.0, 2.0), 0.7, 0, 0.99),
        ((0.9, 0.8, 2.0), 1.1, 1, 0.98),  # anisotropic and 1.4x coarser: the grid itself loses detail
    ],
)
def test_round_trip_with_resampling_keeps_dice(spacing, out_spacing, order, min_dice):
    shape = (6, 64, 64)
    case = make_case(shape=shape, spacing=spacing, body_centre=(32, 32), with_mandible=False)
    # parotid-sized (about 32 x 25 mm at 0.9 mm) organ
    case.masks = {"Parotid_L": _ellipsoid(shape, (3, 30, 33), (2.5, 18, 14)).astype(np.uint8)}
    config = SlicingConfig(size=64, spacing_mm=out_spacing, empty_slice_margin=0, empty_slice_share=0.0)
    examples = list(slice_case(case, ("Parotid_L",), config))
    back = to_original_grid(_stack(examples, shape[0]), compute_transform(case, config), order=order)
    assert back.dtype == (np.float32 if order else np.uint8)
    assert _dice(back[..., 0] >= 0.5, case.masks["Parotid_L"].astype(bool)) >= min_dice


def test_example_contract_and_missing_structure():
    case = make_case(with_mandible=False)
    config = SlicingConfig(size=32, spacing_mm=1.0, neighbours=1, empty_slice_margin=1, empty_slice_share=0)
    examples = list(slice_case(case, ORGANS, config))
    depth_range = np.flatnonzero(case.masks["BrainStem"].any(axis=(1, 2)) | case.masks["Parotid_L"].any(axis=(1, 2)))
    assert [e["slice_index"] for e in examples] == list(range(depth_range[0] - 1, depth_range[-1] + 2))
    for example in examples:
        assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.int16
        assert example["masks"].shape == (32, 32, 3) and example["masks"].dtype == np.uint8
        assert example["dist_maps"].dtype == np.int8
        np.testing.assert_array_equal(example["annotated"], [1, 0, 1])
        assert not example["masks"][..., 1].any() and not example["dist_maps"][..., 1].any()
        assert example["spacing"].dtype == np.float32 and tuple(example["spacing"]) == (1.0, 1.0, 2.5)
        for o in (0, 2):
            dist, mask = example["dist_maps"][..., o], example["masks"][..., o].astype(bool)
            if mask.any():
                np.testing.assert_array_equal(dist, np.clip(np.rint(_brute_force_signed_distance(mask)), -127, 127))
            else:
                assert np.all(dist == 127)  # annotated but absent from this slice


def test_bad_config_and_shapes_raise_one_line_errors():
    with pytest.raises(HnsegError, match="empty_slice_share"):
        SlicingConfig(empty_slice_share=2.0)
    transform = compute_transform(make_case(), SlicingConfig(size=16))
    with pytest.raises(HnsegError, match="does not match the slice grid"):
        to_original_grid(np.zeros((3, 16, 16)), transform)


@pytest.mark.parametrize("output_spacing, centre", [
    ((1.0, 1.0), (30.0, 25.0)),      # native spacing, grid inside the CT
    ((1.37, 0.83), (5.0, 60.0)),     # anisotropic ratios, grid hanging over two edges
    ((0.5, 0.5), (40.0, 20.0)),      # finer slice grid than the CT
])
def test_mapping_back_only_the_field_of_view_changes_nothing(output_spacing, centre):
    """The window must hold every voxel that a full-grid linear/nearest mapping makes nonzero."""
    from scipy import ndimage

    transform = SliceTransform(original_size=(70, 50, 3), original_spacing=(0.9, 1.1, 2.5),
                               origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
                               output_size=(24, 20), output_spacing=output_spacing, crop_centre_mm=centre)
    per_slice = np.random.default_rng(0).uniform(0.1, 1.0, (3, 20, 24)).astype(np.float32)
    ry, rx = transform.ratio
    y0, x0 = transform.start_index
    for order in (0, 1):
        expected = np.stack([ndimage.affine_transform(
            plane, (1 / ry, 1 / rx), offset=(-y0 / ry, -x0 / rx), output_shape=(50, 70), order=order,
            mode="constant", cval=0.0, prefilter=False) for plane in per_slice])
        np.testing.assert_allclose(to_original_grid(per_slice, transform, order=order), expected, atol=1e-6)
    rows, columns = field_of_view(transform)
    assert 0 < (rows.stop - rows.start) * (columns.stop - columns.start) < 50 * 70
