"""The CNN's training augmentations (encoder.augment): each is applied, seeded and deterministic."""

import numpy as np
import pytest
from PIL import Image, ImageOps

from encoder.augment import AUGMENTATIONS, DEFAULT_PROBS, augment, greyscale, overlay, resized_crop
from test_encoder import picture


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.int16)


def is_grey(im: Image.Image) -> bool:
    a = pixels(im)
    return bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())


@pytest.fixture(scope="module")
def im():
    return picture(3, size=128)


def test_training_covers_the_edits_people_make():
    for name in ("greyscale", "colour", "resized_crop", "hflip", "overlay", "rotate", "rescale", "jpeg"):
        assert DEFAULT_PROBS.get(name, 0) > 0, name
    assert set(DEFAULT_PROBS) <= set(AUGMENTATIONS)


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_each_augmentation_changes_the_image_and_is_deterministic(im, name):
    fn = AUGMENTATIONS[name]
    a, b = fn(im, np.random.default_rng(7)), fn(im, np.random.default_rng(7))
    assert a.mode == "RGB" and a.size == im.size
    np.testing.assert_array_equal(pixels(a), pixels(b))  # same seed, same image
    assert np.abs(pixels(a) - pixels(im)).mean() > 0.5, name  # it did something
    if name in ("resized_crop", "rotate", "colour", "overlay", "rescale", "jpeg"):  # random: another seed differs
        assert not np.array_equal(pixels(fn(im, np.random.default_rng(8))), pixels(a)), name


def test_augment_is_seeded(im):
    views = [augment(im, np.random.default_rng(s)) for s in (0, 0, 1)]
    np.testing.assert_array_equal(pixels(views[0]), pixels(views[1]))
    assert not np.array_equal(pixels(views[0]), pixels(views[2]))
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)  # a stream of views, as training draws them
    for _ in range(5):
        np.testing.assert_array_equal(pixels(augment(im, rng_a)), pixels(augment(im, rng_b)))


def test_a_greyscale_batch_is_grey(im):
    torch = pytest.importorskip("torch")
    from encoder.torchscript import preprocess
    from encoder.train import MEAN, STD

    batch = [picture(i, size=96) for i in range(4)]
    assert not any(is_grey(x) for x in batch)
    rng = np.random.default_rng(0)
    grey = [augment(x, rng, {"greyscale": 1.0}) for x in batch]
    assert all(is_grey(x) for x in grey)
    x = torch.from_numpy(preprocess(grey, 64, MEAN, STD))  # what the network sees
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    # luminance, not a colour dropped: the grey level is PIL's L of the original
    np.testing.assert_array_equal(pixels(greyscale(batch[0], rng))[..., 0], np.asarray(batch[0].convert("L")))


def test_default_training_views_include_each_kind(im):
    rng = np.random.default_rng(0)
    views = [augment(im, rng) for _ in range(60)]
    grey = sum(is_grey(v) for v in views)
    assert 3 <= grey <= 30  # DEFAULT_PROBS["greyscale"] = 0.2 of 60
    only_flip = augment(im, np.random.default_rng(0), {"hflip": 1.0})
    np.testing.assert_array_equal(pixels(only_flip), pixels(ImageOps.mirror(im)))
    assert np.array_equal(pixels(augment(im, rng, {})), pixels(im))  # nothing asked, nothing done


def test_crop_and_overlay_are_local(im):
    big = picture(4, size=256)
    crop = resized_crop(big, np.random.default_rng(1), scale=(0.25, 0.25), ratio=(1, 1))
    # a quarter of the area blown up x2: smoother than the original (fewer strong neighbour differences)
    assert np.abs(np.diff(pixels(crop), axis=1)).mean() < np.abs(np.diff(pixels(big), axis=1)).mean()
    changed = [(np.abs(pixels(overlay(big, np.random.default_rng(s))) - pixels(big)).sum(axis=2) > 0).mean()
               for s in range(12)]
    assert all(0 < c < 0.9 for c in changed)  # something pasted on, the picture still shows


def test_unknown_augmentation_is_refused(im):
    with pytest.raises(ValueError, match="unknown augmentations"):
        augment(im, np.random.default_rng(0), {"sepia": 1.0})


def test_training_views_come_from_these_augmentations(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import encoder.train as train

    views = []
    real = train.augment

    def recorded(im, rng):
        views.append(real(im, rng))
        return views[-1]

    monkeypatch.setattr(train, "augment", recorded)
    train.train_encoder([picture(i, size=96) for i in range(4)], tmp_path / "m.pt", epochs=10, batch_size=4,
                        progress=False)
    assert len(views) == 80  # 10 steps, 2 views of 4 pictures
    assert sum(is_grey(v) for v in views) >= 20  # greyscale in half of the views (seeded: the same every run)
