"""Sanity checks of a CT image as read from disk: refusals for what cannot be a CT volume,
warnings (logged, shown on stderr by the CLI) for what is unusual but may be right.

A model trained on Hounsfield units at head-and-neck spacing segments garbage from an image in
other units or at a wildly wrong spacing without any error, so such images are flagged by name.
"""

from __future__ import annotations

import logging
import os

import SimpleITK as sitk

from hnseg_keras.errors import HnsegError

log = logging.getLogger(__name__)

HU_MIN = -3100.0  # below the -3024 padding scanners put outside the field of view
HU_MAX = 5000.0  # far above cortical bone; metal in extended-range CT can exceed it
MIN_HU_SPAN = 500.0  # a CT in HU spans at least air (-1000) to soft tissue (40)
SPACING_MM = (0.1, 20.0)
LOW_BIT_TYPES = {sitk.sitkUInt8: "8-bit unsigned", sitk.sitkInt8: "8-bit signed", sitk.sitkUInt16: "16-bit unsigned",
                 sitk.sitkUInt32: "32-bit unsigned"}


def check_image(image: sitk.Image, path: str | os.PathLike) -> list[str]:
    """Refuse a non-3D or multi-channel image (HnsegError); log and return warnings for odd values."""
    size = image.GetSize()
    if image.GetDimension() != 3:
        raise HnsegError(f"{path}: image is {image.GetDimension()}D (size {list(size)}); give a 3D CT")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise HnsegError(f"{path}: image has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                         f"(size {list(size)}); give a scalar 3D CT")
    warnings = []
    kind = LOW_BIT_TYPES.get(image.GetPixelID())
    if kind is not None:
        warnings.append(f"{path}: voxels are {kind} integers, which cannot hold Hounsfield units (air is "
                        "-1000 HU); check that the image is a CT in HU")
    spacing = image.GetSpacing()
    if any(not SPACING_MM[0] <= s <= SPACING_MM[1] for s in spacing):
        warnings.append(f"{path}: voxel spacing {[round(s, 4) for s in spacing]} mm is outside "
                        f"{SPACING_MM[0]}..{SPACING_MM[1]} mm; check the image header")
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64) or kind is None:
        warnings += _hu_warnings(image, path)
    for text in warnings:
        log.warning(text)
    return warnings


def _hu_warnings(image: sitk.Image, path) -> list[str]:
    stats = sitk.MinimumMaximumImageFilter()
    try:
        stats.Execute(image)
    except RuntimeError:
        return []  # non-finite values: refused by the reader's own check
    low, high = stats.GetMinimum(), stats.GetMaximum()
    if low < HU_MIN or high > HU_MAX:
        return [f"{path}: values span {low:g}..{high:g}, outside the plausible CT range {HU_MIN:g}..{HU_MAX:g} HU "
                "(values beyond int16 are clipped); check that the image is a CT in HU"]
    if high - low < MIN_HU_SPAN:
        return [f"{path}: values span only {low:g}..{high:g}; a CT in HU spans air (-1000) to soft tissue and "
                "bone, so check the image's units"]
    return []
