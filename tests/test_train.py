"""The CNN trained on the catalog (triplet and autoencoder) and the TorchScript encoder that loads it."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from encoder import get_encoder  # noqa: E402
from encoder.match import CNN_MATCH_COSINE, MatchRule, default_match  # noqa: E402
from encoder.train import augment, train_encoder  # noqa: E402
from tools import cli  # noqa: E402
from test_encoder import EDITS, picture  # noqa: E402


@pytest.fixture(scope="module")
def pictures():
    return [picture(i) for i in range(16)]


def test_triplet_cnn_learns_near_duplicates(tmp_path, pictures):
    out = tmp_path / "cnn.pt"
    # 30 steps: the colour augmentations are strong, and these pictures differ mostly by their colours
    losses = train_encoder(pictures, out, method="triplet", epochs=30, batch_size=16, progress=False)
    assert losses[-1] < losses[0]
    enc = get_encoder(f"torchscript:{out}")
    assert (enc.dim, enc.metric) == (128, "cosine")
    H = enc.encode_images(pictures)
    np.testing.assert_allclose(np.linalg.norm(H, axis=1), 1, rtol=1e-5)
    np.testing.assert_array_equal(H, enc.encode_images(pictures))  # deterministic
    for name, edit in EDITS.items():
        E = enc.encode_images([edit(im).convert("RGB") for im in pictures])
        assert ((E @ H.T).argmax(axis=1) == np.arange(16)).mean() >= 0.9, name


def test_autoencoder_variant_trains_and_loads(tmp_path, pictures):
    out = tmp_path / "ae.pt"
    losses = train_encoder(pictures, out, method="autoencoder", epochs=6, batch_size=16, dim=32, progress=False)
    assert losses[-1] < losses[0]
    meta = json.loads((tmp_path / "ae.pt.json").read_text())
    assert meta["method"] == "autoencoder" and meta["metric"] == "cosine"
    # the threshold the contact sheet marks matches with, read back from the JSON
    assert meta["match_threshold"] == CNN_MATCH_COSINE["autoencoder"]
    assert default_match(f"torchscript:{out}") == MatchRule("cosine", meta["match_threshold"], "from the model's JSON")
    assert get_encoder(f"torchscript:{out}").encode_images(pictures[:3]).shape == (3, 32)


def test_torchscript_contract_and_errors(tmp_path):
    class Model(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))  # (N, 3): the per-channel mean of the normalised image

    path = tmp_path / "m.pt"
    torch.jit.script(Model()).save(str(path))
    (tmp_path / "m.pt.json").write_text(json.dumps({"input_size": 32, "mean": [0, 0, 0], "std": [1, 1, 1],
                                                    "metric": "l2"}))
    enc = get_encoder(f"torchscript:{path}")
    assert (enc.dim, enc.metric) == (3, "l2")
    from PIL import Image
    red = enc.encode_images([Image.new("RGB", (50, 70), (255, 0, 0))])
    np.testing.assert_allclose(red, [[1, 0, 0]], atol=1e-6)
    with pytest.raises(ValueError, match="does not exist"):
        get_encoder(f"torchscript:{tmp_path / 'nope.pt'}")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a TorchScript model"):
        get_encoder(f"torchscript:{tmp_path / 'junk.pt'}")


def test_augment_keeps_an_image():
    im = augment(picture(1), np.random.default_rng(0))
    assert im.mode == "RGB" and min(im.size) > 100


def test_cli_train_encoder(tmp_path, capsys):
    for i in range(8):
        picture(i, size=96).save(tmp_path / f"p{i}.png")
    out = tmp_path / "model.pt"
    assert cli.main(["train-encoder", str(tmp_path), "--out", str(out), "--epochs", "2", "--quiet"]) == 0
    assert out.exists() and "torchscript:" in capsys.readouterr().out


def test_collection_with_a_trained_cnn_and_a_lost_model_file(tmp_path, pictures):
    import grpc

    from control.local import LocalCluster
    from lookalike.client import Client
    from router.server import create_router_server
    from test_encoder import to_bytes

    model = tmp_path / "cnn.pt"
    train_encoder(pictures, model, epochs=3, batch_size=16, progress=False)
    cluster = LocalCluster(tmp_path / "data", shards=2)
    server, port, _ = create_router_server(cluster.router, "127.0.0.1:0")
    client = Client(f"127.0.0.1:{port}")
    try:
        info = client.create_collection("cnn", encoder=f"torchscript:{model}", buckets=8)
        assert (info.spec.dim, info.spec.metric) == (128, 3)  # cosine
        assert client.upsert_images("cnn", [(f"p{i}", to_bytes(im)) for i, im in enumerate(pictures)])[0] == 16
        assert client.search_by_image("cnn", [to_bytes(pictures[5], "JPEG", quality=60)], k=1).ids == [["p5"]]
        model.unlink()
        cluster.router.encoders = type(cluster.router.encoders)()  # a new router process: nothing cached
        with pytest.raises(grpc.RpcError) as err:
            client.search_by_image("cnn", [to_bytes(pictures[5])], k=1)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "does not exist" in err.value.details()
    finally:
        client.close()
        server.stop(None)
        cluster.close()
