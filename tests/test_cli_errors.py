"""The command line as a new user meets it: help for every flag, one-line errors with a non-zero exit status for
every mistake (never a traceback), and the messages that say what to do. `main(argv)` runs in this process; the
commands that need a router talk to a closed port (they fail at once with the "cannot reach" sentence) or to one
in-process cluster (no Ray) shared by this module."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import socket
import sys

import numpy as np
import pytest

from conftest import served_local_cluster

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def run(argv: list[str], capsys) -> tuple[object, str, str]:
    """(exit status, stdout, stderr) of ``lookalike ARGV`` in this process. A SystemExit or a KeyboardInterrupt
    that escapes main() is returned as what it is, so that the assertions (not pytest) report it."""
    from tools.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = f"SystemExit({stop.code!r}) escaped main()"
    except KeyboardInterrupt:
        code = "KeyboardInterrupt escaped main()"
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(argv, capsys, expect: str = "") -> str:
    code, _, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert isinstance(code, int) and code != 0, (argv, code, err)
    assert "Traceback" not in err and len(lines) == 1, (argv, err)
    assert expect in lines[0], (argv, expect, err)
    return lines[0]


@pytest.fixture(scope="module")
def closed_target() -> str:
    """host:port where nothing listens (a port bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


# --- help -------------------------------------------------------------------------------------------------------
def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...]):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helped = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                assert helped.get(name), f"`{' '.join(path)} {name}` has no help line in `{' '.join(path)} --help`"
                if not (path == ("lookalike",) and name == "bench"):  # bench has its own parser, below
                    yield from _parsers(sub, (*path, name))


def test_every_flag_of_every_subcommand_has_help_that_shows_its_default(capsys):
    from bench.cluster_bench import build_parser as bench_parser
    from tools.cli import build_parser

    parsers = [*_parsers(build_parser(), ("lookalike",)), (("lookalike", "bench"), bench_parser())]
    missing, no_default = [], []
    for path, parser in parsers:
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = "/".join(action.option_strings) or action.dest
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{' '.join(path)} {name}")
            elif (action.option_strings and action.nargs != 0  # not a switch: it takes a value
                  and action.default not in (None, False, "", argparse.SUPPRESS)
                  and "default" not in formatter._get_help_string(action)):
                no_default.append(f"{' '.join(path)} {name} (default {action.default!r})")
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"options whose help does not show the default: {no_default}"
    for path, _ in parsers:  # the help renders (no stray % in a help sentence)
        code, out, err = run([*path[1:], "--help"], capsys)
        assert code == 0 and "usage: lookalike" in out and not err, (path, err)


def test_version_is_the_package_version(capsys):
    from importlib import metadata

    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"lookalike {metadata.version('lookalike')}"


def test_encoder_help_lists_every_encoder_of_the_registry(capsys):
    from encoder.registry import available

    code, out, _ = run(["collection", "create", "--help"], capsys)
    assert code == 0
    encoder_help = " ".join(out.split("\n  --encoder NAME", 1)[1].split("\n  --index", 1)[0].split())
    for name in available():
        assert re.search(rf"\b{name}\b", encoder_help), (name, encoder_help)
    assert "torchscript:PATH" in encoder_help and "phash[:N]" in encoder_help


def test_replication_and_replicas_are_one_flag_in_both_places():
    from tools.cli import build_parser

    p = build_parser()
    for spelling in ("--replication", "--replicas"):
        assert p.parse_args(["collection", "create", "c", "--dim", "4", spelling, "2"]).replication == 2
        assert p.parse_args(["size", "--vectors", "10", "--dim", "8", spelling, "3"]).replication == 3


def test_connection_flags_go_before_or_after_the_subcommand(closed_target, capsys):
    from tools.cli import build_parser
    from tools.cli.common import DEFAULT_TARGET
    from tools.cli.flags import connection_defaults

    p = build_parser()
    flags = ["--target", "h:1", "--token-file", "t"]
    for argv in ([*flags, "status"], ["status", *flags]):
        args = p.parse_args(argv)
        connection_defaults(p, args)
        assert (args.target, args.token_file, args.tls_ca) == ("h:1", "t", "")
    args = p.parse_args(["--tls-ca", "ca.pem", "search", "c", "q.npy"])
    connection_defaults(p, args)
    assert (args.target, args.tls_ca) == (DEFAULT_TARGET, "ca.pem")
    line = assert_one_line_error(["--target", closed_target, "status"], capsys, f"cannot reach the router at "
                                                                                f"{closed_target}")
    assert "connection refused" in line and "TLS" not in line  # no TLS hint for a router that is not there


def test_the_environment_names_the_router_and_serve_port(closed_target, monkeypatch, capsys):
    """LOOKALIKE_TARGET stands for --target, LOOKALIKE_PORT for serve's --port; a flag still wins."""
    from tools.cli import build_parser
    from tools.cli.flags import connection_defaults

    monkeypatch.setenv("LOOKALIKE_TARGET", closed_target)
    assert_one_line_error(["status"], capsys, f"cannot reach the router at {closed_target}")
    p = build_parser()
    args = p.parse_args(["status", "--target", "h:2"])
    connection_defaults(p, args)
    assert args.target == "h:2"
    monkeypatch.setenv("LOOKALIKE_TARGET", "nonsense")
    assert_one_line_error(["status"], capsys, "LOOKALIKE_TARGET")
    monkeypatch.setenv("LOOKALIKE_PORT", "70000")
    assert_one_line_error(["serve"], capsys, "LOOKALIKE_PORT")


# --- every subcommand: a missing file, a wrong type, a bad value --------------------------------------------------
def test_every_subcommand_answers_mistakes_with_one_line_and_a_nonzero_exit(tmp_path, closed_target, capsys):
    from tools.cli import build_parser

    T = ["--target", closed_target]
    missing = tmp_path / "missing"
    good = tmp_path / "x.npy"
    np.save(good, np.zeros((10, 4), np.float32))
    not_npy = tmp_path / "x.txt"
    not_npy.write_text("0.1 0.2 0.3 0.4\n")
    bad_payload = tmp_path / "p.jsonl"
    bad_payload.write_text('{"uri": "a.jpg"}\n{uri: b.jpg}\n')
    three_ids = tmp_path / "ids.txt"
    three_ids.write_text("a\nb\nc\n")
    toks = tmp_path / "tokens.json"
    png = tmp_path / "map.png"
    data = tmp_path / "data"
    cases = [
        # serve: all refused before anything starts
        (["serve", "--data", data, "--tls-cert", missing, "--tls-key", missing, "--tls-ca", missing], "missing"),
        (["serve", "--data", data, "--tokens", missing, "--port", "0"], "missing"),
        (["serve", "--data", data, "--port", "fifty"], "argument --port: takes a whole number"),
        (["serve", "--data", data, "--shard-memory", "8XB"], "argument --shard-memory"),
        (["serve", "--data", data, "--rate-limit", "-1"], "argument --rate-limit: must be at least 0"),
        # token
        (["token", "list", "--tokens", missing], "no tokens file"),
        (["token", "create", "ci", "--scopes", "read", "--tokens", missing / "t.json"], "cannot write"),
        (["token", "create", "ci", "--scopes", "read", "--rate", "fast", "--tokens", toks], "argument --rate"),
        (["token", "create", "ci", "--scopes", "root", "--tokens", toks], "--scopes takes"),
        (["token", "create", "--tokens", toks], "token create needs a NAME"),
        (["token", "revoke", "--tokens", toks], "the following arguments are required: name"),
        # collection
        (["collection", "create", "c", "--dim", "ten", *T], "argument --dim: takes a whole number, got 'ten'"),
        (["collection", "create", "c", "--dim", "0", *T], "argument --dim: must be at least 1, got 0"),
        (["collection", "create", "c", *T], "--dim is required"),
        (["collection", "create", "c", "--dim", "4", "--buckets", "0", *T], "argument --buckets"),
        (["collection", "list", "--target", "localhost:http"], "argument --target: takes HOST:PORT"),
        (["collection", "describe", "c", "--target", "localhost"], "argument --target: takes HOST:PORT"),
        (["collection", "drop", "c", *T], "cannot reach the router"),
        # upsert
        (["upsert", "c", missing, *T], f"{missing}: no such file"),
        (["upsert", "c", good, "--ids", missing, *T], f"--ids {missing}: no such file"),
        (["upsert", "c", not_npy, *T], "not a .npy array"),
        (["upsert", "c", good, "--payload", bad_payload, *T], f"--payload {bad_payload} line 2: not JSON"),
        (["upsert", "c", good, "--ids", three_ids, *T], "3 ids for the 10 vectors"),
        (["upsert", "c", good, "--batch", "many", *T], "argument --batch"),
        (["upsert", "c", good, "--batch", "0", *T], "argument --batch: must be at least 1"),
        (["upsert", "c", good, *T], "cannot reach the router"),
        # delete, get
        (["delete", "c", "--ids-file", missing, *T], f"--ids-file {missing}: no such file"),
        (["delete", "c", *T], "give the ids to delete"),
        (["delete", "c", "a", *T], "cannot reach the router"),
        (["get", "c", "a", "--target", "h:x"], "argument --target"),
        (["get", "c", "a", *T], "cannot reach the router"),
        # search
        (["search", "c", missing, *T], f"{missing}: no such file"),
        (["search", "c", "--image", missing, *T], f"--image {missing}: no such file"),
        (["search", "c", good, "-k", "ten", *T], "argument -k: takes a whole number, got 'ten'"),
        (["search", "c", good, "--min-coverage", "most", *T], "argument --min-coverage"),
        (["search", "c", good, "-k", "0", *T], "argument -k: must be at least 1, got 0"),
        (["search", "c", good, "--min-coverage", "1.5", *T], "argument --min-coverage: must be at most 1"),
        (["search", "c", good, "--ef-search", "-2", *T], "argument --ef-search"),
        (["search", "c", *T], "give either QUERIES.npy"),
        (["search", "c", good, *T], "cannot reach the router"),
        # ingest, train-encoder
        (["ingest", "c", missing, *T], f"folder {missing}: no such folder"),
        (["ingest", "c", tmp_path, "--batch", "x", *T], "argument --batch"),
        (["ingest", "c", tmp_path, "--batch", "0", *T], "argument --batch: must be at least 1"),
        (["train-encoder", missing, "--out", tmp_path / "m.pt"], f"folder {missing}: no such folder"),
        (["train-encoder", missing, "--out", tmp_path / "m.pt", "--epochs", "many"], "argument --epochs"),
        (["train-encoder", missing, "--out", tmp_path / "m.pt", "--dim", "0"], "argument --dim: must be at least 1"),
        # catalog jobs
        (["dedup", "c", "--threshold", "close", *T], "argument --threshold: takes a number"),
        (["dedup", "c", "--threshold", "0.5", "-k", "0", *T], "argument -k/--k: must be at least 1"),
        (["dedup", "c", *T], "the following arguments are required: --threshold"),
        (["dedup", "c", "--threshold", "0.5", *T], "cannot reach the router"),
        (["cluster", "c", "-k", "ten", *T], "argument -k/--k: takes a whole number"),
        (["cluster", "c", "-k", "0", *T], "argument -k/--k: must be at least 1"),
        (["job", "lst", *T], "invalid choice: 'lst'"),
        (["job", "status", *T], "job status needs the job's ID"),
        (["job", "list", *T], "cannot reach the router"),
        (["map", "c", "--out", png, "--width", "wide", *T], "argument --width"),
        (["map", "c", "--out", png, "--sample", "0", *T], "argument --sample: must be at least 1"),
        # status, train, rebalance
        (["status", "--target", "127.0.0.1:port"], "argument --target"),
        (["status", "--target", "127.0.0.1:0"], "argument --target"),
        (["train", "c", "--timeout", "soon", *T], "argument --timeout"),
        (["train", "c", "--timeout", "0", *T], "argument --timeout: must be more than 0"),
        (["train", "c", *T], "cannot reach the router"),
        (["rebalance", "c", "--add-shards", "two", *T], "argument --add-shards"),
        (["rebalance", "c", "--add-shards", "-1", *T], "argument --add-shards: must be at least 0"),
        (["rebalance", "c", *T], "cannot reach the router"),
        # loadtest
        (["loadtest", "c", "--data", missing, *T], f"--data {missing}: no such file"),
        (["loadtest", "c", "--queries", missing, *T], f"--queries {missing}: no such file"),
        (["loadtest", "c", "--data", good, "--ids", missing, *T], f"--ids {missing}: no such file"),
        (["loadtest", "c", "--data", good, "--ids", three_ids, *T], "3 ids for the 10 vectors"),
        (["loadtest", "c", "--rate", "fast", *T], "argument --rate: takes a number"),
        (["loadtest", "c", "--rate", "-1", *T], "argument --rate: must be at least 0"),
        (["loadtest", "c", "--mix", "serch=1", *T], "mix"),
        (["loadtest", "c", *T], "cannot reach the router"),
        # size, bench
        (["size", "--vectors", "many", "--dim", "8"], "argument --vectors"),
        (["size", "--vectors", "10", "--dim", "0"], "argument --dim: must be at least 1"),
        (["size", "--vectors", "10", "--dim", "8", "--index", "Bogus"], "index 'Bogus': not a supported index"),
        (["size", "--vectors", "10", "--dim", "8", "--node-memory", "64XB"], "argument --node-memory"),
        (["bench", "--n", "many"], "argument --n"),
        (["bench", "--k", "0"], "argument --k: must be at least 1"),
        # backup, restore
        (["backup", "c", str(tmp_path / "bk"), "--page", "0", *T], "argument --page: must be at least 1"),
        (["backup", "c", str(tmp_path / "bk"), *T], "cannot reach the router"),
        (["restore", missing, *T], f"{missing} holds no backup"),
        # the command line itself
        ([], "the following arguments are required: COMMAND"),
        (["serch"], "invalid choice: 'serch'"),
        (["--target", closed_target, "size", "--vectors", "1", "--dim", "8"], "takes no connection flags"),
    ]
    for argv, expect in cases:
        assert_one_line_error(argv, capsys, expect)
    assert not data.exists()  # serve refused before anything started
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert commands == {argv[0] for argv, _ in cases if argv and not argv[0].startswith("-")} - {"serch"}


def test_ctrl_c_and_unexpected_errors_are_one_line(monkeypatch, capsys):
    from tools import sizing

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(sizing, "plan", interrupted)
    code, _, err = run(["size", "--vectors", "1", "--dim", "8"], capsys)
    assert code == 130 and len(err.strip().splitlines()) == 1 and "interrupted" in err, (code, err)

    def bug(*a, **kw):
        raise RuntimeError("an index\nthe sizing tool did not expect")

    monkeypatch.setattr(sizing, "plan", bug)
    line = assert_one_line_error(["size", "--vectors", "1", "--dim", "8"], capsys, "unexpected RuntimeError: an index "
                                                                                   "the sizing tool did not expect")
    assert "LOOKALIKE_DEBUG=1" in line
    monkeypatch.setenv("LOOKALIKE_DEBUG", "1")  # the traceback, for whoever debugs it
    from tools.cli import main

    with pytest.raises(RuntimeError, match="did not expect"):
        main(["size", "--vectors", "1", "--dim", "8"])


def test_map_without_the_plot_extra_says_which_extra(monkeypatch, closed_target, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError, as without the extra
    assert_one_line_error(["map", "c", "--out", tmp_path / "m.png", "--target", closed_target], capsys,
                          "pip install 'lookalike[plot]'")


def test_a_tls_hint_only_where_tls_is_what_differs(tmp_path, capsys):
    pytest.importorskip("cryptography")
    from lookalike.devcerts import write_pki
    from lookalike.net import create_server

    pki = write_pki(tmp_path)
    plain, plain_port = create_server("127.0.0.1:0", lambda server: None, ["x"])[:2]
    tls, tls_port = create_server("127.0.0.1:0", lambda server: None, ["x"], tls=pki)[:2]
    try:
        line = assert_one_line_error(["status", "--target", f"127.0.0.1:{tls_port}"], capsys, "speaks TLS")
        assert "--tls-ca" in line
        line = assert_one_line_error(["status", "--target", f"127.0.0.1:{plain_port}", "--tls-ca", pki.ca], capsys,
                                     "serves plaintext")
        assert "drop --tls-ca" in line
    finally:
        plain.stop(None)
        tls.stop(None)


def test_the_readme_token_example_works(tmp_path, monkeypatch, capsys):
    """The README's `lookalike token create ...` is a whole command that runs (it said only `token create`)."""
    from lookalike.security import TokenTable

    text = " ".join((ROOT / "README.md").read_text().split())
    examples = re.findall(r"`(lookalike token create[^`]*)`", text)
    assert examples and all("--scopes" in e for e in examples), examples
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(examples[0])[1:]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    out = argv[argv.index("--out") + 1] if "--out" in argv else None
    tokens = argv[argv.index("--tokens") + 1] if "--tokens" in argv else "lookalike-tokens.json"
    assert out and TokenTable(str(tmp_path / tokens)).lookup((tmp_path / out).read_text().strip()) is not None


# --- against a router -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(client, ["--target", address]) of an in-process cluster (no Ray) that serves the catalog jobs too."""
    with served_local_cluster(tmp_path_factory.mktemp("cli"), shards=2, jobs=True) as (_cluster, client):
        yield client, ["--target", client.target]


def test_collection_defaults_for_search_and_search_ef_search(served, tmp_path, monkeypatch, capsys):
    from lookalike.client import Client

    client, T = served
    assert run(["collection", "create", "h", "--dim", "8", "--index", "HNSW16", "--buckets", "8", "--nprobe", "7",
                "--ef-search", "40", *T], capsys)[0] == 0
    code, out, _ = run(["collection", "describe", "h", *T], capsys)
    described = json.loads(out)
    assert code == 0 and (described["nprobe"], described["efSearch"]) == (7, 40)
    assert run(["collection", "create", "r", "--dim", "4", "--buckets", "8", "--replicas", "2", *T], capsys)[0] == 0
    assert client.describe_collection("r").spec.replication == 2
    xb = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    client.upsert("h", [str(i) for i in range(200)], xb)
    np.save(tmp_path / "q.npy", xb[:2])
    asked = []
    search = Client.search

    def spy(self, *a, **kw):
        asked.append(kw.get("ef_search"))
        return search(self, *a, **kw)

    monkeypatch.setattr(Client, "search", spy)
    code, out, err = run(["search", "h", tmp_path / "q.npy", "-k", "3", "--ef-search", "80", "--json", *T], capsys)
    assert code == 0, err
    assert asked == [80] and [r["ids"][0] for r in json.loads(out)["results"]] == ["0", "1"]


def test_job_list_has_a_header(served, capsys):
    client, T = served
    client.create_collection("j", 4, buckets=8)
    client.upsert("j", [str(i) for i in range(100)], np.random.default_rng(1).standard_normal((100, 4)))
    code, out, _ = run(["job", "list", *T], capsys)
    assert code == 0 and out.startswith("no jobs")
    assert run(["cluster", "j", "-k", "2", "--quiet", *T], capsys)[0] == 0
    code, out, _ = run(["job", "list", *T], capsys)
    header, *rows = out.splitlines()
    assert code == 0 and header.split()[:4] == ["job", "kind", "collection", "state"], out
    assert len(rows) == 1 and rows[0].split()[1:4] == ["cluster", "j", "SUCCEEDED"], out


def test_ingest_failures_exit_nonzero_and_image_errors_name_the_file(served, tmp_path, capsys):
    from PIL import Image

    client, T = served
    client.create_collection("photos", encoder="phash", buckets=8)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 48), (60 * i, 90, 200 - 60 * i)).save(folder / f"ok{i}.png")
    broken = folder / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    code, out, err = run(["ingest", "photos", folder, "--quiet", *T], capsys)
    assert code == 1 and "2 stored now" in out, (out, err)
    assert err.strip().splitlines()[-1] == "error: 1 of 3 image file(s) failed (--report FILE.json lists them all)"
    line = assert_one_line_error(["search", "photos", "--image", folder / "ok0.png", "--image", broken, *T], capsys,
                                 f"--image {broken}: ")
    assert "query image" not in line


def test_status_labels_its_counts(served, capsys):
    client, T = served
    for name in ("s1", "s2"):
        client.create_collection(name, 4, buckets=16)
        client.upsert(name, [str(i) for i in range(64)], np.random.default_rng(2).standard_normal((64, 4)))
    code, _, err = run(["rebalance", "s1", "--add-shards", "1", *T], capsys)
    assert code == 0, err
    code, out, _ = run(["status", *T], capsys)
    assert code == 0
    # buckets per collection under each shard (each collection has buckets of its own), never summed across them
    per = re.findall(r"^  (s[12]): (\d+) bucket\(s\)", out, re.M)
    assert {c for c, _ in per} == {"s1", "s2"}, out
    assert all(sum(int(b) for c, b in per if c == name) == 16 for name in ("s1", "s2")), out
    assert re.search(r"^collection s1: 64 items", out, re.M), out
    moves = next(line for line in out.splitlines() if line.startswith("bucket moves:"))
    assert "0 bucket(s) still to move; since the controller started, " in moves and "move(s) done" in moves, moves


def test_loadtest_does_not_claim_recall_0_for_ids_that_are_not_row_numbers(served, tmp_path, capsys):
    client, T = served
    xb = np.random.default_rng(3).standard_normal((300, 8)).astype(np.float32)
    ids = [f"img-{i}" for i in range(len(xb))]
    client.create_collection("lt", 8, buckets=8)
    client.upsert("lt", ids, xb)
    np.save(tmp_path / "xb.npy", xb)
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    out_json = tmp_path / "lt.json"
    base = ["loadtest", "lt", "--data", tmp_path / "xb.npy", "--requests", "30", "--concurrency", "2", "--processes",
            "1", "--out", out_json, "--plot", "", "--quiet", *T]
    code, out, err = run(base, capsys)
    recall = json.loads(out_json.read_text())["recall"]
    assert code == 0 and recall["recall_at_k"] is None and "recall needs --ids FILE" in recall["why"], (recall, err)
    assert "warning:" in err and "recall needs --ids FILE" in err and "recall@" not in out
    code, out, err = run([*base, "--ids", tmp_path / "ids.txt"], capsys)
    assert code == 0 and json.loads(out_json.read_text())["recall"]["recall_at_k"] == 1.0, err  # Flat: exact


def test_flags_are_not_abbreviated(capsys):
    """`lookalike size --shards 4` meant --shards-per-node 4 without a word: an unknown flag is an error."""
    assert_one_line_error(["size", "--vectors", "1000", "--dim", "8", "--shards", "4"], capsys,
                          "unrecognized arguments: --shards")
