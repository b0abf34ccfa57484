"""The edits a catalog's near-duplicates go through, as seeded random augmentations for training the CNN.

Each augmentation is ``f(im, rng) -> im``: an RGB PIL image in, an RGB PIL image out, every random choice drawn
from the numpy ``rng`` (so a seed gives the same images, byte for byte). ``augment`` applies each with its
probability, in a fixed order: geometry first (crop, flip, rotation), then colour, then what is pasted on top
(overlays), then what a re-upload does (down- and up-scaling, JPEG).

- ``resized_crop``: a random part of the image (50-100% of the area, aspect x0.75-1.33), resized back (as
  torchvision's RandomResizedCrop, with a scale range for copies rather than for classification).
- ``hflip``: mirrored left to right.
- ``rotate``: up to 5 degrees, black, white or grey corners.
- ``colour``: hue shifted by up to half a turn either way (any hue), saturation x0-2, brightness x0.6-1.4,
  contrast x0.6-1.4 (as torchvision's ColorJitter), in a random order. Strong on purpose: a network that cannot
  tell photos apart by their colours learns their structure, which is what survives greyscale and colour edits of
  photos it never saw.
- ``greyscale``: luminance copied to R, G and B.
- ``overlay``: a watermark (large translucent text, straight or diagonal), a caption (small opaque text on a band
  or not) or a logo (a filled shape with a letter), pasted at a random place.
- ``rescale``: down to 25-60% and back up.
- ``jpeg``: recompressed at quality 20-95.

torchvision is not a dependency (and not installed here); these are PIL and numpy only.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

Augmentation = Callable[[Image.Image, np.random.Generator], Image.Image]


def resized_crop(im: Image.Image, rng: np.random.Generator, scale: tuple[float, float] = (0.5, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """A random crop of ``scale`` of the area and ``ratio`` times the image's aspect, resized to the image's size."""
    w, h = im.size
    area = rng.uniform(*scale) * w * h
    r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))) * w / h
    cw = int(round(min(w, max(8, np.sqrt(area * r)))))
    ch = int(round(min(h, max(8, np.sqrt(area / r)))))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return im.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BILINEAR)


def hflip(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Mirrored left to right (``rng`` unused: the choice is augment's)."""
    return ImageOps.mirror(im)


def rotate(im: Image.Image, rng: np.random.Generator, degrees: float = 5.0) -> Image.Image:
    """Up to ``degrees`` either way, on the same canvas: the corners black, white or grey."""
    fill = [(0, 0, 0), (255, 255, 255), (128, 128, 128)][int(rng.integers(3))]
    return im.rotate(rng.uniform(-degrees, degrees), resample=Image.Resampling.BILINEAR, fillcolor=fill)


def _hue(im: Image.Image, shift: float) -> Image.Image:
    """Hue rotated by ``shift`` turns (-0.5..0.5)."""
    hsv = np.asarray(im.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(shift * 256))) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def colour(im: Image.Image, rng: np.random.Generator, hue: float = 0.5, saturation: float = 1.0,
           brightness: float = 0.4, contrast: float = 0.4) -> Image.Image:
    """Hue shift of up to +-``hue`` turns; saturation, brightness, contrast times 1 +- the given amounts."""
    ops = [lambda x: _hue(x, rng.uniform(-hue, hue)),
           lambda x: ImageEnhance.Color(x).enhance(rng.uniform(1 - saturation, 1 + saturation)),
           lambda x: ImageEnhance.Brightness(x).enhance(rng.uniform(1 - brightness, 1 + brightness)),
           lambda x: ImageEnhance.Contrast(x).enhance(rng.uniform(1 - contrast, 1 + contrast))]
    for i in rng.permutation(len(ops)):
        im = ops[i](im)
    return im


def greyscale(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Luminance (ITU-R 601-2, as PIL's "L") in all three channels (``rng`` unused)."""
    return im.convert("L").convert("RGB")


_WORDS = ["SAMPLE", "PREVIEW", "COPYRIGHT", "STOCK", "PROOF", "DRAFT", "PHOTO", "studio", "images", "shop",
          "www", "com", "2024", "2025", "(c)", "all rights reserved", "sale", "new", "HD", "@user"]


def _text(rng: np.random.Generator, words: tuple[int, int] = (1, 3)) -> str:
    n = int(rng.integers(words[0], words[1] + 1))
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            out.append(_WORDS[int(rng.integers(len(_WORDS)))])
        else:  # a made-up name or number
            alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
            out.append("".join(alphabet[int(i)] for i in rng.integers(0, len(alphabet), int(rng.integers(3, 9)))))
    return " ".join(out)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    if rng.random() < 0.6:  # watermarks are mostly white or black
        v = 255 if rng.random() < 0.6 else 0
        return (v, v, v)
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(6, px))


def overlay(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A watermark, a caption or a logo pasted on (one of the three, chosen by ``rng``)."""
    w, h = im.size
    side = min(w, h)
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    kind = rng.choice(["watermark", "caption", "logo"])
    if kind == "watermark":  # large translucent text, across the picture, straight or diagonal
        text = _text(rng, (1, 2))
        font = _font(int(side * rng.uniform(0.1, 0.25)))
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        x = int((w - (r - l)) * rng.uniform(0.0, 1.0)) - l
        y = int((h - (b - t)) * rng.uniform(0.1, 0.9)) - t
        draw.text((x, y), text, font=font, fill=(*_colour(rng), int(255 * rng.uniform(0.25, 0.6))))
        if rng.random() < 0.5:
            layer = layer.rotate(rng.uniform(-45, 45), resample=Image.Resampling.BILINEAR)
    elif kind == "caption":  # small opaque text, sometimes on a band, near an edge
        text = _text(rng)
        font = _font(int(side * rng.uniform(0.05, 0.12)))
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        x = int(max(0, w - (r - l)) * rng.uniform(0, 1)) - l
        y = int(max(0, h - (b - t)) * (rng.uniform(0, 0.15) if rng.random() < 0.5 else rng.uniform(0.85, 1))) - t
        if rng.random() < 0.4:
            pad = max(1, (b - t) // 4)
            draw.rectangle((0, y + t - pad, w, y + b + pad), fill=(*_colour(rng), int(255 * rng.uniform(0.5, 1))))
        draw.text((x, y), text, font=font, fill=(*_colour(rng), int(255 * rng.uniform(0.7, 1))))
    else:  # a logo: a filled shape with a letter or two, in a corner or anywhere
        s = int(side * rng.uniform(0.1, 0.3))
        x, y = int(rng.integers(0, max(1, w - s))), int(rng.integers(0, max(1, h - s)))
        if rng.random() < 0.6:  # corners are where logos go
            x = int(rng.uniform(0, 0.05) * w) if rng.random() < 0.5 else w - s - int(rng.uniform(0, 0.05) * w)
            y = int(rng.uniform(0, 0.05) * h) if rng.random() < 0.5 else h - s - int(rng.uniform(0, 0.05) * h)
        fill = (*_colour(rng), int(255 * rng.uniform(0.6, 1)))
        box = (x, y, x + s, y + s)
        shape = rng.choice(["ellipse", "rectangle", "rounded"])
        if shape == "ellipse":
            draw.ellipse(box, fill=fill)
        elif shape == "rectangle":
            draw.rectangle(box, fill=fill)
        else:
            draw.rounded_rectangle(box, radius=max(1, s // 4), fill=fill)
        letters = "".join("ABCDEFGHJKLMNPRSTUVWXYZ"[int(i)] for i in rng.integers(0, 23, int(rng.integers(1, 3))))
        font = _font(int(s * 0.5))
        ink = (255 - fill[0], 255 - fill[1], 255 - fill[2], 255)
        draw.text((x + s // 2, y + s // 2), letters, font=font, fill=ink, anchor="mm")
    return Image.alpha_composite(im.convert("RGBA"), layer).convert("RGB")


def rescale(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Down to 25-60% of the size and back up (a re-upload's thumbnail)."""
    f = rng.uniform(0.25, 0.6)
    small = im.resize((max(8, int(im.width * f)), max(8, int(im.height * f))), Image.Resampling.BILINEAR)
    return small.resize(im.size, Image.Resampling.BILINEAR)


def jpeg(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=int(rng.integers(20, 96)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


# In the order augment applies them.
AUGMENTATIONS: dict[str, Augmentation] = {
    "resized_crop": resized_crop, "hflip": hflip, "rotate": rotate, "colour": colour, "greyscale": greyscale,
    "overlay": overlay, "rescale": rescale, "jpeg": jpeg,
}
# The probability of each in one training view.
DEFAULT_PROBS: dict[str, float] = {
    "resized_crop": 0.8, "hflip": 0.5, "rotate": 0.3, "colour": 0.8, "greyscale": 0.5, "overlay": 0.4,
    "rescale": 0.3, "jpeg": 0.5,
}


def augment(im: Image.Image, rng: np.random.Generator, probs: Mapping[str, float] | None = None) -> Image.Image:
    """A random near-duplicate of ``im``: each augmentation applied with its probability in ``probs`` (default
    DEFAULT_PROBS; a name left out of ``probs`` is not applied).

    Raises:
        ValueError: a name in ``probs`` that is not an augmentation.
    """
    probs = DEFAULT_PROBS if probs is None else probs
    unknown = set(probs) - set(AUGMENTATIONS)
    if unknown:
        raise ValueError(f"unknown augmentations {sorted(unknown)}; known: {', '.join(AUGMENTATIONS)}")
    im = im.convert("RGB")
    for name, fn in AUGMENTATIONS.items():
        p = probs.get(name, 0.0)
        if p > 0 and rng.random() < p:
            im = fn(im, rng)
    return im
