"""butd.images: every mode to the BGR values built independently with numpy, EXIF, errors.

Expected arrays are computed from the known pixel values with numpy (never by calling the code
under test's Pillow conversions); JPEG decoding is compared with ``cv2.imdecode``, the decoder
of the original Caffe pipeline.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageOps

from butd.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    NotAnImageError,
    TooManyPixelsError,
    TruncatedImageError,
    decode_image,
    probe_image,
)

REPO = Path(__file__).resolve().parents[2]


def _encode(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _rgb(h: int = 5, w: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _gray3(values: np.ndarray) -> np.ndarray:
    return np.stack([values] * 3, axis=-1).astype(np.uint8)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose IHDR declares w x h RGB but whose IDAT holds 10 bytes: a bomb's header."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + _png_chunk(b"IEND", b"")
    )


# --- modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_rgb_lossless_formats_give_bgr(fmt: str) -> None:
    rgb = _rgb()
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(_encode(Image.fromarray(rgb), fmt, **kwargs))
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb[:, :, ::-1])


def test_grayscale_is_replicated() -> None:
    gray = _rgb()[:, :, 0]
    out = decode_image(_encode(Image.fromarray(gray, "L"), "PNG"))
    np.testing.assert_array_equal(out, _gray3(gray))


def test_one_bit_is_0_or_255() -> None:
    bits = _rgb()[:, :, 0] > 127
    out = decode_image(_encode(Image.fromarray(bits), "PNG"))
    assert Image.open(io.BytesIO(_encode(Image.fromarray(bits), "PNG"))).mode == "1"
    np.testing.assert_array_equal(out, _gray3(np.where(bits, 255, 0)))


def _palette_image(seed: int = 1) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (6, 9), dtype=np.uint8)
    im = Image.fromarray(index, "P")
    im.putpalette(palette.tobytes())
    return im, palette, index


def test_palette_goes_through_the_palette() -> None:
    im, palette, index = _palette_image()
    out = decode_image(_encode(im, "PNG"))
    np.testing.assert_array_equal(out, palette[index][:, :, ::-1])


def test_palette_single_transparent_index_becomes_black() -> None:
    im, palette, index = _palette_image()
    transparent = int(index[0, 0])
    out = decode_image(_encode(im, "PNG", transparency=transparent))
    expected = palette[index].copy()
    expected[index == transparent] = 0
    np.testing.assert_array_equal(out, expected[:, :, ::-1])


def test_palette_alpha_table_is_alpha_multiplied() -> None:
    im, palette, index = _palette_image()
    alpha = np.random.default_rng(2).integers(0, 256, 16, dtype=np.uint8)
    out = decode_image(_encode(im, "PNG", transparency=alpha.tobytes()))
    colour = palette[index].astype(np.float64)
    expected = np.round(colour * alpha[index][:, :, None] / 255.0)
    np.testing.assert_array_equal(out, expected[:, :, ::-1].astype(np.uint8))


def test_rgba_is_composited_on_black() -> None:
    rgba = np.random.default_rng(3).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255  # fully transparent, fully opaque
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    expected = np.round(rgba[:, :, :3] * (rgba[:, :, 3:] / 255.0)).astype(np.uint8)
    np.testing.assert_array_equal(out, expected[:, :, ::-1])
    np.testing.assert_array_equal(out[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(out[0, 1], rgba[0, 1, 2::-1])


def test_la_is_composited_on_black() -> None:
    la = np.random.default_rng(4).integers(0, 256, (5, 7, 2), dtype=np.uint8)
    out = decode_image(_encode(Image.fromarray(la, "LA"), "PNG"))
    expected = np.round(la[:, :, 0] * (la[:, :, 1] / 255.0))
    np.testing.assert_array_equal(out, _gray3(expected))


def _cmyk_expected(cmyk: np.ndarray) -> np.ndarray:
    """RGB = (255 - C)(255 - K) / 255, the subtractive model Pillow documents."""
    c = cmyk.astype(np.float64)
    rgb = (255.0 - c[..., :3]) * (255.0 - c[..., 3:]) / 255.0
    return np.round(rgb)


def test_cmyk_tiff() -> None:
    cmyk = np.random.default_rng(5).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    out = decode_image(_encode(Image.fromarray(cmyk, "CMYK"), "TIFF"))
    expected = _cmyk_expected(cmyk)[:, :, ::-1]
    # Pillow rounds with integer arithmetic: within 1 of the exact value.
    assert np.abs(out.astype(np.float64) - expected).max() <= 1


@pytest.mark.parametrize("cmyk", [(100, 50, 20, 80), (0, 0, 0, 0), (255, 10, 128, 3)])
def test_cmyk_jpeg_flat_colour(cmyk: tuple[int, int, int, int]) -> None:
    flat = np.full((16, 16, 4), cmyk, dtype=np.uint8)
    data = _encode(Image.fromarray(flat, "CMYK"), "JPEG", quality=100)
    out = decode_image(data)
    expected = _cmyk_expected(np.array(cmyk))[::-1]
    # Flat 8x8 blocks survive JPEG up to rounding: measured <= 1; allow 2.
    assert np.abs(out.astype(np.float64) - expected).max() <= 2


def test_sixteen_bit_gray_keeps_the_high_byte() -> None:
    values = np.array([[0, 255, 256, 511], [32768, 65280, 65535, 1000]], dtype=np.uint16)
    data = _encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    np.testing.assert_array_equal(decode_image(data), _gray3(values // 256))


def test_thirty_two_bit_int_is_clipped_then_shifted() -> None:
    values = np.array([[-5, 0, 255, 256], [70000, 65535, 4096, 2**31 - 1]], dtype=np.int32)
    data = _encode(Image.fromarray(values), "TIFF")
    expected = np.clip(values.astype(np.int64), 0, 65535) // 256
    np.testing.assert_array_equal(decode_image(data), _gray3(expected))


def test_float_follows_pillow_0_255_rule() -> None:
    values = np.array([[-3.0, 0.4, 0.6, 127.5], [254.6, 300.0, np.nan, 12.2]], dtype=np.float32)
    data = _encode(Image.fromarray(values), "TIFF")
    expected = np.clip(np.round(np.nan_to_num(values, nan=0.0)), 0, 255)
    np.testing.assert_array_equal(decode_image(data), _gray3(expected))


def test_multi_frame_gif_gives_first_frame() -> None:
    im0, palette, index = _palette_image(6)
    im1, _, _ = _palette_image(7)
    data = _encode(im0, "GIF", save_all=True, append_images=[im1])
    np.testing.assert_array_equal(decode_image(data), palette[index][:, :, ::-1])


# --- EXIF orientation ----------------------------------------------------------------------

# EXIF 2.32 Orientation: what to do to the stored pixels to display them upright.
_EXIF_SPEC = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirror horizontally
    3: lambda a: np.rot90(a, 2),  # rotate 180
    4: lambda a: a[::-1],  # mirror vertically
    5: lambda a: np.rot90(a[:, ::-1], 1),  # mirror horizontally, rotate 90 CCW
    6: lambda a: np.rot90(a, -1),  # rotate 90 CW
    7: lambda a: np.rot90(a[:, ::-1], -1),  # mirror horizontally, rotate 90 CW
    8: lambda a: np.rot90(a, 1),  # rotate 90 CCW
}


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_exif_orientation(orientation: int, fmt: str) -> None:
    stored = _rgb(4, 6, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(stored), fmt, exif=exif.tobytes())
    out = decode_image(data)
    expected = _EXIF_SPEC[orientation](stored)
    np.testing.assert_array_equal(out, expected[:, :, ::-1])
    pillow = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    np.testing.assert_array_equal(out, pillow[:, :, ::-1])
    assert probe_image(data) == (out.shape[1], out.shape[0])


def test_exif_orientation_in_jpeg_swaps_probe_size() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(_rgb(16, 32)), "JPEG", exif=exif.tobytes())
    assert probe_image(data) == (16, 32)
    assert decode_image(data).shape == (32, 16, 3)


# --- JPEG versus OpenCV --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
@pytest.mark.parametrize("subsampling", [0, 2])
def test_jpeg_matches_cv2_imdecode(name: str, subsampling: int) -> None:
    rgb = getattr(skimage.data, name)()
    data = _encode(Image.fromarray(rgb), "JPEG", quality=90, subsampling=subsampling)
    ours = decode_image(data).astype(np.int16)
    ref = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).astype(np.int16)
    assert ours.shape == ref.shape
    # Both wheels bundle libjpeg-turbo (islow IDCT, fancy upsampling). Measured: identical
    # (max 0) with Pillow 13.0 / OpenCV 5.0 on these images; tolerance 1 level, 0.1 % of values.
    diff = np.abs(ours - ref)
    assert diff.max() <= 1
    assert (diff > 0).mean() <= 1e-3


# --- errors --------------------------------------------------------------------------------


def test_empty_bytes() -> None:
    with pytest.raises(NotAnImageError, match="empty"):
        decode_image(b"")
    with pytest.raises(NotAnImageError, match="empty"):
        probe_image(b"")


def test_text_file_is_not_an_image() -> None:
    data = b"id,caption\n1,a cat on a mat\n"
    with pytest.raises(NotAnImageError, match=r"28 bytes.*cannot identify image file$") as info:
        decode_image(data)
    assert "69 64 2c" in str(info.value)  # the leading bytes are shown
    assert isinstance(info.value, ValueError)


def test_random_bytes_are_not_an_image() -> None:
    data = np.random.default_rng(8).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(NotAnImageError):
        decode_image(data)


def test_truncated_jpeg() -> None:
    data = _encode(Image.fromarray(skimage.data.coffee()), "JPEG")
    assert probe_image(data[: len(data) // 2]) == (600, 400)  # the header is intact
    with pytest.raises(TruncatedImageError, match=r"JPEG.*600x400.*truncated"):
        decode_image(data[: len(data) // 2])


def test_truncated_header() -> None:
    data = _encode(Image.fromarray(_rgb()), "PNG")
    with pytest.raises(TruncatedImageError, match="20 bytes"):
        decode_image(data[:20])


def test_corrupt_png_stream() -> None:
    data = bytearray(_encode(Image.fromarray(_rgb(64, 64)), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start + 2 : start + 40] = bytes(range(38))  # scramble the deflate stream
    with pytest.raises(TruncatedImageError, match="PNG"):
        decode_image(bytes(data))


def test_errors_share_a_value_error_base() -> None:
    for cls in (NotAnImageError, TruncatedImageError, TooManyPixelsError):
        assert issubclass(cls, ImageError) and issubclass(cls, ValueError)


def test_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="bytes"):
        decode_image("not bytes")  # type: ignore[arg-type]


# --- pixel limit ---------------------------------------------------------------------------


def test_bomb_header_is_refused_before_allocation() -> None:
    data = _png_header_only(100_000, 100_000)  # 30 GB decoded; the file is 70 bytes
    limit_before = Image.MAX_IMAGE_PIXELS
    for fn in (probe_image, decode_image):
        with pytest.raises(TooManyPixelsError) as info:
            fn(data)
        message = str(info.value)
        assert "100000x100000" in message and "10000000000" in message
        assert str(DEFAULT_MAX_PIXELS) in message.replace("10000000000", "")
    assert limit_before == Image.MAX_IMAGE_PIXELS


def test_our_limit_decides_above_pillows() -> None:
    # 1e10 pixels is past Pillow's own hard limit (2 * MAX_IMAGE_PIXELS); a caller who allows
    # it gets the header read anyway: the configured limit is the one applied.
    assert probe_image(_png_header_only(100_000, 100_000), max_pixels=10**11) == (100_000, 100_000)


def test_pillows_warning_range_is_silent() -> None:
    # 90 MP: above Pillow's warning (89 MP), below the limit given
    data = _png_header_only(10_000, 9_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert probe_image(data, max_pixels=100_000_000) == (10_000, 9_000)


def test_limit_boundary() -> None:
    data = _encode(Image.fromarray(_rgb(5, 7)), "PNG")
    assert decode_image(data, max_pixels=35).shape == (5, 7, 3)
    with pytest.raises(TooManyPixelsError, match=r"7x5 = 35 pixels.*limit of 34"):
        decode_image(data, max_pixels=34)
    with pytest.raises(TooManyPixelsError):
        probe_image(data, max_pixels=34)


# --- packaging -----------------------------------------------------------------------------


def test_module_is_torch_free() -> None:
    code = "import sys, butd.images; sys.exit('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False)
    assert result.returncode == 0
