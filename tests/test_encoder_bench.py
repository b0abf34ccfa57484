"""bench/encoder_bench.py on a few photos, 1 epoch: its edits (greyscale, watermark, flip among them) are scored per
encoder. Speed and accuracy are what the bench measures; nothing here asserts them."""

import json

import numpy as np
import pytest
from PIL import ImageOps

pytest.importorskip("torch")
pytest.importorskip("skimage")

from bench import encoder_bench, encoder_photos  # noqa: E402


def test_new_edits_are_what_they_say():
    photos, _ = encoder_photos.load_photos(use_sklearn=False, limit=1)
    im = next(p["image"] for p in photos if p["name"] == "astronaut")
    a = np.asarray(im, dtype=np.int16)
    grey = np.asarray(encoder_photos.edit(im, "greyscale"), dtype=np.int16)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert encoder_photos.is_colour(im) and not encoder_photos.is_colour(encoder_photos.edit(im, "greyscale"))
    np.testing.assert_array_equal(np.asarray(encoder_photos.edit(im, "hflip")), np.asarray(ImageOps.mirror(im)))
    marked = np.asarray(encoder_photos.edit(im, "watermark"), dtype=np.int16)
    changed = (np.abs(marked - a).sum(axis=2) > 30).mean()
    assert 0.01 < changed < 0.3  # text pasted on, most of the photo untouched


def test_tiny_run_scores_every_edit_for_every_encoder(tmp_path, capsys):
    out = tmp_path / "enc.json"
    assert encoder_bench.main(["--max-photos", "4", "--folds", "2", "--epochs", "1", "--methods", "triplet",
                               "--no-baseline", "--no-face", "--no-throughput", "--no-sklearn",
                               "--model-dir", str(tmp_path / "models"), "--out", str(out)]) == 0
    report = capsys.readouterr().out
    res = json.loads(out.read_text())
    for e in ("greyscale", "watermark", "hflip", "resize 1/2", "crop 10%"):
        assert e in encoder_photos.EDIT_NAMES and f"| {e} |" in report
    assert set(res["quality"]) == {"phash", "phash+mirror", "phash:16", "cnn-triplet"}
    for label, r in res["quality"].items():
        group = "all" if label.startswith("phash") else "held-out"  # the CNN: each photo by the fold without it
        acc = r["accuracy"][group]
        for e in encoder_photos.EDIT_NAMES:
            assert acc[e]["n"] == 4 and 0 <= acc[e]["correct"] <= 4, (label, e)
        assert acc["greyscale (colour photos)"]["n"] == sum(p["colour"] for p in res["photos"])
    assert res["folds"] == 2 and len(list((tmp_path / "models").glob("cnn-triplet-fold*.pt"))) == 2
    assert res["quality"]["cnn-triplet"]["accuracy"]["train"]["all"]["n"] == 4 * len(encoder_photos.EDIT_NAMES)
    # flipped queries searched mirrored too: every flip finds its original at distance 0
    assert res["quality"]["phash+mirror"]["copy_distance"]["all"]["hflip"]["max"] == 0
