"""When a search hit counts as a match (a copy of the query, or for ``face`` the same person): a threshold on the
distance a collection returns, per encoder. Measured with ``python -m bench.encoder_bench`` (docs/ENCODERS.md).

Distances are those of the collection's metric, as searches return them: Hamming bits (smaller is nearer), squared
L2 (smaller), cosine or inner-product similarity (larger is nearer).
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

from encoder.torchscript import load_settings

# pHash: copies made by resize, JPEG, brightness and greyscale edits stay within 8 of 64 bits on the bench's
# photos, and no copy is nearer than 18 bits to a different photo (docs/ENCODERS.md). phash:N scales it with the
# number of bits.
PHASH_MATCH_BITS_PER_64 = 10
# The CNN `lookalike train-encoder` trains, per method: cosine similarity at least this (train_encoder writes it
# into the model's JSON as match_threshold, where it can be changed). On held-out photos the cosine distance that
# best separated copies from different photos was 0.15-0.21 (triplet) and 0.11-0.15 (autoencoder).
CNN_MATCH_COSINE = {"triplet": 0.85, "autoencoder": 0.87}
# dlib's same-person rule: Euclidean 0.6, i.e. 0.36 in the squared L2 that l2 collections return.
FACE_MATCH_L2 = 0.36

_LARGER_IS_NEARER = {"cosine", "ip"}
_UNITS = {"hamming": " bits", "l2": " (squared L2)", "cosine": " (cosine similarity)", "ip": " (inner product)"}


@dataclass(frozen=True)
class MatchRule:
    """A hit matches when its distance is within ``threshold``: at most it for hamming and l2, at least it for
    cosine and ip similarity."""

    metric: str
    threshold: float
    source: str = ""

    def __post_init__(self):
        if self.metric not in _UNITS:
            raise ValueError(f"a match rule's metric is one of {', '.join(_UNITS)}, got {self.metric!r}")

    def matches(self, distance: float) -> bool:
        if self.metric in _LARGER_IS_NEARER:
            return distance >= self.threshold
        return distance <= self.threshold

    def describe(self) -> str:
        """E.g. "match: d <= 10 bits (phash default)"."""
        op = ">=" if self.metric in _LARGER_IS_NEARER else "<="
        return f"match: d {op} {self.threshold:.4g}{_UNITS[self.metric]}" + (f" ({self.source})" if self.source else "")


def default_match(encoder: str) -> MatchRule | None:
    """The default match rule of an encoder spec ("phash", "phash:16", "face", "torchscript:PATH"); None for a
    collection without an encoder ("") or a TorchScript model whose JSON names no ``match_threshold`` (a model of
    your own: only you know its distances), whose files cannot be read here, or an encoder this module has no rule
    for.
    """
    name, _, arg = encoder.partition(":")
    if not name:
        return None
    if name == "phash":
        size = int(arg) if arg and arg.isdigit() else 8
        return MatchRule("hamming", round(size * size * PHASH_MATCH_BITS_PER_64 / 64), f"{encoder} default")
    if name == "face":
        return MatchRule("l2", FACE_MATCH_L2, "same person, dlib's 0.6")
    if name == "torchscript":
        try:
            settings = load_settings(pathlib.Path(arg).expanduser())
        except (OSError, ValueError):
            return None
        if settings.get("match_threshold") is None:
            return None
        return MatchRule(settings["metric"], float(settings["match_threshold"]), "from the model's JSON")
    return None
