"""DCT perceptual hash (the classic pHash): robust to resizing, recompression, brightness changes and greyscale (it
hashes luminance only), less to watermarks; not to flips (a mirrored photo is as far as an unrelated one: search
with the mirrored image too), crops of 10% or rotation. No weights. Measured per edit in docs/ENCODERS.md.

Greyscale, resized to (hash_size x 4)^2 with Lanczos, 2-D DCT-II; the top-left hash_size x hash_size coefficients
(lowest frequencies) are compared with their median: one bit each. Hamming distance between hashes: 0 = same
picture, about half the bits for unrelated pictures.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

_HIGHFREQ_FACTOR = 4
# hash_size ** 2 bits must fit a collection (lookalike.config.Limits.max_dim = 65536); the DCT matrix is
# (4 * hash_size) ** 2 floats, so an unchecked size from a request would be a memory bomb.
MAX_HASH_SIZE = 256


def _dct_matrix(n: int) -> np.ndarray:
    """Unnormalised DCT-II as a matrix: (C @ x)[k] = sum_j x[j] cos(pi (2j + 1) k / (2n))."""
    k = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    return np.cos(np.pi * (2 * j + 1) * k / (2 * n))


class PHash:
    """pHash with ``hash_size`` x ``hash_size`` bits (8: 64 bits).

    Raises:
        ValueError: hash_size below 8.
    """

    metric = "hamming"

    def __init__(self, hash_size: int = 8):
        if not 8 <= hash_size <= MAX_HASH_SIZE:
            raise ValueError(f"phash takes a hash size from 8 (64 bits) to {MAX_HASH_SIZE} "
                             f"({MAX_HASH_SIZE ** 2} bits, the largest collection dimension), got {hash_size}")
        self.hash_size = hash_size
        self.name = "phash" if hash_size == 8 else f"phash:{hash_size}"
        self.dim = hash_size * hash_size
        self._side = hash_size * _HIGHFREQ_FACTOR
        self._dct = _dct_matrix(self._side)[:hash_size]  # only the low frequencies are kept

    def hash_image(self, im: Image.Image) -> np.ndarray:
        """One image -> shape (dim / 8,) uint8."""
        grey = im.convert("L").resize((self._side, self._side), Image.Resampling.LANCZOS)
        pixels = np.asarray(grey, dtype=np.float64)
        low = self._dct @ pixels @ self._dct.T  # (hash_size, hash_size)
        return np.packbits(low.ravel() > np.median(low))

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Images -> shape (n, dim / 8) uint8."""
        out = np.empty((len(images), self.dim // 8), dtype=np.uint8)
        for i, im in enumerate(images):
            out[i] = self.hash_image(im)
        return out
