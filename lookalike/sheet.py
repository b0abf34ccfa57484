"""Contact sheets: a query image and its neighbours as thumbnails with ids and distances, one row per query."""

from __future__ import annotations

import io
import os

from PIL import Image, ImageDraw, ImageFont

from encoder import ImageError, decode_image

THUMB = 160
CAPTION = 34
PAD = 8


def _thumb(data: bytes | None) -> Image.Image:
    tile = Image.new("RGB", (THUMB, THUMB), (235, 235, 235))
    if data is None:
        ImageDraw.Draw(tile).text((PAD, THUMB // 2 - 6), "no image", fill=(120, 120, 120))
        return tile
    try:
        im = decode_image(data)
    except ImageError:
        ImageDraw.Draw(tile).text((PAD, THUMB // 2 - 6), "unreadable", fill=(160, 40, 40))
        return tile
    im.thumbnail((THUMB, THUMB))
    tile.paste(im, ((THUMB - im.width) // 2, (THUMB - im.height) // 2))
    return tile


def read_uri(uri: str | None) -> bytes | None:
    """The bytes of a local file named by a payload uri (a path or file://path); None if not readable here."""
    if not uri:
        return None
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    try:
        with open(os.path.expanduser(path), "rb") as f:
            return f.read()
    except OSError:
        return None


def contact_sheet(queries: list[bytes | None], neighbours: list[list[tuple[str, float, bytes | None]]],
                  labels: list[str] | None = None) -> bytes:
    """A PNG: per query, its image then each neighbour's (id, distance, image bytes or None). ``labels``: the
    caption of each row's first image (default "query N").

    Returns:
        The PNG file's bytes.
    """
    k = max((len(row) for row in neighbours), default=0)
    cell_w, cell_h = THUMB + PAD, THUMB + CAPTION + PAD
    sheet = Image.new("RGB", (PAD + cell_w * (k + 1), PAD + cell_h * max(len(queries), 1)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for q, (query, row) in enumerate(zip(queries, neighbours)):
        y = PAD + q * cell_h
        sheet.paste(_thumb(query), (PAD, y))
        draw.rectangle([PAD - 2, y - 2, PAD + THUMB + 1, y + THUMB + 1], outline=(30, 90, 200), width=2)
        head = labels[q] if labels else f"query {q}"
        draw.text((PAD, y + THUMB + 4), head if len(head) <= 26 else "..." + head[-23:], fill=(30, 90, 200),
                  font=font)
        for j, (uid, dist, data) in enumerate(row):
            x = PAD + (j + 1) * cell_w
            sheet.paste(_thumb(data), (x, y))
            label = uid if len(uid) <= 24 else "..." + uid[-21:]
            draw.text((x, y + THUMB + 4), f"{j + 1}. {label}", fill=(0, 0, 0), font=font)
            draw.text((x, y + THUMB + 18), f"d = {dist:.4g}", fill=(90, 90, 90), font=font)
    buf = io.BytesIO()
    sheet.save(buf, "PNG")
    return buf.getvalue()
