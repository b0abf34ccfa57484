"""Where the router has images encoded. One interface; the in-process pool runs encoders in the router process
(cheap encoders such as phash); a Ray actor pool for heavy (CNN, GPU) encoders implements the same method."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from encoder import get_encoder
from encoder.registry import encode_many


class EncoderPool(Protocol):
    def encode_many(self, spec: str, images: Sequence[bytes]) -> tuple[np.ndarray, list[str | None]]:
        """(vectors of the images that decode, in order; a reason or None per image)."""
        ...


class LocalEncoderPool:
    """Encoders in this process, one instance per spec."""

    def __init__(self):
        self._encoders: dict[str, object] = {}
        self._lock = threading.Lock()

    def _get(self, spec: str):
        enc = self._encoders.get(spec)
        if enc is None:
            with self._lock:  # one load per spec, even when several calls ask at once
                enc = self._encoders.get(spec)
                if enc is None:
                    enc = self._encoders[spec] = get_encoder(spec)
        return enc

    def encode_many(self, spec: str, images: Sequence[bytes]) -> tuple[np.ndarray, list[str | None]]:
        return encode_many(self._get(spec), images)
