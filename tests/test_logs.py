"""One logging setup (laser/logs.py) for every stage: one format, -v/-q or LASER_LOG_LEVEL, a log file per stage."""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import pytest

from laser.cli import stage_main
from laser.errors import PERMANENT_EXIT
from laser.logs import stage_log_file

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO laser\.stages\.fake: hello 1$", re.MULTILINE)


def _fake_stage():
    def run(params, args):
        log = logging.getLogger("laser.stages.fake")
        log.info("hello %d", 1)
        log.debug("details")
        log.warning("careful")

    run.__module__ = "stages.fake"  # as if defined in stages/fake.py: the log file is logs/fake.log
    return run


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LASER_LOG_LEVEL", raising=False)
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.001\n")
    return tmp_path


def test_a_stage_logs_in_one_format_to_stdout_and_to_its_log_file(workdir, capsys):
    stage_main(_fake_stage(), "fake", [])
    out = capsys.readouterr()
    assert LINE.search(out.out) and "WARNING laser.stages.fake: careful" in out.out and "details" not in out.out
    assert out.err == ""  # stderr keeps only the error:/params: lines (laser.cli)
    logged = (workdir / "logs" / "fake.log").read_text()
    assert LINE.search(logged) and "careful" in logged
    stage_main(_fake_stage(), "fake", [])
    assert len(LINE.findall((workdir / "logs" / "fake.log").read_text())) == 2  # appended, run after run


def test_verbosity_flags_and_the_environment_set_the_level(workdir, capsys, monkeypatch):
    stage_main(_fake_stage(), "fake", ["-v"])
    assert "DEBUG laser.stages.fake: details" in capsys.readouterr().out
    stage_main(_fake_stage(), "fake", ["-q"])
    out = capsys.readouterr().out
    assert "hello" not in out and "careful" in out
    monkeypatch.setenv("LASER_LOG_LEVEL", "warning")
    stage_main(_fake_stage(), "fake", [])
    assert "hello" not in capsys.readouterr().out
    monkeypatch.setenv("LASER_LOG_LEVEL", "chatty")
    with pytest.raises(SystemExit) as exit_info:
        stage_main(_fake_stage(), "fake", [])
    assert exit_info.value.code == PERMANENT_EXIT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: LASER_LOG_LEVEL='chatty'")


def test_an_unwritable_log_file_is_a_warning_not_a_failure(workdir, capsys):
    (workdir / "logs").write_text("a file where the log directory should be")
    stage_main(_fake_stage(), "fake", [])
    out = capsys.readouterr().out
    assert LINE.search(out) and "cannot write the log file" in out


def test_log_file_names():
    assert stage_log_file("logs", "train", env={}) == Path("logs/train.log")
    assert stage_log_file("logs", "train", env={"RANK": "1"}) == Path("logs/train.rank1.log")


def test_no_stage_prints():
    """Stages log (laser.logs); only laser/cli.py prints (its error:/params: lines) and the flow its summary."""
    for path in sorted((ROOT / "stages").glob("*.py")):
        calls = [node.lineno for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"]
        assert not calls, f"{path.name} prints at lines {calls}: use logging.getLogger('laser.stages.<name>')"


def test_logs_are_ignored_by_git_and_dvc():
    assert "/logs/" in (ROOT / ".gitignore").read_text().splitlines()
    assert "/logs/" in (ROOT / ".dvcignore").read_text().splitlines()
