"""A user's own TorchScript model as an encoder: how people bring a CLIP image tower, a ResNet or the CNN that
``lookalike train-encoder`` trains on their catalog.

The contract (docs/ENCODERS.md):
- the file is a TorchScript module (``torch.jit.save``) taking a float32 tensor of shape (N, 3, S, S): RGB, values
  in [0, 1], then normalised per channel as ``(x - mean) / std``, and returning float32 of shape (N, D);
- an optional JSON file beside it, ``<model>.json``, sets ``input_size`` S (default 224), ``mean`` and ``std``
  (default ImageNet's), ``metric`` (default ``cosine``) and ``resize`` ("squash": stretch to S x S, the default,
  or "crop": shorter side to S, then centre crop), and optionally ``match_threshold``, the distance at which a hit
  counts as a match (encoder.match).
Images are batched (``batch_size``) and run on the GPU when torch sees one.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _import_torch():
    try:
        import torch  # deferred: PyTorch is an optional extra, and heavy
    except ImportError:
        raise ValueError("this encoder needs PyTorch: pip install 'lookalike[torch]' "
                         "(here: pip install torch==2.13.0 for the CPU build)") from None
    return torch


def load_settings(path: pathlib.Path) -> dict:
    sidecar = path.with_name(path.name + ".json")
    settings = {"input_size": 224, "mean": _IMAGENET_MEAN, "std": _IMAGENET_STD, "metric": "cosine",
                "resize": "squash"}
    if sidecar.exists():
        settings.update(json.loads(sidecar.read_text()))
    if settings["metric"] not in ("l2", "ip", "cosine"):
        raise ValueError(f"{sidecar}: metric must be l2, ip or cosine, got {settings['metric']!r}")
    if settings["resize"] not in ("squash", "crop"):
        raise ValueError(f"{sidecar}: resize must be squash or crop, got {settings['resize']!r}")
    return settings


def preprocess(images: Sequence[Image.Image], size: int, mean, std, resize: str = "squash") -> np.ndarray:
    """RGB images -> float32 array of shape (N, 3, size, size), normalised."""
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, im in enumerate(images):
        im = im.convert("RGB")
        if resize == "crop":
            scale = size / min(im.size)
            im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))),
                           Image.Resampling.BILINEAR)
            left, top = (im.width - size) // 2, (im.height - size) // 2
            im = im.crop((left, top, left + size, top + size))
        else:
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean = np.asarray(mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(std, dtype=np.float32)[None, :, None, None]
    return (out - mean) / std


class TorchScriptEncoder:
    """Encoder over a TorchScript file.

    Raises:
        ValueError: no torch, a missing or unreadable file, or a model whose output is not (N, D).
    """

    def __init__(self, path: str, batch_size: int = 64, name_prefix: str = "torchscript"):
        torch = _import_torch()
        self._torch = torch
        self.path = pathlib.Path(path).expanduser()
        if not self.path.is_file():
            raise ValueError(f"model file {self.path} does not exist")
        s = load_settings(self.path)
        self.size, self.mean, self.std, self.metric, self.resize = (s["input_size"], s["mean"], s["std"], s["metric"],
                                                                    s["resize"])
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.model = torch.jit.load(str(self.path), map_location=self.device).eval()
        except Exception as err:
            raise ValueError(f"{self.path} is not a TorchScript model: {err}") from None
        self.batch_size = batch_size
        self.name = f"{name_prefix}:{self.path}"
        probe = self._run(np.zeros((1, 3, self.size, self.size), dtype=np.float32))
        if probe.ndim != 2:
            raise ValueError(f"{self.path} returns shape {tuple(probe.shape)}; an encoder must return (N, D)")
        self.dim = int(probe.shape[1])

    def _run(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            y = self.model(torch.from_numpy(x).to(self.device))
        return y.float().cpu().numpy()

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Images -> shape (n, dim) float32."""
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for i in range(0, len(images), self.batch_size):
            batch = images[i:i + self.batch_size]
            out[i:i + len(batch)] = self._run(preprocess(batch, self.size, self.mean, self.std, self.resize))
        return out
