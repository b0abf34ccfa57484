"""Every example of README.md, run as written against a real `lookalike serve`, and its output checked.

The commands are read from the README itself (its ``bash`` blocks and its Python block), so the README and this
test cannot drift apart: a command added to the README runs here too (and must at least exit 0 without a
traceback). What is not run, and why, is in ``NOT_RUN``.

`lookalike serve` runs as the README writes it, in a scratch directory (``./lookalike-data`` there), with Ray's
token authentication on, as a user gets it. The client commands reach it through ``LOOKALIKE_TARGET`` and serve
listens on ``LOOKALIKE_PORT`` (a free port: tests never bind a fixed one); ``localhost:50051`` in a command (grpcurl)
is replaced by that target, and a loadtest's ``--duration`` by ``LOADTEST_SECONDS``. ``lookalike`` on PATH runs this
checkout's CLI.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import cli_shim, exact_knn, free_port, make_data, stop_serve

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parent.parent

# Commands of the README not run here, with the reason.
NOT_RUN = {
    "pip install": "installs the package: the test runs this checkout (CI installed it with the second command)",
    "lookalike serve": "started once for the whole test, as written (see serve below)",
    "lookalike bench": "the 1M-vector benchmark takes minutes (docs/BENCHMARKS.md); tested in tests/test_bench.py",
    "python -m pytest": "this is the suite",
}

N, DIM = 3000, 128
# A loadtest's `--duration` here (the README's are 10 s): the commands and their checks are the same, shorter.
LOADTEST_SECONDS = 3


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block of the README, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def readme_commands(text: str) -> list[str]:
    """The shell commands of the README's bash blocks, in order: continuation lines joined, comments cut."""
    out = []
    for lang, body in readme_blocks(text):
        if lang not in ("bash", "sh", "shell"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def skipped(cmd: str) -> str | None:
    """Why ``cmd`` is not run here, or None."""
    for prefix, why in NOT_RUN.items():
        if cmd.startswith(prefix) or f"&& {prefix}" in cmd:
            return why
    return None


def _write_inputs(work: pathlib.Path) -> dict:
    """The files the README's commands name: vectors.npy, ids.txt, payloads.jsonl, queries.npy, ./my-photos,
    query.jpg, as a user would have them."""
    from PIL import Image, ImageOps
    from skimage import data as skdata

    xb, xq = make_data("l2", N, DIM, seed=3, nq=5)
    np.save(work / "vectors.npy", xb)
    np.save(work / "queries.npy", xq)
    ids = [f"sku-{i}" for i in range(N)]
    (work / "ids.txt").write_text("\n".join(ids) + "\n")
    photos = work / "my-photos"
    photos.mkdir()
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "hubble_deep_field", "immunohistochemistry",
             "coins", "page", "text", "moon"]
    files = []
    for name in names:
        img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        img.thumbnail((256, 256))
        p = photos / f"{name}.jpg"
        img.save(p, quality=90)
        files.append(p)
    # the query: a resized, re-encoded copy of one photo
    ImageOps.contain(Image.open(files[1]), (180, 180)).save(work / "query.jpg", quality=80)
    # every product has a photo (cycled), so `map --thumbnails` has something to draw
    (work / "payloads.jsonl").write_text(
        "\n".join(json.dumps({"uri": str(files[i % len(files)]), "sku": ids[i]}) for i in range(N)) + "\n")
    products = [{"category": ["shoes", "hats", "bags"][i % 3], "price": float(i * 37 % 200) + 0.5,
                 "seller": f"s{i % 5}"} for i in range(N)]
    (work / "products.jsonl").write_text("\n".join(json.dumps(p) for p in products) + "\n")
    return {"xb": xb, "xq": xq, "ids": ids, "products": products}


def _check(cmd: str, res: subprocess.CompletedProcess, data: dict, work: pathlib.Path) -> None:
    """What each README command must print; a command not listed here must exit 0 without a traceback."""
    out, err = res.stdout, res.stderr
    assert "Traceback" not in out + err, f"{cmd}\n{out}\n{err}"
    assert res.returncode == 0, f"{cmd} exited {res.returncode}\n{out}\n{err}"
    words = cmd.split()
    if words[:3] == ["lookalike", "collection", "create"]:
        assert json.loads(out.strip().splitlines()[-1])["name"] == words[3]
    elif words[:2] == ["lookalike", "upsert"] and words[3] == "vectors.npy":
        assert f"upserted {N}" in out
    elif words[:2] == ["lookalike", "search"] and "--filter" in words:  # the filtered search's --filterable example
        rank_lines = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
        products = [data["products"][data["ids"].index(parts[1])] for parts in rank_lines]
        assert len(products) == 10 * len(data["xq"]), out
        assert all(p["category"] == "shoes" and p["price"] < 100 and p["seller"] != "s1" for p in products), out
    elif words[:2] == ["lookalike", "search"] and "queries.npy" in words:
        _, I = exact_knn("l2", data["xb"], data["xq"], 10)
        for q in range(len(data["xq"])):  # the table names every query's exact nearest neighbour
            assert data["ids"][I[q][0]] in out, f"query {q}: {data['ids'][I[q][0]]} not in\n{out}"
    elif words[:2] == ["lookalike", "search"] and "--image" in words:
        first = next(line for line in out.splitlines() if line.split()[:1] == ["1"])
        assert "coffee" in first, out  # the query is a smaller, re-encoded coffee.jpg
        assert (work / "matches.png").stat().st_size > 0
    elif words[:2] == ["lookalike", "status"]:
        assert "products" in out and str(N) in out.replace(",", ""), out
    elif words[:3] == ["lookalike", "collection", "list"]:
        line = next(l for l in out.splitlines() if l.startswith("products"))
        assert f"items={N}" in line, out  # the collection's real count (ListCollections said 0)
    elif words[:3] == ["lookalike", "collection", "describe"]:
        assert int(json.loads(out)["count"]) > 0
    elif words[:2] == ["lookalike", "loadtest"] and "--data" in words:
        m = re.search(r"recall@10\D+([0-9.]+)", out)
        assert m and float(m.group(1)) >= 0.99, out  # Flat: exact
    elif words[:2] == ["lookalike", "dedup"]:
        assert (work / "dedup-products.csv").exists() and "group(s) of near-duplicates" in out
    elif words[:2] == ["lookalike", "map"]:
        assert (work / "map.png").stat().st_size > 10_000
    elif words[:2] == ["lookalike", "ingest"]:
        assert "12" in out + err
    elif words[:2] == ["lookalike", "size"]:
        assert "shards" in out.lower()


@pytest.mark.timeout(900)
def test_every_readme_example_runs_as_written(tmp_path):
    from lookalike.net import wait_for_serving

    text = (REPO / "README.md").read_text()
    commands = readme_commands(text)
    assert any(c.startswith("lookalike collection create") for c in commands)  # the parser found the blocks
    work = tmp_path / "work"
    work.mkdir()
    data = _write_inputs(work)
    cli_shim(tmp_path / "bin")
    port = free_port()
    target = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # Ray's token authentication as shipped
    env.update(PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}",
               LOOKALIKE_TARGET=target, LOOKALIKE_PORT=str(port), MPLBACKEND="Agg")
    serve_cmd = next(c for c in commands if "lookalike serve" in c).split("&&")[-1].strip()
    # no shell between: the signals that stop it reach serve itself
    proc = subprocess.Popen(shlex.split(serve_cmd), cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ran = []
    try:
        wait_for_serving(target, timeout=180)
        for cmd in commands:
            if skipped(cmd):
                continue
            t = time.monotonic()
            run = re.sub(r"--duration \d+", f"--duration {LOADTEST_SECONDS}", cmd.replace("localhost:50051", target))
            res = subprocess.run(run, shell=True, cwd=work, env=env,
                                 capture_output=True, text=True, timeout=300)
            print(f"{time.monotonic() - t:6.1f}s  exit {res.returncode}  {cmd}", flush=True)
            _check(cmd, res, data, work)
            ran.append(cmd)
        # the Python example, as written
        py = [body for lang, body in readme_blocks(text) if lang == "python"]
        assert py, "the README's Python example"
        for body in py:
            res = subprocess.run([sys.executable, "-c", body.replace("localhost:50051", target)], cwd=work,
                                 env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
            assert res.returncode == 0 and "Traceback" not in res.stderr, f"{body}\n{res.stdout}\n{res.stderr}"
    finally:
        out = stop_serve(proc, signal.SIGTERM)
        print(f"--- lookalike serve's output (the end) ---\n{out[-4000:]}")
    assert "lookalike stopped" in out, out[-3000:]
    assert len(ran) >= 20, ran


def test_readme_command_parser():
    text = textwrap.dedent("""\
        ```bash
        lookalike a --x 1   # comment
        # only a comment
        lookalike b \\
          --y 2
        ```
        ```python
        print(1)
        ```
        ```
        not a shell block
        ```
        """)
    assert readme_commands(text) == ["lookalike a --x 1", "lookalike b    --y 2"]
    assert [lang for lang, _ in readme_blocks(text)] == ["bash", "python", ""]
    assert skipped("pip install -e . && lookalike serve") and not skipped("lookalike status")
