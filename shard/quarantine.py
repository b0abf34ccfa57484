"""Quarantine of a collection whose replay kills the shard process (:class:`ReplayGuard`).

Uses the standard library and shard.osutil's directory fsync.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import threading

from lookalike.files import fsync_dir as _fsync_dir

# One replay at a time in a process (see ReplayGuard.replaying).
_REPLAYS = threading.Lock()


class ReplayGuard:
    """Keeps a collection whose replay kills the process (a FAISS abort, a segfault, memory) from taking its shard
    down again and again, and with it every other collection of the shard.

    Before a replay, ``<collection dir>/REPLAYING`` is written with the number of replays started; a finished
    replay removes it. Finding it at the next start means the process died during the replay. After
    ``max_attempts`` such deaths in a row the collection is quarantined: ``QUARANTINED`` (a JSON note: why and
    when) is written and the collection is not loaded again until an operator drops it or removes the note.
    """

    REPLAYING = "REPLAYING"
    QUARANTINED = "QUARANTINED"

    def __init__(self, path: pathlib.Path, max_attempts: int = 2):
        self.path = pathlib.Path(path)
        self.max_attempts = max_attempts
        self._attempts = 0

    def _read(self, name: str) -> dict | None:
        try:
            return json.loads((self.path / name).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: treated as present

    def _write(self, name: str, note: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / (name + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(note) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / name)
        _fsync_dir(self.path)

    def quarantine_reason(self) -> str | None:
        """Why the collection must not be loaded (a note of an earlier quarantine, or too many replays that did not
        finish), or None."""
        note = self._read(self.QUARANTINED)
        if note is not None:
            return f"{note.get('reason', 'quarantined')} (since {note.get('since', '?')}; {self._how_to()})"
        replaying = self._read(self.REPLAYING)
        self._attempts = int((replaying or {}).get("attempts", 1 if replaying is not None else 0))
        if self._attempts >= self.max_attempts:
            return self.quarantine(f"the shard process died {self._attempts} times in a row while replaying it "
                                   "(a crash in FAISS, or memory)")
        return None

    def quarantine(self, reason: str) -> str:
        """Records the quarantine; returns the sentence that reports it."""
        since = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self._write(self.QUARANTINED, {"reason": reason, "since": since})
        (self.path / self.REPLAYING).unlink(missing_ok=True)
        return f"{reason} (since {since}; {self._how_to()})"

    def _how_to(self) -> str:
        return (f"drop the collection, or remove {self.path / self.QUARANTINED} and restart the shard to try "
                "again")

    @property
    def died(self) -> int:
        """Loads of the collection that the process died in, in a row (known after :meth:`quarantine_reason`)."""
        return self._attempts

    @contextlib.contextmanager
    def replaying(self):
        """Marks the replay (:meth:`start`; the caller calls :meth:`done` or :meth:`quarantine` before it ends),
        and holds the process's turn meanwhile: one replay at a time in a process. The shards of a process
        (shard.host) loaded at once, and a death during their loads left every one of them marked, so every one
        distrusted its checkpoint at the next start, and two deaths quarantined them all, whichever killed it.

        A collection with nothing stored here (a shard given its first bucket of it, by a bucket move or a new
        collection) has nothing to replay and nothing to blame: it neither waits for the turn nor is marked (a
        move's join waited behind another collection's whole replay)."""
        if not self._stored():
            yield
            return
        with _REPLAYS:
            self.start()
            yield

    def _stored(self) -> bool:
        """Whether the collection's directory holds anything (its log, snapshots, checkpoints, notes)."""
        try:
            return any(self.path.iterdir())
        except FileNotFoundError:
            return False

    def start(self) -> None:
        self._write(self.REPLAYING, {"attempts": self._attempts + 1})

    def done(self) -> None:
        (self.path / self.REPLAYING).unlink(missing_ok=True)
        _fsync_dir(self.path)
