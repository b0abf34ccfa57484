"""Train a small CNN encoder on the catalog itself, on this machine's CPU in minutes.

Two methods, so they can be compared:
- ``triplet`` (Siamese): two augmented views of each image in a batch; the loss pulls the two views together and
  pushes the hardest other image in the batch away (triplet margin loss with batch-hard negatives) on
  L2-normalised embeddings.
- ``autoencoder``: the classic recipe; the same convolutional encoder plus a decoder that reconstructs the
  original from an augmented view (mean squared error); the bottleneck, L2-normalised, is the embedding.

Augmentations (encoder.augment) are those a catalog's near-duplicates go through: random resized crop, flip,
small rotation, colour shifts (hue, saturation, brightness, contrast), greyscale, overlays (watermark, caption,
logo), down- and up-scaling, JPEG recompression; seeded, so one seed trains the same model.

The result is a TorchScript file (plus ``<file>.json``: input size, normalisation, metric) that the
``torchscript:PATH`` encoder loads; nothing in it needs this module at inference time.
"""

from __future__ import annotations

import json
import logging
import pathlib

import numpy as np
from PIL import Image
from tqdm import tqdm

from encoder.augment import augment
from encoder.decode import ImageError, decode_image
from encoder.match import CNN_MATCH_COSINE
from encoder.torchscript import _import_torch, preprocess

log = logging.getLogger(__name__)

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def _modules(dim: int):
    torch = _import_torch()
    nn = torch.nn

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    class Encoder(nn.Module):
        """(N, 3, 64, 64) -> (N, dim), L2-normalised."""

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 128), block(128, 192))
            self.head = nn.Linear(192, dim)

        def embed(self, x):
            return self.head(self.features(x).mean(dim=(2, 3)))

        def forward(self, x):
            return nn.functional.normalize(self.embed(x), dim=1)

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(dim, 192 * 4 * 4)

            def up(cin, cout):
                return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.ReLU(inplace=True))

            self.net = nn.Sequential(up(192, 128), up(128, 64), up(64, 32), nn.ConvTranspose2d(32, 3, 4, 2, 1))

        def forward(self, z):
            return self.net(self.fc(z).view(-1, 192, 4, 4))

    return Encoder, Decoder


def load_folder(root: str | pathlib.Path, side: int = 96) -> list[Image.Image]:
    """Every readable image under root, downsized so its shorter side is ``side`` (augmenting small is fast)."""
    images = []
    for path in sorted(pathlib.Path(root).rglob("*")):
        if not path.is_file():
            continue
        try:
            im = decode_image(path.read_bytes())
        except ImageError:
            continue
        scale = side / min(im.size)
        images.append(im.resize((max(side, round(im.width * scale)), max(side, round(im.height * scale))),
                                Image.Resampling.BILINEAR))
    return images


MIN_STEPS = 400  # below this many optimiser steps the model has not settled (brightness copies still missed)


def train_encoder(images: list[Image.Image], out: str | pathlib.Path, method: str = "triplet",
                  epochs: int | None = None,
                  batch_size: int = 32, dim: int = 128, size: int = 64, margin: float = 0.3, seed: int = 0,
                  progress: bool = True) -> list[float]:
    """Trains an encoder on ``images`` and saves it as TorchScript at ``out`` (+ ``out.json``).

    ``epochs`` None: 30, or more when that would be fewer than MIN_STEPS optimiser steps.

    Returns:
        The mean loss of each epoch.

    Raises:
        ValueError: an unknown method, or fewer than 2 images.
    """
    if method not in ("triplet", "autoencoder"):
        raise ValueError(f"method must be triplet or autoencoder, got {method!r}")
    if len(images) < 2:
        raise ValueError(f"training needs at least 2 images, got {len(images)}")
    torch = _import_torch()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    Encoder, Decoder = _modules(dim)
    encoder = Encoder()
    decoder = Decoder() if method == "autoencoder" else None
    params = list(encoder.parameters()) + (list(decoder.parameters()) if decoder is not None else [])
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)
    batch_size = min(batch_size, len(images))
    steps = max(1, len(images) // batch_size)
    if epochs is None:  # small catalogs have few steps per epoch: train for at least MIN_STEPS steps
        epochs = max(30, -(-MIN_STEPS // steps))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * steps)

    def tensor(ims):
        return torch.from_numpy(preprocess(ims, size, MEAN, STD))

    losses = []
    bar = tqdm(total=epochs * steps, unit="step", desc=f"train {method}", disable=not progress)
    for _epoch in range(epochs):
        order = rng.permutation(len(images))
        total = 0.0
        encoder.train()
        for s in range(steps):
            batch = [images[i] for i in order[s * batch_size:(s + 1) * batch_size]]
            if method == "triplet":
                a = encoder(tensor([augment(im, rng) for im in batch]))
                p = encoder(tensor([augment(im, rng) for im in batch]))
                d = torch.cdist(a, p)                                  # (B, B): anchor i to positive j
                pos = d.diagonal()
                neg = (d + torch.eye(len(batch)) * 1e3).min(dim=1).values  # hardest other image
                loss = torch.relu(pos - neg + margin).mean()
            else:
                z = encoder.embed(tensor([augment(im, rng) for im in batch]))
                loss = torch.nn.functional.mse_loss(decoder(z), tensor(batch))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        losses.append(total / steps)
    bar.close()
    encoder.eval()
    out = pathlib.Path(out)
    torch.jit.script(encoder).save(str(out))
    out.with_name(out.name + ".json").write_text(json.dumps(
        {"input_size": size, "mean": MEAN, "std": STD, "metric": "cosine", "resize": "squash", "method": method,
         "match_threshold": CNN_MATCH_COSINE[method], "dim": dim, "epochs": epochs, "images": len(images),
         "final_loss": losses[-1]}, indent=1))
    log.info("saved %s encoder (%d-d) to %s", method, dim, out)
    return losses
