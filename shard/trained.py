"""A collection's trained index: trained once for the whole collection, kept in storage, loaded by every shard.

IVF centroids, PQ/SQ codebooks and PCA/OPQ transforms are trained once per collection, on a sample drawn from
all its buckets (see ``shard.training.TrainedIndexes.train``), and written here as the *empty* trained index in
FAISS's own serialization. Every shard and replica of the collection starts its index from that same file and adds
its own buckets to it, so ``nlist``, ``nprobe`` and ``M`` mean what they mean for one FAISS index over all the data,
and two replicas holding the same items answer the same.

Layout, on the storage every node mounts::

    trained/<collection>/v<version>.index    the trained, empty index (faiss.serialize_index / _binary)
    trained/<collection>/v<version>.json     version, spec, dim, metric, bytes and CRC-32 of the .index,
                                              vectors it was trained on, seconds, when

Versions count up from 1 (0 means untrained); the controller records the collection's current version in its
config (``CollectionConfig.trained_version``). Both files are written to a temporary name, fsynced and renamed,
the .json last, so a version whose .json exists is whole. Reading checks the CRC and that spec, dim and metric are
the collection's: anything else raises :class:`TemplateDamaged`, and the shard then serves exactly from its
buffer and reports it, until the collection is trained again.

Uses faiss, numpy, the base package (CollectionConfig) and shard.osutil only.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import shutil
import zlib

import faiss
import numpy as np

from lookalike.config import CollectionConfig
from lookalike.files import fsync_dir, write_atomic

_CHUNK = 1 << 24


class TemplateDamaged(Exception):
    """A trained index file is missing, cut short, or not the collection's."""


def template_dir(storage_root: str | pathlib.Path, name: str) -> pathlib.Path:
    return pathlib.Path(storage_root) / "trained" / name


def _paths(storage_root, name: str, version: int) -> tuple[pathlib.Path, pathlib.Path]:
    d = template_dir(storage_root, name)
    return d / f"v{version}.index", d / f"v{version}.json"


def _serialize(index) -> np.ndarray:
    return faiss.serialize_index_binary(index) if isinstance(index, faiss.IndexBinary) else faiss.serialize_index(index)


def _deserialize(data: np.ndarray, binary: bool):
    return faiss.deserialize_index_binary(data) if binary else faiss.deserialize_index(data)


def _crc(data) -> int:
    view = memoryview(data).cast("B")
    crc = 0
    for s in range(0, len(view), _CHUNK):
        crc = zlib.crc32(view[s:s + _CHUNK], crc)
    return crc


def write_template(storage_root, coll: CollectionConfig, version: int, index, trained_on: int,
                   seconds: float) -> dict:
    """Writes ``index`` (trained, empty) as version ``version`` of the collection's trained index; returns its note."""
    data = _serialize(index)
    path, note_path = _paths(storage_root, coll.name, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, sync_dir=False)
    note = {"version": version, "spec": coll.index, "dim": coll.dim, "metric": coll.metric, "bytes": int(data.size),
            "crc32": _crc(data), "trained_on": int(trained_on), "seconds": round(float(seconds), 3),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    write_atomic(note_path, json.dumps(note, indent=1).encode(), sync_dir=False)
    fsync_dir(path.parent)
    return note


def read_template(storage_root, coll: CollectionConfig, version: int):
    """The trained, empty index of ``version``, checked.

    Raises:
        TemplateDamaged: with a sentence saying what is wrong.
    """
    path, note_path = _paths(storage_root, coll.name, version)
    where = f"trained index v{version} of {coll.name!r} ({path})"
    try:
        note = json.loads(note_path.read_text())
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError as err:
        raise TemplateDamaged(f"{where} is missing ({pathlib.Path(err.filename).name})") from None
    except (OSError, ValueError) as err:
        raise TemplateDamaged(f"{where} cannot be read: {err}") from None
    if (note.get("spec"), note.get("dim"), note.get("metric")) != (coll.index, coll.dim, coll.metric):
        raise TemplateDamaged(f"{where} was trained for {note.get('spec')!r}, dim {note.get('dim')}, "
                              f"{note.get('metric')}, not for this collection")
    if data.size != note.get("bytes") or _crc(data) != note.get("crc32"):
        raise TemplateDamaged(f"{where} is damaged: {data.size} bytes with CRC {_crc(data):08x}, written as "
                              f"{note.get('bytes')} bytes with CRC {int(note.get('crc32', 0)):08x}")
    try:
        return _deserialize(data, coll.binary)
    except Exception as err:  # noqa: BLE001: FAISS refuses what it cannot parse with a RuntimeError
        raise TemplateDamaged(f"{where} cannot be loaded by FAISS: {str(err).strip().splitlines()[-1]}") from None


def template_note(storage_root, name: str, version: int) -> dict | None:
    """The .json of a version, or None."""
    try:
        return json.loads(_paths(storage_root, name, version)[1].read_text())
    except (OSError, ValueError):
        return None


def remove_templates(storage_root, name: str, keep: tuple[int, ...] = ()) -> None:
    """Deletes the collection's trained indexes, all of them or all but the versions in ``keep``."""
    d = template_dir(storage_root, name)
    if not keep:
        shutil.rmtree(d, ignore_errors=True)
        return
    for p in d.glob("v*"):
        if p.name.split(".", 1)[0] not in {f"v{v}" for v in keep}:
            p.unlink(missing_ok=True)
