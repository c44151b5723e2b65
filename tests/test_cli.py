"""laser.cli.stage_main: exit codes the flow's retry policy relies on, one clear line, launcher arguments."""

from __future__ import annotations

import pytest

from laser.cli import BAD_PARAMS_EXIT, PERMANENT_EXIT, StageError, stage_main
from laser.data import SourceError
from laser.models import ModelError
from laser.verify import VerifierError


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
