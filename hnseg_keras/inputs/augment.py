"""Batched training augmentation in ``keras.ops``: the ops of ``OPS`` (window, crop + warp with rotation
and zoom, the nnU-Net-like intensity ops, mixup).

A batch is a dict of float32 tensors: ``image [B,H,W,C]`` (HU), ``masks [B,H,W,O]`` ({0, 1}),
``dist_maps [B,H,W,O]`` (signed pixels, negative inside), ``annotated [B,O]``. Every random draw
comes from an explicit stateless seed (int32 [2]; per-op seeds from :func:`sub_seed`) with a leading
batch axis, so each sample gets its own crop and warp. Crop, rotation, zoom and warp are one bilinear
resampling at crop offset + (turned and scaled) identity grid + displacement, the same field for image,
masks (then ``>= 0.5``) and distance maps; integer offsets without rotation, zoom or displacement copy
pixels exactly. The intensity ops (noise, blur, brightness, shift, contrast, gamma) change the image
only, in units of the window, and keep it inside the window; their arithmetic is in ``intensity``, their
random draws are made here like every other, so the seed tree stays in one module. Runs in ``tf.data``,
under XLA and, being ``keras.ops`` only, under JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import keras
import numpy as np
from keras import ops

from hnseg_keras.errors import HnsegError
from hnseg_keras.inputs import intensity

# The soft-tissue window of the paper: the one default of the augmentation and the model (pictures use
# render.DISPLAY_WINDOW, a viewing choice).
HU_WINDOW: tuple[float, float] = (-155.0, 195.0)
# Plain clip used when no window is set: the int16 HU range a CT can hold.
HU_RANGE: tuple[float, float] = (-1024.0, 3071.0)
SPATIAL_KEYS: tuple[str, ...] = ("image", "masks", "dist_maps")

# Per-op sub-seed indices (see sub_seed); nested ops reuse small indices under their own parent.
(_TAG_CROP, _TAG_WARP_CHOICE, _TAG_ELASTIC, _TAG_GRID, _TAG_PARTNER, _TAG_LAMBDA, _TAG_AFFINE,
 _TAG_INTENSITY) = range(8)
_NUM_CHILD_SEEDS = 16
# Sub-seed of each intensity op under _TAG_INTENSITY, fixed so that reordering the ops keeps the draws.
_INTENSITY_TAGS = {"noise": 0, "blur": 1, "brightness": 2, "shift": 3, "contrast": 4, "gamma_inverted": 5,
                   "gamma": 6}

# What ``AugmentConfig.nnunet_like`` switches on: the chance per sample of each op whose probability is
# left at None (nnU-Net's 2D defaults, but rotation +-15 degrees; see AugmentConfig).
NNUNET_LIKE: dict[str, float] = {"rotation": 0.2, "scale": 0.2, "noise": 0.1, "blur": 0.2, "brightness": 0.15,
                                 "shift": 0.15, "contrast": 0.15, "gamma_inverted": 0.1, "gamma": 0.3}


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation; every op can be switched off for ablations.

    Attributes:
        window: HU window (low, high) the image is clipped to (soft tissue, as in the paper); None
            clips to the plain HU range ``HU_RANGE`` instead. The one window of a training config:
            the model's first layer is built with it too.
        crop_size: side of the random square crop in pixels (280 -> 256 in the paper); None: no crop.
        warp_probability: chance per sample of a geometric warp (0 switches warps off).
        elastic: allow the elastic deformation.
        elastic_alpha: RMS displacement of each axis in pixels (dy and dx are independent).
        elastic_sigma: Gaussian smoothing sigma of the displacement field in pixels.
        grid: allow the grid distortion (one of elastic / grid is chosen per warped sample).
        grid_steps: cells per axis of the piecewise-linear grid distortion.
        grid_distort_limit: each cell is stretched by a factor in [1 - limit, 1 + limit].
        mixup: class-weighted mixup of images within the batch.
        mixup_alpha: lambda ~ Beta(alpha, alpha).
        rotation_probability: chance per sample of an in-plane rotation about the crop centre.
        rotation_degrees: (low, high) angle, uniform; positive turns the anatomy counter-clockwise on
            screen. +-15 rather than nnU-Net's 2D +-180: H&N slices keep left/right and up/down.
        scale_probability: chance per sample of a zoom about the crop centre.
        scale_range: (low, high) zoom, log-uniform; 2 shows the anatomy twice as large. The distance
            maps are multiplied by the zoom, so they stay in output pixels.
        noise_probability, noise_variance: additive Gaussian noise, variance uniform in (low, high).
        blur_probability, blur_sigma: separable Gaussian blur, sigma uniform in (low, high) pixels.
        brightness_probability, brightness_range: multiply the image by a factor uniform in the range.
        shift_probability, shift_range: add an offset uniform in the range.
        contrast_probability, contrast_range: stretch about the sample's mean by a factor in the range.
        gamma_probability, gamma_range: gamma, log-uniform in the range, on the window mapped to [0, 1].
        gamma_inverted_probability: the same gamma on the inverted image (1 - t), drawn on its own.
        nnunet_like: every ``*_probability`` above left at None takes its ``NNUNET_LIKE`` value
            (rotation and scale 0.2, noise 0.1, blur 0.2, brightness, shift and contrast 0.15, gamma 0.3,
            inverted gamma 0.1); a number given explicitly wins, so 0 switches one op off.

    The paper names the ops but not the warp parameters; the values here give gentle anatomical
    deformations (a few pixels) on 256-pixel slices of 1 mm. Rotation, zoom and the intensity ops
    are nnU-Net's defaults and off unless asked for (None without ``nnunet_like`` is 0): configs
    written before them give the same batches. Intensity values (noise variance, shift) are in units
    of the window's half-width: the window mapped to [-1, 1], the model's own scaling without
    statistics, about one standard deviation of soft tissue as in nnU-Net's z-scored images.
    No mirroring: the organs come in left/right pairs.
    """

    window: tuple[float, float] | None = HU_WINDOW
    crop_size: int | None = 256
    warp_probability: float = 0.5
    elastic: bool = True
    elastic_alpha: float = 4.0
    elastic_sigma: float = 16.0
    grid: bool = True
    grid_steps: int = 5
    grid_distort_limit: float = 0.3
    mixup: bool = True
    mixup_alpha: float = 0.2
    rotation_probability: float | None = None
    rotation_degrees: tuple[float, float] = (-15.0, 15.0)
    scale_probability: float | None = None
    scale_range: tuple[float, float] = (0.7, 1.4)
    noise_probability: float | None = None
    noise_variance: tuple[float, float] = (0.0, 0.1)
    blur_probability: float | None = None
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    brightness_probability: float | None = None
    brightness_range: tuple[float, float] = (0.75, 1.25)
    shift_probability: float | None = None
    shift_range: tuple[float, float] = (-0.1, 0.1)
    contrast_probability: float | None = None
    contrast_range: tuple[float, float] = (0.75, 1.25)
    gamma_probability: float | None = None
    gamma_inverted_probability: float | None = None
    gamma_range: tuple[float, float] = (0.7, 1.5)
    nnunet_like: bool = False

    def __post_init__(self):
        check_window(self.window, "augment.window")
        _check_nnunet_fields(self)

    def probability(self, op: str) -> float:
        """Chance per sample of ``op`` (a key of ``NNUNET_LIKE``): its field, or when that is None the
        ``NNUNET_LIKE`` value under ``nnunet_like`` and 0 otherwise."""
        value = getattr(self, f"{op}_probability")
        if value is not None:
            return float(value)
        return NNUNET_LIKE[op] if self.nnunet_like else 0.0


# (range field, lowest allowed low, whether low itself is allowed) of the nnU-Net-like ops.
_RANGE_FLOORS = (("rotation_degrees", -180.0, True), ("scale_range", 0.0, False), ("noise_variance", 0.0, True),
                 ("blur_sigma", 0.0, False), ("brightness_range", 0.0, True), ("shift_range", -2.0, True),
                 ("contrast_range", 0.0, True), ("gamma_range", 0.0, False))


def _check_nnunet_fields(config: AugmentConfig) -> None:
    """Refuse a probability outside [0, 1] or a (low, high) range that is reversed or out of bounds."""
    for op in NNUNET_LIKE:
        value = getattr(config, f"{op}_probability")
        if value is not None and not 0.0 <= value <= 1.0:
            raise HnsegError(f"augment.{op}_probability={value}: give a chance in [0, 1] (null: 0, or the "
                             "nnU-Net-like value with nnunet_like)")
    for name, floor, inclusive in _RANGE_FLOORS:
        value = getattr(config, name)
        low = value[0] if len(value) == 2 else math.nan  # NaN fails every comparison below
        if not (low <= value[-1] and (low >= floor if inclusive else low > floor)):
            bound = ">=" if inclusive else ">"
            raise HnsegError(f"augment.{name}={list(value)}: give (low, high) with low <= high and low {bound} "
                             f"{floor}")


def check_window(window, what: str) -> None:
    """Refuse a HU window that is not ``(low, high)`` with low < high (None, the plain HU range, passes)."""
    if window is not None and not (len(window) == 2 and window[0] < window[1]):
        raise HnsegError(f"{what}={list(window)}: give (low, high) HU with low < high, or null for the plain "
                         "HU range")


# ----------------------------------------------------------------------------- seeds


def seed_pair(seed):
    """An int32 [2] seed tensor from a Python int, a pair, or a tensor of shape [2]."""
    if isinstance(seed, int | np.integer):
        seed = [int(seed) & 0x7FFFFFFF, 0]
    return ops.cast(ops.convert_to_tensor(seed), "int32")


def sub_seed(seed, tag: int):
    """Seed for one op: row ``tag`` (0-15) of a [16, 2] table of random ints drawn from ``seed``.

    Drawing the children from the counter-based generator itself hashes (seed, tag), so the
    sub-seeds of nearby parent seeds do not collide (plain offsets or XORs would).
    """
    if not 0 <= tag < _NUM_CHILD_SEEDS:
        raise ValueError(f"sub-seed tag {tag} is outside [0, {_NUM_CHILD_SEEDS})")
    table = keras.random.randint((_NUM_CHILD_SEEDS, 2), 0, 2**31 - 1, dtype="int32", seed=_rng(seed))
    return table[tag]


class _TensorSeed(keras.random.SeedGenerator):
    """Hands a seed tensor to ``keras.random`` (Keras 3.15 accepts only ints or SeedGenerators).

    ``draw_seed`` calls ``next()`` on SeedGenerators; returning the fixed tensor keeps the draw
    stateless and creates no variable, so it works inside tf.data and compiled functions.
    """

    def __init__(self, seed):  # noqa: D107 - deliberately skips the stateful base constructor
        self._seed = seed

    def next(self, ordered=True):
        return self._seed


def _rng(seed):
    if keras.backend.backend() == "jax":
        return ops.cast(seed_pair(seed), "uint32")  # JAX takes a raw uint32 [2] key directly
    return _TensorSeed(seed_pair(seed))


def _uniform(seed, shape, low=0.0, high=1.0):
    return keras.random.uniform(shape, minval=low, maxval=high, dtype="float32", seed=_rng(seed))


def _normal(seed, shape):
    return keras.random.normal(shape, dtype="float32", seed=_rng(seed))


# ----------------------------------------------------------------------------- window


def window_image(image, window: tuple[float, float] | None):
    """Clip HU to ``window`` (or to ``HU_RANGE`` when None); returns float32, same shape."""
    low, high = window if window is not None else HU_RANGE
    return ops.clip(ops.cast(image, "float32"), low, high)


# ----------------------------------------------------------------------------- resampling


def _bilinear_plan(coord_y, coord_x, batch_size, in_hw):
    """Flat corner indices [4 x (B,Ho,Wo)] and weights [4 x (B,Ho,Wo,1)] for coordinates [B,Ho,Wo].

    Coordinates are clamped to the image (edge replication); integer coordinates get weights
    (1, 0, 0, 0), so the lookup copies the pixel exactly.
    """
    height, width = in_hw
    coord_y = ops.clip(coord_y, 0.0, ops.cast(height - 1, "float32"))
    coord_x = ops.clip(coord_x, 0.0, ops.cast(width - 1, "float32"))
    y0, x0 = ops.floor(coord_y), ops.floor(coord_x)
    wy, wx = (coord_y - y0)[..., None], (coord_x - x0)[..., None]
    y0, x0 = ops.cast(y0, "int32"), ops.cast(x0, "int32")
    y1, x1 = ops.minimum(y0 + 1, height - 1), ops.minimum(x0 + 1, width - 1)
    base = ops.reshape(ops.arange(batch_size, dtype="int32") * (height * width), (-1, 1, 1))
    index = [base + yy * width + xx for yy in (y0, y1) for xx in (x0, x1)]
    weight = [(1.0 - wy) * (1.0 - wx), (1.0 - wy) * wx, wy * (1.0 - wx), wy * wx]
    return index, weight


def _gather_plan(values, plan):
    """Apply a bilinear plan to ``values`` [B,Hi,Wi,C]; one gather per corner, float32 [B,Ho,Wo,C]."""
    flat = ops.reshape(ops.cast(values, "float32"), (-1, ops.shape(values)[-1]))
    index, weight = plan
    out = ops.take(flat, index[0], axis=0) * weight[0]
    for corner in range(1, 4):
        out = out + ops.take(flat, index[corner], axis=0) * weight[corner]
    return out


def bilinear_sample(values, coord_y, coord_x):
    """Bilinear lookup of ``values`` [B,Hi,Wi,C] at float pixel coordinates [B,Ho,Wo] (border clamped)."""
    shape = ops.shape(values)
    return _gather_plan(values, _bilinear_plan(coord_y, coord_x, shape[0], (shape[1], shape[2])))


def _sampling_coords(offsets, displacement, out_hw, affine=None):
    offsets = ops.cast(offsets, "float32")
    grid_y = ops.arange(out_hw[0], dtype="float32")[None, :, None]
    grid_x = ops.arange(out_hw[1], dtype="float32")[None, None, :]
    if affine is not None:
        grid_y, grid_x = _turned_grid(affine, grid_y, grid_x, out_hw)
    coord_y = offsets[:, 0, None, None] + grid_y + ops.zeros_like(grid_x)
    coord_x = offsets[:, 1, None, None] + grid_x + ops.zeros_like(grid_y)
    if displacement is not None:
        coord_y, coord_x = coord_y + displacement[..., 0], coord_x + displacement[..., 1]
    return coord_y, coord_x


def _turned_grid(affine, grid_y, grid_x, out_hw):
    """The output grid [B,Ho,Wo] (y, x) mapped by ``affine`` [B,2,2] about the crop centre.

    An identity matrix gives the grid back exactly (pixel + half-integer centre arithmetic is exact).
    """
    centre_y, centre_x = (out_hw[0] - 1) / 2.0, (out_hw[1] - 1) / 2.0
    rel_y, rel_x = grid_y - centre_y, grid_x - centre_x
    m = affine[:, :, :, None, None]
    return (centre_y + (m[:, 0, 0] * rel_y + m[:, 0, 1] * rel_x),
            centre_x + (m[:, 1, 0] * rel_y + m[:, 1, 1] * rel_x))


def affine_from_draws(draws, config: AugmentConfig) -> dict:
    """Rotation + zoom per sample from uniforms ``draws`` [B,4] (rotate?, angle, zoom?, zoom).

    Returns ``affine`` [B,2,2], the map from an output pixel's (dy, dx) off the crop centre to the input
    offset sampled there (rotation by the angle, divided by the zoom), and ``zoom`` [B]. Samples not
    chosen get exactly the identity and zoom 1.
    """
    low, high = config.rotation_degrees
    degrees = low + (high - low) * draws[:, 1]
    angle = ops.where(draws[:, 0] < config.probability("rotation"), degrees * (math.pi / 180.0), 0.0)
    low, high = config.scale_range
    zoom = low * ops.exp(draws[:, 3] * math.log(high / low))  # log-uniform; exactly low when high == low
    zoom = ops.where(draws[:, 2] < config.probability("scale"), zoom, 1.0)
    cos, sin = ops.cos(angle) / zoom, ops.sin(angle) / zoom
    affine = ops.stack([ops.stack([cos, sin], axis=-1), ops.stack([-sin, cos], axis=-1)], axis=1)
    return {"affine": affine, "zoom": zoom}


def crop_offsets(draw, in_hw, out_hw: tuple[int, int]):
    """Integer crop corners [B,2] (float32) from uniform draws [B,2]: uniform in [0, in - out]."""
    span = ops.convert_to_tensor([float(in_hw[0] - out_hw[0] + 1), float(in_hw[1] - out_hw[1] + 1)])
    return ops.minimum(ops.floor(draw * span[None, :]), span[None, :] - 1.0)


# ----------------------------------------------------------------------------- warp fields


def _elastic_geometry(out_hw, sigma: float):
    """(grid step px, 1D Gaussian kernel on that grid, noise height, noise width) of the elastic field."""
    step = max(1, int(sigma // 4))
    radius = max(1, math.ceil(3.0 * sigma / step))
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (taps * step / sigma) ** 2)
    kernel = (kernel / kernel.sum()).astype(np.float32)
    return step, kernel, (out_hw[0] - 1) // step + 2 + 2 * radius, (out_hw[1] - 1) // step + 2 + 2 * radius


def elastic_from_noise(noise, out_hw: tuple[int, int], alpha: float, sigma: float):
    """Smooth unit noise [B,h,w,2] (shape from ``_elastic_geometry``) into a field [B,Ho,Wo,2] of RMS alpha.

    dy and dx come from independent noise channels. For speed the noise lives on a grid coarser by
    ``step = sigma // 4`` pixels (>= 4 nodes per sigma) and is bilinearly upsampled.
    """
    step, kernel, _, _ = _elastic_geometry(out_hw, sigma)
    k = ops.convert_to_tensor(kernel)
    noise = ops.depthwise_conv(noise, ops.tile(ops.reshape(k, (-1, 1, 1, 1)), (1, 1, 2, 1)), padding="valid")
    noise = ops.depthwise_conv(noise, ops.tile(ops.reshape(k, (1, -1, 1, 1)), (1, 1, 2, 1)), padding="valid")
    # Smoothed unit-variance noise has std = sum(k^2) per axis (separable kernel): rescale to alpha.
    field = noise * (alpha / float(np.sum(kernel.astype(np.float64) ** 2)))
    if step == 1:
        return field[:, : out_hw[0], : out_hw[1], :]
    zeros = ops.zeros((ops.shape(noise)[0], 2), "float32")
    coord_y, coord_x = _sampling_coords(zeros, None, out_hw)
    return bilinear_sample(field, coord_y / step, coord_x / step)


def _grid_axis(stretch, length: int):
    """Displacement [B, length] along one axis from cell stretch factors [B, steps]."""
    batch_size, steps = ops.shape(stretch)[0], int(stretch.shape[1])
    widths = stretch / ops.sum(stretch, axis=1, keepdims=True) * float(length - 1)
    knots = ops.concatenate([ops.zeros((batch_size, 1), "float32"), ops.cumsum(widths, axis=1)], axis=1)
    position = ops.arange(length, dtype="float32") * (steps / max(length - 1, 1))
    cell = ops.clip(ops.floor(position), 0.0, float(steps - 1))
    fraction = (position - cell)[None, :]
    index = ops.cast(cell, "int32")[None, :] + ops.zeros((batch_size, 1), "int32")
    start = ops.take_along_axis(knots, index, axis=1)
    end = ops.take_along_axis(knots, index + 1, axis=1)
    return start + fraction * (end - start) - ops.arange(length, dtype="float32")[None, :]


def grid_from_stretch(stretch, out_hw: tuple[int, int]):
    """Grid-distortion field [B,Ho,Wo,2] from stretch factors [B,2,steps] (rows, columns).

    Cell ``i`` of an axis is ``stretch[i] / mean(stretch)`` times its regular width; the image border
    stays fixed, dy depends on the row only and dx on the column only.
    """
    dy = _grid_axis(stretch[:, 0], out_hw[0])[:, :, None] + ops.zeros((1, 1, out_hw[1]), "float32")
    dx = _grid_axis(stretch[:, 1], out_hw[1])[:, None, :] + ops.zeros((1, out_hw[0], 1), "float32")
    return ops.stack([dy, dx], axis=-1)


def check_crop(crop_size: int | None, in_hw: tuple[int, int]) -> tuple[int, int]:
    """The one crop check: output (H, W) of ``crop_size`` on ``in_hw`` slices (None: no crop)."""
    out_hw = (crop_size, crop_size) if crop_size else tuple(in_hw)
    if in_hw[0] < out_hw[0] or in_hw[1] < out_hw[1]:
        raise HnsegError(f"crop_size {crop_size} is larger than the slices ({in_hw[0]}x{in_hw[1]}); choose "
                         f"crop_size <= {min(in_hw)}")
    return out_hw


def output_hw(image, config: AugmentConfig):
    """(input, output) static (H, W) of a batch image under ``config``'s crop."""
    in_hw = _static_hw(image)
    return in_hw, check_crop(config.crop_size, in_hw)


def centre_crop(batch: dict, size: int | None) -> dict:
    """Deterministic centre crop (corner = floor of half the margin) of every spatial key.

    A plain slice, so values are copied exactly; ``size`` None leaves the batch unchanged.
    """
    if not size:
        return dict(batch)
    height, width = _static_hw(batch["image"])
    check_crop(size, (height, width))
    top, left = (height - size) // 2, (width - size) // 2
    out = dict(batch)
    for key in SPATIAL_KEYS:
        out[key] = batch[key][:, top : top + size, left : left + size, :]
    return out


def resample_batch(batch: dict, offsets, field, out_hw: tuple[int, int], affine=None, zoom=None) -> dict:
    """Resample every spatial key at ``offsets`` [B,2] + identity + ``field`` [B,Ho,Wo,2] (or None).

    ``affine`` [B,2,2] (or None) turns and scales the identity grid about the crop centre (see
    :func:`affine_from_draws`). Image and distance maps bilinear, masks bilinear then ``>= 0.5``;
    distance maps are multiplied by ``zoom`` [B] (or None) so they stay in output pixels; other keys
    pass through.
    """
    # One plan, one gather per key: slicing a joint result would make XLA recompute the gathers.
    image = batch["image"]
    coords = _sampling_coords(offsets, field, out_hw, affine)
    plan = _bilinear_plan(*coords, ops.shape(image)[0], _static_hw(image))
    out = dict(batch)
    out.update({key: _gather_plan(batch[key], plan) for key in SPATIAL_KEYS})
    out["masks"] = ops.cast(out["masks"] >= 0.5, "float32")
    if zoom is not None:
        out["dist_maps"] = out["dist_maps"] * zoom[:, None, None, None]
    return out


def _static_hw(image):
    height, width = image.shape[1], image.shape[2]
    if height is None or width is None:
        raise ValueError("augment needs static slice height and width; set the dataset's shapes")
    return int(height), int(width)


# ----------------------------------------------------------------------------- mixup

_GAMMA_TRIES = 8


def _gamma_draws(seed, batch_size) -> dict:
    return {"gamma_normal": _normal(sub_seed(seed, 0), (2, _GAMMA_TRIES, batch_size)),
            "gamma_uniform": _uniform(sub_seed(seed, 1), (2, _GAMMA_TRIES, batch_size), 1e-12, 1.0),
            "gamma_boost": _uniform(sub_seed(seed, 2), (2, batch_size), 1e-30, 1.0)}


def beta_from_draws(draws: dict, alpha: float):
    """Beta(alpha, alpha) [B] = X / (X + Y) of two Gamma(alpha) draws, in log space (stable for alpha << 1).

    keras.random.beta uses a TF gamma kernel that XLA cannot compile, so Gamma is sampled with
    Marsaglia-Tsang (``_GAMMA_TRIES`` candidates; all rejected has probability < 1e-10, then the
    mode is used) plus the boost Gamma(a) = Gamma(a + 1) * U^(1/a) for a < 1.
    """
    boosted = alpha + 1.0 if alpha < 1.0 else alpha
    d = boosted - 1.0 / 3.0
    z, u = draws["gamma_normal"], draws["gamma_uniform"]
    v = (1.0 + z / math.sqrt(9.0 * d)) ** 3
    v_safe = ops.maximum(v, 1e-12)
    accept = ops.logical_and(v > 0.0, ops.log(u) < 0.5 * z * z + d - d * v + d * ops.log(v_safe))
    first = ops.argmax(ops.cast(accept, "int32"), axis=1)[:, None]
    chosen = ops.take_along_axis(ops.log(d * v_safe), first, axis=1)[:, 0]
    log_gamma = ops.where(ops.any(accept, axis=1), chosen, math.log(d))
    if alpha < 1.0:
        log_gamma = log_gamma + ops.log(draws["gamma_boost"]) / alpha
    return ops.sigmoid(log_gamma[0] - log_gamma[1])


def slice_weights(masks, organ_weights):
    """Mixup weight of each slice: the sum of ``organ_weights`` over organs with foreground in it.

    A slice with no foreground gets the smallest organ weight (like the rarest-seen large organ),
    so background slices can still be drawn but never outweigh a small structure.
    masks [B,H,W,O], organ_weights [O] -> float32 [B].
    """
    organ_weights = ops.cast(organ_weights, "float32")
    present = ops.cast(ops.max(masks, axis=(1, 2)) > 0.5, "float32")
    total = ops.sum(present * organ_weights[None, :], axis=1)
    return ops.where(ops.sum(present, axis=1) > 0.0, total, ops.min(organ_weights))


def partners_from_uniform(weights, draw):
    """Inverse-CDF pick of a batch index per sample with probability weights / sum(weights); int32 [B].

    A sample may draw itself, which leaves it unmixed.
    """
    cdf = ops.cumsum(weights) / ops.sum(weights)
    index = ops.sum(ops.cast(cdf[None, :] <= draw[:, None], "int32"), axis=1)
    return ops.minimum(index, ops.shape(weights)[0] - 1)


def apply_mixup(batch: dict, draws: dict, organ_weights, alpha: float) -> dict:
    """Class-weighted mixup: image <- lam * image + (1 - lam) * image[partner], lam ~ Beta(alpha, alpha).

    The partner is drawn from the batch with probability proportional to :func:`slice_weights`
    (``organ_weights`` [O], e.g. 1 / foreground-slice count; None: uniform), from ``draws["partner"]``
    [B] uniforms and the gamma draws of :func:`beta_from_draws`. Targets are not mixed:
    ``partner_masks``, ``partner_dist_maps``, ``partner_annotated`` and ``lam [B]`` are added.
    """
    masks = batch["masks"]
    if organ_weights is None:
        weights = ops.ones((ops.shape(masks)[0],), "float32")
    else:
        weights = slice_weights(masks, organ_weights)
    partner = partners_from_uniform(weights, draws["partner"])
    lam = beta_from_draws(draws, alpha)
    image, lam_b = ops.cast(batch["image"], "float32"), lam[:, None, None, None]
    out = dict(batch)
    out["image"] = lam_b * image + (1.0 - lam_b) * ops.take(image, partner, axis=0)
    for key in ("masks", "dist_maps", "annotated"):
        out[f"partner_{key}"] = ops.take(batch[key], partner, axis=0)
    out["lam"] = lam
    return out


# ----------------------------------------------------------------------------- the ops, in order


def warp_from_draws(draws: dict, out_hw: tuple[int, int], config: AugmentConfig):
    """Per-sample warp field [B,Ho,Wo,2] (dy, dx), or None when warps are off.

    With ``warp_probability`` a sample is warped, elastic or grid (a coin picks when both are on).
    """
    fields = []
    if "elastic_noise" in draws:
        fields.append(elastic_from_noise(draws["elastic_noise"], out_hw, config.elastic_alpha, config.elastic_sigma))
    if "grid_stretch" in draws:
        fields.append(grid_from_stretch(draws["grid_stretch"], out_hw))
    if not fields:
        return None
    coins = draws["coins"]
    warped = ops.cast(coins[:, 0] < config.warp_probability, "float32")[:, None, None, None]
    if len(fields) == 1:
        return fields[0] * warped
    use_elastic = ops.cast(coins[:, 1] < 0.5, "float32")[:, None, None, None]
    return (fields[0] * use_elastic + fields[1] * (1.0 - use_elastic)) * warped


def cast_and_window(batch: dict, window: tuple[float, float] | None) -> dict:
    """float32 copy of a batch's four keys with the image clipped to ``window`` (HU) or ``HU_RANGE``."""
    out = {key: ops.cast(batch[key], "float32") for key in ("masks", "dist_maps", "annotated")}
    return {"image": window_image(batch["image"], window), **out}


def _crop_warp_draw(seed, batch_size, in_hw, out_hw, config: AugmentConfig, channels=1) -> dict:
    """Crop corner [B,2], warp field [B,Ho,Wo,2] (or none), rotation + zoom ``affine`` [B,2,2] and ``zoom``
    [B] (or none): fields and matrices are derived here, with the draws, so that the application is a
    pure resampling (the part worth compiling with XLA)."""
    draws = {"crop": _uniform(sub_seed(seed, _TAG_CROP), (batch_size, 2)),
             "coins": _uniform(sub_seed(seed, _TAG_WARP_CHOICE), (batch_size, 2))}
    if config.warp_probability > 0.0 and config.elastic:
        _, _, height, width = _elastic_geometry(out_hw, config.elastic_sigma)
        draws["elastic_noise"] = _normal(sub_seed(seed, _TAG_ELASTIC), (batch_size, height, width, 2))
    if config.warp_probability > 0.0 and config.grid:
        limit = config.grid_distort_limit
        draws["grid_stretch"] = _uniform(sub_seed(seed, _TAG_GRID), (batch_size, 2, config.grid_steps),
                                         1.0 - limit, 1.0 + limit)
    field = warp_from_draws(draws, out_hw, config)
    params = {"offsets": crop_offsets(draws["crop"], in_hw, out_hw), **({} if field is None else {"field": field})}
    if config.probability("rotation") > 0.0 or config.probability("scale") > 0.0:
        params.update(affine_from_draws(_uniform(sub_seed(seed, _TAG_AFFINE), (batch_size, 4)), config))
    return params


def _crop_warp_apply(batch: dict, params: dict, config: AugmentConfig, organ_weights=None) -> dict:
    out_hw = output_hw(batch["image"], config)[1]
    return resample_batch(batch, params["offsets"], params.get("field"), out_hw, params.get("affine"),
                          params.get("zoom"))


def _mixup_draw(seed, batch_size, in_hw, out_hw, config: AugmentConfig, channels=1) -> dict:
    return {"partner": _uniform(sub_seed(seed, _TAG_PARTNER), (batch_size,)),
            **_gamma_draws(sub_seed(seed, _TAG_LAMBDA), batch_size)}


def _mixup_apply(batch: dict, params: dict, config: AugmentConfig, organ_weights=None) -> dict:
    return apply_mixup(batch, params, organ_weights, config.mixup_alpha)


def _intensity_draw(seed, batch_size, in_hw, out_hw, config: AugmentConfig, channels=1, *, name: str) -> dict:
    """The random numbers of intensity op ``name`` (uniforms, and Gaussian noise for the noise op), made
    into its params by :func:`intensity.params_from_draws`."""
    seed = sub_seed(sub_seed(seed, _TAG_INTENSITY), _INTENSITY_TAGS[name])
    draws = _uniform(sub_seed(seed, 0), (batch_size, 2))
    noise = _normal(sub_seed(seed, 1), (batch_size, out_hw[0], out_hw[1], channels)) if name == "noise" else None
    return intensity.params_from_draws(draws, noise, config, name)


def _intensity_apply(batch: dict, params: dict, config: AugmentConfig, organ_weights=None, *, name: str) -> dict:
    window = config.window if config.window is not None else HU_RANGE
    return intensity.apply_op(batch, params, window, config, name)


def _intensity_op(name: str) -> AugmentOp:
    return AugmentOp(name, lambda config: config.probability(name) > 0.0,
                     functools.partial(_intensity_draw, name=name), functools.partial(_intensity_apply, name=name))


@dataclasses.dataclass(frozen=True)
class AugmentOp:
    """One step of the augmentation: ``draw(seed, batch_size, in_hw, out_hw, config, channels) -> params``
    (every random number; ``channels``, the image's C, sizes the noise; None: no draws),
    ``apply(batch, params, config, organ_weights) -> batch`` (deterministic), and whether tf.data may
    XLA-compile ``apply`` (worth it for the resampling only; TF's stateless generator is slow under XLA
    on CPU, so draws never run there)."""

    name: str
    enabled: Callable[[AugmentConfig], bool]
    draw: Callable | None
    apply: Callable
    compilable: bool = False


# The one composition, in order, iterated by the tf.data pipeline and by the on-device train step.
# Intensity ops after the geometry (on the output crop: cheaper, and the resampling does not smooth the
# noise) and before mixup (each image changed on its own, then mixed, so the mix stays in the window).
OPS: tuple[AugmentOp, ...] = (
    AugmentOp("window", lambda config: True, None, lambda batch, _, config, __: cast_and_window(batch, config.window)),
    AugmentOp("crop_and_warp", lambda config: True, _crop_warp_draw, _crop_warp_apply, compilable=True),
    *(_intensity_op(name) for name in intensity.OPS),
    AugmentOp("mixup", lambda config: config.mixup, _mixup_draw, _mixup_apply),
)


def active_ops(config: AugmentConfig) -> tuple[AugmentOp, ...]:
    return tuple(op for op in OPS if op.enabled(config))


def draw_params(batch: dict, seed, config: AugmentConfig) -> dict:
    """Every op's parameters for one batch, drawn from ``seed`` (int32 [2] or int): ``{op name: dict}``."""
    in_hw, out_hw = output_hw(batch["image"], config)
    batch_size = ops.shape(batch["image"])[0]
    channels = batch["image"].shape[-1] or ops.shape(batch["image"])[-1]
    return {op.name: op.draw(seed, batch_size, in_hw, out_hw, config, channels=channels)
            for op in active_ops(config) if op.draw is not None}


def apply_ops(batch: dict, params: dict, config: AugmentConfig, organ_weights=None) -> dict:
    """Apply the enabled ops in order with drawn ``params`` (no random draws inside)."""
    for op in active_ops(config):
        batch = op.apply(batch, params.get(op.name, {}), config, organ_weights)
    return batch


def augment_batch(batch: dict, seed, config: AugmentConfig, organ_weights=None) -> dict:
    """The full training augmentation: window, crop + rotation + zoom + warp (one resampling), the
    intensity ops (noise, blur, brightness, shift, contrast, inverted gamma, gamma), weighted mixup
    (each per ``config``).

    Args:
        batch: dict with image [B,Hi,Wi,C] HU, masks / dist_maps [B,Hi,Wi,O], annotated [B,O].
        seed: int32 [2] tensor (or int); the same seed gives the same batch.
        config: which ops run and their parameters.
        organ_weights: [O] mixup organ weights (see :func:`slice_weights`), or None.

    Returns:
        float32 dict with spatial keys at the crop size; with mixup also ``partner_*`` and ``lam``.
    """
    return apply_ops(batch, draw_params(batch, seed, config), config, organ_weights)
