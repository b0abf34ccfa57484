"""Pins the image of a kustomize overlay to a digest: what `kustomize edit set image lookalike=REPO@sha256:...` does
to the overlay's ``images:`` entry, for machines without kustomize (docker/release.sh uses kustomize when it is on
PATH). The rest of the file, comments included, is kept.

    python docker/pin_image.py k8s/overlays/cpu ghcr.io/acme/lookalike@sha256:<64 hex digits>
"""

from __future__ import annotations

import pathlib
import re
import sys

NAME = "lookalike"  # the image name the base's containers use; the overlays replace it
_REF = re.compile(r"^(?P<repo>[a-z0-9][a-z0-9._:/-]*[a-z0-9])@(?P<digest>sha256:[0-9a-f]{64})$")


def pin(overlay: pathlib.Path, ref: str) -> str:
    """Rewrites ``overlay``/kustomization.yaml's images entry of :data:`NAME` to ``ref`` (REPO@sha256:...); returns
    the new text.

    Raises:
        ValueError: ``ref`` is not REPO@sha256:<64 hex>, or the file has no images: list.
    """
    m = _REF.match(ref)
    if m is None:
        raise ValueError(f"{ref!r} is not an image by digest: REPOSITORY@sha256:<64 hex digits>")
    path = overlay / "kustomization.yaml"
    text = path.read_text()
    block = re.search(r"^images:\n(?:(?:  .*|\s*)\n)*", text, flags=re.M)
    if block is None:
        raise ValueError(f"{path} has no images: list to pin")
    new = f"images:\n  - name: {NAME}\n    newName: {m['repo']}\n    digest: {m['digest']}\n"
    text = text[:block.start()] + new + text[block.end():]
    path.write_text(text)
    return text


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python docker/pin_image.py OVERLAY_DIR REPOSITORY@sha256:DIGEST", file=sys.stderr)
        return 2
    try:
        pin(pathlib.Path(argv[0]), argv[1])
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
