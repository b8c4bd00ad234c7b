"""How a batch's images are sized: fixed squares, or native resolution (each image its own grid between
min_pixels and max_pixels, read from its header up front) with per-prompt patch buckets and the padded layout
that keeps shapes static."""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence

import numpy as np
import PIL.Image

from mr1jax.data.vision import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, ImageLike, preprocess_images, smart_resize

__all__ = ["ImageSizing", "PatchBuckets", "image_hw", "max_patches", "pad_pixel_values"]


def image_hw(image: ImageLike) -> tuple[int, int]:
    """``(height, width)`` of an image as `preprocess_images` will see it, reading only the header of encoded
    images and files (EXIF orientations that swap the sides are applied, as the loader does)."""
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3):
            raise ValueError(f"image array must be [H, W] or [H, W, C], got shape {image.shape}")
        return int(image.shape[0]), int(image.shape[1])
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, (bytes, bytearray, memoryview)):
        opened = PIL.Image.open(io.BytesIO(bytes(image)))
    elif isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"no such image file: {os.fspath(image)}")
        opened = PIL.Image.open(image)
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}")
    with opened:
        width, height = opened.size
        orientation = opened.getexif().get(0x0112, 1)
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def max_patches(max_pixels: int) -> int:
    """The most patches `smart_resize` gives one image under `max_pixels` (whole 28 x 28 blocks of 4 patches)."""
    return (max_pixels // 28**2) * 4


class PatchBuckets:
    """Per-prompt patch-count buckets of the native-resolution layout: a batch's prompts are padded to the
    smallest bucket that holds its largest prompt's patches, so shapes (and compiled programs) are bounded by
    the number of buckets.

    Default buckets (`for_limits`): 1/8, 1/4, 3/8, 1/2, 3/4 and 1 of the most patches a prompt can have
    (``images_per_prompt x max_pixels / 14^2``), each rounded up to a multiple of 16 patches (4 merged tokens).
    """

    def __init__(self, sizes):
        sizes = sorted({int(s) for s in sizes})
        if not sizes or sizes[0] <= 0 or any(s % 4 for s in sizes):
            raise ValueError(f"patch buckets must be positive multiples of 4, got {list(sizes)}")
        self.sizes = tuple(sizes)

    @classmethod
    def for_limits(cls, max_pixels: int, images_per_prompt: int) -> "PatchBuckets":
        top = images_per_prompt * max_patches(max_pixels)
        return cls(max(16, -(-int(top * f) // 16) * 16) for f in (1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1))

    def __call__(self, patches: int) -> int:
        """The smallest bucket >= `patches`; ValueError when none is."""
        for s in self.sizes:
            if s >= patches:
                return s
        raise ValueError(f"{patches} patches exceed the largest patch bucket {self.sizes[-1]}")

    def __repr__(self) -> str:
        return f"PatchBuckets({list(self.sizes)})"


def pad_pixel_values(pixel_values: np.ndarray, image_grid_thw: np.ndarray, images_per_row, patches_per_row: int
                     ) -> np.ndarray:
    """[sum patches, D] (images row by row) -> [B * P, D]: row b's patches first in its block of P, zeros after
    (the per-prompt padded layout of `mr1jax.models.qwen2_vl.rope.padded_patch_layout`)."""
    grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    per_image = grid.prod(-1)
    counts = np.asarray(images_per_row, np.int64)
    out = np.zeros((len(counts) * patches_per_row, pixel_values.shape[-1]), pixel_values.dtype)
    src, img = 0, 0
    for b, k in enumerate(counts):
        n = int(per_image[img:img + k].sum())
        if n > patches_per_row:
            raise ValueError(f"row {b} has {n} patches, more than {patches_per_row}")
        out[b * patches_per_row:b * patches_per_row + n] = pixel_values[src:src + n]
        src, img = src + n, img + k
    return out


@dataclasses.dataclass(frozen=True)
class ImageSizing:
    """How a data path sizes images.

    fixed: > 0: every image resized to fixed x fixed (aspect ratio not kept; one shape, the fast path); 0: native
      resolution: each image keeps its aspect ratio and gets its own grid (`smart_resize` between min_pixels and
      max_pixels, as the Qwen processors do), and a batch's prompts are padded to a per-prompt patch bucket.
    buckets: the per-prompt patch buckets of native resolution (() = `PatchBuckets.for_limits`).
    images_per_prompt: the most images a prompt carries (native: 0 up to it; fixed: exactly it).
    """

    fixed: int = 0
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    buckets: tuple[int, ...] = ()
    images_per_prompt: int = 1

    def __post_init__(self):
        if self.fixed < 0 or (self.fixed and self.fixed % 28):
            raise ValueError(f"image_size = {self.fixed} must be 0 (native resolution) or a multiple of 28")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        if not self.fixed:
            top = self.patch_buckets().sizes[-1]
            need = self.images_per_prompt * max_patches(self.max_pixels)
            if top < need:
                raise ValueError(f"the largest patch bucket {top} is smaller than images_per_prompt x "
                                 f"max_pixels / 14^2 = {need} patches (a prompt of full-size images would not fit)")

    @property
    def native(self) -> bool:
        return not self.fixed

    def patch_buckets(self) -> PatchBuckets:
        return PatchBuckets(self.buckets) if self.buckets else \
            PatchBuckets.for_limits(self.max_pixels, self.images_per_prompt)

    def preprocess(self, images: Sequence[ImageLike]) -> tuple[np.ndarray, np.ndarray]:
        """(pixel_values, image_grid_thw) of a row's images (none: [0, 1176] and [0, 3])."""
        if not images:
            return np.zeros((0, 1176), np.float32), np.zeros((0, 3), np.int64)
        if self.fixed:
            return preprocess_images(images, fixed_size=(self.fixed, self.fixed))
        return preprocess_images(images, min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def grid_of(self, image: ImageLike) -> tuple[int, int]:
        """(h, w) in patches of one image, from its header only (no decode)."""
        if self.fixed:
            return self.fixed // 14, self.fixed // 14
        height, width = image_hw(image)
        h, w = smart_resize(height, width, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return h // 14, w // 14
