"""The files a server keeps beside its storage for itself: the lock that makes it the storage's only server, and the
token of its embedded Ray.

- ``<data_dir>/.lock``: ``flock``-ed by the serving process for its life. The kernel drops the lock when the process
  ends, however it ends (``kill -9`` included), so a stale file never blocks a start; the file holds the holder's
  pid, host and start time, for the message a second server gets.
- ``<data_dir>/ray-auth-token``: the shared secret of the embedded Ray cluster's token authentication, made on the
  first start (256 random bits, mode 600) and reused afterwards.

Plain functions over paths: no Ray here (the command line hands :func:`embedded_ray_env` to Ray).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import pathlib
import secrets
import socket
import stat

from lookalike.errors import FailedPrecondition, InvalidArgument

LOCK_FILE = ".lock"
RAY_TOKEN_FILE = "ray-auth-token"


class DataDirInUse(FailedPrecondition):
    """Another process holds the data directory's lock. ``holder``: what it wrote there (pid, host, started), or
    {} when it had not written yet."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


class DataDirLock:
    """An exclusive lock on a data directory, held from :meth:`acquire` until :meth:`release` or the process ends.

    The file descriptor is not inherited by child processes (Python's default), so the Ray processes a server starts
    do not keep the lock alive after the server is gone.
    """

    def __init__(self, data_dir: str | os.PathLike):
        self.path = pathlib.Path(data_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        """Takes the lock without waiting and writes this process's pid, host and start time into it.

        Raises:
            DataDirInUse: another process holds it; the message names that process.
            InvalidArgument: the directory cannot be created or the lock file opened (the message says why).
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise InvalidArgument(f"cannot lock the data directory {self.path.parent}: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise DataDirInUse(f"the data directory {os.path.abspath(self.path.parent)} is in use by "
                               f"{describe_holder(holder)}: one storage, one server", holder) from None
        except OSError as err:
            os.close(fd)
            raise InvalidArgument(f"cannot lock the data directory {self.path.parent}: {err.strerror}") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Lets go of the lock (the file stays: removing it would race with a server taking it)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe_holder(holder: dict) -> str:
    """'pid 1234 on host h, serving since 2026-01-01T00:00:00+00:00', or 'another process' without details."""
    if not holder.get("pid"):
        return "another process"
    where = f" on host {holder['host']}" if holder.get("host") else ""
    since = f", serving since {holder['started']}" if holder.get("started") else ""
    return f"pid {holder['pid']}{where}{since}"


# --- the embedded Ray's token -------------------------------------------------------------------------------------
def ray_token_path(data_dir: str | os.PathLike) -> pathlib.Path:
    """The token of the embedded Ray cluster of ``data_dir``: made on first use (mode 600), reused afterwards.

    Raises:
        InvalidArgument: the file exists but others may read it, is not a regular file, or is empty.
    """
    path = pathlib.Path(data_dir) / RAY_TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        _check_private(path)
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
        f.flush()
        os.fsync(f.fileno())
    return path


def _check_private(path: pathlib.Path) -> None:
    st = path.lstat()
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"{path}: the embedded Ray's token must be a regular file")
    if st.st_mode & 0o077:
        raise InvalidArgument(f"{path}: the embedded Ray's token is readable by others (mode "
                              f"{stat.S_IMODE(st.st_mode):o}); chmod 600 it, or delete it to make a new one")
    if st.st_size == 0:
        raise InvalidArgument(f"{path}: the embedded Ray's token is empty; delete it to make a new one")


def embedded_ray_env(data_dir: str | os.PathLike) -> dict[str, str | None]:
    """The environment that turns on Ray's token authentication (and off Ray's metrics endpoints) for an embedded
    cluster over ``data_dir``: every process Ray starts inherits it. A value of None means: remove the variable (a
    token given in the environment would take precedence over the file).

    Raises:
        InvalidArgument: as :func:`ray_token_path`.
    """
    # No Ray metrics endpoints: with prometheus-client installed (lookalike's metrics need it), Ray's autoscaler
    # would serve its metrics in plaintext HTTP, with no authentication, on the machine's address (port 44217), and
    # its node agents may export theirs. Port -1 makes the autoscaler's metrics server fail to bind (Ray logs it and
    # goes on); the node agents' export is a switch.
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_token_path(data_dir).resolve()),
            "RAY_AUTH_TOKEN": None, "AUTOSCALER_METRIC_PORT": "-1", "RAY_enable_metrics_collection": "0"}
