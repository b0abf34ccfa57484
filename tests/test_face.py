"""dlib face encoder on a real photo (skimage.data.astronaut); skipped cleanly without the [face] extra."""

import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("dlib", reason="the face encoder is an optional extra: pip install 'lookalike[face]'")
pytest.importorskip("face_recognition_models", reason="pip install 'lookalike[face]'")
skimage_data = pytest.importorskip("skimage.data")

from encoder import ImageError, get_encoder  # noqa: E402
from encoder.face import SAME_PERSON_DISTANCE  # noqa: E402
from encoder.registry import encode_many  # noqa: E402
from test_encoder import picture, to_bytes  # noqa: E402


@pytest.fixture(scope="module")
def astronaut():
    return Image.fromarray(skimage_data.astronaut())


@pytest.fixture(scope="module")
def enc():
    return get_encoder("face")


def test_same_face_after_edits_is_near(enc, astronaut):
    ref = enc.encode_images([astronaut])
    assert ref.shape == (1, 128) and ref.dtype == np.float32
    small = astronaut.resize((256, 256))
    jpeg = Image.open(io.BytesIO(to_bytes(astronaut, "JPEG", quality=30)))
    edits = enc.encode_images([small, jpeg.convert("RGB")])
    assert (np.linalg.norm(edits - ref, axis=1) < SAME_PERSON_DISTANCE).all()
    np.testing.assert_array_equal(enc.encode_images([astronaut]), ref)


def test_no_face_and_several_faces_are_reported(enc, astronaut):
    with pytest.raises(ImageError, match="no face"):
        enc.encode_images([picture(1)])
    pair = Image.new("RGB", (astronaut.width * 2, astronaut.height))
    pair.paste(astronaut, (0, 0))
    pair.paste(astronaut.resize((astronaut.width // 2, astronaut.height // 2)), (astronaut.width, 0))
    largest = enc.encode_images([pair])  # the largest face: the full-size astronaut
    assert np.linalg.norm(largest - enc.encode_images([astronaut])) < SAME_PERSON_DISTANCE / 2
    with pytest.raises(ImageError, match=r"\d faces found"):
        get_encoder("face:strict").encode_images([pair])
    vecs, reasons = encode_many(enc, [to_bytes(astronaut), to_bytes(picture(2)), b"junk"])
    assert vecs.shape == (1, 128) and reasons[0] is None
    assert "no face" in reasons[1] and "not an image" in reasons[2]
