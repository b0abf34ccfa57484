"""Encoders and defensive decoding (issue 3, first part): phash and the image reader."""

import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from encoder import ImageError, decode_image, get_encoder
from encoder.registry import encode_bytes, encode_many


def picture(seed: int, size: int = 256) -> Image.Image:
    """A photo-like test picture: a colour gradient with soft blobs and fine texture, different per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3))
    for c in range(3):
        img[..., c] = rng.uniform(0, 0.5) + rng.uniform(-0.3, 0.3) * x + rng.uniform(-0.3, 0.3) * y
    for _ in range(8):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.25)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-0.6, 0.6, 3)
    img += rng.normal(0, 0.02, img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def to_bytes(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.unpackbits(np.bitwise_xor(a, b), axis=-1).sum(axis=-1)


EDITS = {
    "resize 1/2": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.BILINEAR),
    "resize 1/4": lambda im: im.resize((im.width // 4, im.height // 4), Image.Resampling.BILINEAR),
    "jpeg 50": lambda im: Image.open(io.BytesIO(to_bytes(im, "JPEG", quality=50))),
    "jpeg 20": lambda im: Image.open(io.BytesIO(to_bytes(im, "JPEG", quality=20))),
    "brightness 1.3": lambda im: ImageEnhance.Brightness(im).enhance(1.3),
}


@pytest.mark.parametrize("spec,nbytes", [("phash", 8), ("phash:16", 32)])
def test_phash_shape_dtype_determinism(spec, nbytes):
    enc = get_encoder(spec)
    assert enc.metric == "hamming" and enc.dim == nbytes * 8
    data = [to_bytes(picture(i)) for i in range(3)]
    a, b = encode_bytes(enc, data), encode_bytes(enc, data)
    assert a.shape == (3, nbytes) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_phash_near_duplicates_are_nearer_than_other_pictures():
    enc = get_encoder("phash")
    originals = [picture(i) for i in range(12)]
    H = enc.encode_images(originals)
    for name, edit in EDITS.items():
        E = enc.encode_images([edit(im).convert("RGB") for im in originals])
        D = hamming(E[:, None, :], H[None, :, :])  # (copies, originals)
        assert (D.argmin(axis=1) == np.arange(12)).all(), name
        same, other = np.diag(D), D[~np.eye(12, dtype=bool)]
        assert same.max() < other.min(), f"{name}: copies up to {same.max()} bits, others from {other.min()}"


def test_unknown_encoder_is_a_clear_error():
    with pytest.raises(ValueError, match="known: face, phash, torchscript"):
        get_encoder("clip")
    with pytest.raises(ValueError, match="from 8 .* to 256"):
        get_encoder("phash:4")
    with pytest.raises(ValueError, match="from 8 .* to 256"):
        get_encoder("phash:100000")  # its DCT matrix would be a memory bomb


# --- decoding ------------------------------------------------------------------------------------------------
def test_exif_orientation_is_applied():
    im = picture(1).resize((200, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(to_bytes(im, "JPEG", exif=exif.tobytes()))
    assert out.size == (100, 200) and out.mode == "RGB"


@pytest.mark.parametrize("make", [
    lambda: picture(2).convert("P"),                                        # palette
    lambda: picture(2).convert("P").convert("RGBA"),                        # alpha
    lambda: picture(2).convert("L"),                                        # greyscale
    lambda: Image.fromarray((np.arange(256 * 256).reshape(256, 256) % 65536).astype(np.uint16)),  # 16-bit
    lambda: picture(2).convert("LA"),                                       # grey + alpha
], ids=["palette", "rgba", "grey", "16bit", "grey-alpha"])
def test_modes_decode_to_rgb(make):
    out = decode_image(to_bytes(make(), "PNG"))
    assert out.mode == "RGB" and out.size == (256, 256)
    assert np.asarray(out).std() > 10  # the picture survived the conversion (not a blank or saturated image)


def test_cmyk_and_transparent_palette_and_animation():
    assert decode_image(to_bytes(picture(3).convert("CMYK"), "JPEG")).mode == "RGB"
    pal = picture(3).convert("P")
    pal.info["transparency"] = 0
    assert decode_image(to_bytes(pal, "PNG", transparency=0)).mode == "RGB"
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    first = decode_image(buf.getvalue())
    assert first.getpixel((5, 5))[0] > 200  # the red first frame


@pytest.mark.parametrize("data,words", [
    (b"", "empty"),
    (b"this is not an image at all", "not an image"),
    (to_bytes(picture(4), "JPEG")[:3000], "truncated or corrupt"),
    (to_bytes(picture(4), "PNG")[:800], "truncated or corrupt"),
], ids=["empty", "text", "truncated-jpeg", "truncated-png"])
def test_bad_files_are_rejected_with_a_reason(data, words):
    with pytest.raises(ImageError, match=words):
        decode_image(data)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = to_bytes(Image.new("L", (12000, 12000)), "PNG")  # 144 Mpixel of zeros compress to ~140 KB
    assert len(bomb) < 1_000_000
    with pytest.raises(ImageError, match="decompression bombs"):
        decode_image(bomb)
    with pytest.raises(ImageError, match="decompression bombs"):  # our own limit, below Pillow's
        decode_image(to_bytes(Image.new("L", (3000, 3000)), "PNG"), max_pixels=1_000_000)
    with pytest.raises(ImageError, match="at most 100 bytes"):
        decode_image(to_bytes(picture(5)), max_bytes=100)


def test_encode_many_skips_bad_images_with_reasons():
    enc = get_encoder("phash")
    vecs, reasons = encode_many(enc, [to_bytes(picture(6)), b"junk", to_bytes(picture(7))])
    assert vecs.shape == (2, 8)
    assert reasons[0] is None and "not an image" in reasons[1] and reasons[2] is None
    with pytest.raises(ImageError, match="image 1"):
        encode_bytes(enc, [to_bytes(picture(6)), b"junk"])
