"""Encoders by name. Each has a ``name``, an output ``dim`` (components, or bits for binary codes), a ``metric``
and ``encode(images) -> vectors``.

Names: ``phash`` (64 bits) and ``phash:N`` (N x N bits, N >= 8); ``torchscript:PATH`` (a TorchScript model file:
see encoder/torchscript.py for the contract; the CNN of ``lookalike train-encoder`` is one); ``face`` and
``face:strict`` (dlib's 128-d face descriptor, optional extra).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from encoder.decode import MAX_IMAGE_PIXELS, ImageError, decode_image, require_all
from encoder.face import FaceEncoder
from encoder.phash import PHash
from encoder.torchscript import TorchScriptEncoder
from lookalike.config import CollectionConfig
from lookalike.errors import InvalidArgument


class Encoder(Protocol):
    name: str
    dim: int        # float components, or bits for hamming encoders
    metric: str     # a collection metric: l2, ip, cosine or hamming

    def encode_images(self, images: Sequence) -> np.ndarray:
        """Decoded RGB images -> shape (n, dim) float32, or (n, dim / 8) uint8 for hamming."""
        ...


def encode_bytes(encoder: Encoder, images: Sequence[bytes]) -> np.ndarray:
    """Image bytes -> vectors, rows aligned with ``images``.

    Raises:
        ImageError: naming the first image that cannot be decoded or encoded, and why.
    """
    vectors, reasons = encode_many(encoder, images)
    require_all(reasons)
    return vectors


def encode_many(encoder: Encoder, images: Sequence[bytes]) -> tuple[np.ndarray, list[str | None]]:
    """Like encode_bytes, but skips what cannot be used: (vectors of the good ones, reason or None per image).

    Encoders that can refuse a decoded image (the face encoder: no face) provide ``encode_images_lenient``.
    """
    # Decoded images are encoded a chunk at a time, a chunk holding at most MAX_IMAGE_PIXELS pixels (or one image):
    # a request of many small files that decode to large images must not hold them all decoded at once.
    chunks, reasons, decoded, pixels = [], [], [], 0
    for data in images:
        try:
            im = decode_image(data)
        except ImageError as err:
            reasons.append(str(err))
            continue
        if decoded and pixels + im.width * im.height > MAX_IMAGE_PIXELS:
            chunks.append(_encode_chunk(encoder, decoded))
            decoded, pixels = [], 0
        decoded.append(im)
        pixels += im.width * im.height
        reasons.append(None)
    if decoded or not chunks:
        chunks.append(_encode_chunk(encoder, decoded))
    vectors = chunks[0][0] if len(chunks) == 1 else np.concatenate([v for v, _ in chunks])
    later = iter([r for _, rs in chunks for r in rs])
    return vectors, [r if r is not None else next(later) for r in reasons]


def _encode_chunk(encoder: Encoder, decoded: list) -> tuple[np.ndarray, list[str | None]]:
    """(vectors of the images the encoder takes, reason or None per decoded image)."""
    lenient = getattr(encoder, "encode_images_lenient", None)
    if lenient is None:
        return encoder.encode_images(decoded), [None] * len(decoded)
    return lenient(decoded)


_FACTORIES: dict[str, Callable[[str | None], Encoder]] = {}


def register(name: str, factory: Callable[[str | None], Encoder]) -> None:
    """Adds an encoder family; ``factory(arg)`` gets the text after ``name:`` (or None)."""
    _FACTORIES[name] = factory


def available() -> list[str]:
    return sorted(_FACTORIES)


def get_encoder(spec: str) -> Encoder:
    """The encoder for a spec such as "phash" or "phash:16".

    Raises:
        ValueError: unknown name or bad argument, with the names known.
    """
    name, _, arg = spec.partition(":")
    if name not in _FACTORIES:
        raise ValueError(f"unknown encoder {spec!r}; known: {', '.join(available())}")
    return _FACTORIES[name](arg or None)


def with_encoder(cfg: CollectionConfig) -> CollectionConfig:
    """A collection's config with dim and metric filled from the encoder it names, or checked against it, and the
    encoder's own name; unchanged when it names none. Before ``CollectionConfig.validated``.

    Raises:
        InvalidArgument: an unknown encoder or a bad argument, or a dim or metric the encoder does not give.
    """
    if not cfg.encoder:
        return cfg
    try:
        enc = get_encoder(cfg.encoder)
    except ValueError as err:
        raise InvalidArgument(str(err)) from None
    dim = cfg.dim or enc.dim
    metric = cfg.metric or enc.metric
    if dim != enc.dim or metric != enc.metric:
        raise InvalidArgument(
            f"encoder {cfg.encoder!r} gives {enc.dim}-{'bit' if enc.metric == 'hamming' else 'd'} "
            f"{enc.metric} vectors; the collection asks for dim {dim}, metric {metric} (leave them out)")
    return dataclasses.replace(cfg, dim=dim, metric=metric, encoder=enc.name)


def _phash(arg: str | None) -> Encoder:
    if arg is not None and not arg.isdigit():
        raise ValueError(f"phash takes a hash size, as in phash:16; got {arg!r}")
    return PHash(int(arg) if arg else 8)


def _torchscript(arg: str | None) -> Encoder:
    if not arg:
        raise ValueError("torchscript needs a model file: torchscript:/path/to/model.pt")
    return TorchScriptEncoder(arg)


def _face(arg: str | None) -> Encoder:
    if arg not in (None, "strict"):
        raise ValueError(f"face takes no argument or 'strict', got {arg!r}")
    return FaceEncoder(strict=arg == "strict")


register("face", _face)
register("phash", _phash)
register("torchscript", _torchscript)
