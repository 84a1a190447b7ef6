"""Residual 2D U-Net: ``build_unet(UNetConfig) -> keras.Model`` from raw HU to per-organ probabilities.

Architecture (read ``build_unet`` top to bottom):

- input ``ct`` [B, H, W, C] float32 raw HU, C = 1 (2D) or 2k+1 (2.5D, centre slice at k);
- ``hu_window``: clip to the HU window, then ``(x - mean) / std`` with the training statistics, so
  exported models and prediction feed raw HU. The window is not part of ``UNetConfig``: it is the
  training input's (``AugmentConfig.window``), handed to ``build_unet`` when the model is built, so one
  value decides what the pipeline clips to and what the model clips to;
- encoder: level 0 at full resolution, levels 1..n-1 each start with a stride-2 residual unit
  (strided 3x3 conv, 1x1 stride-2 projection shortcut), ``units_per_level`` units per level;
- decoder: 2x2 transposed conv (x2 up-sampling), concatenation with the encoder skip, 1x1 fuse conv
  back to the level's width, one residual unit;
- head: 1x1 conv to one logit per organ and a per-organ sigmoid whose gradient cannot vanish
  (``OrganProbabilities``), ``probabilities`` [B, H, W, O].

A residual unit is ``convs_per_unit`` times (conv -> norm -> activation) plus a shortcut (identity, or
a 1x1 projection when channels or stride change). With one conv per unit and filters 64..1024, one unit
per encoder level gives 13.6M parameters (paper's M: 13.5M) and two give 26.2M (paper's L: 26M); the
second unit adds one 3x3 conv per level, exactly the paper's L - M difference. The decoder keeps one unit
per level, as MONAI's implementation of the Residual U-Net the paper cites (Kerfoot et al. 2019) does:
its ``num_res_units`` deepens only the encoder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import keras
from keras import layers, ops

from hnseg_keras.errors import HnsegError
from hnseg_keras.inputs.augment import HU_RANGE, HU_WINDOW, check_window

NORMS = ("batch", "instance", "none")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise HnsegError(f"UNetConfig: {message}")


@dataclass(frozen=True)
class UNetConfig:
    """Residual U-Net hyper-parameters; S/M/L are presets in ``VARIANTS``.

    Attributes:
        filters: channels per level, top to bottom; ``len(filters) - 1`` stride-2 down-samplings.
        units_per_level: residual units per encoder level (1 = paper's M, 2 = paper's L).
        convs_per_unit: conv -> norm -> activation repetitions inside one residual unit.
        input_channels: 1 (2D) or 2k+1 (2.5D with k neighbours each side).
        num_organs: output channels, one sigmoid per organ, in organ-list order.
        kernel_size: spatial size of the 3x3-type convs.
        norm: "batch", "instance" or "none".
        dropout: spatial dropout rate after each activation inside residual units (0 = none).
        hu_mean, hu_std: HU statistics of the training images clipped to the window the model is built
            with (set by training from the manifest); None uses the window's midpoint and half-width,
            i.e. maps the window to [-1, 1].
        name: Keras model name.
    """

    filters: tuple[int, ...] = (64, 128, 256, 512, 1024)
    units_per_level: int = 1
    convs_per_unit: int = 1
    input_channels: int = 1
    num_organs: int = 9
    kernel_size: int = 3
    norm: str = "batch"
    dropout: float = 0.0
    hu_mean: float | None = None
    hu_std: float | None = None
    name: str = "unet"

    def __post_init__(self):
        _check(len(self.filters) >= 2 and all(f > 0 for f in self.filters),
               f"filters={self.filters}: give at least two positive channel counts, e.g. (16, 32, 64)")
        _check(self.units_per_level >= 1, f"units_per_level={self.units_per_level}: must be >= 1")
        _check(self.convs_per_unit >= 1, f"convs_per_unit={self.convs_per_unit}: must be >= 1")
        _check(self.input_channels >= 1 and self.input_channels % 2 == 1,
               f"input_channels={self.input_channels}: must be 1 or 2k+1 (centre slice plus k each side)")
        _check(self.num_organs >= 1, f"num_organs={self.num_organs}: must be >= 1")
        _check(self.kernel_size >= 1 and self.kernel_size % 2 == 1,
               f"kernel_size={self.kernel_size}: must be odd, e.g. 3")
        _check(self.norm in NORMS, f"norm={self.norm!r}: choose one of {NORMS}")
        _check(0.0 <= self.dropout < 1.0, f"dropout={self.dropout}: must be in [0, 1)")
        _check(self.hu_std is None or self.hu_std > 0, f"hu_std={self.hu_std}: must be > 0")

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this (2 ** number of down-samplings)."""
        return 2 ** (len(self.filters) - 1)

    def normalization(self, window: tuple[float, float] | None = HU_WINDOW
                      ) -> tuple[tuple[float, float], float, float]:
        """``(clip range, mean, std)`` in HU that the first layer applies for the HU ``window``
        (None: the full CT range ``HU_RANGE``)."""
        check_window(window, "window")
        low, high = window if window is not None else HU_RANGE
        mean = self.hu_mean if self.hu_mean is not None else (low + high) / 2.0
        std = self.hu_std if self.hu_std is not None else (high - low) / 2.0
        return (float(low), float(high)), float(mean), float(std)


VARIANTS: dict[str, UNetConfig] = {
    # Paper's L: ~26M parameters, focal + Dice loss.
    "L": UNetConfig(units_per_level=2, name="unet_L"),
    # Paper's M: ~13.5M parameters, focal + Dice + boundary loss, weighted mixup.
    "M": UNetConfig(units_per_level=1, name="unet_M"),
    # Small: 1.8M parameters, ~0.04 s per 128x128 slice per train step on a 2-core CPU.
    "S": UNetConfig(filters=(16, 32, 64, 128, 256), units_per_level=1, convs_per_unit=2, name="unet_S"),
}


def variant_config(name: str, **overrides) -> UNetConfig:
    """The preset ``name`` ("S", "M" or "L", case-insensitive) with fields replaced by ``overrides``."""
    key = str(name).upper()
    if key not in VARIANTS:
        raise HnsegError(f"model variant {name!r} is unknown; choose one of {sorted(VARIANTS)}")
    fields = {field.name for field in dataclasses.fields(UNetConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise HnsegError(f"UNetConfig: unknown field(s) {unknown}; accepted fields: {sorted(fields)}")
    return dataclasses.replace(VARIANTS[key], **overrides)


def build_unet(config: UNetConfig, image_size: int | tuple[int, int] | None = None,
               window: tuple[float, float] | None = HU_WINDOW) -> keras.Model:
    """Build the residual U-Net.

    Args:
        config: the architecture and the input statistics.
        image_size: optional static (H, W) (or one int for square); None accepts any size that is a
            multiple of ``config.size_multiple`` (checked when the shape is known at call time).
        window: (low, high) HU the first layer clips to, the training input's window (training passes
            ``AugmentConfig.window``); None clips to the full CT range (-1024, 3071).

    Returns:
        A functional model ``ct`` [B, H, W, C] float32 HU -> ``probabilities`` [B, H, W, O] in [0, 1].
    """
    height, width = _static_size(image_size, config.size_multiple)
    ct = keras.Input((height, width, config.input_channels), dtype="float32", name="ct")
    x = SpatialSizeCheck(config.size_multiple, name="size_check")(ct)
    clip_range, mean, std = config.normalization(window)
    x = HUWindowNormalize(clip_range, mean, std, dtype="float32", name="hu_window")(x)

    skips = []
    for level, filters in enumerate(config.filters):
        x = _encoder_level(x, config, level, filters)
        skips.append(x)
    for level in reversed(range(len(config.filters) - 1)):
        x = _decoder_level(x, skips[level], config, level, config.filters[level])

    logits = layers.Conv2D(config.num_organs, 1, name="head_conv")(x)
    # Per-organ sigmoid rather than softmax with background: organs may overlap (multi-label), and an
    # organ not annotated in a sample can be masked out of the loss channel by channel exactly, whereas
    # a softmax with background would have to count the unannotated organ's pixels as background (or
    # as another organ) and so push their probability down. float32 so the losses get full precision
    # under mixed precision.
    probabilities = OrganProbabilities(dtype="float32", name="probabilities")(logits)
    return keras.Model(ct, probabilities, name=config.name)


def _encoder_level(x, config: UNetConfig, level: int, filters: int):
    """Level 0 keeps the resolution; deeper levels halve it in their first unit's strided conv."""
    for unit in range(config.units_per_level):
        strides = 2 if level > 0 and unit == 0 else 1
        x = _residual_unit(x, filters, strides, config, name=f"enc{level}_unit{unit + 1}")
    return x


def _decoder_level(x, skip, config: UNetConfig, level: int, filters: int):
    """Up-sample x2 with a transposed conv, concatenate the skip, fuse to ``filters``, one unit."""
    name = f"dec{level}"
    x = layers.Conv2DTranspose(filters, 2, strides=2, use_bias=_use_bias(config), name=f"{name}_up")(x)
    x = _norm_act(x, config, f"{name}_up")
    x = layers.Concatenate(name=f"{name}_concat")([x, skip])
    x = layers.Conv2D(filters, 1, use_bias=_use_bias(config), name=f"{name}_fuse")(x)
    x = _norm_act(x, config, f"{name}_fuse")
    return _residual_unit(x, filters, 1, config, name=f"{name}_unit1")


def _residual_unit(x, filters: int, strides: int, config: UNetConfig, name: str):
    """``convs_per_unit`` x (conv -> norm -> activation) plus a shortcut; the first conv carries the stride."""
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=strides, use_bias=_use_bias(config), name=f"{name}_proj")(x)
        shortcut = _norm(shortcut, config, f"{name}_proj_norm")
    for index in range(1, config.convs_per_unit + 1):
        x = layers.Conv2D(
            filters, config.kernel_size, strides=strides if index == 1 else 1, padding="same",
            use_bias=_use_bias(config), name=f"{name}_conv{index}",
        )(x)
        x = _norm_act(x, config, f"{name}_conv{index}")
        if config.dropout > 0:
            x = layers.SpatialDropout2D(config.dropout, name=f"{name}_drop{index}")(x)
    return layers.Add(name=f"{name}_add")([shortcut, x])


def _norm_act(x, config: UNetConfig, prefix: str):
    x = _norm(x, config, f"{prefix}_norm")
    return layers.Activation("relu", name=f"{prefix}_relu")(x)


def _norm(x, config: UNetConfig, name: str):
    if config.norm == "batch":
        # momentum 0.9 (PyTorch's default, which the paper trained with): Keras's 0.99 lets the
        # moving statistics lag a few epochs behind the weights in short runs, and validation Dice
        # then swings from epoch to epoch.
        return layers.BatchNormalization(momentum=0.9, name=name)(x)
    if config.norm == "instance":
        return layers.GroupNormalization(groups=-1, name=name)(x)
    return x


def _use_bias(config: UNetConfig) -> bool:
    # A bias right before a normalisation layer is cancelled by its mean subtraction.
    return config.norm == "none"


def _static_size(image_size, multiple: int) -> tuple[int | None, int | None]:
    if image_size is None:
        return None, None
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    check_image_size(height, width, multiple, "image_size")
    return int(height), int(width)


def check_image_size(height, width, multiple: int = 16, what: str = "image") -> None:
    """Raise HnsegError unless the known (non-None) ``height`` and ``width`` are multiples of ``multiple``."""
    for value in (height, width):
        if value is not None and (value <= 0 or value % multiple):
            raise HnsegError(
                f"{what}: image size {height}x{width} is not a multiple of {multiple}; "
                f"crop or pad the slices to a multiple of {multiple} (e.g. SlicingConfig.size)"
            )



@keras.saving.register_keras_serializable(package="hnseg_keras")
class OrganProbabilities(layers.Layer):
    """Per-organ sigmoid held inside ``[floor, 1 - floor]``, with the sigmoid's slope taken there.

    The losses read probabilities, and ``log(p + 1e-7)`` times the sigmoid's slope ``p (1 - p)`` has no
    gradient left once an organ's logits fall below about -16 everywhere: the channel then stays at zero
    for good (OpenKBP's larynx and oesophagus did, from their first epochs). Clipping at ``floor`` and
    using the slope at the clipped value keeps the push on a missed organ pixel near -0.5 per pixel, as
    a loss computed from logits would; the forward value differs from the sigmoid by at most ``floor``.
    Models saved with a plain sigmoid layer still load and predict as before.
    """

    def __init__(self, floor: float = 1e-7, **kwargs):
        super().__init__(**kwargs)
        self.floor = float(floor)

    def call(self, logits):
        low, high = self.floor, 1.0 - self.floor

        @ops.custom_gradient
        def floored_sigmoid(x):
            p = ops.clip(ops.sigmoid(x), low, high)

            def grad(*args, upstream=None):
                upstream = args[0] if upstream is None else upstream
                return upstream * p * (1.0 - p)

            return p, grad

        return floored_sigmoid(ops.cast(logits, self.compute_dtype))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "floor": self.floor}


@keras.saving.register_keras_serializable(package="hnseg_keras")
class HUWindowNormalize(layers.Layer):
    """Clip HU to ``window`` and standardise: ``(clip(x, low, high) - mean) / std``.

    Args:
        window: (low, high) HU; None clips to the full CT range (-1024, 3071).
        mean, std: HU statistics of the clipped training images.
    Input and output: [B, H, W, C] float (HU in, unitless out).
    """

    def __init__(self, window=HU_WINDOW, mean=0.0, std=1.0, **kwargs):
        super().__init__(**kwargs)
        self.window = None if window is None else (float(window[0]), float(window[1]))
        self.mean = float(mean)
        self.std = float(std)

    def call(self, inputs):
        low, high = self.window if self.window is not None else HU_RANGE
        x = ops.clip(ops.cast(inputs, self.compute_dtype), low, high)
        return (x - self.mean) / self.std

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "window": self.window, "mean": self.mean, "std": self.std}


@keras.saving.register_keras_serializable(package="hnseg_keras")
class SpatialSizeCheck(layers.Layer):
    """Identity that raises HnsegError when a known H or W is not a multiple of ``multiple``.

    The U-Net halves the resolution ``log2(multiple)`` times; other sizes would fail later with an
    unreadable shape mismatch in a skip concatenation. Unknown (None) sizes pass unchecked, and Keras'
    ``fit``/``predict`` relax traced shapes to None after a retrace, so stages that feed arbitrary sizes
    should also call ``check_image_size`` up front.
    """

    def __init__(self, multiple=16, **kwargs):
        super().__init__(**kwargs)
        self.multiple = int(multiple)

    def call(self, inputs):
        check_image_size(inputs.shape[1], inputs.shape[2], self.multiple, "model input 'ct'")
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "multiple": self.multiple}
