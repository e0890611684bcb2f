"""Atomic outputs: written beside their destination under a temporary name, then renamed into place.

- A failure (or SIGTERM under `terminate_cleanly`) removes the temporary; nothing partial is left.
- A run killed outright (SIGKILL, a power cut) leaves a temporary named `.NAME.tmp-HOST-PID-XXXX`; the next
  write to NAME removes those whose process is gone (`remove_stale`).
- Permissions follow the umask, like any other file the user creates (temporary files start private).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _prefix(dst: str, kind: str) -> str:
    return f".{os.path.basename(dst)}.{kind}-{_HOST}-{os.getpid()}-"


def _stale_pattern(dst: str) -> re.Pattern:
    name = re.escape(os.path.basename(dst))
    return re.compile(rf"^\.{name}\.(tmp|old)-{re.escape(_HOST)}-(\d+)-[^/]+$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def remove_stale(dst: str | os.PathLike) -> list[str]:
    """Remove the temporaries that killed runs on this host left beside `dst`; return their paths."""
    dst = os.path.abspath(os.fspath(dst))
    parent = os.path.dirname(dst)
    pattern = _stale_pattern(dst)
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if m and not _alive(int(m.group(2))):
            _remove(os.path.join(parent, name))
            removed.append(os.path.join(parent, name))
    return removed


def umask() -> int:
    """The process's umask (read without changing it, where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_permissions(path: str) -> None:
    """Directories 0777 & ~umask and files 0666 & ~umask, as open() and mkdir() would make them."""
    mask = umask()
    if os.path.isdir(path):
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def check_writable_parent(dst: str | os.PathLike, what: str = "output") -> str:
    """The absolute path of `dst` once its folder is known to exist and be writable; else OSError naming it."""
    dst = os.path.abspath(os.fspath(dst))
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"the folder of the {what} {dst} does not exist: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write the {what} {dst}: its folder {parent} is not writable")
    return dst


@contextlib.contextmanager
def atomic_file(dst: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary path beside `dst`; on success it replaces `dst`, on any failure it is removed."""
    dst = check_writable_parent(dst)
    if os.path.isdir(dst):
        raise IsADirectoryError(f"{dst} is a directory; give a file name for the output")
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite (overwrite=True) to replace it")
    remove_stale(dst)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(dst, "tmp"), dir=os.path.dirname(dst))
    os.close(fd)
    try:
        yield tmp
        _publish_permissions(tmp)
        os.replace(tmp, dst)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike, *, replace: bool = False) -> Iterator[str]:
    """Yield a temporary folder beside `dst`; on success it becomes `dst` (replacing it when `replace`),
    on any failure it is removed. The caller decides whether an existing `dst` may be replaced."""
    dst = os.path.abspath(os.fspath(dst))
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(dst) and not replace:
        raise FileExistsError(f"{dst} already exists")
    remove_stale(dst)
    tmp = tempfile.mkdtemp(prefix=_prefix(dst, "tmp"), dir=parent)
    try:
        yield tmp
        _publish_permissions(tmp)
        if os.path.exists(dst):
            old = tempfile.mkdtemp(prefix=_prefix(dst, "old"), dir=parent)
            os.rename(dst, os.path.join(old, "x"))
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        _remove(tmp)
        raise


class Terminated(SystemExit):
    """Raised in the main thread when SIGTERM arrives under `terminate_cleanly` (exit status 143)."""


@contextlib.contextmanager
def terminate_cleanly() -> Iterator[None]:
    """Turn SIGTERM (what `timeout`, `docker stop`, Kubernetes and systemd send) into an exception in the main
    thread, so that `finally` and cleanup blocks run. Elsewhere than the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
