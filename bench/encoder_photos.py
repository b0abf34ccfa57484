"""The photos of bench/encoder_bench.py and their edits: real photographs bundled with scikit-image (and, where
installed, scikit-learn's and matplotlib's samples), and the edited copies (resize, JPEG, brightness, crop,
rotation, flip, greyscale, a stock-photo watermark) whose retrieval the benchmark scores.

May use: nothing else of the project (PIL and numpy; scikit-image, scikit-learn and matplotlib where installed).
"""

from __future__ import annotations

import io
import pathlib

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# skimage.data loaders of real photographs (name -> how to get the RGB array); tried one by one, skipped on failure.
SKIMAGE_PHOTOS = ["astronaut", "camera", "coffee", "chelsea", "coins", "moon", "rocket", "hubble_deep_field",
                  "retina", "immunohistochemistry", "gravel", "grass", "brick", "clock", "cell",
                  "stereo_motorcycle", "eagle", "lily", "skin"]
SKIMAGE_LEFT_OUT = {
    "cat": "the same picture as chelsea",
    "stereo_motorcycle (right view)": "a near-duplicate of the left view",
    "checkerboard, colorwheel, logo, binary_blobs, shepp_logan_phantom": "synthetic",
    "text, page": "text / a scanned page, not a photograph of a scene",
    "horse": "a binary silhouette",
    "microaneurysms": "102 x 102 px",
    "lfw_subset": "25 x 25 px crops (used only for the face encoder)",
    "brain, cells3d, kidney, ...": "3-D / multi-channel microscopy, or downloads",
}
EDIT_NAMES = ["resize 1/2", "resize 1/4", "jpeg 50", "jpeg 20", "bright x1.3", "crop 5%", "crop 10%", "rotate 5",
              "hflip", "greyscale", "watermark"]
WATERMARK_TEXT = "\u00a9 SAMPLE stock"


def to_rgb(arr: np.ndarray) -> Image.Image:
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8) if arr.dtype.kind == "f" else arr.astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def load_photos(use_sklearn: bool = True, limit: int = 0) -> tuple[list[dict], list[dict]]:
    """([{name, source, image}], [{name, reason}] for the loaders that failed); ``limit`` > 0: the first that many
    photos only (the loaders after them are not tried)."""
    import skimage.data

    photos, failed = [], []
    for name in SKIMAGE_PHOTOS:
        if limit and len(photos) >= limit:
            return photos, failed
        try:
            arr = getattr(skimage.data, name)()
            if name == "stereo_motorcycle":
                arr, name = arr[0], "motorcycle_left"
            photos.append({"name": name, "source": "skimage.data", "image": to_rgb(arr)})
        except (ImportError, OSError, ValueError, RuntimeError) as err:  # needs a download or an optional package
            failed.append({"name": name, "reason": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"})
    if use_sklearn and not (limit and len(photos) >= limit):
        try:
            from sklearn.datasets import load_sample_images

            data = load_sample_images()
            for fname, arr in zip(data.filenames, data.images):
                photos.append({"name": pathlib.Path(fname).stem, "source": "sklearn.datasets", "image": to_rgb(arr)})
        except (ImportError, OSError, ValueError) as err:
            failed.append({"name": "sklearn.load_sample_images", "reason": f"{type(err).__name__}: {err}"})
    if limit and len(photos) >= limit:
        return photos[:limit], failed
    try:  # the one photograph in matplotlib's bundled sample data
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            photos.append({"name": "grace_hopper", "source": "matplotlib", "image": Image.open(f).convert("RGB")})
    except (ImportError, OSError, ValueError) as err:
        failed.append({"name": "matplotlib grace_hopper", "reason": f"{type(err).__name__}: {err}"})
    return photos, failed


def is_colour(im: Image.Image) -> bool:
    """Whether a photo has colour (its greyscale copy differs from it); grey photos are stored as RGB too."""
    a = np.asarray(im, dtype=np.int16)
    return bool(np.abs(a[..., 0] - a[..., 1]).max() > 8 or np.abs(a[..., 1] - a[..., 2]).max() > 8)


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _crop(im: Image.Image, f: float) -> Image.Image:
    w, h = im.size
    dx, dy = round(w * f), round(h * f)
    return im.crop((dx, dy, w - dx, h - dy))


def watermark(im: Image.Image) -> Image.Image:
    """A stock-photo watermark: WATERMARK_TEXT in white at 50% opacity, its height 1/8 of the shorter side, across
    the middle at 30 degrees, plus a small opaque caption in the lower left corner."""
    from PIL import ImageDraw, ImageFont

    w, h = im.size
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    font = ImageFont.load_default(size=max(8, min(w, h) // 8))
    draw.text((w // 2, h // 2), WATERMARK_TEXT, font=font, fill=(255, 255, 255, 128), anchor="mm")
    layer = layer.rotate(30, resample=Image.Resampling.BILINEAR)
    small = ImageFont.load_default(size=max(6, min(w, h) // 25))
    ImageDraw.Draw(layer).text((min(w, h) // 40, h - min(w, h) // 40), "photo: lookalike.example", font=small,
                               fill=(255, 255, 255, 255), anchor="ld", stroke_width=1, stroke_fill=(0, 0, 0, 255))
    return Image.alpha_composite(im.convert("RGBA"), layer).convert("RGB")


def edit(im: Image.Image, name: str) -> Image.Image:
    w, h = im.size
    if name == "resize 1/2":
        return im.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BICUBIC)
    if name == "resize 1/4":
        return im.resize((max(1, w // 4), max(1, h // 4)), Image.Resampling.BICUBIC)
    if name == "jpeg 50":
        return _jpeg(im, 50)
    if name == "jpeg 20":
        return _jpeg(im, 20)
    if name == "bright x1.3":
        return ImageEnhance.Brightness(im).enhance(1.3)
    if name == "crop 5%":
        return _crop(im, 0.05)
    if name == "crop 10%":
        return _crop(im, 0.10)
    if name == "rotate 5":
        return im.rotate(5, resample=Image.Resampling.BICUBIC, expand=False, fillcolor=(0, 0, 0))
    if name == "hflip":
        return ImageOps.mirror(im)
    if name == "greyscale":
        return ImageOps.grayscale(im).convert("RGB")
    if name == "watermark":
        return watermark(im)
    raise ValueError(name)


def train_view(im: Image.Image, side: int = 96) -> Image.Image:
    """Shorter side to ``side`` px, as encoder.train.load_folder (the CLI's train-encoder) does."""
    s = side / min(im.size)
    return im.resize((max(side, round(im.width * s)), max(side, round(im.height * s))), Image.Resampling.BILINEAR)
