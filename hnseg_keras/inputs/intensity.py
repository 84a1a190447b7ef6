"""The nnU-Net-like intensity ops of the augmentation (noise, blur, brightness, shift, contrast, gamma).

They change the image only, on the windowed image in window units u = (HU - centre) / half-width (the
window mapped to [-1, 1]), and clip the result back into the window: the model clips to it anyway, so
this is the image it sees, and gamma needs a bounded range.

Deterministic ``keras.ops`` only: ``augment`` owns the seeds, the registry ``OPS`` and the config class,
draws the uniforms and the noise and passes them here with the window, so this module imports nothing
of the package and ``augment`` can import it without a cycle.
"""

from __future__ import annotations

import math

from keras import ops


def gaussian_blur(values, sigma, radius: int):
    """Separable Gaussian blur of ``values`` [B,H,W,C] with its own ``sigma`` [B] (pixels) per sample.

    Sampled Gaussian taps -radius..radius normalised to sum 1, mirrored borders. Shifted sums instead of
    a convolution, because every sample has its own kernel (a depthwise conv shares one over the batch).
    """
    taps = ops.arange(-radius, radius + 1, dtype="float32")
    kernel = ops.exp(-0.5 * ops.square(taps[None, :] / sigma[:, None]))
    kernel = kernel / ops.sum(kernel, axis=1, keepdims=True)

    def along_rows(x):
        length = int(x.shape[1])
        padded = ops.pad(x, [[0, 0], [radius, radius], [0, 0], [0, 0]], mode="symmetric")
        out = kernel[:, 0, None, None, None] * padded[:, :length]
        for tap in range(1, 2 * radius + 1):
            out = out + kernel[:, tap, None, None, None] * padded[:, tap : tap + length]
        return out

    if values.shape[1] is None or values.shape[2] is None:  # the shifted slices need static H and W
        raise ValueError("augment needs static slice height and width; set the dataset's shapes")
    return ops.swapaxes(along_rows(ops.swapaxes(along_rows(values), 1, 2)), 1, 2)


def blur_radius(config) -> int:
    """Kernel half-width in pixels: 3 of the largest sigma of ``config.blur_sigma``."""
    return max(1, math.ceil(3.0 * config.blur_sigma[1]))


def _gamma(unit, gamma, inverted: bool):
    """Gamma on the window mapped to t in [0, 1]: t ** gamma, or 1 - (1 - t) ** gamma when inverted."""
    if inverted:
        return 1.0 - 2.0 * ops.power((1.0 - unit) / 2.0, gamma)
    return 2.0 * ops.power((unit + 1.0) / 2.0, gamma) - 1.0


def _contrast(unit, factor):
    mean = ops.mean(unit, axis=(1, 2, 3), keepdims=True)
    return mean + (unit - mean) * factor


# name: (range field of the config, log-uniform value, change of the window units u [B,H,W,C] with the
# drawn value v [B,1,1,1] and the op's params and config), in the order they run (nnU-Net's: noise,
# blur, brightness, contrast, gamma; the additive shift beside the brightness).
OPS = {
    "noise": ("noise_variance", False, lambda u, v, params, _: u + ops.sqrt(v) * params["noise"]),
    "blur": ("blur_sigma", False, lambda u, v, _, config: gaussian_blur(u, v[:, 0, 0, 0], blur_radius(config))),
    "brightness": ("brightness_range", False, lambda u, v, params, _: u * v),
    "shift": ("shift_range", False, lambda u, v, params, _: u + v),
    "contrast": ("contrast_range", False, lambda u, v, params, _: _contrast(u, v)),
    "gamma_inverted": ("gamma_range", True, lambda u, v, params, _: _gamma(u, v, inverted=True)),
    "gamma": ("gamma_range", True, lambda u, v, params, _: _gamma(u, v, inverted=False)),
}


def params_from_draws(draws, noise, config, name: str) -> dict:
    """Params of op ``name`` from uniforms ``draws`` [B,2] (chance, value) and, for the noise op, unit
    Gaussian ``noise`` [B,Ho,Wo,C] (else None), under ``config`` (the ``augment.AugmentConfig``).

    Returns ``chosen`` [B] (bool: the op runs on this sample), ``value`` [B] in the op's range and, for
    the noise op, ``noise``.
    """
    range_field, log_uniform, _ = OPS[name]
    low, high = getattr(config, range_field)
    if log_uniform:
        value = low * ops.exp(draws[:, 1] * math.log(high / low))
    else:
        value = low + (high - low) * draws[:, 1]
    params = {"chosen": draws[:, 0] < config.probability(name), "value": value}
    if noise is not None:
        params["noise"] = noise
    return params


def apply_op(batch: dict, params: dict, window: tuple[float, float], config, name: str) -> dict:
    """The image of the chosen samples changed in units of ``window`` (low, high) HU, the one it was
    clipped to, and clipped back into it; the rest and every other key untouched."""
    low, high = window
    centre, half = (low + high) / 2.0, (high - low) / 2.0
    image = batch["image"]
    unit = ops.clip((image - centre) / half, -1.0, 1.0)
    changed = OPS[name][2](unit, params["value"][:, None, None, None], params, config)
    changed = ops.clip(changed, -1.0, 1.0) * half + centre
    return {**batch, "image": ops.where(params["chosen"][:, None, None, None], changed, image)}
