"""Encoders: images (bytes) in, vectors out. See encoder.registry for the names and encoder.decode for how
images are read defensively."""

from encoder.decode import ImageError, decode_image
from encoder.registry import Encoder, available, get_encoder, with_encoder

__all__ = ["Encoder", "ImageError", "available", "decode_image", "get_encoder", "with_encoder"]
