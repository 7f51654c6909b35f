"""One daemon per cart: OS-level locks taken before any device, broker or record is touched.

Two daemons for one cart write one pump, share one MQTT client id (the broker disconnects each
whenever the other connects) and reopen one live record. So ``ilup run`` takes two exclusive
``flock`` locks first, and a second daemon exits at once, naming the holder's PID:

- ``<record.directory>/.<cart_id>.lock``: one writer per record directory, whoever runs it;
- ``<runtime dir>/<cart_id>.lock``: one daemon per cart id on this computer, even with another
  (e.g. relative) record directory. The runtime dir is ``$ILUP_RUNTIME_DIR``, else systemd's
  ``$RUNTIME_DIRECTORY``, else ``/run/ilup`` when it exists, else ``$XDG_RUNTIME_DIR/ilup``,
  else ``<tmp>/ilup-<uid>``.

This module imports nothing heavy, so a refused start is quick.

The kernel releases a ``flock`` when its process ends, however it ends (SIGKILL, a watchdog
abort, a crash): a stale lock file never blocks a start. The PID inside is information only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path


class CartLockError(RuntimeError):
    """The cart's lock cannot be taken: the daemon does not start (exit code 3)."""


class AlreadyRunning(CartLockError):
    """Another process holds this cart's lock (exit code 3, like every refused start)."""

    def __init__(self, path: Path, holder: str) -> None:
        self.path = path
        self.holder = holder
        super().__init__(
            f"another ilup process (PID {holder}: a daemon, `ilup commission` or `ilup tune`) "
            f"already runs this cart: it holds {path}; stop it first (systemctl stop "
            "ilup@<cart>, or kill that PID)"
        )


def runtime_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get("ILUP_RUNTIME_DIR"):
        return Path(env["ILUP_RUNTIME_DIR"])
    if env.get("RUNTIME_DIRECTORY"):  # systemd RuntimeDirectory=, ':'-separated
        return Path(env["RUNTIME_DIRECTORY"].split(":")[0])
    if Path("/run/ilup").is_dir():
        return Path("/run/ilup")
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "ilup"
    return Path(tempfile.gettempdir()) / f"ilup-{os.getuid()}"


def lock_paths(
    cart_id: str, record_directory: str | Path, environ: Mapping[str, str] | None = None
) -> list[Path]:
    return [Path(record_directory) / f".{cart_id}.lock", runtime_dir(environ) / f"{cart_id}.lock"]


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError):
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        if text:
            return text
    return "unknown"


def _take(path: Path) -> int:
    """An fd holding ``path`` locked, with our PID written in it; AlreadyRunning if held."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except PermissionError:
            # Another user's lock file (e.g. the service's): it can still be locked to test it.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise CartLockError(
            f"cannot open the lock file {path}: {e}; without it a second daemon could drive "
            "this cart (set ILUP_RUNTIME_DIR to a writable directory, or fix record.directory)"
        ) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise AlreadyRunning(path, holder) from None
    except OSError as e:
        os.close(fd)
        raise CartLockError(f"cannot lock {path}: {e}") from e
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except OSError:
        # Locked but read-only (another user's file): the lock is what counts.
        pass
    return fd


@contextlib.contextmanager
def cart_lock(
    cart_id: str, record_directory: str | Path, environ: Mapping[str, str] | None = None
) -> Iterator[list[Path]]:
    """Hold every lock of this cart for the ``with`` block; raise AlreadyRunning if one is held.

    Nothing else is done before both locks are held, so a refused start disturbs nothing.
    """
    fds: list[int] = []
    paths = lock_paths(cart_id, record_directory, environ)
    try:
        for path in paths:
            fds.append(_take(path))
        yield paths
    finally:
        for fd in fds:
            # The file stays: unlinking it would race with a daemon that just opened it.
            os.close(fd)
