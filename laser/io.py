"""Atomic file output: every artifact is written to a temp file beside its target, then renamed into place.

A crash (or a kill) mid-write leaves the previous artifact, or none, never a half-written one. A killed writer's
temp file (named with its host and PID) is swept by the next write of the same target on that host once that
process is gone; temps of other hosts (a cache on a shared filesystem) are left alone.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def temp_prefix(target: Path, kind: str = "tmp") -> str:
    """The name prefix of ``target``'s temp files (``kind`` tmp) or of the old copy being deleted (``old``):
    hidden, carrying this host and PID for the sweep."""
    return f".{target.name}.{kind}-{_host()}-{os.getpid()}-"


def sweep_stale_temps(target: Path) -> list[Path]:
    """Remove temp and old copies of ``target`` left by writers on this host that are no longer running (a
    SIGKILL or OOM skips their cleanup; a model copy is gigabytes). A live writer's are kept: it may be racing
    us. Returns those removed."""
    removed = []
    for kind in ("tmp", "old"):
        mine = f".{target.name}.{kind}-{_host()}-"
        for path in target.parent.glob(f"{glob.escape(mine)}*-*"):
            pid = path.name[len(mine):].split("-", 1)[0]
            if pid.isdigit() and not _running(int(pid)):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def atomic_path(target: str | Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it over ``target``, on error remove it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(target)
    prefix = temp_prefix(target)
    umask = os.umask(0)
    os.umask(umask)
    try:
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
            tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; artifacts get the usual permissions
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
            os.close(fd)
            tmp = Path(name)
            tmp.chmod(0o666 & ~umask)  # mkstemp makes 0600
    except OSError as err:  # name the artifact, not the hidden temp file (read-only data/: one clear line)
        raise OSError(err.errno, err.strerror, str(target)) from err
    try:
        yield tmp
        if is_dir:
            _replace_dir(tmp, target)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


def _replace_dir(tmp: Path, target: Path) -> None:
    # os.replace cannot replace a non-empty directory: move the old one aside first, then drop it.
    old = None
    if target.exists():
        old = target.with_name(temp_prefix(target, "old") + secrets.token_hex(4))
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def ensure_writable(*directories: str | Path) -> None:
    """Create each directory and write (then remove) a probe file in it: a stage checks its outputs before its
    work, not after it. Raises the ``OSError`` (``PermissionError``, read-only filesystem) naming the directory."""
    for directory in directories:
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".write-probe-{_host()}-{os.getpid()}-", dir=directory)
            os.close(fd)
            os.unlink(name)
        except OSError as err:
            raise OSError(err.errno, err.strerror, str(directory)) from err


def atomic_write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def atomic_write_json(target: str | Path, obj: Any) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")
