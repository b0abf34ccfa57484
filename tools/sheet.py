"""Contact sheets: a query image and its neighbours as thumbnails with ids and distances, one row per query; the
neighbours that count as matches marked."""

from __future__ import annotations

import io
import json
import os

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from encoder import ImageError, decode_image
from encoder.match import MatchRule

THUMB = 160
CAPTION = 34
PAD = 8
FOOTER = 18  # the caption line under the rows that states the match rule (only with one)
QUERY_COLOUR = (30, 90, 200)
MATCH_COLOUR = (0, 150, 0)


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
                  labels: list[str] | None = None, match: MatchRule | None = None) -> bytes:
    """A PNG: per query, its image then each neighbour's (id, distance, image bytes or None).

    Args:
        labels: the caption of each row's first image, e.g. the query's file name (default "query N").
        match: when a neighbour counts as a match (``encoder.match.default_match(encoder)``); matches get a green
            border and a "match" tag, and the rule is printed in a caption under the rows. None: no marking.

    The PNG's text chunks say the same for machines: "Caption" (the rule, or absent) and "Rows" (JSON: per row its
    label and each neighbour's id, distance and whether it matches).

    Returns:
        The PNG file's bytes.
    """
    k = max((len(row) for row in neighbours), default=0)
    cell_w, cell_h = THUMB + PAD, THUMB + CAPTION + PAD
    rows_h = PAD + cell_h * max(len(queries), 1)
    sheet = Image.new("RGB", (PAD + cell_w * (k + 1), rows_h + (FOOTER if match else 0)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    meta_rows = []
    for q, (query, row) in enumerate(zip(queries, neighbours)):
        y = PAD + q * cell_h
        sheet.paste(_thumb(query), (PAD, y))
        draw.rectangle([PAD - 2, y - 2, PAD + THUMB + 1, y + THUMB + 1], outline=QUERY_COLOUR, width=2)
        head = labels[q] if labels else f"query {q}"
        draw.text((PAD, y + THUMB + 4), head if len(head) <= 26 else "..." + head[-23:], fill=QUERY_COLOUR,
                  font=font)
        meta = []
        for j, (uid, dist, data) in enumerate(row):
            x = PAD + (j + 1) * cell_w
            sheet.paste(_thumb(data), (x, y))
            label = uid if len(uid) <= 24 else "..." + uid[-21:]
            draw.text((x, y + THUMB + 4), f"{j + 1}. {label}", fill=(0, 0, 0), font=font)
            hit = match is not None and match.matches(dist)
            if hit:
                draw.rectangle([x - 3, y - 3, x + THUMB + 2, y + THUMB + 2], outline=MATCH_COLOUR, width=3)
                draw.text((x + THUMB - 34, y + THUMB + 18), "match", fill=MATCH_COLOUR, font=font)
            draw.text((x, y + THUMB + 18), f"d = {dist:.4g}", fill=(90, 90, 90), font=font)
            meta.append({"id": uid, "distance": float(dist), **({"match": hit} if match is not None else {})})
        meta_rows.append({"label": head, "neighbours": meta})
    info = PngInfo()
    if match is not None:
        caption = f"{match.describe()}: green border"
        draw.text((PAD, rows_h + 2), caption, fill=MATCH_COLOUR, font=font)
        info.add_text("Caption", caption)
    info.add_text("Rows", json.dumps(meta_rows))
    buf = io.BytesIO()
    sheet.save(buf, "PNG", pnginfo=info)
    return buf.getvalue()
