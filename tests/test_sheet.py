"""Contact sheets: rows labelled by query file name, hits within the encoder's match threshold marked."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from encoder.match import FACE_MATCH_L2, MatchRule, default_match
from tools.sheet import CAPTION, FOOTER, MATCH_COLOUR, PAD, THUMB, contact_sheet
from test_encoder import picture, to_bytes

CELL_W, CELL_H = THUMB + PAD, THUMB + CAPTION + PAD


def render(*args, **kw):
    im = Image.open(io.BytesIO(contact_sheet(*args, **kw)))
    im.load()
    return im


def border_pixel(sheet, row: int, col: int) -> tuple:
    """A pixel of the frame around the thumbnail at (row, col) (col 0 is the query), left edge, halfway down."""
    x, y = PAD + col * CELL_W, PAD + row * CELL_H
    return sheet.getpixel((x - 2, y + THUMB // 2))


def test_rows_are_labelled_with_the_given_names_or_query_n():
    rows = [[("a", 1.0, to_bytes(picture(1)))], [("b", 2.0, None)]]
    queries = [to_bytes(picture(0)), to_bytes(picture(2))]
    named = render(queries, rows, labels=["holiday/IMG_2031.jpg", "q2.png"])
    plain = render(queries, rows)
    assert [r["label"] for r in json.loads(named.text["Rows"])] == ["holiday/IMG_2031.jpg", "q2.png"]
    assert [r["label"] for r in json.loads(plain.text["Rows"])] == ["query 0", "query 1"]
    caption = (PAD, PAD + THUMB + 2, PAD + THUMB, PAD + THUMB + 16)  # under the first query
    assert not np.array_equal(np.asarray(named.crop(caption)), np.asarray(plain.crop(caption)))
    assert "Caption" not in plain.text and plain.size == (PAD + CELL_W * 2, PAD + CELL_H * 2)  # no rule: as before


def test_hits_within_the_threshold_are_marked_and_the_rule_is_printed():
    rows = [[("near", 2.0, to_bytes(picture(1))), ("edge", 10.0, to_bytes(picture(2))), ("far", 11.0, None)],
            [("copy", 0.0, to_bytes(picture(3)))]]
    rule = MatchRule("hamming", 10, "phash default")
    sheet = render([to_bytes(picture(0)), None], rows, labels=["q.jpg", "r.jpg"], match=rule)
    assert sheet.size == (PAD + CELL_W * 4, PAD + CELL_H * 2 + FOOTER)
    assert [border_pixel(sheet, 0, c) for c in (1, 2)] == [MATCH_COLOUR] * 2  # d <= 10: green frame
    assert border_pixel(sheet, 0, 3) == (255, 255, 255) and border_pixel(sheet, 1, 1) == MATCH_COLOUR
    meta = json.loads(sheet.text["Rows"])
    assert [[n["match"] for n in r["neighbours"]] for r in meta] == [[True, True, False], [True]]
    assert sheet.text["Caption"].startswith("match: d <= 10 bits (phash default)")
    footer = np.asarray(sheet.crop((0, PAD + CELL_H * 2, sheet.width, sheet.height)), dtype=np.int16)
    green = (footer[..., 1] - np.maximum(footer[..., 0], footer[..., 2])) > 60
    assert green.sum() > 50  # the rule is drawn, in green, under the rows


def test_similarity_rules_match_from_above():
    rule = MatchRule("cosine", 0.85)
    sheet = render([None], [[("a", 0.97, None), ("b", 0.5, None)]], match=rule)
    assert border_pixel(sheet, 0, 1) == MATCH_COLOUR and border_pixel(sheet, 0, 2) == (255, 255, 255)
    assert sheet.text["Caption"].startswith("match: d >= 0.85 (cosine similarity)")
    with pytest.raises(ValueError, match="metric"):
        MatchRule("euclid", 1.0)


def test_default_match_rules(tmp_path):
    assert default_match("phash") == MatchRule("hamming", 10, "phash default")
    assert default_match("phash:16").threshold == 40  # the same fraction of 256 bits
    assert default_match("face") == MatchRule("l2", FACE_MATCH_L2, "same person, dlib's 0.6")
    assert default_match("") is None
    model = tmp_path / "m.pt"
    model.write_bytes(b"")  # only the JSON beside it is read
    assert default_match(f"torchscript:{model}") is None  # a model of your own: no threshold known
    (tmp_path / "m.pt.json").write_text(json.dumps({"metric": "cosine", "match_threshold": 0.9}))
    assert default_match(f"torchscript:{model}") == MatchRule("cosine", 0.9, "from the model's JSON")
    assert default_match(f"torchscript:{tmp_path / 'gone.pt'}") is None
