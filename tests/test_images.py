"""Images through the whole path (gRPC router, shards): ingest a folder, search by image, contact sheets."""

import io
import json

import grpc
import pytest
from PIL import Image

from tools import cli
from encoder.ingest import ingest
from control.local import LocalCluster
from tools.sheet import contact_sheet
from lookalike.client import Client
from router.server import create_router_server
from test_encoder import EDITS, picture, to_bytes


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    cluster = LocalCluster(tmp_path_factory.mktemp("images"), shards=2)
    server, port, _ = create_router_server(cluster.router, "127.0.0.1:0")
    client = Client(f"127.0.0.1:{port}", timeout=60)
    yield client, f"127.0.0.1:{port}"
    client.close()
    server.stop(None)
    cluster.close()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    (root / "a" / "b").mkdir(parents=True)
    for i in range(12):
        sub = root / ("a/b" if i % 3 == 0 else "a" if i % 3 == 1 else ".")
        picture(i).save(sub / f"img{i:02d}.{'jpg' if i % 2 else 'png'}")
    (root / "notes.txt").write_text("not an image")
    (root / "broken.jpg").write_bytes(to_bytes(picture(99), "JPEG")[:2000])
    (root / "fake.png").write_bytes(b"definitely not a png")
    return root


def test_ingest_search_by_image_and_resume(served, folder):
    client, _ = served
    client.create_collection("photos", encoder="phash", buckets=16)
    report = ingest(client, "photos", folder, batch=5, progress=False)
    assert (report.files, report.stored, report.already_stored, report.not_images) == (15, 12, 0, 1)
    assert set(report.failed) == {"broken.jpg", "fake.png"}
    assert "truncated or corrupt" in report.failed["broken.jpg"] and "not an image" in report.failed["fake.png"]
    for name, edit in EDITS.items():
        query = to_bytes(edit(picture(4)).convert("RGB"), "JPEG", quality=90)
        hits = client.search_by_image("photos", [query], k=3, include_payloads=True)
        assert hits.ids[0][0] == "a/img04.png", name
        assert hits.payloads[0][0]["uri"].endswith("a/img04.png")
    # a second run stores nothing again; after a delete it stores just that one
    again = ingest(client, "photos", folder, batch=5, progress=False)
    assert (again.stored, again.already_stored) == (0, 12)
    client.delete("photos", ["a/b/img03.jpg"])
    third = ingest(client, "photos", folder, batch=5, progress=False)
    assert (third.stored, third.already_stored) == (1, 11)


def test_image_errors_have_status_and_reason(served):
    client, _ = served
    client.create_collection("imgerr", encoder="phash", buckets=8)
    client.create_collection("vecs", dim=4, buckets=8)
    good = to_bytes(picture(1))
    with pytest.raises(grpc.RpcError) as err:
        client.upsert_images("imgerr", [("ok", good), ("bad", b"junk")], skip_bad=False)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'bad'" in err.value.details()
    assert client.get("imgerr", ["ok"])[0] == []  # all or nothing without skip_bad
    with pytest.raises(grpc.RpcError) as err:
        client.search_by_image("imgerr", [b"junk"], k=1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "query image 0" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.upsert_images("vecs", [("a", good)])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no encoder" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.create_collection("mismatch", dim=128, metric="l2", encoder="phash")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "64-bit" in err.value.details()


def test_contact_sheet_is_a_png_of_the_right_size():
    rows = [[("a", 1.0, to_bytes(picture(1))), ("b", 2.5, None)], [("c", 0.0, b"junk")]]
    png = contact_sheet([to_bytes(picture(0)), None], rows)
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG" and im.size == (8 + 168 * 3, 8 + 202 * 2)


def test_cli_search_by_image_writes_a_sheet(served, folder, tmp_path, capsys):
    client, target = served
    client.create_collection("cli_photos", encoder="phash", buckets=8)
    # the folder holds two files that are not images: ingest stores the others and exits 1, saying so last
    assert cli.main(["ingest", "cli_photos", str(folder), "--quiet", "--target", target,
                     "--report", str(tmp_path / "r.json")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: 2 of 14 image file(s) failed")
    assert json.loads((tmp_path / "r.json").read_text())["stored"] == 12
    query = tmp_path / "q.jpg"
    EDITS["resize 1/2"](picture(7)).save(query)
    sheet = tmp_path / "sheet.png"
    capsys.readouterr()
    assert cli.main(["search", "cli_photos", "--image", str(query), "-k", "4", "--sheet", str(sheet), "--json",
                     "--target", target]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"][0]["ids"][0] == "a/img07.jpg"
    png = Image.open(sheet)
    assert png.size == (8 + 168 * 5, 8 + 202 + 18)  # + the caption that states phash's match rule
    rows = json.loads(png.text["Rows"])
    assert rows[0]["label"] == str(query)  # the row is named after the file, not "query 0"
    assert "10" in png.text["Caption"]  # phash: a match is within 10 of 64 bits
