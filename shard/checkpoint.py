"""Index checkpoints: one collection's built index and id table on one shard, written to its storage directory, so
that a restart loads them and replays only the log written after them instead of rebuilding from every snapshot
and segment (an HNSW graph of 150k x 128 took longer to replay than to build; IVF/PQ re-encoded everything).

A checkpoint ``ckpt-<n>`` is three files in the collection's store directory (see shard.store)::

    ckpt-<n>.index   the FAISS index, in FAISS's own format (faiss.write_index / write_index_binary)
    ckpt-<n>.table   the id table and what the index needs beside FAISS's file (an .npz of plain arrays, no pickle)
    ckpt-<n>.json    written last: what the rest holds (spec, dim, metric, trained version, owned buckets, the log
                     position it covers) and the size and CRC-32 of each other file

The JSON is written atomically (temporary file, fsync, rename, fsync of the directory) after the other two are
fsynced, so a checkpoint without its JSON is one a crash interrupted: it is deleted, never read. Only the newest
complete checkpoint is kept: older files go once a new JSON is in place. Whether a checkpoint may be used, and what
happens to one that does not check out, is :class:`shard.checkpointing.Loader`'s business; this module only writes,
finds, verifies and reads the files.

Uses faiss, numpy and shard.manifest / shard.osutil / shard.specs only.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import pathlib
import re
import zlib

import faiss
import numpy as np

from shard.manifest import LogPosition
from lookalike.files import fsync_dir
from shard.specs import faiss_reason

log = logging.getLogger(__name__)

FORMAT = 1
_NAME_RE = re.compile(r"^ckpt-(\d{10})\.(index|table|json)(\.tmp)?$")
_CHUNK = 1 << 20


class CheckpointDamaged(Exception):
    """A file of a checkpoint that does not check out: ``file`` (a path), ``reason``, at byte ``offset``."""

    def __init__(self, file: pathlib.Path, reason: str, offset: int = 0):
        super().__init__(f"{file.name}: {reason}")
        self.file = pathlib.Path(file)
        self.reason = reason
        self.offset = offset


def name_of(n: int) -> str:
    return f"ckpt-{n:010d}"


def files_of(path: pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """(index, table, json) paths of checkpoint ``name`` in directory ``path``."""
    return path / f"{name}.index", path / f"{name}.table", path / f"{name}.json"


def _numbers(path: pathlib.Path) -> dict[int, list[pathlib.Path]]:
    """Checkpoint number -> its files present (temporary ones included)."""
    out: dict[int, list[pathlib.Path]] = {}
    for p in path.glob("ckpt-*"):
        m = _NAME_RE.match(p.name)
        if m:
            out.setdefault(int(m.group(1)), []).append(p)
    return out


def _crc(path: pathlib.Path) -> tuple[int, int]:
    """(bytes, CRC-32) of a file, read in chunks."""
    crc = size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc


def write(path: pathlib.Path, index, binary: bool, arrays: dict[str, np.ndarray], meta: dict,
          position: LogPosition) -> str:
    """Writes a checkpoint of ``index`` (a FAISS index; binary if ``binary``) and ``arrays`` (plain numeric arrays),
    described by ``meta`` (JSON-able) and covering the log before ``position``; then deletes older checkpoints.
    Returns its name.

    Raises:
        OSError, RuntimeError: it could not be written (a full disk: FAISS raises RuntimeError); its files are
            removed, the checkpoint before it stays the newest.
    """
    numbers = _numbers(path)
    name = name_of(max(numbers, default=0) + 1)
    index_path, table_path, json_path = files_of(path, name)
    tmp = json_path.with_name(json_path.name + ".tmp")
    try:
        (faiss.write_index_binary if binary else faiss.write_index)(index, str(index_path))
        fsync_dir(index_path)  # fsyncs any path it can open read-only, a file too
        with open(table_path, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        files = {}
        for p in (index_path, table_path):
            size, crc = _crc(p)
            files[p.name] = {"bytes": size, "crc32": crc}
        note = dict(meta, format=FORMAT, checkpoint=name,
                    written=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    position={"seq": position.seq, "records": position.records, "items": position.items,
                              "bytes": position.bytes, "crc": position.crc},
                    files=files)
        with open(tmp, "w") as f:
            f.write(json.dumps(note, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, json_path)
        fsync_dir(path)
    except BaseException:
        for p in (index_path, table_path, tmp, json_path):
            p.unlink(missing_ok=True)
        raise
    for n, old in numbers.items():
        for p in old:
            p.unlink(missing_ok=True)
    fsync_dir(path)
    return name


def find(path: pathlib.Path) -> tuple[str, dict] | None:
    """The newest complete checkpoint: (its name, its JSON); None if there is none. Files of checkpoints a crash
    interrupted (no JSON, newer than the newest complete one) and of older ones are deleted.

    Raises:
        CheckpointDamaged: the newest JSON does not parse, or is not one this code wrote.
    """
    numbers = _numbers(path)
    complete = [n for n, files in numbers.items() if any(p.name.endswith(".json") for p in files)]
    newest = max(complete, default=None)
    for n, files in numbers.items():
        if n != newest:
            if newest is None or n > newest:
                log.info("%s: deleting %s, a checkpoint whose writing was interrupted (no JSON)", path, name_of(n))
            for p in files:
                p.unlink(missing_ok=True)
    if newest is None:
        return None
    name = name_of(newest)
    json_path = files_of(path, name)[2]
    try:
        meta = json.loads(json_path.read_text())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("checkpoint") != name:
            raise ValueError(f"not a checkpoint note of format {FORMAT}")
        position_of(meta)
        for p in files_of(path, name)[:2]:
            int(meta["files"][p.name]["bytes"]), int(meta["files"][p.name]["crc32"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointDamaged(json_path, f"unreadable ({err})") from None
    return name, meta


def position_of(meta: dict) -> LogPosition:
    """The log position a checkpoint's JSON records. Raises KeyError, TypeError or ValueError if it has none."""
    p = meta["position"]
    return LogPosition(int(p["seq"]), int(p["records"]), int(p["items"]), int(p["bytes"]), int(p["crc"]))


def verify(path: pathlib.Path, name: str, meta: dict) -> None:
    """Checks the size and CRC-32 of the checkpoint's files against its JSON.

    Raises:
        CheckpointDamaged: a file is missing, or its size or CRC differ.
    """
    for p in files_of(path, name)[:2]:
        want = meta["files"][p.name]
        try:
            size, crc = _crc(p)
        except FileNotFoundError:
            raise CheckpointDamaged(p, f"missing ({want['bytes']} bytes when written)") from None
        if size != want["bytes"]:
            raise CheckpointDamaged(p, f"{size} bytes, {want['bytes']} when written", min(size, want["bytes"]))
        if crc != want["crc32"]:
            raise CheckpointDamaged(p, f"CRC-32 {crc:08x}, {want['crc32']:08x} when written")


def read(path: pathlib.Path, name: str, binary: bool) -> tuple[object, dict[str, np.ndarray]]:
    """(FAISS index, arrays) of a verified checkpoint.

    Raises:
        CheckpointDamaged: FAISS or numpy refuses a file.
    """
    index_path, table_path, _ = files_of(path, name)
    try:
        index = (faiss.read_index_binary if binary else faiss.read_index)(str(index_path))
    except RuntimeError as err:  # FAISS's C++ exceptions
        raise CheckpointDamaged(index_path, f"FAISS cannot read it ({faiss_reason(err)})") from None
    try:
        with np.load(table_path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise CheckpointDamaged(table_path, f"cannot be read ({type(err).__name__}: {err})") from None
    return index, arrays


def discard(path: pathlib.Path) -> None:
    """Deletes every checkpoint file in ``path`` (one that may not be used: written for another spec)."""
    for files in _numbers(path).values():
        for p in files:
            p.unlink(missing_ok=True)
    fsync_dir(path)
