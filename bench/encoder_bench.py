"""Encoders on real photos: retrieval of edited copies, the copy / different-photo distance threshold, training the
CNN on part of the photos, and throughput (encode, decode + encode, ingest end to end).

    python -m bench.encoder_bench [--out bench/out/encoders.json] [--epochs 1000] [--seed 0] [--folds 1]

What it does, in one process:

1. **Photos**: the real photographs bundled in scikit-image's wheel (``skimage.data``; loaders that would download
   are tried and skipped when they fail; synthetic patterns, text, a binary silhouette, a thumbnail and duplicates
   are left out on purpose, see ``SKIMAGE_PHOTOS`` / ``SKIMAGE_LEFT_OUT``), when scikit-learn is installed
   ``sklearn.datasets.load_sample_images()`` (china, flower), and when matplotlib is installed the photograph in its
   sample data (grace_hopper). Nothing is generated.
2. **Edits** of each photo (``EDIT_NAMES``, ``edit``): resize 1/2 and 1/4, JPEG quality 50 and 20, brightness x1.3,
   crop 5% and 10% per side, rotation 5 degrees (same canvas, black corners), horizontal flip, greyscale, and a
   stock-photo watermark (``watermark``: translucent diagonal text across the middle and a small caption).
3. **Retrieval**: for each encoder, database = every original photo, query = each edited copy; top-1 is correct when
   the copy's own original is strictly nearer than every other photo (a tie counts as a miss). Distances in the
   encoder's metric: Hamming (differing bits) for pHash, cosine distance (1 - cos) for the CNNs, Euclidean for the
   face encoder. ``phash+mirror`` is pHash searched flip-invariantly: each query also mirrored, each original at the
   nearer of the two. Greyscale copies of photos that are grey already are the photos themselves, so greyscale is
   also scored on the colour photos alone ("greyscale (colour photos)").
4. **Threshold**: copy distances (query to its own original) against different-photo distances (query to every other
   original): per edit the largest copy distance, the smallest / 5th percentile / median different-photo distance,
   and two thresholds (a pair is called a copy when distance <= t): the one that minimises miss rate + false-match
   rate, and the largest with no false match, each with its miss and false-match rates.
5. **CNNs**: ``encoder.train.train_encoder`` (``--methods``: triplet, autoencoder) on a seeded 2/3 of the photos
   (downsized to a shorter side of 96 px, as ``lookalike train-encoder`` does), loaded back through
   ``torchscript:PATH``; accuracy reported on training and held-out photos separately; a 1-epoch triplet model is
   the (near) untrained baseline. With ``--folds K`` each method trains K models, each without one K-th of the
   photos, so that every photo is held out once: the held-out rows pool every photo scored by the model that did
   not see it (and the CNN rows have no "all").
6. **Face**: dlib's encoder only where a face is detected. Among the photos above that is normally one
   (astronaut), so the face rows also use the real LFW face crops bundled with scikit-image
   (``skimage.data.lfw_subset``, 25 x 25 px, upscaled x4) as more people: database = every face, queries = edits.
7. **Throughput**: images/s of ``encode_images`` on crops of the photos resized to 512 px (long side), of
   ``encode_many`` on the same as JPEG bytes (decode + encode), and of ``encoder.ingest.ingest`` through a
   ``LocalCluster`` (2 shards, real gRPC, no Ray) + router gRPC server, for pHash and the triplet CNN. Every row
   records how many cores other processes used meanwhile (the machine is shared).

A Markdown report goes to stdout and every number to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from bench.timing import ForeignCpu
from control.local import LocalCluster
from encoder import get_encoder
from encoder.ingest import ingest
from encoder.match import FACE_MATCH_L2, default_match
from encoder.registry import encode_many
from encoder.train import train_encoder
from lookalike.client import Client
from router.server import create_router_server

# skimage.data loaders of real photographs (name -> how to get the RGB array); tried one by one, skipped on failure.
SKIMAGE_PHOTOS = ["astronaut", "camera", "coffee", "chelsea", "coins", "moon", "rocket", "hubble_deep_field",
                  "retina", "immunohistochemistry", "gravel", "grass", "brick", "clock", "cell",
                  "stereo_motorcycle", "eagle", "lily", "skin"]
SKIMAGE_LEFT_OUT = {
    "cat": "the same picture as chelsea",
    "stereo_motorcycle (right view)": "a near-duplicate of the left view",
    "checkerboard, colorwheel, logo, binary_blobs, shepp_logan_phantom": "synthetic",
    "text, page": "text / a scanned page, not a photograph of a scene",
    "horse": "a binary silhouette",
    "microaneurysms": "102 x 102 px",
    "lfw_subset": "25 x 25 px crops (used only for the face encoder)",
    "brain, cells3d, kidney, ...": "3-D / multi-channel microscopy, or downloads",
}
EDIT_NAMES = ["resize 1/2", "resize 1/4", "jpeg 50", "jpeg 20", "bright x1.3", "crop 5%", "crop 10%", "rotate 5",
              "hflip", "greyscale", "watermark"]
WATERMARK_TEXT = "\u00a9 SAMPLE stock"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- photos and edits -------------------------------------------------------------------------------------------
def _to_rgb(arr: np.ndarray) -> Image.Image:
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8) if arr.dtype.kind == "f" else arr.astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def load_photos(use_sklearn: bool = True, limit: int = 0) -> tuple[list[dict], list[dict]]:
    """([{name, source, image}], [{name, reason}] for the loaders that failed); ``limit`` > 0: the first that many
    photos only (the loaders after them are not tried)."""
    import skimage.data

    photos, failed = [], []
    for name in SKIMAGE_PHOTOS:
        if limit and len(photos) >= limit:
            return photos, failed
        try:
            arr = getattr(skimage.data, name)()
            if name == "stereo_motorcycle":
                arr, name = arr[0], "motorcycle_left"
            photos.append({"name": name, "source": "skimage.data", "image": _to_rgb(arr)})
        except (ImportError, OSError, ValueError, RuntimeError) as err:  # needs a download or an optional package
            failed.append({"name": name, "reason": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"})
    if use_sklearn and not (limit and len(photos) >= limit):
        try:
            from sklearn.datasets import load_sample_images

            data = load_sample_images()
            for fname, arr in zip(data.filenames, data.images):
                photos.append({"name": pathlib.Path(fname).stem, "source": "sklearn.datasets", "image": _to_rgb(arr)})
        except (ImportError, OSError, ValueError) as err:
            failed.append({"name": "sklearn.load_sample_images", "reason": f"{type(err).__name__}: {err}"})
    if limit and len(photos) >= limit:
        return photos[:limit], failed
    try:  # the one photograph in matplotlib's bundled sample data
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            photos.append({"name": "grace_hopper", "source": "matplotlib", "image": Image.open(f).convert("RGB")})
    except (ImportError, OSError, ValueError) as err:
        failed.append({"name": "matplotlib grace_hopper", "reason": f"{type(err).__name__}: {err}"})
    return photos, failed


def is_colour(im: Image.Image) -> bool:
    """Whether a photo has colour (its greyscale copy differs from it); grey photos are stored as RGB too."""
    a = np.asarray(im, dtype=np.int16)
    return bool(np.abs(a[..., 0] - a[..., 1]).max() > 8 or np.abs(a[..., 1] - a[..., 2]).max() > 8)


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _crop(im: Image.Image, f: float) -> Image.Image:
    w, h = im.size
    dx, dy = round(w * f), round(h * f)
    return im.crop((dx, dy, w - dx, h - dy))


def watermark(im: Image.Image) -> Image.Image:
    """A stock-photo watermark: WATERMARK_TEXT in white at 50% opacity, its height 1/8 of the shorter side, across
    the middle at 30 degrees, plus a small opaque caption in the lower left corner."""
    from PIL import ImageDraw, ImageFont

    w, h = im.size
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    font = ImageFont.load_default(size=max(8, min(w, h) // 8))
    draw.text((w // 2, h // 2), WATERMARK_TEXT, font=font, fill=(255, 255, 255, 128), anchor="mm")
    layer = layer.rotate(30, resample=Image.Resampling.BILINEAR)
    small = ImageFont.load_default(size=max(6, min(w, h) // 25))
    ImageDraw.Draw(layer).text((min(w, h) // 40, h - min(w, h) // 40), "photo: lookalike.example", font=small,
                               fill=(255, 255, 255, 255), anchor="ld", stroke_width=1, stroke_fill=(0, 0, 0, 255))
    return Image.alpha_composite(im.convert("RGBA"), layer).convert("RGB")


def edit(im: Image.Image, name: str) -> Image.Image:
    w, h = im.size
    if name == "resize 1/2":
        return im.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BICUBIC)
    if name == "resize 1/4":
        return im.resize((max(1, w // 4), max(1, h // 4)), Image.Resampling.BICUBIC)
    if name == "jpeg 50":
        return _jpeg(im, 50)
    if name == "jpeg 20":
        return _jpeg(im, 20)
    if name == "bright x1.3":
        return ImageEnhance.Brightness(im).enhance(1.3)
    if name == "crop 5%":
        return _crop(im, 0.05)
    if name == "crop 10%":
        return _crop(im, 0.10)
    if name == "rotate 5":
        return im.rotate(5, resample=Image.Resampling.BICUBIC, expand=False, fillcolor=(0, 0, 0))
    if name == "hflip":
        return ImageOps.mirror(im)
    if name == "greyscale":
        return ImageOps.grayscale(im).convert("RGB")
    if name == "watermark":
        return watermark(im)
    raise ValueError(name)


def train_view(im: Image.Image, side: int = 96) -> Image.Image:
    """Shorter side to ``side`` px, as encoder.train.load_folder (the CLI's train-encoder) does."""
    s = side / min(im.size)
    return im.resize((max(side, round(im.width * s)), max(side, round(im.height * s))), Image.Resampling.BILINEAR)


# --- distances and scores ---------------------------------------------------------------------------------------
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


# --- throughput -------------------------------------------------------------------------------------------------
def throughput_images(photos: list[Image.Image], n: int, side: int, seed: int) -> list[Image.Image]:
    """n random crops (60-100% of each side) of the photos, long side resized to ``side``."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = im.crop((x, y, x + cw, y + ch))
        s = side / max(im.size)
        out.append(im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.BICUBIC))
    return out


def timed(fn, items: list, seconds: float, monitor) -> dict:
    """Runs fn(items) once to warm up on a few items, then repeatedly for at least ``seconds``."""
    fn(items[:2])
    a = monitor.snapshot() if monitor else None
    t0 = time.perf_counter()
    done = 0
    while True:
        fn(items)
        done += len(items)
        el = time.perf_counter() - t0
        if el >= seconds:
            break
    b = monitor.snapshot() if monitor else None
    return {"images": done, "seconds": round(el, 3), "images_per_s": round(done / el, 2),
            "others_cores": round(monitor.cores(a, b), 2) if monitor else None}


def ingest_run(spec: str, folder: pathlib.Path, batch: int, monitor, check: list[pathlib.Path]) -> dict:
    tmp = tempfile.mkdtemp(prefix="encbench-cluster-")
    cluster = LocalCluster(tmp, shards=2)
    server, port, _ = create_router_server(cluster.router, "127.0.0.1:0")
    client = Client(f"127.0.0.1:{port}")
    try:
        client.create_collection("photos", encoder=spec, buckets=64)
        a = monitor.snapshot() if monitor else None
        t0 = time.perf_counter()
        report = ingest(client, "photos", folder, batch=batch, progress=False)
        el = time.perf_counter() - t0
        b = monitor.snapshot() if monitor else None
        t1 = time.perf_counter()
        again = ingest(client, "photos", folder, batch=batch, progress=False)  # resume: nothing left to encode
        el2 = time.perf_counter() - t1
        hits = client.search_by_image("photos", [p.read_bytes() for p in check], k=1)
        want = [p.relative_to(folder).as_posix() for p in check]
        top1 = sum(h[:1] == [w] for h, w in zip(hits.ids, want))
        return {"encoder": spec, "files": report.files, "stored": report.stored, "failed": len(report.failed),
                "failures": dict(list(report.failed.items())[:5]), "seconds": round(el, 2),
                "images_per_s": round(report.stored / el, 2),
                "others_cores": round(monitor.cores(a, b), 2) if monitor else None,
                "resume_seconds": round(el2, 2), "resume_already_stored": again.already_stored,
                "resume_stored": again.stored, "search_check": f"{top1}/{len(check)}"}
    finally:
        client.close()
        server.stop(None)
        cluster.close()
        shutil.rmtree(tmp, ignore_errors=True)


# --- the run ----------------------------------------------------------------------------------------------------
def run(args) -> dict:
    try:
        monitor = ForeignCpu()
    except ImportError:  # psutil missing: rows carry no others' CPU
        monitor = None
    import torch

    started = time.perf_counter()
    out: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                             "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                             "loadavg_start": list(os.getloadavg())},
                 "args": vars(args).copy()}

    photos, failed = load_photos(not args.no_sklearn, args.max_photos)
    names = [p["name"] for p in photos]
    originals = [p["image"] for p in photos]
    colour = [is_colour(im) for im in originals]
    n = len(photos)
    if n < 3:
        raise SystemExit(f"only {n} photos could be loaded: {failed}")
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(n)
    if args.folds > 1:  # every photo held out once: fold f holds out perm[f::K]
        if args.folds > n:
            raise SystemExit(f"--folds {args.folds} is more than the {n} photos")
        folds = [{"held-out": sorted(perm[f::args.folds].tolist())} for f in range(args.folds)]
    else:
        n_train = max(2, round(n * args.train_fraction))
        folds = [{"held-out": sorted(perm[n_train:].tolist())}]
    for fold in folds:
        fold["train"] = [i for i in range(n) if i not in set(fold["held-out"])]
    train_idx, held_idx = folds[0]["train"], folds[0]["held-out"]
    groups = {"all": list(range(n)), "train": train_idx, "held-out": held_idx}
    out["photos"] = [{"name": p["name"], "source": p["source"], "size": list(p["image"].size), "colour": colour[i],
                      "split": ("train" if i in train_idx else "held-out") if len(folds) == 1 else
                      f"held out in fold {next(f for f, fd in enumerate(folds) if i in fd['held-out'])}"}
                     for i, p in enumerate(photos)]
    out["folds"] = len(folds)
    out["photos_failed"] = failed
    out["photos_left_out"] = SKIMAGE_LEFT_OUT
    log(f"{n} photos ({len(train_idx)} train / {len(held_idx)} held-out"
        + (f", {len(folds)} folds" if len(folds) > 1 else "") + f"): {', '.join(names)}")
    if failed:
        log("skipped loaders: " + "; ".join(f"{f['name']} ({f['reason'][:60]})" for f in failed))

    # CNNs: one model per fold and method
    model_dir = pathlib.Path(args.model_dir or tempfile.mkdtemp(prefix="encbench-models-"))
    model_dir.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    if not set(methods) <= {"triplet", "autoencoder"}:
        raise SystemExit(f"--methods takes triplet and/or autoencoder, got {args.methods!r}")
    runs = [(f"cnn-{m}", m, args.epochs) for m in methods]
    if not args.no_baseline:
        runs.append(("cnn-untrained", "triplet", 1))
    models: dict[str, list[str]] = {}
    out["training"] = {}
    for label, method, epochs in runs:
        for f, fold in enumerate(folds):
            train_set = [train_view(originals[i]) for i in fold["train"]]
            path = model_dir / (f"{label}.pt" if len(folds) == 1 else f"{label}-fold{f}.pt")
            t0 = time.perf_counter()
            losses = train_encoder(train_set, path, method=method, epochs=epochs or None, batch_size=args.batch,
                                   seed=args.seed, progress=False)
            el = time.perf_counter() - t0
            models.setdefault(label, []).append(str(path))
            key = label if len(folds) == 1 else f"{label} fold {f}"
            out["training"][key] = {"method": method, "epochs": len(losses), "images": len(train_set),
                                    "steps_per_epoch": max(1, len(train_set) // min(args.batch, len(train_set))),
                                    "seconds": round(el, 1), "loss_first": losses[0], "loss_last": losses[-1],
                                    "path": str(path)}
            log(f"trained {key} ({method}, {len(losses)} epochs on {len(train_set)} photos): {el:.1f}s, "
                f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    # quality
    specs = [("phash", "phash", False), ("phash+mirror", "phash", True), ("phash:16", "phash:16", False)]
    encoders = {}
    out["quality"] = {}
    for label, spec, mirror in specs:
        enc = get_encoder(spec)
        encoders.setdefault(label.split("+")[0], enc)
        rule = default_match(spec)
        res = evaluate(enc, originals, names, groups, mirror=mirror, colour=colour, fixed_t=rule.threshold)
        res.update(metric=enc.metric, dim=enc.dim, mirror=mirror, match_rule=rule.describe())
        out["quality"][label] = res
        a = res["accuracy"]["all"]["all"]
        log(f"quality {label}: top-1 {a['correct']}/{a['n']} ({res['seconds']}s)")
    for label, paths in models.items():
        encs = [get_encoder(f"torchscript:{path}") for path in paths]
        encoders[label] = encs[0]
        rule = default_match(f"torchscript:{paths[0]}")  # the similarity train_encoder wrote into the model's JSON
        fixed_t = 1.0 - rule.threshold if rule else None  # as a cosine distance, the bench's unit
        if len(folds) == 1:
            res = evaluate(encs[0], originals, names, groups, colour=colour, fixed_t=fixed_t)
        else:
            res = evaluate_folds(encs, originals, names, folds, colour=colour, fixed_t=fixed_t)
        res.update(metric=encs[0].metric, dim=encs[0].dim, match_rule=rule.describe() if rule else None)
        out["quality"][label] = res
        a = res["accuracy"]["held-out"]
        gc = a["greyscale (colour photos)"]
        log(f"quality {label}: held-out top-1 {a['all']['correct']}/{a['all']['n']}, greyscale "
            f"{a['greyscale']['correct']}/{a['greyscale']['n']} (colour photos {gc['correct']}/{gc['n']}) "
            f"({res['seconds']}s)")
    models = {label: paths[0] for label, paths in models.items()}  # throughput and ingest use the first fold's

    if not args.no_face:
        try:
            face = get_encoder("face")
        except ValueError as err:
            out["face"] = {"skipped": str(err)}
            face = None
        if face is not None:
            encoders["face"] = face
            out["face"] = face_quality(face, originals, names, args)

    if not args.no_throughput:
        throughput(out, args, originals, names, encoders, models, monitor)
    out["machine"]["loadavg_end"] = list(os.getloadavg())
    out["total_seconds"] = round(time.perf_counter() - started, 1)
    if not args.model_dir:
        out["models_kept_in"] = str(model_dir)
    return out


def throughput(out: dict, args, originals: list[Image.Image], names: list[str], encoders: dict, models: dict,
               monitor) -> None:
    """encode_images and encode_many images/s per encoder, then ingest end to end (into ``out``)."""
    n = len(originals)
    face = encoders.get("face")
    out["machine"]["loadavg_before_throughput"] = list(os.getloadavg())
    if monitor is not None:
        waited, others = monitor.wait_quiet(args.quiet_wait)
        out["machine"]["quiet_wait"] = {"seconds": round(waited, 1), "others_cores": round(others, 2)}
        log(f"others used {others:.2f} cores before throughput (waited {waited:.0f}s)")
    tims = throughput_images(originals, args.throughput_images, args.side, args.seed)
    blobs = []
    for im in tims:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    out["throughput"] = {"images": len(tims), "side": args.side, "jpeg_kib_mean": round(np.mean([len(b) for b in blobs]) / 1024, 1),
                         "rows": []}
    for label, enc in encoders.items():
        if label == "cnn-untrained":
            continue
        k = len(tims) if label != "face" else min(len(tims), args.face_throughput_images)
        if label == "face":
            r1 = timed(lambda xs: face.encode_images_lenient(xs), tims[:k], args.seconds, monitor)
            r1["faces_found"] = sum(r is None for r in face.encode_images_lenient(tims[:k])[1])
        else:
            r1 = timed(enc.encode_images, tims[:k], args.seconds, monitor)
        r2 = timed(lambda bs, enc=enc: encode_many(enc, bs), blobs[:k], args.seconds, monitor)
        out["throughput"]["rows"].append({"encoder": label, "batch": k, "encode_images": r1, "decode_encode": r2})
        log(f"throughput {label}: encode {r1['images_per_s']}/s, decode+encode {r2['images_per_s']}/s "
            f"(others {r1['others_cores']}/{r2['others_cores']} cores)")

    if not args.no_ingest:
        folder = pathlib.Path(tempfile.mkdtemp(prefix="encbench-ingest-"))
        try:
            iims = throughput_images(originals, args.ingest_images, args.side, args.seed + 1)
            paths = []
            for i, im in enumerate(iims):
                p = folder / names[i % n] / f"{i:04d}.jpg"
                p.parent.mkdir(exist_ok=True)
                im.save(p, "JPEG", quality=90)
                paths.append(p)
            check = paths[:: max(1, len(paths) // 8)][:8]
            out["ingest"] = {"files": len(paths), "side": args.side, "batch": args.ingest_batch,
                             "mib": round(sum(p.stat().st_size for p in paths) / 2**20, 1), "rows": []}
            ing_specs = [("phash", "phash")]
            if "cnn-triplet" in models:
                ing_specs.append(("cnn-triplet", f"torchscript:{models['cnn-triplet']}"))
            for label, spec in ing_specs:
                if monitor is not None:
                    monitor.wait_quiet(min(30.0, args.quiet_wait))
                r = ingest_run(spec, folder, args.ingest_batch, monitor, check)
                r["label"] = label
                out["ingest"]["rows"].append(r)
                log(f"ingest {label}: {r['stored']} stored in {r['seconds']}s = {r['images_per_s']}/s, "
                    f"{r['failed']} failed, resume {r['resume_seconds']}s, search check {r['search_check']}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def face_quality(face, originals: list[Image.Image], names: list[str], args) -> dict:
    """Face encoder: which photos have a face; retrieval over those plus LFW faces."""
    t0 = time.perf_counter()
    _, reasons = face.encode_images_lenient(originals)
    with_face = [names[i] for i, r in enumerate(reasons) if r is None]
    res: dict = {"photos_with_face": with_face, "photos_without_face": [names[i] for i, r in enumerate(reasons) if r]}
    log(f"face: detected in {with_face or 'none'} of the {len(names)} photos ({time.perf_counter() - t0:.1f}s)")
    faces = [originals[i] for i, r in enumerate(reasons) if r is None]
    fnames = [names[i] for i, r in enumerate(reasons) if r is None]
    if args.lfw_faces > 0:
        try:
            import skimage.data

            lfw = skimage.data.lfw_subset()[:100]  # the first 100 are faces
            ups = [_to_rgb(a).resize((25 * args.lfw_scale, 25 * args.lfw_scale), Image.Resampling.BICUBIC)
                   for a in lfw[:args.lfw_faces]]
            _, lr = face.encode_images_lenient(ups)
            kept = [i for i, r in enumerate(lr) if r is None]
            res["lfw"] = {"tried": len(ups), "detected": len(kept), "scale": args.lfw_scale}
            faces += [ups[i] for i in kept]
            fnames += [f"lfw{i:03d}" for i in kept]
        except (ImportError, OSError, ValueError, RuntimeError) as err:
            res["lfw"] = {"error": f"{type(err).__name__}: {err}"}
    groups = {"all": list(range(len(faces)))}
    own = [i for i, nm in enumerate(fnames) if not nm.startswith("lfw")]
    if own:
        groups["photos"] = own
    lfw_idx = [i for i, nm in enumerate(fnames) if nm.startswith("lfw")]
    if lfw_idx:
        groups["lfw"] = lfw_idx
    if len(faces) >= 1:
        # dlib's same-person rule, 0.6 (Euclidean, the bench's distance for face) is scored too
        ev = evaluate(face, faces, fnames, groups, lenient=True, metric="l2", fixed_t=FACE_MATCH_L2 ** 0.5)
        res.update(ev)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    log(f"face quality: {res.get('accuracy', {}).get('all', {}).get('all')} ({res['seconds']}s)")
    return res


# --- report -----------------------------------------------------------------------------------------------------
def _f(x, nd=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x == int(x) and abs(x) < 1e6 and nd == 0:
            return str(int(x))
        return f"{x:.{nd}f}"
    return str(x)


def _acc(s: dict | None) -> str:
    if not s or not s["n"]:
        return "-"
    return f"{s['correct']}/{s['n']}"


def markdown(out: dict) -> str:
    L = []
    m = out["machine"]
    L.append(f"# Encoder benchmark ({out['date']})\n")
    L.append(f"{m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), load average at start "
             f"{', '.join(f'{x:.2f}' for x in m['loadavg_start'])}; total {out['total_seconds']} s.\n")
    L.append("## Photos\n")
    L.append("| photo | source | size | split |")
    L.append("|---|---|---|---|")
    for p in out["photos"]:
        L.append(f"| {p['name']} | {p['source']} | {p['size'][0]}x{p['size'][1]} | {p['split']} |")
    if out["photos_failed"]:
        L.append("\nLoaders skipped (not bundled offline): " + ", ".join(
            f"{f['name']} ({f['reason'][:70]})" for f in out["photos_failed"]))
    L.append("")
    q = out["quality"]
    grey_c = "greyscale (colour photos)"
    folds = out.get("folds", 1)
    L.append("## Top-1 retrieval of edited copies (database = all originals)\n")
    if folds > 1:
        L.append(f"CNN rows: {folds} models per method, each trained without one fold; held-out = every photo "
                 "scored by the model that did not see it.\n")
    L.append("| encoder | " + " | ".join(EDIT_NAMES) + f" | all | {grey_c} |")
    L.append("|---|" + "---:|" * (len(EDIT_NAMES) + 2))
    for label, r in q.items():
        g = "all" if "all" in r["accuracy"] else "held-out"
        a = r["accuracy"][g]
        L.append(f"| {label}{'' if g == 'all' else f' (held-out, {folds} folds)'} | "
                 + " | ".join(_acc(a[e]) for e in EDIT_NAMES) + f" | {_acc(a['all'])} | {_acc(a.get(grey_c))} |")
    L.append("\n## Training vs held-out photos\n")
    L.append("| encoder | photos | " + " | ".join(EDIT_NAMES) + f" | all | {grey_c} |")
    L.append("|---|---|" + "---:|" * (len(EDIT_NAMES) + 2))
    for label, r in q.items():
        for g in ("train", "held-out"):
            a = r["accuracy"].get(g)
            if a:
                L.append(f"| {label} | {g} | " + " | ".join(_acc(a[e]) for e in EDIT_NAMES)
                         + f" | {_acc(a['all'])} | {_acc(a.get(grey_c))} |")
    L.append("\n## Training\n")
    L.append("| model | method | epochs | photos | seconds | loss first -> last |")
    L.append("|---|---|---:|---:|---:|---|")
    for label, t in out["training"].items():
        L.append(f"| {label} | {t['method']} | {t['epochs']} | {t['images']} | {t['seconds']} | "
                 f"{t['loss_first']:.4f} -> {t['loss_last']:.4f} |")
    L.append("\n## Copy distances (largest per edit) vs different-photo distances\n")
    L.append("| encoder | photos | " + " | ".join(EDIT_NAMES) + " | diff min | diff p5 | diff median |")
    L.append("|---|---|" + "---:|" * (len(EDIT_NAMES) + 3))
    for label, r in q.items():
        nd = 0 if r["metric"] == "hamming" else 3
        for g in ("all", "held-out"):
            if g == "held-out" and not label.startswith("cnn"):
                continue
            cd, th = r["copy_distance"].get(g), r["thresholds"].get(g)
            if not cd or not th:
                continue
            L.append(f"| {label} | {g} | " + " | ".join(_f(cd[e]["max"] if cd[e] else None, nd) for e in EDIT_NAMES)
                     + f" | {_f(th['diff_min'], nd)} | {_f(th['diff_p5'], nd)} | {_f(th['diff_median'], nd)} |")
    L.append("\n## Thresholds (a pair is a copy when distance <= t)\n")
    L.append("| encoder | photos | metric | t (min miss + false) | miss | false match | t (no false match) | miss |"
             " misses per edit at the first t |")
    L.append("|---|---|---|---:|---:|---:|---:|---:|---|")
    for label, r in q.items():
        nd = 0 if r["metric"] == "hamming" else 3
        for g in ("all", "held-out"):
            if g == "held-out" and not label.startswith("cnn"):
                continue
            th = r["thresholds"].get(g)
            if not th:
                continue
            z = th["zero_false_match"]
            pe = ", ".join(f"{e} {v:.2f}" for e, v in th["miss_per_edit_at_best"].items() if v)
            L.append(f"| {label} | {g} | {r['metric']} | {_f(th['best']['t'], nd)} | {th['best']['miss']:.3f} | "
                     f"{th['best']['false_match']:.4f} | {_f(z['t'], nd) if z else '-'} | "
                     f"{_f(z['miss']) if z else '-'} | {pe or 'none'} |")
    L.append("\n## Copies within the default match threshold (what the contact sheet marks as a match)\n")
    L.append("| encoder | photos | rule | " + " | ".join(EDIT_NAMES) + " | false match |")
    L.append("|---|---|---|" + "---:|" * (len(EDIT_NAMES) + 1))
    for label, r in q.items():
        for g in ("all", "held-out"):
            if g == "held-out" and not label.startswith("cnn"):
                continue
            fx = (r["thresholds"].get(g) or {}).get("fixed")
            if not fx:
                continue
            w = fx["within_per_edit"]
            L.append(f"| {label} | {g} | {r.get('match_rule') or '-'} | "
                     + " | ".join(f"{w[e]['within']}/{w[e]['n']}" for e in EDIT_NAMES)
                     + f" | {fx['false_match']:.4f} |")
    f = out.get("face")
    if f:
        L.append("\n## Face encoder (dlib, Euclidean)\n")
        if "skipped" in f:
            L.append(f"Skipped: {f['skipped']}")
        else:
            L.append(f"Face detected in: {', '.join(f['photos_with_face']) or 'none'} "
                     f"(of {len(f['photos_with_face']) + len(f['photos_without_face'])} photos).")
            if "lfw" in f:
                L.append(f" LFW subset: {f['lfw']}.")
            L.append("")
            L.append("| queries | " + " | ".join(EDIT_NAMES) + " | all |")
            L.append("|---|" + "---:|" * (len(EDIT_NAMES) + 1))
            for g, a in f.get("accuracy", {}).items():
                L.append(f"| {g} (top-1) | " + " | ".join(
                    f"{_acc(a[e])}" + (f" ({a[e]['n'] - a[e]['encoded']} no face)" if a[e]["n"] - a[e]["encoded"] else "")
                    for e in EDIT_NAMES) + f" | {_acc(a['all'])} |")
            for g, cd in f.get("copy_distance", {}).items():
                L.append(f"| {g} (max copy dist) | " + " | ".join(_f(cd[e]["max"] if cd[e] else None) for e in EDIT_NAMES)
                         + " | |")
            for g, th in f.get("thresholds", {}).items():
                z = th["zero_false_match"]
                L.append(f"\n{g}: different-face distance min {th['diff_min']:.3f}, p5 {th['diff_p5']:.3f}, median "
                         f"{th['diff_median']:.3f}; t = {th['best']['t']:.3f}: miss {th['best']['miss']:.3f}, false "
                         f"match {th['best']['false_match']:.4f}"
                         + (f"; no false match up to {z['t']:.3f} (miss {z['miss']:.3f})" if z else "")
                         + (f"; at dlib's 0.6: miss {th['fixed']['miss']:.3f}, false match "
                            f"{th['fixed']['false_match']:.4f}" if "fixed" in th else ""))
    t = out.get("throughput")
    if not t:
        return "\n".join(L) + "\n"
    L.append(f"\n## Throughput ({t['images']} crops, long side {t['side']} px, JPEG q90 mean {t['jpeg_kib_mean']} KiB)\n")
    L.append("| encoder | batch | encode_images img/s | others' cores | encode_many (decode + encode) img/s | others' cores |")
    L.append("|---|---:|---:|---:|---:|---:|")
    for r in t["rows"]:
        L.append(f"| {r['encoder']} | {r['batch']} | {r['encode_images']['images_per_s']} | "
                 f"{r['encode_images']['others_cores']} | {r['decode_encode']['images_per_s']} | "
                 f"{r['decode_encode']['others_cores']} |")
    ing = out.get("ingest")
    if ing:
        L.append(f"\n## Ingest end to end ({ing['files']} JPEGs, {ing['mib']} MiB, batch {ing['batch']}; LocalCluster 2 "
                 "shards + router gRPC, one process)\n")
        L.append("| encoder | stored | failed | seconds | img/s | others' cores | resume (all stored) s | "
                 "search-by-image top-1 |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---|")
        for r in ing["rows"]:
            L.append(f"| {r['label']} | {r['stored']} | {r['failed']} | {r['seconds']} | {r['images_per_s']} | "
                     f"{r['others_cores']} | {r['resume_seconds']} | {r['search_check']} |")
    return "\n".join(L) + "\n"


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, float) and not np.isfinite(o):
        return None
    return o


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.encoder_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/out/encoders.json")
    p.add_argument("--epochs", type=int, default=0,
                   help="CNN training epochs; 0: what `lookalike train-encoder` does by default (30, or at least "
                        "encoder.train.MIN_STEPS steps: with 13 photos an epoch is one step of 13)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--train-fraction", type=float, default=2 / 3)
    p.add_argument("--folds", type=int, default=1,
                   help="K > 1: train K models per method, each without 1/K of the photos, so that every photo is "
                        "held out once (held-out rows pool them); 1: one split by --train-fraction")
    p.add_argument("--methods", default="triplet,autoencoder", help="CNN training methods, comma-separated")
    p.add_argument("--max-photos", type=int, default=0, help="only the first N photos (0: all; for smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", default=None, help="where the trained models go (default: a temp folder)")
    p.add_argument("--no-sklearn", action="store_true", help="skimage photos only")
    p.add_argument("--no-baseline", action="store_true", help="no 1-epoch (untrained) CNN row")
    p.add_argument("--no-face", action="store_true")
    p.add_argument("--lfw-faces", type=int, default=30, help="LFW face crops added for the face encoder (0: none)")
    p.add_argument("--lfw-scale", type=int, default=4)
    p.add_argument("--throughput-images", type=int, default=128)
    p.add_argument("--face-throughput-images", type=int, default=32)
    p.add_argument("--side", type=int, default=512, help="long side of the throughput images")
    p.add_argument("--seconds", type=float, default=3.0, help="least time per throughput measurement")
    p.add_argument("--quiet-wait", type=float, default=60.0, help="wait up to this for others to leave the CPUs")
    p.add_argument("--no-throughput", action="store_true", help="quality only: no throughput, no ingest")
    p.add_argument("--no-ingest", action="store_true")
    p.add_argument("--ingest-images", type=int, default=300)
    p.add_argument("--ingest-batch", type=int, default=64)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    out = run(args)
    print(markdown(out))
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(out), indent=1))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
