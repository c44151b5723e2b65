"""Atomic outputs: a failure leaves the previous artifact and no temp file; permissions follow the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from laser.io import atomic_path, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out" / "metrics.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError), atomic_path(target, is_dir=True) as tmp:
        (tmp / "b.txt").write_text("2")
        raise RuntimeError("crash")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_permissions_follow_the_umask_not_the_temp_file_defaults(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
        with atomic_path(tmp_path / "d", is_dir=True) as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "f.txt") == 0o644  # mkstemp alone gives 0600
    assert _mode(tmp_path / "d") == 0o755  # mkdtemp alone gives 0700


def test_a_killed_writers_temp_is_swept_by_the_next_write_and_a_live_ones_kept(tmp_path):
    import socket
    import subprocess
    import sys

    target = tmp_path / "model"
    script = ("import sys, time; from pathlib import Path; from laser.io import atomic_path\n"
              "with atomic_path(Path(sys.argv[1]), is_dir=True) as tmp:\n"
              "    (tmp / 'weights').write_bytes(b'x' * 1000); print(tmp, flush=True); time.sleep(60)\n")
    root = Path(__file__).resolve().parents[1]
    writers = [subprocess.Popen([sys.executable, "-c", script, str(target)], cwd=root, stdout=subprocess.PIPE,
                                text=True) for _ in range(2)]
    killed, live = writers
    temps = [Path(w.stdout.readline().strip()) for w in writers]
    killed.kill()  # SIGKILL: its cleanup never runs
    killed.wait()
    host = socket.gethostname().replace("-", "_")
    old_copy = tmp_path / f".model.old-{host}-{killed.pid}-beef"  # killed while deleting the previous version
    other_host = tmp_path / f".model.tmp-elsewhere-{killed.pid}-cafe"  # a shared cache: not ours to judge
    old_copy.mkdir()
    other_host.mkdir()
    try:
        atomic_write_text(tmp_path / "other.txt", "x")  # another target's write leaves them alone
        assert all(t.exists() for t in temps)
        with atomic_path(target, is_dir=True) as tmp:
            (tmp / "weights").write_text("new")
        assert not temps[0].exists() and temps[1].exists()  # the live writer may still be racing us
        assert not old_copy.exists() and other_host.exists()
        assert (target / "weights").read_text() == "new"
    finally:
        live.kill()
        live.wait()
