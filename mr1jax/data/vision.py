"""Host-side Qwen2-VL image preprocessing (numpy + PIL, no torch, no JAX).

This module reproduces ``transformers.Qwen2VLImageProcessorPil`` (transformers 5.23)
exactly -- same RGB conversion, same PIL bicubic resize on uint8 pixels, same float
rounding in rescale/normalize and the same patch order -- so that a JAX model fed by
this pipeline sees bit-identical ``pixel_values`` to the Hugging Face reference.

Pipeline for each image::

    decode / convert to RGB uint8 [H, W, 3]
    -> resize to (h, w) = smart_resize(H, W)   (or fixed_size)   PIL BICUBIC
    -> x = float32(float64(u8) * (1/255))
    -> x = (x - CLIP_MEAN) / CLIP_STD          (float32)
    -> patchify to [(h/14) * (w/14), 3 * 2 * 14 * 14] with the frame repeated
       twice along the temporal axis, rows ordered by 2x2 merge blocks.

Reference behaviours that are reproduced on purpose (they matter for parity):

* PIL images with an alpha band, or with ``info["transparency"]`` (e.g. ``P`` or
  ``L`` images with a tRNS chunk), are composited onto an opaque white background with
  ``PIL.Image.alpha_composite`` before dropping alpha.
* 4-channel numpy arrays are composited onto white in float64 numpy arithmetic and
  rounded (this differs from PIL's ``alpha_composite`` by up to 1 grey level).
* Images given as file paths (or, here, bytes) are loaded like
  ``transformers.image_utils.load_image``: EXIF orientation is applied and the image is
  converted with ``Image.convert("RGB")``, which *drops* alpha without compositing.

Deliberate deviations from the reference (inputs the reference mishandles are rejected
or interpreted unambiguously instead):

* numpy arrays must be channels-last ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or
  ``[H, W, 4]``; the reference guesses channels-first when ``H`` is 1, 3 or 4.
* ``[H, W]`` grayscale arrays are accepted (the reference raises); they are treated as
  ``[H, W, 1]``.
* float arrays are rejected: the reference rescales float images in [0, 1] twice.
* ``str`` is only a file path (no URLs, no base64).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import Union

import numpy as np
import PIL.Image
import PIL.ImageOps

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_PIXELS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ImageLike",
    "num_image_tokens",
    "preprocess_images",
    "smart_resize",
]

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

#: ``Qwen2VLImageProcessorPil`` default ``size["shortest_edge"]`` (min_pixels).
DEFAULT_MIN_PIXELS: int = 56 * 56
#: ``Qwen2VLImageProcessorPil`` default ``size["longest_edge"]`` (max_pixels) = 28*28*1280.
DEFAULT_MAX_PIXELS: int = 14 * 14 * 4 * 1280

_MAX_ASPECT_RATIO = 200
_RESCALE_FACTOR = 1 / 255  # transformers' default ``rescale_factor``

ImageLike = Union[PIL.Image.Image, np.ndarray, bytes, bytearray, memoryview, str, os.PathLike]


# --------------------------------------------------------------------------- sizes


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = 28,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """Target ``(height, width)`` for an image of size ``height x width``.

    Same rule as transformers' Qwen2-VL ``smart_resize``: round each side to a
    multiple of ``factor``; if the area then exceeds ``max_pixels`` scale down (floor),
    if it is below ``min_pixels`` scale up (ceil), keeping the aspect ratio as well
    as possible.

    Args:
        height: input image height in pixels (> 0).
        width: input image width in pixels (> 0).
        factor: both outputs are multiples of this (``patch_size * merge_size``).
        min_pixels: lower bound on the output area.
        max_pixels: upper bound on the output area.

    Returns:
        ``(resized_height, resized_width)``, both positive multiples of ``factor``.

    Raises:
        ValueError: a non-positive side, or aspect ratio ``max/min > 200``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    ratio = max(height, width) / min(height, width)
    if ratio > _MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be at most {_MAX_ASPECT_RATIO}, got {ratio} "
            f"(height={height}, width={width})"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def num_image_tokens(image_grid_thw: np.ndarray, merge_size: int = 2) -> np.ndarray:
    """Number of ``<|image_pad|>`` tokens each image occupies in the LLM sequence.

    Args:
        image_grid_thw: int array ``[n_images, 3]`` of ``(t, h, w)`` patch-grid sizes,
            as returned by :func:`preprocess_images`.
        merge_size: spatial merge size of the vision tower (2 for Qwen2-VL).

    Returns:
        int64 array ``[n_images]`` with ``t * h * w // merge_size**2``.

    Raises:
        ValueError: wrong shape, or ``h``/``w`` not divisible by ``merge_size``.
    """
    grid = np.asarray(image_grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"image_grid_thw must have shape [n_images, 3], got {grid.shape}")
    if not np.issubdtype(grid.dtype, np.integer):
        raise ValueError(f"image_grid_thw must be integer, got dtype {grid.dtype}")
    grid = grid.astype(np.int64)
    if np.any(grid < 0):
        raise ValueError(f"image_grid_thw must be non-negative, got {grid.tolist()}")
    if np.any(grid[:, 1:] % merge_size):
        raise ValueError(
            f"grid h and w must be multiples of merge_size={merge_size}, got {grid.tolist()}"
        )
    return grid.prod(axis=1) // (merge_size * merge_size)


# ---------------------------------------------------------------- decode / to RGB


def _describe(image: object) -> str:
    """`` (path)`` suffix for error messages when the image's file is known, else ``""``."""
    if isinstance(image, (str, os.PathLike)):
        return f" ({os.fspath(image)})"
    fn = getattr(image, "filename", None)
    return f" ({fn})" if fn else ""


def _pil_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """``transformers.image_transforms.convert_to_rgb`` for PIL: alpha onto white."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_rgb(arr: np.ndarray, index: int) -> np.ndarray:
    """Channels-last integer array ``[H, W]`` / ``[H, W, C in {1,3,4}]`` -> uint8 ``[H, W, 3]``."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(
            f"image {index}: numpy image must have shape [H, W] or [H, W, C], got shape {arr.shape}"
        )
    if arr.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"image {index}: numpy image must be channels-last with 1, 3 or 4 channels, "
            f"got shape {arr.shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image {index}: image is empty (shape {arr.shape})")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"image {index}: numpy image must have an integer dtype with values in [0, 255] "
            f"(e.g. uint8), got dtype {arr.dtype}; convert float images with "
            f"np.round(x * 255).astype(np.uint8)"
        )
    if arr.dtype != np.uint8:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"image {index}: pixel values must be in [0, 255], got [{lo}, {hi}]")
    channels = arr.shape[-1]
    if channels == 1:
        rgb = np.repeat(arr, 3, axis=-1)
    elif channels == 4:
        # Same float64 expression (and operand order) as transformers' convert_to_rgb.
        alpha = arr[..., 3:4] / 255
        composite = alpha * arr[..., :3] + (1 - alpha) * 255
        rgb = np.round(composite)
    else:
        rgb = arr
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def _load_encoded(source: bytes | str | os.PathLike, index: int) -> PIL.Image.Image:
    """Decode a file path or encoded bytes like ``transformers.image_utils.load_image``."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        where = ""
        fp: object = io.BytesIO(bytes(source))
        if len(source) == 0:
            raise ValueError(f"image {index}: empty bytes")
    else:
        path = os.fspath(source)
        where = f" ({path})"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image {index}: no such image file: {path}")
        fp = path
    try:
        with PIL.Image.open(fp) as im:
            im.load()
            im = PIL.ImageOps.exif_transpose(im)
            return im.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, DecompressionBombError, ...
        raise ValueError(
            f"image {index}{where}: cannot decode image: {type(e).__name__}: {e}"
        ) from e


def _to_rgb_image(image: ImageLike, index: int) -> PIL.Image.Image:
    """Any supported input -> RGB ``PIL.Image`` (uint8), converted as the reference does."""
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image {index}{_describe(image)}: image is empty (size {image.size})")
        try:
            return _pil_to_rgb(image)
        except Exception as e:  # lazily decoded, truncated/corrupt file
            raise ValueError(
                f"image {index}{_describe(image)}: cannot decode image: {type(e).__name__}: {e}"
            ) from e
    if isinstance(image, np.ndarray):
        return PIL.Image.fromarray(_array_to_rgb(image, index))
    if isinstance(image, (bytes, bytearray, memoryview, str, os.PathLike)):
        rgb = _load_encoded(image, index)
        if rgb.width == 0 or rgb.height == 0:
            raise ValueError(f"image {index}: image is empty (size {rgb.size})")
        return rgb
    raise TypeError(
        f"image {index}: unsupported image type {type(image).__name__}; expected PIL.Image.Image, "
        f"numpy array, bytes or a file path"
    )


# ------------------------------------------------------------- normalise/patchify


def _normalize_lut(image_mean: Sequence[float], image_std: Sequence[float]) -> np.ndarray:
    """float32 ``[256, 3]``: ``lut[v, c]`` is the normalised value of uint8 ``v`` in channel ``c``.

    Computed with exactly the reference's dtypes: rescale in float64 then cast to float32,
    then ``(x - mean) / std`` in float32.
    """
    scaled = (np.arange(256, dtype=np.float64) * _RESCALE_FACTOR).astype(np.float32)
    mean = np.asarray(image_mean, dtype=np.float32)
    std = np.asarray(image_std, dtype=np.float32)
    return (scaled[:, None] - mean) / std


_LUT = _normalize_lut(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
_CHANNELS = np.arange(3)


def _patchify(
    image: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int
) -> np.ndarray:
    """float32 ``[h, w, C]`` -> ``[(h/p)*(w/p), C*T*p*p]`` in the reference's merge-block order.

    Row order: (merge-block row, merge-block col, row inside block, col inside block);
    column order: (channel, temporal copy, patch row, patch col).
    """
    h, w, c = image.shape
    gh, gw = h // patch_size, w // patch_size
    m = merge_size
    x = image.reshape(gh // m, m, patch_size, gw // m, m, patch_size, c)
    # -> (gh/m, gw/m, m, m, C, p, p)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, *x.shape[5:]))
    return x.reshape(gh * gw, c * temporal_patch_size * patch_size * patch_size)


def _check_fixed_size(fixed_size: object, factor: int) -> tuple[int, int]:
    ok = (
        isinstance(fixed_size, (tuple, list))
        and len(fixed_size) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in fixed_size)
        and all(v > 0 and v % factor == 0 for v in fixed_size)
    )
    if not ok:
        raise ValueError(
            f"fixed_size must be a (height, width) pair of positive multiples of "
            f"patch_size*merge_size={factor}, got {fixed_size!r}"
        )
    return int(fixed_size[0]), int(fixed_size[1])


def preprocess_images(
    images: ImageLike | Sequence[ImageLike],
    *,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    fixed_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Turn images into Qwen2-VL vision-tower inputs (equal to ``Qwen2VLImageProcessorPil``).

    Args:
        images: one image or a list/tuple of images. Each image is a ``PIL.Image.Image``
            (any mode PIL can convert to RGB: RGB, L, RGBA, P, LA, ...), an integer numpy
            array (values in [0, 255]) of shape ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or
            ``[H, W, 4]``, encoded image ``bytes``, or a file path (``str``/``os.PathLike``).
        min_pixels: minimum resized area (processor ``size["shortest_edge"]``).
        max_pixels: maximum resized area (processor ``size["longest_edge"]``).
        patch_size: ViT patch side ``p``.
        temporal_patch_size: ``T``; each still image is repeated ``T`` times in time.
        merge_size: spatial merge ``m``; resized sides are multiples of ``p * m``.
        fixed_size: if given, ``(H, W)`` with both multiples of ``p * m``: every image is
            resized to exactly ``H x W`` (aspect ratio not kept, min/max_pixels ignored)
            so that batches have static shapes.

    Returns:
        ``(pixel_values, image_grid_thw)`` where ``pixel_values`` is float32
        ``[N, 3 * T * p * p]`` (``[N, 1176]`` by default) with
        ``N = sum_i h_i * w_i`` over images, rows grouped image by image, and
        ``image_grid_thw`` is int64 ``[n_images, 3]`` of ``(1, h_i, w_i)`` = grid
        of patches (``h_i = resized_height_i / p``).

    Raises:
        ValueError: no images; empty image; bad array shape/dtype; corrupt or
            undecodable image (message names the image index and path if known);
            aspect ratio > 200; bad ``fixed_size``.
        FileNotFoundError: a path that is not a file.
        TypeError: unsupported input type.
    """
    factor = patch_size * merge_size
    target = _check_fixed_size(fixed_size, factor) if fixed_size is not None else None
    if isinstance(images, (list, tuple)):
        image_list = list(images)
    else:
        image_list = [images]
    if not image_list:
        raise ValueError("preprocess_images needs at least one image, got an empty list")

    all_patches: list[np.ndarray] = []
    grids: list[list[int]] = []
    for index, image in enumerate(image_list):
        rgb = _to_rgb_image(image, index)
        width, height = rgb.size
        if target is None:
            try:
                new_h, new_w = smart_resize(
                    height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels
                )
            except ValueError as e:
                raise ValueError(f"image {index}{_describe(image)}: {e}") from e
        else:
            new_h, new_w = target
        resized = rgb.resize((new_w, new_h), resample=PIL.Image.Resampling.BICUBIC)
        pixels = np.asarray(resized, dtype=np.uint8)  # [new_h, new_w, 3]
        normalized = _LUT[pixels, _CHANNELS]  # float32 [new_h, new_w, 3]
        all_patches.append(_patchify(normalized, patch_size, merge_size, temporal_patch_size))
        grids.append([1, new_h // patch_size, new_w // patch_size])

    pixel_values = np.concatenate(all_patches, axis=0)
    image_grid_thw = np.asarray(grids, dtype=np.int64)
    return pixel_values, image_grid_thw
