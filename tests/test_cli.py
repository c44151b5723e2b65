"""laser.cli.stage_main: exit codes the flow's retry policy relies on, one clear line, launcher arguments."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys

import pytest
import yaml
from conftest import stage_env

from laser.cli import stage_main
from laser.errors import BAD_PARAMS_EXIT, PERMANENT_EXIT, ModelError, SourceError, StageError, VerifierError


def _params_file(tmp_path, text: str = "train:\n  lr: 0.001\n"):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return str(path)


def test_launcher_local_rank_is_accepted(tmp_path):
    seen = []
    stage_main(lambda params, args: seen.append(params.train.lr), "test",
               ["--params", _params_file(tmp_path), "--local_rank=1"])  # what the deepspeed launcher appends
    assert seen == [0.001]


def test_bad_params_exit_2_with_the_key(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        stage_main(lambda params, args: None, "test", ["--params", _params_file(tmp_path, "train:\n  lr: -1\n")])
    assert exit_info.value.code == BAD_PARAMS_EXIT
    assert "train.lr" in capsys.readouterr().err


@pytest.mark.parametrize("error", [StageError("batch geometry"), ModelError("token '<x>' not in vocabulary"),
                                   SourceError("data/x.jsonl not found"), VerifierError("worker did not start")])
def test_permanent_failures_exit_3_with_one_line(tmp_path, capsys, error):
    def run(params, args):
        raise error

    with pytest.raises(SystemExit) as exit_info:
        stage_main(run, "test", ["--params", _params_file(tmp_path)])
    assert exit_info.value.code == PERMANENT_EXIT
    err = capsys.readouterr().err
    assert err == f"error: {error}\n"  # one line, no traceback


def test_unexpected_exceptions_propagate(tmp_path):
    def run(params, args):
        raise RuntimeError("gloo: connection reset by peer")  # may be transient: the flow retries exit 1

    with pytest.raises(RuntimeError, match="connection reset"):
        stage_main(run, "test", ["--params", _params_file(tmp_path)])


@pytest.mark.parametrize("error", [PermissionError(errno.EACCES, "Permission denied", "data/stats.json"),
                                   OSError(errno.EROFS, "Read-only file system", "models/trained")])
def test_permission_and_read_only_errors_are_permanent_with_one_line(tmp_path, capsys, error):
    def run(params, args):
        raise error

    with pytest.raises(SystemExit) as exit_info:
        stage_main(run, "test", ["--params", _params_file(tmp_path)])
    assert exit_info.value.code == PERMANENT_EXIT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and error.filename in err and error.strerror in err


def test_other_os_errors_stay_transient(tmp_path):
    def run(params, args):
        raise OSError(errno.ENOSPC, "No space left on device", "data/train.parquet")  # may clear: retried

    with pytest.raises(OSError, match="No space left"):
        stage_main(run, "test", ["--params", _params_file(tmp_path)])


def test_help_says_missing_sections_take_defaults(capsys):
    with pytest.raises(SystemExit):
        stage_main(lambda params, args: None, "test", ["--help"])
    assert "missing section or key takes its default" in " ".join(capsys.readouterr().out.split())


def test_train_checks_its_outputs_are_writable_before_step_1(tmp_path, readonly_run, repo_cache):
    """A read-only models/ used to fail only at the export after the last step: now train stops before it loads
    anything (no inputs exist here at all), exit 3 with one line naming the directory."""
    (tmp_path / "models").mkdir()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"paths": {"cache_dir": str(repo_cache)},
                                                          "model": {"name": "tiny-random"}}))
    done = readonly_run([sys.executable, "-m", "stages.train", "--variant", "laser"], [tmp_path / "models"],
                        cwd=tmp_path, env=stage_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == PERMANENT_EXIT, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "models" in lines[-1], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "train" / "steps.jsonl").exists()


def test_term_unwinds_the_stage_so_its_cleanup_runs(tmp_path):
    """A TERM (a flow's kill, a preemption) raises SystemExit(143) inside the stage: its ``finally`` blocks run
    (the train stage's /dev/shm weight copy, a vLLM engine), where the default action ended the process there."""
    scratch = tmp_path / "scratch"
    script = f"""
import time
from pathlib import Path
from laser.cli import stage_main

def run(params, args):
    scratch = Path({str(scratch)!r})
    scratch.write_text("model-sized")
    try:
        print("ready", flush=True)
        time.sleep(60)
    finally:
        scratch.unlink()

stage_main(run, "test", ["--params", {_params_file(tmp_path)!r}])
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=stage_env())
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert not scratch.exists(), "the stage's finally block did not run"
    assert "Traceback" not in err
