"""Image bytes to a BGR uint8 array, torch-free (numpy + Pillow): the gateway imports this.

Two entry points:

* ``probe_image(data)`` reads only the header and returns the (oriented) ``(w, h)``; it refuses
  an image above the pixel limit before a single pixel is decoded (decompression bombs).
* ``decode_image(data)`` returns ``(H, W, 3)`` uint8 **BGR**, C-contiguous, as ``cv2.imread``
  would, so the detector's Caffe preprocessing sees what it was trained on.

Conversions (each a fixed rule, never a per-image normalisation, so features stay reproducible):

* EXIF orientation 1..8 is applied with ``ImageOps.exif_transpose``'s table (EXIF, then the XMP
  ``tiff:Orientation`` fallback that ``Image.getexif`` reads).
* ``L`` and ``1`` (0 / 255) are replicated to three channels; ``P`` goes through its palette.
* Alpha (``LA``, ``PA``, ``RGBA``, ``P`` with a transparent index) is composited onto **black**:
  ``c' = round(c * a / 255)`` per channel (alpha-multiply), then alpha is dropped. A transparent
  pixel becomes black whatever colour it stored, matching premultiplied-alpha decoders.
* ``CMYK`` (Adobe-inverted JPEGs included) uses Pillow's ``R = (255 - C)(255 - K) / 255``.
* 16-bit grayscale (``I;16*``) is scaled to 8 bits by ``v >> 8`` (the high byte, as Pillow does
  for 16-bit RGB PNGs); 32-bit ``I`` is clipped to ``[0, 65535]`` first, then ``>> 8``.
  32-bit float ``F`` follows Pillow's ``F -> L`` rule: values are 0..255, rounded and clipped;
  NaN becomes 0.
* Multi-frame files (GIF, APNG, TIFF) give their first frame.

The pixel limit is ours (``max_pixels``), checked on the header size. Pillow's own
``MAX_IMAGE_PIXELS`` is never modified: its warning is silenced around ``Image.open`` and its
hard error (above twice its limit) is answered by re-reading the header without Pillow's check,
so the configured limit is the one that decides, above or below Pillow's. (The warning filter
is ``warnings.catch_warnings``, process-global before Python 3.14: a concurrent thread may, at
worst, also not see a DecompressionBombWarning during that call.)
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000
"""Default pixel limit: 50 MP (a 7071 x 7071 photo; decoded BGR is 150 MB, ~500 MB at the peak
of a decode). The one default of the gateway's and the workers' ``BUTD_MAX_PIXELS``."""

BGRImage = npt.NDArray[np.uint8]

_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})


class ImageError(ValueError):
    """An upload that cannot become a BGR array. Base of the errors below."""


class NotAnImageError(ImageError):
    """The bytes are not an image format Pillow recognises."""


class TruncatedImageError(ImageError):
    """The header is valid but the pixel data is truncated or corrupt."""


class TooManyPixelsError(ImageError):
    """The header declares more pixels than the configured limit."""


def probe_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Reads the header only: size after EXIF orientation, pixel limit checked.

    Args:
        data: the encoded file (bytes, bytearray or memoryview).
        max_pixels: refuse images with more than this many pixels (w * h).

    Returns:
        ``(w, h)`` of the image ``decode_image`` would return (axes swapped for EXIF
        orientations 5..8). An orientation stored after the pixel data (a PNG ``eXIf`` chunk
        after ``IDAT``) is not seen here; ``decode_image`` still applies it.

    Raises:
        NotAnImageError: unrecognised format.
        TooManyPixelsError: ``w * h > max_pixels``.
    """
    with _open(data, max_pixels) as im:
        w, h = _stored_size(im)
        orientation = _orientation(Image.Image.getexif(im))  # header-only EXIF, no load()
    return (h, w) if orientation in _SWAPS_AXES else (w, h)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> BGRImage:
    """Decodes an image file to BGR uint8, EXIF orientation applied.

    Args:
        data: the encoded file (bytes, bytearray or memoryview).
        max_pixels: refuse images with more than this many pixels (checked before decoding).

    Returns:
        (H, W, 3) uint8 BGR, C-contiguous.

    Raises:
        NotAnImageError: unrecognised format, or a mode with no RGB conversion.
        TruncatedImageError: truncated or corrupt pixel data.
        TooManyPixelsError: ``w * h > max_pixels``.
    """
    with _open(data, max_pixels) as im:
        _load(im)
        orientation = _orientation(im.getexif())
        rgb = _to_rgb(im)
    if orientation in _TRANSPOSE:
        rgb = _apply_orientation(rgb, orientation)
    return np.ascontiguousarray(rgb[:, :, ::-1])


def _open(data: bytes, max_pixels: int) -> ImageFile.ImageFile:
    """Identifies the format from the header and checks the pixel limit (no pixels decoded)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"image data must be bytes; got {type(data).__name__}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1; got {max_pixels}")
    raw = bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError:
        im = _open_without_pillow_limit(raw)
    except UnidentifiedImageError as e:
        raise NotAnImageError(_not_an_image_message(raw, e)) from e
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as e:
        raise TruncatedImageError(
            f"the image header is corrupt ({len(raw)} bytes): {type(e).__name__}: {e}"
        ) from e
    try:
        _check_pixels(im.size, max_pixels)
    except ImageError:
        im.close()
        raise
    return im


def _open_without_pillow_limit(raw: bytes) -> ImageFile.ImageFile:
    """Reads the header through the format plugins directly, skipping Pillow's bomb check.

    Only reached when ``Image.open`` refused the size itself, so the caller's ``max_pixels``
    (checked next) decides rather than ``Image.MAX_IMAGE_PIXELS``.
    """
    Image.init()
    prefix = raw[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        verdict = accept(prefix) if accept is not None else True
        if not verdict or isinstance(verdict, str):  # a str is Pillow's "maybe, but" warning
            continue
        try:
            return factory(io.BytesIO(raw), "")
        except (SyntaxError, IndexError, TypeError, struct.error, OSError):
            continue
    raise NotAnImageError(
        f"Pillow refused the image size but no format plugin reads its header ({len(raw)} bytes)"
    )


def _stored_size(im: ImageFile.ImageFile) -> tuple[int, int]:
    """``(w, h)`` as stored, before orientation.

    Pillow's TIFF plugin (11+) applies the orientation itself on load and already reports the
    oriented size; its IFD still holds the stored width and length.
    """
    tags = getattr(im, "tag_v2", None)
    if tags is not None and 256 in tags and 257 in tags:  # ImageWidth, ImageLength
        return int(tags[256]), int(tags[257])
    return im.size


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise TruncatedImageError(f"the header declares an empty image: {w}x{h}")
    if w * h > max_pixels:
        raise TooManyPixelsError(
            f"image has {w}x{h} = {w * h} pixels, more than the limit of {max_pixels} pixels"
        )


def _not_an_image_message(raw: bytes, error: Exception) -> str:
    if not raw:
        return "not a recognised image: the data is empty (0 bytes)"
    head = raw[:8].hex(" ")
    reason = str(error).split(" <", 1)[0]  # drop Pillow's "<_io.BytesIO object at 0x...>"
    return f"not a recognised image ({len(raw)} bytes, starting {head}): {reason}"


def _load(im: ImageFile.ImageFile) -> None:
    """Decodes the pixels, translating Pillow's errors (truncation stays an error)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
    except Image.DecompressionBombError as e:  # a frame or tile larger than the header said
        raise TooManyPixelsError(f"Pillow refused a frame or tile of the image: {e}") from e
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError) as e:
        raise TruncatedImageError(
            f"the {im.format} pixel data is truncated or corrupt "
            f"({im.size[0]}x{im.size[1]} declared): {type(e).__name__}: {e}"
        ) from e


def _orientation(exif: Image.Exif) -> int:
    """EXIF orientation 1..8; 1 when absent or invalid."""
    try:
        value = int(exif.get(ExifTags.Base.Orientation, 1))
    except (TypeError, ValueError):
        value = 1
    if value not in range(1, 9):
        logger.warning("ignoring invalid EXIF orientation %r", value)
        return 1
    return value


def _apply_orientation(rgb: npt.NDArray[np.uint8], orientation: int) -> npt.NDArray[np.uint8]:
    """Applies ``Image.transpose(_TRANSPOSE[orientation])`` to an (H, W, C) array."""
    if orientation == 2:
        return rgb[:, ::-1]
    if orientation == 3:
        return rgb[::-1, ::-1]
    if orientation == 4:
        return rgb[::-1]
    if orientation == 5:  # TRANSPOSE: swap axes
        return rgb.transpose(1, 0, 2)
    if orientation == 6:  # ROTATE_270: 90 degrees clockwise
        return np.rot90(rgb, k=-1)
    if orientation == 7:  # TRANSVERSE: swap axes across the anti-diagonal
        return rgb[::-1, ::-1].transpose(1, 0, 2)
    return np.rot90(rgb, k=1)  # 8, ROTATE_90: 90 degrees counter-clockwise


def _to_rgb(im: Image.Image) -> npt.NDArray[np.uint8]:
    """(H, W, 3) uint8 RGB of a loaded image in any mode (rules in the module docstring)."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        return _gray(_sixteen_to_eight(np.asarray(im)))
    if mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0)
        return _gray(np.clip(np.round(values), 0, 255).astype(np.uint8))
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif mode == "P":
        im = im.convert("RGB")
    if im.mode in _ALPHA_MODES:
        return _composite_on_black(im)
    try:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as e:
        raise NotAnImageError(f"image mode {mode!r} has no RGB conversion: {e}") from e


def _sixteen_to_eight(values: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """16-bit (or 32-bit int, clipped to 0..65535) gray to 8 bit by ``>> 8``."""
    wide = np.clip(values.astype(np.int64), 0, 65535)
    return (wide >> 8).astype(np.uint8)


def _gray(values: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    return np.repeat(values[:, :, None], 3, axis=2)


def _composite_on_black(im: Image.Image) -> npt.NDArray[np.uint8]:
    """(H, W, 3) RGB alpha-multiplied onto black: ``round(c * a / 255)``."""
    rgba = np.asarray(im.convert("RGBA"), dtype=np.uint8)
    colour = rgba[:, :, :3].astype(np.uint32)
    alpha = rgba[:, :, 3:].astype(np.uint32)
    # c * a / 255 is never exactly x.5 (255 is odd), so this is round-to-nearest.
    return ((colour * alpha + 127) // 255).astype(np.uint8)
