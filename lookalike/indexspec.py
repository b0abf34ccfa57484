"""The index specs lookalike supports: a small grammar over FAISS factory strings, with bounds.

A spec is checked here, from its text alone, before FAISS ever sees it: FAISS builds some specs it then aborts the
process on (``HNSW0`` fails an assertion on the first add, ``HNSW1`` segfaults, ``PQ4x0`` divides by zero while
training), and wrappers such as ``IDMap`` build but refuse every write. So the router, the controller, the sizing
tool and every shard accept only what this grammar derives; everything else is INVALID_ARGUMENT with a sentence.

Float vectors (l2, ip, cosine)::

    spec      := [transform ","] main | graph
    transform := "PCA" d                      d: output dimension, 1..dim
               | "OPQ" m ["_" d]              m divides d (default d: the input dimension); d 1..dim
    main      := "Flat"
               | encoding                     PQ or SQ codes, scanned exhaustively
               | "IVF" nlist ["_HNSW" M] "," (encoding | "Flat")
    graph     := "HNSW" M ["," "Flat" | "_" encoding]
               | "CAGRA" [degree]             a GPU graph (needs faiss with cuVS)
    encoding  := "PQ" m ["x" bits] ["np"]     m divides the dimension; "np" (no polysemous training) after IVF only
               | "PQ" m "x4fs"                fast-scan PQ (4-bit codes, 16-entry SIMD tables), after IVF only
               | "SQ" ("4" | "6" | "8" | "fp16" | "bf16")

Binary codes (hamming; dim in bits)::

    spec      := "BFlat" | "BIVF" nlist ["_HNSW" M] ["," "Flat"] | "BHNSW" M

Bounds: nlist 1..2^20, M 2..512, PQ bits 1..16, CAGRA degree 8..1024, 256 characters.

Imports nothing of the project but its errors: every layer may check a spec.
"""

from __future__ import annotations

import re

from lookalike.errors import InvalidArgument

MAX_SPEC_CHARS = 256
MAX_IVF_LISTS = 1 << 20
MIN_HNSW_M, MAX_HNSW_M = 2, 512
MIN_PQ_BITS, MAX_PQ_BITS = 1, 16
MIN_CAGRA_DEGREE, MAX_CAGRA_DEGREE = 8, 1024
SQ_TYPES = ("4", "6", "8", "fp16", "bf16")

_NUM = r"(0|[1-9]\d{0,8})"  # no leading zeros, at most 9 digits (bounds are checked on the value)
_ENC = rf"PQ{_NUM}(?:x{_NUM})?(np|fs)?|SQ(4|6|8|fp16|bf16)"
_TRANSFORM = re.compile(rf"PCA{_NUM}|OPQ{_NUM}(?:_{_NUM})?")
_ENCODING = re.compile(_ENC)
_IVF = re.compile(rf"IVF{_NUM}(?:_HNSW{_NUM})?")
_HNSW = re.compile(rf"HNSW{_NUM}(?:_(\w+))?")
_CAGRA = re.compile(r"CAGRA(\d{0,9})")
_BINARY = re.compile(rf"BFlat|BIVF{_NUM}(?:_HNSW{_NUM})?(?:,Flat)?|BHNSW{_NUM}")

SUPPORTED = ("Flat, PQ<m>[x<bits>], SQ4/SQ6/SQ8/SQfp16/SQbf16, IVF<nlist>[_HNSW<M>],Flat|PQ..|PQ<m>x4fs|SQ.., HNSW<M>[,Flat|_PQ..|_SQ..], "
             "CAGRA[<degree>], optionally after PCA<d>, or OPQ<m>[_<d>]; binary: BFlat, BIVF<nlist>[_HNSW<M>], BHNSW<M>")


def _refuse(spec: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"index {spec!r}: {why}")


def _check_lists(spec: str, nlist: str) -> None:
    if not 1 <= int(nlist) <= MAX_IVF_LISTS:
        raise _refuse(spec, f"{nlist} IVF lists; use 1 to {MAX_IVF_LISTS}")


def _check_m(spec: str, m: str | None) -> None:
    if m is not None and not MIN_HNSW_M <= int(m) <= MAX_HNSW_M:
        raise _refuse(spec, f"HNSW with M={m}; use {MIN_HNSW_M} to {MAX_HNSW_M}")


def _check_encoding(spec: str, match: re.Match, d: int, after_ivf: bool) -> None:
    """PQ / SQ codes of ``d``-dimensional vectors (groups: m, bits, np, sq type)."""
    m, bits, np_flag, _sq = match.groups()
    if m is None:
        return
    if not 1 <= int(m) <= d or d % int(m):
        raise _refuse(spec, f"PQ{m} cuts {d}-dimensional vectors into {m} parts; m must divide {d}")
    if bits is not None and not MIN_PQ_BITS <= int(bits) <= MAX_PQ_BITS:
        raise _refuse(spec, f"PQ codes of {bits} bits; use {MIN_PQ_BITS} to {MAX_PQ_BITS}")
    if np_flag and not after_ivf:
        raise _refuse(spec, f"'{np_flag}' applies to PQ after IVF only")
    if np_flag == "fs" and bits != "4":
        raise _refuse(spec, "fast-scan PQ takes 4-bit codes: PQ<m>x4fs")


def _transform(spec: str, text: str, dim: int) -> int:
    """The output dimension of a transform, checked."""
    m = _TRANSFORM.fullmatch(text)
    if m is None:
        raise _refuse(spec, f"{text!r} is not a supported transform (PCA<d> or OPQ<m>[_<d>]), or the main part "
                            "must come last")
    pca, opq, opq_d = m.groups()
    if pca is not None:
        if not 1 <= int(pca) <= dim:
            raise _refuse(spec, f"PCA{pca} must reduce the {dim} dimensions to 1 to {dim}")
        return int(pca)
    d = int(opq_d) if opq_d is not None else dim
    if not 1 <= d <= dim:
        raise _refuse(spec, f"OPQ output dimension {d}; use 1 to {dim}")
    if not 1 <= int(opq) <= d or d % int(opq):
        raise _refuse(spec, f"OPQ{opq} must divide its output dimension {d}")
    return d


def _check_float(spec: str, dim: int) -> None:
    parts = spec.split(",")
    d = dim
    if len(parts) > 1 and parts[0].startswith(("PCA", "OPQ")):
        d = _transform(spec, parts[0], dim)
        parts = parts[1:]
    head, rest = parts[0], parts[1:]
    if head == "Flat" and not rest:
        return
    if (m := _CAGRA.fullmatch(head)) and not rest:
        degree = int(m.group(1)) if m.group(1) else 64
        if not MIN_CAGRA_DEGREE <= degree <= MAX_CAGRA_DEGREE:
            raise _refuse(spec, f"the CAGRA graph degree must be between {MIN_CAGRA_DEGREE} and {MAX_CAGRA_DEGREE}")
        if d != dim:
            raise _refuse(spec, "CAGRA takes no transform")
        return
    if (m := _ENCODING.fullmatch(head)) and not rest:
        _check_encoding(spec, m, d, after_ivf=False)
        return
    if m := _IVF.fullmatch(head):
        _check_lists(spec, m.group(1))
        _check_m(spec, m.group(2))
        if len(rest) != 1:
            raise _refuse(spec, "IVF<nlist> takes one encoding after a comma: Flat, PQ<m>[x<bits>][np] or SQ<type>")
        if rest[0] == "Flat":
            return
        enc = _ENCODING.fullmatch(rest[0])
        if enc is None:
            raise _refuse(spec, f"{rest[0]!r} is not a supported encoding (Flat, PQ<m>[x<bits>][np], SQ<type>)")
        _check_encoding(spec, enc, d, after_ivf=True)
        return
    if m := _HNSW.fullmatch(head):
        if d != dim:
            raise _refuse(spec, "HNSW takes no transform (its vectors cannot be removed through one)")
        _check_m(spec, m.group(1))
        if rest not in ([], ["Flat"]) or (rest and m.group(2) is not None):
            raise _refuse(spec, "HNSW<M> takes ',Flat' or '_PQ..'/'_SQ..', nothing more")
        if m.group(2) is not None:
            enc = _ENCODING.fullmatch(m.group(2))
            if enc is None:
                raise _refuse(spec, f"{m.group(2)!r} is not a supported encoding for HNSW (PQ<m>[x<bits>], SQ<type>)")
            _check_encoding(spec, enc, d, after_ivf=False)
        return
    raise _refuse(spec, f"not a supported index; supported: {SUPPORTED}")


def _check_binary(spec: str, dim: int) -> None:
    m = _BINARY.fullmatch(spec)
    if m is None:
        if spec.startswith("BCAGRA"):
            raise InvalidArgument("index 'CAGRA' takes float vectors; hamming collections use BFlat, BIVF or BHNSW")
        raise _refuse(spec, "not a supported binary index; use BFlat, BIVF<nlist>[_HNSW<M>] or BHNSW<M>")
    nlist, quantizer_m, m_graph = m.groups()
    if nlist is not None:
        _check_lists(spec, nlist)
    _check_m(spec, quantizer_m)
    _check_m(spec, m_graph)


def check_spec(spec: str, dim: int, binary: bool) -> None:
    """Checks an index spec (as normalised by the collection config: binary specs start with "B") against the
    grammar and bounds above for ``dim`` (bits, for binary codes).

    Raises:
        InvalidArgument: the spec is not one lookalike supports, with a sentence saying why.
    """
    if not isinstance(spec, str):
        raise InvalidArgument(f"index spec must be text, got {type(spec).__name__}")
    if len(spec) > MAX_SPEC_CHARS:
        raise InvalidArgument(f"index spec of {len(spec)} characters; at most {MAX_SPEC_CHARS}")
    if not spec.isascii() or not spec.isprintable() or any(c.isspace() for c in spec):
        raise InvalidArgument(f"index spec {spec!r} holds characters no index name has (spaces, control "
                              "characters, NUL or non-ASCII)")
    if binary:
        _check_binary(spec, dim)
    else:
        _check_float(spec, dim)


# --- training -------------------------------------------------------------------------------------------------------
# A collection whose spec needs training (IVF lists, PQ/SQ codebooks, PCA/OPQ) is trained once, for all its shards,
# when it holds TRAIN_MIN_POINTS_PER_CENTROID points per centroid of its largest k-means (FAISS warns below 39),
# and at least MIN_TRAIN_POINTS. The sample it trains on is larger where that is affordable: about
# SAMPLE_POINTS_PER_LIST points per IVF list (centroids from 39 points per list give visibly unbalanced lists), up
# to MAX_TRAIN_SAMPLE points; while a collection holds fewer than that, it is trained again once it holds
# RETRAIN_GROWTH times the sample it was trained on.
TRAIN_MIN_POINTS_PER_CENTROID = 39
MIN_TRAIN_POINTS = 1000
SAMPLE_POINTS_PER_LIST = 100
MAX_TRAIN_SAMPLE = 500_000
RETRAIN_GROWTH = 2.5
_SQ_TRAINED = ("4", "6", "8")


def training_points(spec: str) -> tuple[int, int]:
    """(vectors a collection needs before it is trained, vectors its training sample should have); (0, 0) for
    specs that need no training (Flat, HNSW, SQfp16, CAGRA, BFlat, BHNSW). ``spec`` is a valid, normalised spec."""
    needed, lists = 0, 0
    for part in re.split(r"[,_]", spec):
        if m := re.fullmatch(r"B?IVF(\d+)", part):
            lists = int(m.group(1))
            needed = max(needed, TRAIN_MIN_POINTS_PER_CENTROID * lists)
        elif m := re.fullmatch(r"PQ(\d+)(?:x(\d+))?(?:np|fs)?", part):
            needed = max(needed, TRAIN_MIN_POINTS_PER_CENTROID * (1 << int(m.group(2) or 8)))
        elif part.startswith("OPQ"):
            needed = max(needed, TRAIN_MIN_POINTS_PER_CENTROID * 256)
        elif part.startswith("PCA") or (part.startswith("SQ") and part[2:] in _SQ_TRAINED):
            needed = max(needed, MIN_TRAIN_POINTS)
    if not needed:
        return 0, 0
    needed = max(needed, MIN_TRAIN_POINTS)
    return needed, max(needed, min(SAMPLE_POINTS_PER_LIST * lists, MAX_TRAIN_SAMPLE))
