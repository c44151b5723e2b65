"""flows/dvc_output.py on output captured from real `dvc repro -s` runs (DVC 3.67): status and failure class."""

from __future__ import annotations

import pytest

from flows.dvc_output import ReproOutput, describe_exit
from flows.errors import BadParamsStageError, PermanentStageError, StageFailure

RAN = [("stdout", "Running stage 'train':"), ("stdout", "> python -m stages.train"),
       ("stdout", "Updating lock file 'dvc.lock'")]
RESTORED = [("stdout", "Stage 'prepare' is cached - skipping run, checking out outputs")]
UNCHANGED = [("stdout", "Stage 'prepare' didn't change, skipping")]
BAD_PARAMS = [("stdout", "Running stage 'train':"), ("stdout", "> python -m stages.train"),
              ("stderr", "params.yaml: params: train.lr = -1.0 is invalid; allowed: a number > 0"),
              ("stderr", "ERROR: failed to reproduce 'train': failed to run: python -m stages.train, exited with 2")]
PERMANENT = [("stdout", "Running stage 'prepare':"), ("stderr", "error: jsonl file not found: data/x.jsonl"),
             ("stderr", "ERROR: failed to reproduce 'prepare': failed to run: python -m stages.prepare, "
                        "exited with 3")]
KILLED = [("stdout", "Running stage 'train':"), ("stderr", "Traceback (most recent call last):"),
          ("stderr", "ERROR: failed to reproduce 'train': failed to run: python -m stages.train, exited with -9")]


def _fed(stage: str, lines) -> ReproOutput:
    output = ReproOutput(stage)
    for stream, line in lines:
        output.on_line(stream, line)
    return output


@pytest.mark.parametrize(("lines", "status"), [(RAN, "ran"), (RESTORED, "restored"), (UNCHANGED, "unchanged")])
def test_status_from_dvc_lines(lines, status):
    assert _fed("s", lines).status == status


def test_bad_params_and_permanent_failures_are_not_retried_and_name_the_line():
    error = _fed("train", BAD_PARAMS).failure(1)
    assert isinstance(error, BadParamsStageError) and "train.lr = -1.0 is invalid" in str(error)
    error = _fed("prepare", PERMANENT).failure(1)
    assert isinstance(error, PermanentStageError) and "jsonl file not found" in str(error)


def test_a_killed_stage_or_a_failing_dvc_is_retried():
    error = _fed("train", KILLED).failure(1, attempt=2)
    assert type(error) is StageFailure and "killed by SIGKILL" in str(error) and "attempt 2" in str(error)
    error = _fed("train", [("stderr", "ERROR: unexpected error - lock is busy")]).failure(255)
    assert type(error) is StageFailure and "exit code 255" in str(error)  # no "failed to run": dvc itself
    exit2 = [("stderr", "ERROR: failed to reproduce 'b': failed to run: x, exited with 2")]
    assert type(_fed("b", exit2).failure(1)) is StageFailure  # exit 2 without a params: line: not ours


def test_describe_exit():
    assert describe_exit(-15) == "killed by SIGTERM" and describe_exit(137).startswith("exit code 137 (SIGKILL")
    assert describe_exit(143).startswith("exit code 143 (SIGTERM")  # laser.cli: a stage unwinds on TERM
