"""Training: `lookalike train-encoder` (a small CNN on a folder of images, with PyTorch) and `lookalike train` (a
collection's index trained again on a fresh sample, followed until every shard uses it).

May use: encoder (its trainer; PyTorch loads only when a training starts), tools.cli.common and tools.cli.flags.
"""

from __future__ import annotations

import os
import sys
import time

from encoder.train import load_folder, train_encoder
from tools.cli.common import UserError, one_line, open_client
from tools.cli.flags import positive_float, positive_int, with_target


def cmd_train_encoder(args) -> int:
    if not os.path.isdir(args.dir):
        raise UserError(f"folder {args.dir}: {'not a folder' if os.path.exists(args.dir) else 'no such folder'}")
    images = load_folder(args.dir)
    print(f"training a {args.method} encoder on {len(images)} images from {args.dir}", file=sys.stderr)
    try:
        losses = train_encoder(images, args.out, method=args.method, epochs=args.epochs, batch_size=args.batch,
                               dim=args.dim, seed=args.seed, progress=not args.quiet)
    except ModuleNotFoundError as err:
        raise UserError(f"train-encoder needs PyTorch ({err.name} is not installed): pip install torch (the CPU "
                        "build: see the README), or pip install -e '.[torch]'") from None
    except ValueError as err:
        raise UserError(one_line(err)) from None
    print(f"saved {args.out} (loss {losses[0]:.4f} -> {losses[-1]:.4f}); use it with "
          f"`lookalike collection create NAME --encoder torchscript:{os.path.abspath(args.out)}`")
    return 0


def cmd_train(args) -> int:
    """Asks for a new trained version of the collection's index, then (unless --no-wait) follows it until every
    shard uses it. Exits 1 after --timeout; Ctrl-C stops following (the training goes on in the cluster)."""
    with open_client(args) as c:
        info = c.train(args.name)
        version = info.training.next_version
        print(f"training {args.name} ({info.spec.index}) as version {version}: {info.training.message}")
        if args.no_wait:
            return 0
        deadline = time.monotonic() + args.timeout
        last = ""
        try:
            while time.monotonic() < deadline:
                t = c.describe_collection(args.name).training
                if t.message != last:
                    print(f"  {t.message}")
                    last = t.message
                if t.version >= version and t.shards_ready == t.shards:
                    return 0
                time.sleep(0.5)
        except KeyboardInterrupt:
            print(f"\nstopped following: the training of {args.name} goes on in the cluster (`lookalike collection "
                  f"describe {args.name}` shows it)", file=sys.stderr)
            return 130
    print(f"error: version {version} of {args.name} not in use on every shard after {args.timeout:g}s: {last}",
          file=sys.stderr)
    return 1


def add_train_encoder(sub) -> None:
    """The `train-encoder` subcommand."""
    te = sub.add_parser("train-encoder", help="train a small CNN encoder on a folder of images (CPU, minutes)")
    te.add_argument("dir", help="folder of images to train on")
    te.add_argument("--out", required=True, help="TorchScript file to write (plus OUT.json)")
    te.add_argument("--method", choices=["triplet", "autoencoder"], default="triplet",
                    help="triplet: contrastive on augmentations; autoencoder: reconstruction (default %(default)s)")
    te.add_argument("--epochs", type=positive_int, default=None,
                    help="passes over the images (default 30, more for small folders: at least 400 steps)")
    te.add_argument("--batch", type=positive_int, default=32, help="images per training step (default %(default)s)")
    te.add_argument("--dim", type=positive_int, default=128, help="embedding size (default %(default)s)")
    te.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    te.add_argument("--quiet", action="store_true", help="no progress bar")
    te.set_defaults(func=cmd_train_encoder)


def add_train(sub) -> None:
    """The `train` subcommand."""
    tr = with_target(sub.add_parser(
        "train", help="train a collection's index again (IVF centroids, PQ/SQ codebooks) on a fresh sample, as a new "
                      "version the shards move into while they serve"))
    tr.add_argument("name", help="the collection")
    tr.add_argument("--no-wait", action="store_true", help="return once the training is asked for")
    tr.add_argument("--timeout", type=positive_float, default=3600.0,
                    help="seconds to follow it before giving up with exit status 1 (default %(default)s)")
    tr.set_defaults(func=cmd_train)
