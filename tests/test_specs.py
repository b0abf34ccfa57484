"""Index specs: only the grammar of lookalike.indexspec is accepted, and everything it accepts works.

The fuzzing builds specs from FAISS factory tokens with hostile numbers (0, 1, huge), wrappers lookalike does not
support (IDMap, Refine, RFlat, NSG, LSH...), NUL and other characters; each is validated and then exercised the way
a shard uses an index (train, add, search, remove, re-add, reconstruct) in a forked child of a separate process
(tests/spec_trial.py): a spec is either refused with INVALID_ARGUMENT or works, and never kills the process.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import faiss
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lookalike.errors import InvalidArgument
from lookalike.indexspec import check_spec
from shard.specs import build_index

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Specs that FAISS builds but aborts (or crashes) on, or whose writes always fail: found on a real cluster.
KNOWN_BAD = ["HNSW0", "HNSW1", "PQ4x0", "IVF4,PQ4x0", "IDMap,Flat", "IDMap2,Flat", "Flat\x00", "HNSW\x0016",
             "IVF4_HNSW0,Flat", "PCA8,HNSW4", "RFlat", "NSG32", "IVF4,Flat,RFlat", "Flat,", "ＨNSW8"]


def _trial(cases: list[tuple[str, int, str]]) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "spec_trial.py")], input=json.dumps(cases),
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)  # this checkout's code
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("spec", KNOWN_BAD)
def test_specs_faiss_aborts_on_are_refused_from_their_text(spec):
    with pytest.raises(InvalidArgument):
        check_spec(spec, 16, False)


@pytest.mark.parametrize("spec", ["IVF16,PQ8", "PQ8", "PCA16,IVF16,PQ4"])
def test_pq_specs_train_as_their_np_form(spec):
    """A "PQ" spec trains without FAISS's polysemous training (no lookalike search uses it, and it is most of the
    training's time): the same trained index, byte for byte, as FAISS's spec ending in "np"."""
    x = np.random.default_rng(0).standard_normal((2000, 32)).astype("float32")
    ours, faiss_np = build_index(32, "l2", spec), faiss.index_factory(32, spec + "np")
    ours.train(x)
    faiss_np.train(x)
    assert faiss.serialize_index(ours).tobytes() == faiss.serialize_index(faiss_np).tobytes()


_NUMS = st.sampled_from(["0", "1", "2", "3", "4", "8", "16", "17", "007", "99999999999", ""])
_ENC = st.one_of(st.just("Flat"), st.builds(lambda m, b, np_: f"PQ{m}" + (f"x{b}" if b else "") + np_, _NUMS,
                                            st.sampled_from(["", "0", "1", "4", "8", "17"]), st.sampled_from(["", "np", "fs"])),
                 st.sampled_from(["SQ4", "SQ6", "SQ8", "SQfp16", "SQbf16", "SQ7", "SQ"]))
_MAIN = st.one_of(
    st.just("Flat"), _ENC,
    st.builds(lambda n, q, e: f"IVF{n}{q},{e}", _NUMS, st.sampled_from(["", "_HNSW0", "_HNSW2", "_HNSW8"]), _ENC),
    st.builds(lambda m, tail: f"HNSW{m}{tail}", _NUMS, st.sampled_from(["", ",Flat", "_PQ4x4", "_SQ8", "_Flat"])),
    st.builds(lambda d: f"CAGRA{d}", _NUMS),
    st.sampled_from(["IDMap,Flat", "IDMap2,Flat", "RFlat", "Flat,RFlat", "IVF4,PQ4,Refine(Flat)", "NSG32", "LSH",
                     "ITQ,LSHt", "IMI2x2,Flat", "L2norm,Flat", "RR16,Flat", "HNSW2x32,Flat", "IVF4,PQ4x4fs", ""]),
)
_SPEC = st.one_of(
    _MAIN,
    st.builds(lambda t, m: f"{t},{m}", st.builds(lambda k, n: f"{k}{n}", st.sampled_from(["PCA", "OPQ"]), _NUMS), _MAIN),
    st.builds(lambda m, junk: m + junk, _MAIN, st.sampled_from(["\x00", " ", ",", ",,Flat", "\n", "é"])),
)


_DRAWN: list[tuple[str, int, str]] = []


@settings(max_examples=150, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(_SPEC, st.sampled_from([(16, "l2"), (16, "cosine"), (16, "ip"), (8, "l2")]))
def _draw(spec, dim_metric):
    _DRAWN.append((spec, *dim_metric))


def test_every_spec_is_refused_or_works_and_none_kills_the_process():
    _DRAWN.clear()
    _draw()  # up to 150 specs, the same every run
    cases = list(_DRAWN)
    cases += [(spec, 16, "l2") for spec in KNOWN_BAD + ["HNSW2", "PCA8,IVF2,PQ4x4np", "OPQ4_8,IVF4,SQ8", "IVF4,PQ8x4fs"]]
    # binary codes: the grammar's B-specs, and float specs a hamming collection turns into B-specs
    cases += [(s, 64, "hamming") for s in ("BFlat", "BIVF4", "BIVF4,Flat", "BIVF4_HNSW2", "BHNSW2", "BHNSW0",
                                            "BHNSW1", "HNSW8", "IVF4", "BHash8", "BFlat,Flat", "BCAGRA", "PQ4")]
    outcomes = _trial(cases)
    bad = [(spec, metric, out) for (spec, _, metric), out in zip(cases, outcomes) if out not in ("ok", "refused")]
    assert not bad, f"specs accepted that then failed or killed the process: {bad}"
    accepted = {spec for (spec, *_), out in zip(cases, outcomes) if out == "ok"}
    assert {"HNSW2", "BHNSW2", "BIVF4", "PCA8,IVF2,PQ4x4np", "OPQ4_8,IVF4,SQ8", "IVF4,PQ8x4fs"} <= accepted
    assert not accepted & set(KNOWN_BAD)
    # the fuzzing reached both sides: some specs work, some are refused
    assert len(accepted) >= 10 and outcomes.count("refused") >= 10, outcomes


def test_hostile_specs_through_the_api_never_take_down_another_collection_across_a_restart(ray_cluster_factory,
                                                                                        tmp_path):
    """On a real cluster: each hostile spec is INVALID_ARGUMENT and leaves nothing stored; the collection beside it
    serves exactly before and after a restart of the whole cluster on the same storage."""
    import grpc
    import numpy as np

    data = tmp_path / "hostile"
    cl = ray_cluster_factory(shards=2, data_dir=data)
    xb = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    cl.client.create_collection("keep", dim=16, index="Flat", buckets=16)
    cl.client.upsert("keep", [f"k{i}" for i in range(len(xb))], xb)
    for i, spec in enumerate(KNOWN_BAD + ["HNSW0,Flat", "IVF99999999999,Flat", "PQ16x0", "HNSW-1", "Flat" * 100]):
        with pytest.raises(grpc.RpcError) as err:
            cl.client.create_collection(f"bad{i}", dim=16, index=spec, buckets=16)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (spec, err.value)
    assert [c.spec.name for c in cl.client.list_collections()] == ["keep"]
    hits = cl.client.search("keep", xb[:5], k=1)
    assert [row[0] for row in hits.ids] == [f"k{i}" for i in range(5)] and hits.coverage == 1.0
    cl.stop()
    again = ray_cluster_factory(shards=2, data_dir=data)
    hits = again.client.search("keep", xb[:5], k=1)
    assert [row[0] for row in hits.ids] == [f"k{i}" for i in range(5)] and hits.coverage == 1.0
    assert again.client.describe_collection("keep").count == len(xb)
