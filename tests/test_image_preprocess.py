"""mr1jax.data.vision against transformers' Qwen2VLImageProcessorPil (the reference)."""

from __future__ import annotations

import io
import pathlib

import numpy as np
import PIL.Image
import pytest
from transformers import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from mr1jax.data import vision
from mr1jax.data.vision import num_image_tokens, preprocess_images, smart_resize

MIN_PX = 28 * 28 * 4  # small limits keep the reference fast
MAX_PX = 28 * 28 * 24
MODES = ("RGB", "L", "RGBA", "P", "LA")


def _reference(images, **kwargs):
    out = Qwen2VLImageProcessorPil(**kwargs)(images)
    return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])


def _assert_same(ours, ref):
    (pv, grid), (ref_pv, ref_grid) = ours, ref
    assert grid.dtype == np.int64 and grid.shape == ref_grid.shape
    np.testing.assert_array_equal(grid, ref_grid)
    assert pv.dtype == np.float32 and pv.shape == ref_pv.shape
    # Bit-exact in practice; the brief's tolerance is atol=1e-5.
    np.testing.assert_allclose(pv, ref_pv, rtol=0, atol=1e-5)
    assert np.array_equal(pv, ref_pv), f"max abs diff {np.abs(pv - ref_pv).max()}"


def _random_pil(rng: np.random.Generator, height: int, width: int, mode: str) -> PIL.Image.Image:
    rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    # Smooth-ish content plus noise so that bicubic resampling does real work.
    yy, xx = np.mgrid[0:height, 0:width]
    rgba[..., 0] = (rgba[..., 0] // 4 + (yy * 7 + xx * 3) % 192).astype(np.uint8)
    img = PIL.Image.fromarray(rgba, "RGBA")
    if mode == "P":
        img = img.convert("RGB").quantize(colors=32)
    elif mode != "RGBA":
        img = img.convert(mode)
    assert img.mode == mode
    return img


# ----------------------------------------------------------------- smart_resize


def test_smart_resize_matches_transformers_on_random_sizes():
    rng = np.random.default_rng(0)
    checked = {"up": 0, "down": 0, "round": 0}
    for _ in range(3000):
        kind = rng.integers(3)
        if kind == 0:
            h, w = rng.integers(1, 60, size=2)
        elif kind == 1:
            h, w = rng.integers(1, 4000, size=2)
        else:  # extreme but legal aspect ratios
            short = int(rng.integers(1, 40))
            h, w = short, int(short * rng.uniform(1, 200))
            if rng.random() < 0.5:
                h, w = w, h
        h, w = int(h), int(w)
        factor = int(rng.choice([14, 28, 32]))
        min_px = int(rng.integers(1, 64)) * factor * factor
        max_px = min_px + int(rng.integers(0, 2000)) * factor * factor
        if max(h, w) / min(h, w) > 200:
            for fn in (smart_resize, hf_smart_resize):
                with pytest.raises(ValueError):
                    fn(h, w, factor=factor, min_pixels=min_px, max_pixels=max_px)
            checked["ratio"] = checked.get("ratio", 0) + 1
            continue
        ours = smart_resize(h, w, factor=factor, min_pixels=min_px, max_pixels=max_px)
        ref = hf_smart_resize(h, w, factor=factor, min_pixels=min_px, max_pixels=max_px)
        assert ours == ref, (h, w, factor, min_px, max_px)
        assert ours[0] % factor == 0 and ours[1] % factor == 0
        rh, rw = round(h / factor) * factor, round(w / factor) * factor
        checked["up" if rh * rw < min_px else "down" if rh * rw > max_px else "round"] += 1
    assert min(checked["up"], checked["down"], checked["round"]) > 100, checked  # every branch
    assert checked.get("ratio", 0) > 0, checked
    # Defaults equal the processor's and transformers' defaults.
    for h, w in [(10, 10), (480, 640), (3000, 4000), (1, 150)]:
        assert smart_resize(h, w) == hf_smart_resize(h, w)
    proc = Qwen2VLImageProcessorPil()
    assert (vision.DEFAULT_MIN_PIXELS, vision.DEFAULT_MAX_PIXELS) == (
        proc.size.shortest_edge,
        proc.size.longest_edge,
    )


def test_smart_resize_aspect_ratio_limit():
    assert smart_resize(1, 200) == hf_smart_resize(1, 200)
    with pytest.raises(ValueError, match=r"aspect ratio.*201"):
        smart_resize(1, 201)
    with pytest.raises(ValueError, match=r"300.*height=3, width=900"):
        smart_resize(3, 900)
    with pytest.raises(ValueError):
        hf_smart_resize(3, 900)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10)


# ------------------------------------------------------------ reference parity


def test_random_pil_images_match_reference():
    rng = np.random.default_rng(1)
    seen = {"up": 0, "down": 0}
    for _call in range(6):
        images = []
        for _ in range(int(rng.integers(2, 5))):
            kind = rng.integers(4)
            if kind == 0:  # tiny: must be upscaled to min_pixels
                h, w = rng.integers(1, 12, size=2)
            elif kind == 1:  # tall or wide
                h, w = int(rng.integers(6, 20)), int(rng.integers(100, 400))
                if rng.random() < 0.5:
                    h, w = w, h
            elif kind == 2:  # large: must be downscaled under max_pixels
                h, w = rng.integers(150, 420, size=2)
            else:
                h, w = rng.integers(20, 120, size=2)
            h, w = int(h), int(w)
            images.append(_random_pil(rng, h, w, str(rng.choice(MODES))))
            rh, rw = round(h / 28) * 28, round(w / 28) * 28
            seen["up"] += rh * rw < MIN_PX
            seen["down"] += rh * rw > MAX_PX
        ours = preprocess_images(images, min_pixels=MIN_PX, max_pixels=MAX_PX)
        _assert_same(ours, _reference(images, min_pixels=MIN_PX, max_pixels=MAX_PX))
        grid = ours[1]
        assert np.all(grid[:, 1] * grid[:, 2] * 14 * 14 >= MIN_PX)
        assert np.all(grid[:, 1] * grid[:, 2] * 14 * 14 <= MAX_PX)
        assert ours[0].shape == (int(grid.prod(axis=1).sum()), 1176)
    assert seen["up"] >= 2 and seen["down"] >= 2, seen


def test_all_modes_and_transparency_match_reference():
    rng = np.random.default_rng(2)
    images = [_random_pil(rng, 33, 47, m) for m in MODES]
    images += [_random_pil(rng, 29, 31, "RGB").convert(m) for m in ("1", "CMYK", "I", "F", "RGBX")]
    pal = _random_pil(rng, 40, 40, "P")
    pal.info["transparency"] = 3  # palette transparency -> composited onto white
    lt = _random_pil(rng, 30, 50, "L")
    lt.info["transparency"] = 0
    images += [pal, lt]
    _assert_same(
        preprocess_images(images, min_pixels=MIN_PX, max_pixels=MAX_PX),
        _reference(images, min_pixels=MIN_PX, max_pixels=MAX_PX),
    )


def test_transparent_pixels_become_white():
    img = PIL.Image.fromarray(np.zeros((56, 56, 4), np.uint8), "RGBA")  # black, fully transparent
    pv, _ = preprocess_images(img)
    white = (1.0 - np.array(vision.OPENAI_CLIP_MEAN)) / np.array(vision.OPENAI_CLIP_STD)
    per_channel = pv.reshape(-1, 3, 2 * 14 * 14)
    np.testing.assert_allclose(per_channel, np.broadcast_to(white[None, :, None], per_channel.shape), atol=1e-5)


def test_numpy_inputs_match_reference():
    rng = np.random.default_rng(3)
    arrays = [
        rng.integers(0, 256, (37, 53, 3), dtype=np.uint8),
        rng.integers(0, 256, (61, 29, 4), dtype=np.uint8),  # composited onto white in float64
        rng.integers(0, 256, (45, 45, 1), dtype=np.uint8),
        rng.integers(0, 256, (250, 300, 3), dtype=np.uint8),
        rng.integers(0, 256, (9, 700, 3), dtype=np.uint8),
        rng.integers(0, 256, (40, 50, 3)).astype(np.int64),  # integer dtype != uint8
    ]
    _assert_same(
        preprocess_images(arrays, min_pixels=MIN_PX, max_pixels=MAX_PX),
        _reference(arrays, min_pixels=MIN_PX, max_pixels=MAX_PX),
    )
    # [H, W] grayscale (the reference needs [H, W, 1]) equals the 1-channel and PIL "L" forms.
    gray = rng.integers(0, 256, (43, 77), dtype=np.uint8)
    ours = preprocess_images(gray, min_pixels=MIN_PX, max_pixels=MAX_PX)
    _assert_same(ours, _reference([gray[..., None]], min_pixels=MIN_PX, max_pixels=MAX_PX))
    _assert_same(ours, _reference([PIL.Image.fromarray(gray, "L")], min_pixels=MIN_PX, max_pixels=MAX_PX))


def test_default_settings_match_reference():
    rng = np.random.default_rng(4)
    images = [_random_pil(rng, 300, 500, "RGB"), _random_pil(rng, 5, 8, "RGBA")]
    _assert_same(preprocess_images(images), _reference(images))
    _assert_same(preprocess_images(images[0]), _reference(images[0]))  # single image, not a list


def test_paths_and_bytes_match_reference(tmp_path: pathlib.Path):
    rng = np.random.default_rng(5)
    rgba = _random_pil(rng, 70, 45, "RGBA")
    png = tmp_path / "a.png"
    rgba.save(png)
    # JPEG with EXIF orientation 6 (rotate 90): the reference applies exif_transpose.
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    jpg = tmp_path / "b.jpg"
    _random_pil(rng, 40, 90, "RGB").save(jpg, exif=exif, quality=90)

    ours = preprocess_images([str(png), jpg], min_pixels=MIN_PX, max_pixels=MAX_PX)
    _assert_same(ours, _reference([str(png), str(jpg)], min_pixels=MIN_PX, max_pixels=MAX_PX))
    assert ours[1][1, 1] > ours[1][1, 2]  # rotated: taller than wide
    from_bytes = preprocess_images([png.read_bytes(), jpg.read_bytes()], min_pixels=MIN_PX, max_pixels=MAX_PX)
    _assert_same(from_bytes, ours)
    # Loaded files drop alpha (Image.convert("RGB")), in-memory RGBA is composited: they differ.
    in_memory = preprocess_images(rgba, min_pixels=MIN_PX, max_pixels=MAX_PX)[0]
    assert not np.array_equal(in_memory, ours[0][: in_memory.shape[0]])


def test_patch_layout_is_merge_block_order():
    # Each 14x14 patch gets a distinct constant grey level; the rows of pixel_values must
    # visit patches in 2x2 merge-block order: (block row, block col, inner row, inner col).
    gh, gw = 4, 6
    levels = np.arange(gh * gw, dtype=np.uint8).reshape(gh, gw) * 10
    img = np.repeat(np.repeat(levels, 14, axis=0), 14, axis=1)
    pv, grid = preprocess_images(img, min_pixels=14 * 14, max_pixels=10**6)
    np.testing.assert_array_equal(grid, [[1, gh, gw]])
    expected = levels.reshape(gh // 2, 2, gw // 2, 2).transpose(0, 2, 1, 3).reshape(-1)
    lut = vision._LUT
    for row, level in zip(pv, expected):
        block = row.reshape(3, 2, 14, 14)
        for c in range(3):
            assert np.all(block[c] == lut[level, c])


# ------------------------------------------------------------------ fixed size


def test_fixed_size_shapes():
    rng = np.random.default_rng(6)
    images = [_random_pil(rng, h, w, m) for (h, w), m in zip([(5, 7), (300, 90), (64, 64), (1, 150)], MODES)]
    pv, grid = preprocess_images(images, fixed_size=(56, 112))
    np.testing.assert_array_equal(grid, [[1, 4, 8]] * 4)
    assert pv.shape == (4 * 4 * 8, 1176) and pv.dtype == np.float32
    assert np.all(np.isfinite(pv))
    np.testing.assert_array_equal(num_image_tokens(grid), [8] * 4)


def test_fixed_size_matches_reference():
    rng = np.random.default_rng(7)
    target = (84, 140)
    # Sizes that round to the target, so the reference's smart_resize lands on 84x140.
    images = [_random_pil(rng, 84 + int(dh), 140 + int(dw), "RGB") for dh, dw in rng.integers(-13, 14, (3, 2))]
    images.append(_random_pil(rng, *target, "RGBA"))  # already the target size
    for img in images:
        assert hf_smart_resize(img.height, img.width, min_pixels=MIN_PX, max_pixels=10**6) == target
    ours = preprocess_images(images, fixed_size=target)
    _assert_same(ours, _reference(images, min_pixels=MIN_PX, max_pixels=10**6))
    # And for an arbitrary image: identical to resizing first, then the dynamic pipeline.
    odd = _random_pil(rng, 333, 77, "P")
    pre = odd.convert("RGB").resize((target[1], target[0]), PIL.Image.Resampling.BICUBIC)
    _assert_same(preprocess_images(odd, fixed_size=target), preprocess_images(pre, min_pixels=MIN_PX, max_pixels=10**6))


@pytest.mark.parametrize("bad", [(30, 56), (56, 0), (56,), (56, 56, 56), (56.0, 56), "56x56", (True, 56), (-28, 56)])
def test_fixed_size_invalid(bad):
    img = np.zeros((30, 30, 3), np.uint8)
    with pytest.raises(ValueError, match=r"fixed_size.*28") as info:
        preprocess_images(img, fixed_size=bad)
    assert repr(bad) in str(info.value)


# ------------------------------------------------------------ num_image_tokens


def test_num_image_tokens():
    images = [np.zeros((56, 84, 3), np.uint8), np.zeros((300, 200, 3), np.uint8)]
    pv, grid = preprocess_images(images, min_pixels=MIN_PX, max_pixels=MAX_PX)
    tokens = num_image_tokens(grid)
    assert tokens.dtype == np.int64 and tokens.shape == (2,)
    np.testing.assert_array_equal(tokens, grid.prod(axis=1) // 4)
    assert tokens[0] == 6 and tokens.sum() * 4 == pv.shape[0]
    np.testing.assert_array_equal(num_image_tokens(np.array([[2, 6, 8]]), merge_size=2), [24])
    np.testing.assert_array_equal(num_image_tokens(np.array([[1, 6, 9]]), merge_size=3), [6])
    with pytest.raises(ValueError, match="shape"):
        num_image_tokens(np.array([1, 4, 4]))
    with pytest.raises(ValueError, match="merge_size"):
        num_image_tokens(np.array([[1, 4, 5]]))


# ---------------------------------------------------------------------- errors


def test_corrupt_file_names_index_and_path(tmp_path: pathlib.Path):
    good = np.zeros((30, 30, 3), np.uint8)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all")
    with pytest.raises(ValueError, match=r"image 1 \(.*garbage\.png\).*decode"):
        preprocess_images([good, str(garbage)])
    # Valid header, truncated pixel data: fails at decode time, still a ValueError.
    buf = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(8).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match=r"image 2 \(.*truncated\.png\)"):
        preprocess_images([good, good, truncated])
    # The same file opened lazily by the caller, passed as a PIL image.
    with PIL.Image.open(truncated) as lazy:
        with pytest.raises(ValueError, match=r"image 0 \(.*truncated\.png\)"):
            preprocess_images(lazy)
    with pytest.raises(ValueError, match=r"image 0.*decode"):
        preprocess_images(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match=r"image 0.*empty"):
        preprocess_images(b"")
    with pytest.raises(FileNotFoundError, match=r"image 1.*missing\.jpg"):
        preprocess_images([good, tmp_path / "missing.jpg"])


@pytest.mark.parametrize(
    ("image", "error", "pattern"),
    [
        (PIL.Image.new("RGB", (0, 5)), ValueError, "empty"),
        (np.zeros((0, 5, 3), np.uint8), ValueError, "empty"),
        (np.zeros((10,), np.uint8), ValueError, r"shape \[H, W\]"),
        (np.zeros((2, 10, 10, 3), np.uint8), ValueError, r"shape \[H, W\]"),
        (np.zeros((10, 10, 2), np.uint8), ValueError, "1, 3 or 4 channels"),
        (np.zeros((3, 10, 10), np.uint8), ValueError, "channels-last"),
        (np.zeros((10, 10, 3), np.float32), ValueError, "dtype float32"),
        (np.zeros((10, 10, 3), bool), ValueError, "dtype bool"),
        (np.full((10, 10, 3), 300, np.int32), ValueError, r"\[0, 255\], got \[300, 300\]"),
        (np.zeros((2, 500, 3), np.uint8), ValueError, "aspect ratio"),
        (12345, TypeError, "unsupported image type int"),
    ],
)
def test_bad_inputs_raise(image, error, pattern):
    good = np.zeros((30, 30, 3), np.uint8)
    with pytest.raises(error, match=pattern) as info:
        preprocess_images([good, image])
    assert "image 1" in str(info.value)


def test_empty_image_list_raises():
    with pytest.raises(ValueError, match="at least one image"):
        preprocess_images([])
