"""How bench/encoder_bench.py scores an encoder: distances in its metric, each edited copy's rank against every
original (top-1 retrieval), the copy / different-photo distance threshold, and the evaluation over the photos (or
over folds, each scored by the model that did not see them).

May use: bench.encoder_photos.
"""

from __future__ import annotations

import time

import numpy as np
from PIL import Image, ImageOps

from bench.encoder_photos import EDIT_NAMES, edit


def distances(metric: str, q: np.ndarray, db: np.ndarray) -> np.ndarray:
    """(nq, ndb) distances: Hamming bits, cosine distance (1 - cos) or Euclidean."""
    if metric == "hamming":
        return np.unpackbits(q[:, None, :] ^ db[None, :, :], axis=2).sum(axis=2).astype(np.float64)
    q, db = q.astype(np.float64), db.astype(np.float64)
    if metric == "cosine":
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        dn = db / np.linalg.norm(db, axis=1, keepdims=True)
        return 1.0 - qn @ dn.T
    return np.sqrt(np.maximum(0.0, (q * q).sum(1)[:, None] + (db * db).sum(1)[None, :] - 2 * q @ db.T))


def threshold_analysis(copy: np.ndarray, diff: np.ndarray, integer: bool, fixed_t: float | None = None) -> dict:
    """Copy (should match) vs different-photo (should not) distances; a pair matches when distance <= t."""
    copy, diff = np.sort(copy), np.sort(diff)
    if integer:
        cands = np.arange(0, max(copy.max(initial=0), diff.max(initial=0)) + 2, dtype=np.float64)
    else:
        vals = np.unique(np.concatenate([copy, diff]))
        cands = np.concatenate([[vals[0] - 1e-6], (vals[:-1] + vals[1:]) / 2, [vals[-1] + 1e-6]])
    miss = 1.0 - np.searchsorted(copy, cands, side="right") / max(1, len(copy))
    fm = np.searchsorted(diff, cands, side="right") / max(1, len(diff))
    err = miss + fm
    best = np.flatnonzero(err == err.min())
    i = best[len(best) // 2]  # the middle of a flat optimum
    zero = np.flatnonzero(fm == 0)
    j = zero[-1] if len(zero) else None
    out = {"best": {"t": float(cands[i]), "miss": float(miss[i]), "false_match": float(fm[i])},
           "zero_false_match": ({"t": float(cands[j]), "miss": float(miss[j]), "false_match": 0.0}
                                if j is not None else None),
           "copy_max": float(copy.max()) if len(copy) else None,
           "copy_p95": float(np.percentile(copy, 95)) if len(copy) else None,
           "diff_min": float(diff.min()) if len(diff) else None,
           "diff_p5": float(np.percentile(diff, 5)) if len(diff) else None,
           "diff_median": float(np.median(diff)) if len(diff) else None,
           "copies": len(copy), "different_pairs": len(diff)}
    if fixed_t is not None:
        out["fixed"] = {"t": fixed_t, "miss": float((copy > fixed_t).mean()), "false_match": float((diff <= fixed_t).mean())}
    return out


def query_distances(enc, originals: list[Image.Image], lenient: bool = False, metric: str | None = None,
                    mirror: bool = False) -> tuple[list[dict], list[int]]:
    """Every edit of every photo as a query against the originals: (queries, database photo indices).

    A query is {photo, edit, encoded, own (distance to its original), min_other, correct, tie, other (distances to
    the other originals)}. With ``lenient`` (the face encoder), images it refuses are left out of the database, and
    queries it refuses count as misses ("no face"). With ``mirror``, each query is also searched mirrored and each
    original is at the smaller of the two distances (flip-invariant search at twice the query cost).
    """
    metric = metric or enc.metric
    if lenient:
        db, reasons = enc.encode_images_lenient(originals)
        in_db = [i for i, r in enumerate(reasons) if r is None]
    else:
        db, in_db = enc.encode_images(originals), list(range(len(originals)))
    pos = {p: k for k, p in enumerate(in_db)}
    queries = []
    for e in EDIT_NAMES:
        ims = [edit(originals[p], e) for p in in_db]
        if lenient:
            qv, qreasons = enc.encode_images_lenient(ims)
            ok = [k for k, r in enumerate(qreasons) if r is None]
        else:
            qv, ok = enc.encode_images(ims), list(range(len(ims)))
        D = distances(metric, qv, db) if len(ok) else np.empty((0, len(in_db)))
        if mirror and len(ok):
            D = np.minimum(D, distances(metric, enc.encode_images([ImageOps.mirror(ims[k]) for k in ok]), db))
        got = {k: row for k, row in zip(ok, D)}
        for k, p in enumerate(in_db):
            row = got.get(k)
            if row is None:
                queries.append({"photo": p, "edit": e, "encoded": False, "own": None, "min_other": None,
                                "correct": False, "tie": False, "other": np.empty(0)})
                continue
            own = row[pos[p]]
            other = np.delete(row, pos[p])
            mo = float(other.min()) if len(other) else float("inf")
            queries.append({"photo": p, "edit": e, "encoded": True, "own": float(own), "min_other": mo,
                            "correct": bool(own < mo), "tie": bool(own == mo), "other": other})
    return queries, in_db


def _score(sel: list[dict]) -> dict:
    n = len(sel)
    return {"n": n, "encoded": sum(q["encoded"] for q in sel), "correct": sum(q["correct"] for q in sel),
            "ties": sum(q["tie"] for q in sel), "acc": (sum(q["correct"] for q in sel) / n) if n else None}


def summarise(selections: dict[str, list[dict]], integer: bool, fixed_t: float | None = None,
              colour: list[bool] | None = None) -> dict:
    """Per group of queries: top-1 per edit and overall, thresholds, copy distances per edit.

    ``colour``: per photo, whether it has colour; adds "greyscale (colour photos)", the greyscale queries of colour
    photos only (a greyscale copy of a grey photo is the photo itself).
    """
    out = {"accuracy": {}, "thresholds": {}, "copy_distance": {}}
    for g, sel in selections.items():
        if not sel:
            continue
        acc = {e: _score([q for q in sel if q["edit"] == e]) for e in EDIT_NAMES}
        acc["all"] = _score(sel)
        if colour is not None:
            acc["greyscale (colour photos)"] = _score([q for q in sel
                                                       if q["edit"] == "greyscale" and colour[q["photo"]]])
        out["accuracy"][g] = acc
        enc_sel = [q for q in sel if q["encoded"]]
        copy = np.array([q["own"] for q in enc_sel])
        diff = np.concatenate([q["other"] for q in enc_sel]) if enc_sel else np.empty(0)
        if len(copy) and len(diff):
            th = threshold_analysis(copy, diff, integer, fixed_t)
            per_edit_miss = {}
            for e in EDIT_NAMES:
                c = np.array([q["own"] for q in enc_sel if q["edit"] == e])
                per_edit_miss[e] = float((c > th["best"]["t"]).mean()) if len(c) else None
            th["miss_per_edit_at_best"] = per_edit_miss
            if fixed_t is not None:  # copies a search would call matches at the fixed threshold, per edit
                th["fixed"]["within_per_edit"] = {e: {
                    "within": sum(q["encoded"] and q["own"] <= fixed_t for q in sel if q["edit"] == e),
                    "n": sum(q["edit"] == e for q in sel)} for e in EDIT_NAMES}
            out["thresholds"][g] = th
        out["copy_distance"][g] = {
            e: ({"max": float(max(q["own"] for q in enc_sel if q["edit"] == e)),
                 "median": float(np.median([q["own"] for q in enc_sel if q["edit"] == e]))}
                if any(q["edit"] == e for q in enc_sel) else None) for e in EDIT_NAMES}
    return out


def _misses(queries: list[dict], names: list[str], **extra) -> list[dict]:
    return [{"photo": names[q["photo"]], "edit": q["edit"], "own": q["own"], "min_other": q["min_other"],
             "encoded": q["encoded"], **extra} for q in queries if not q["correct"]]


def evaluate(enc, originals: list[Image.Image], names: list[str], groups: dict[str, list[int]],
             lenient: bool = False, metric: str | None = None, fixed_t: float | None = None, mirror: bool = False,
             colour: list[bool] | None = None) -> dict:
    """Top-1 retrieval of each edit (database = the originals) and the copy / different-photo distances.

    groups: subset name -> indices of the photos whose queries it scores (e.g. train / held-out).
    """
    metric = metric or enc.metric
    t0 = time.perf_counter()
    queries, in_db = query_distances(enc, originals, lenient, metric, mirror)
    seconds = time.perf_counter() - t0
    selections = {g: [q for q in queries if q["photo"] in set(members)] for g, members in groups.items()}
    out = {"database": [names[i] for i in in_db], "seconds": round(seconds, 2)}
    out.update(summarise(selections, metric == "hamming", fixed_t, colour))
    out["misses"] = _misses(queries, names)
    return out


def evaluate_folds(encs: list, originals: list[Image.Image], names: list[str], folds: list[dict],
                   colour: list[bool] | None = None, fixed_t: float | None = None) -> dict:
    """Like evaluate, for K models each trained without one fold of the photos: the "held-out" group pools every
    photo's queries scored by the model that did not see it, "train" the queries of each model's training photos.
    """
    metric = encs[0].metric
    t0 = time.perf_counter()
    sel: dict[str, list[dict]] = {"train": [], "held-out": []}
    misses = []
    for f, (enc, fold) in enumerate(zip(encs, folds)):
        queries, _ = query_distances(enc, originals, metric=metric)
        held = set(fold["held-out"])
        sel["held-out"] += [q for q in queries if q["photo"] in held]
        sel["train"] += [q for q in queries if q["photo"] not in held]
        misses += _misses([q for q in queries if q["photo"] in held], names, fold=f)
    out = {"database": list(names), "seconds": round(time.perf_counter() - t0, 2), "folds": len(encs)}
    out.update(summarise(sel, metric == "hamming", fixed_t, colour))
    out["misses"] = misses  # held-out queries only
    return out
