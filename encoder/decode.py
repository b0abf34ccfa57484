"""Defensive image decoding: whatever arrives either becomes an RGB image or is rejected with a reason.

Handled: EXIF orientation, palette (with or without transparency), CMYK, 16-bit and 32-bit integer and float
greyscale, alpha (composited on white), greyscale, animated images (first frame). Rejected with a clear reason:
empty input, too many bytes, not an image, truncated or corrupt data, and decompression bombs (more pixels than
the limit, checked from the header before any pixel is decoded).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lookalike.config import LIMITS
from lookalike.errors import InvalidArgument

MAX_IMAGE_BYTES = LIMITS.max_image_bytes
MAX_IMAGE_PIXELS = LIMITS.max_image_pixels


class ImageError(InvalidArgument):
    """An image that cannot be encoded, with the reason in the message."""


def require_all(reasons: list[str | None]) -> None:
    """Raises ImageError naming the first image that has a reason not to be encoded (reasons: one per image, None
    for the good ones)."""
    bad = next((i for i, r in enumerate(reasons) if r is not None), None)
    if bad is not None:
        raise ImageError(f"image {bad}: {reasons[bad]}")


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    """Decodes image bytes into an upright RGB image.

    Raises:
        ImageError: empty, too large, not an image, truncated or corrupt, or over ``max_pixels``.
    """
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError(f"the image is {len(data)} bytes; at most {max_bytes} bytes are accepted")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            if width * height > max_pixels:
                raise ImageError(f"the image is {width}x{height} = {width * height} pixels; at most {max_pixels} "
                                 "are decoded (a guard against decompression bombs)")
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)  # animated: the first frame
            im.load()
            im = ImageOps.exif_transpose(im) or im
            return _to_rgb(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("the data is not an image in a format this server reads") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"the image has too many pixels to decode safely (a guard against decompression bombs): "
                         f"{err}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(f"the image is truncated or corrupt: {err}") from None
    except Exception as err:  # noqa: BLE001 - Pillow's plugins raise others on corrupt input (a TIFF without
        # dimensions: TypeError); whatever the bytes make it raise is the bytes' fault
        raise ImageError(f"the image is truncated or corrupt: {type(err).__name__}: {err}") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        im = Image.fromarray(scaled.astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB")
