"""Encoders on real photos: retrieval of edited copies, the copy / different-photo distance threshold, training the
CNN on part of the photos, and throughput (encode, decode + encode, ingest end to end).

    python -m bench.encoder_bench [--out bench/out/encoders.json] [--epochs 1000] [--seed 0] [--folds 1]

What it does, in one process:

1. **Photos**: the real photographs bundled in scikit-image's wheel (``skimage.data``; loaders that would download
   are tried and skipped when they fail; synthetic patterns, text, a binary silhouette, a thumbnail and duplicates
   are left out on purpose, see ``SKIMAGE_PHOTOS`` / ``SKIMAGE_LEFT_OUT`` in bench/encoder_photos.py), when
   scikit-learn is installed ``sklearn.datasets.load_sample_images()`` (china, flower), and when matplotlib is
   installed the photograph in its sample data (grace_hopper). Nothing is generated.
2. **Edits** of each photo (bench/encoder_photos.py ``EDIT_NAMES``, ``edit``): resize 1/2 and 1/4, JPEG quality 50
   and 20, brightness x1.3, crop 5% and 10% per side, rotation 5 degrees (same canvas, black corners), horizontal
   flip, greyscale, and a stock-photo watermark (``watermark``: translucent diagonal text across the middle and a
   small caption).
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
from PIL import Image

from bench.encoder_photos import SKIMAGE_LEFT_OUT, is_colour, load_photos, to_rgb, train_view
from bench.encoder_report import markdown
from bench.encoder_scores import evaluate, evaluate_folds
from bench.timing import ForeignCpu
from control.local import LocalCluster
from encoder import get_encoder
from encoder.ingest import ingest
from encoder.match import FACE_MATCH_L2, default_match
from encoder.registry import encode_many
from encoder.train import train_encoder
from lookalike.client import Client
from router.server import create_router_server

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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
            ups = [to_rgb(a).resize((25 * args.lfw_scale, 25 * args.lfw_scale), Image.Resampling.BICUBIC)
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
