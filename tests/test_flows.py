"""``flows.pipeline.laser_pipeline`` with real DVC and real Prefect on a tiny toy DVC project.

The toy project (built in tmp) has a chain a -> b -> r@x, r@y (foreach) -> c, written in dvc.yaml in reverse so
the order must come from the DAG, not from the file. Every stage runs ``step.py``, which appends its name to
``runs.log`` (outside the outs: a record of which commands really ran) and obeys fault markers in ``faults/``:
``<stage>.kill_once`` (SIGKILL itself once: a transient fault) and ``<stage>.bad_params`` (exit 2 with a
``params:`` line, as laser.cli does) and ``<stage>.permanent`` (exit 3 with an ``error:`` line: a failure that
cannot succeed as configured) and ``<stage>.sleep`` (sleep that many seconds, recording start and end in
``times.log``). Every stage prints a line and a two-step ``rollouts`` progress bar as tqdm prints one to a pipe.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ORDER = ["a", "b", "r@x", "r@y", "c"]

STEP = '''
import json, os, signal, sys, time
from pathlib import Path

name, out, *inputs = sys.argv[1:]
with open("runs.log", "a") as log:
    log.write(name + "\\n")
print(f"hello from {name}", flush=True)
for i in (1, 2):
    print(f"\\rrollouts: {50 * i:3d}%|{'#' * 5 * i:<10}| {i}/2 [00:00<00:00]", end="", file=sys.stderr, flush=True)
print(file=sys.stderr, flush=True)
faults = Path("faults")
if (faults / f"{name}.sleep").exists():
    start = time.time()
    time.sleep(float((faults / f"{name}.sleep").read_text()))
    with open("times.log", "a") as log:
        log.write(f"{name} {start} {time.time()}\\n")
if (faults / f"{name}.kill_once").exists():
    (faults / f"{name}.kill_once").unlink()
    os.kill(os.getpid(), signal.SIGKILL)
if (faults / f"{name}.permanent").exists():
    print(f"error: toy data for {name} is missing; point toy.data at a file", file=sys.stderr)
    sys.exit(3)
if (faults / f"{name}.bad_params").exists():
    print(f"params: toy.{name} = 1 is invalid; allowed: a number > 1", file=sys.stderr)
    sys.exit(2)
Path(out).parent.mkdir(parents=True, exist_ok=True)
Path(out).write_text(name + "".join(Path(i).read_text() for i in inputs))
if name == "c":
    Path("out/metrics.json").write_text(json.dumps({"accuracy": 0.75, "sv": {"f1": 0.5}}))
    Path("out/report.md").write_text("# toy report\\n")
'''

DVC_YAML = '''
stages:
  c:
    cmd: python step.py c out/c.txt out/r_x.txt out/r_y.txt
    deps: [step.py, out/r_x.txt, out/r_y.txt]
    outs: [out/c.txt, out/report.md]
    metrics:
      - out/metrics.json:
          cache: false
  r:
    foreach: [x, y]
    do:
      cmd: python step.py r@${item} out/r_${item}.txt out/b.txt
      deps:
        - step.py
        - out/b.txt
      outs:
        - out/r_${item}.txt
  b:
    cmd: python step.py b out/b.txt out/a.txt
    deps: [step.py, out/a.txt]
    outs: [out/b.txt]
  a:
    cmd: python step.py a out/a.txt
    deps: [step.py]
    outs: [out/a.txt]
'''

PARAMS = {"paths": {"eval_metrics": "out/metrics.json", "eval_report": "out/report.md"},
          "flow": {"retries": 2, "retry_delay_s": 0, "retry_backoff": 1}}


@pytest.fixture(scope="session")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def toy_template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy-template")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    (root / "step.py").write_text(STEP)
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    (root / "profiles").mkdir()
    (root / "profiles" / "noretry.yaml").write_text("flow:\n  retries: 0\n")
    (root / "faults").mkdir()
    return root


@pytest.fixture
def toy(toy_template, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "toy"
    shutil.copytree(toy_template, root)
    site = tmp_path / "dvc-site"
    (root / ".dvc" / "config").write_text(textwrap.dedent(f"""\
        [core]
            no_scm = True
            analytics = false
            site_cache_dir = {site}
        """))
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(site))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    return root


def runs(root: Path) -> list[str]:
    log = root / "runs.log"
    return log.read_text().split() if log.exists() else []


def statuses(summary: dict) -> dict[str, str]:
    return {name: result["status"] for name, result in summary["stages"].items()}


def test_dag_from_dvc(toy):
    from flows.pipeline import forced_stages, read_dag, stage_order

    dag = read_dag(toy)
    assert stage_order(dag) == ORDER
    assert set(dag.edges) == {("a", "b"), ("b", "r@x"), ("b", "r@y"), ("r@x", "c"), ("r@y", "c")}
    assert forced_stages(dag, "b") == {"b", "r@x", "r@y", "c"}
    assert forced_stages(dag, "r") == {"r@x", "r@y", "c"}  # a foreach group
    assert forced_stages(dag, None) == set()
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        forced_stages(dag, "nope")


def test_runs_every_stage_in_dag_order_then_nothing(prefect_api, toy):
    from prefect.artifacts import Artifact

    from flows.pipeline import METRICS_ARTIFACT, REPORT_ARTIFACT, laser_pipeline

    summary = laser_pipeline(repo_root=str(toy))
    assert summary["order"] == ORDER
    assert runs(toy) == ORDER
    assert statuses(summary) == dict.fromkeys(ORDER, "ran")
    for out in ("a", "b", "r_x", "r_y", "c"):
        assert (toy / "out" / f"{out}.txt").is_file()
    assert (toy / "out" / "c.txt").read_text() == "cr@xbar@yba"
    assert summary["report"] == str(toy / "out" / "report.md")
    assert summary["metrics"] == {str(toy / "out" / "metrics.json"): {"accuracy": 0.75, "sv": {"f1": 0.5}}}

    table = Artifact.get(METRICS_ARTIFACT)
    assert table is not None and table.type == "table"
    assert "sv.f1" in str(table.data) and "0.75" in str(table.data)
    report = Artifact.get(REPORT_ARTIFACT)
    assert report is not None and str(toy / "out" / "report.md") in str(report.data)

    again = laser_pipeline(repo_root=str(toy))  # nothing changed: DVC runs no stage command
    assert runs(toy) == ORDER
    assert statuses(again) == dict.fromkeys(ORDER, "unchanged")


def test_force_reruns_the_stage_and_downstream_only(prefect_api, toy):
    from flows.pipeline import laser_pipeline

    laser_pipeline(repo_root=str(toy))
    forced = laser_pipeline(repo_root=str(toy), force="b")
    assert runs(toy) == [*ORDER, "b", "r@x", "r@y", "c"]
    assert statuses(forced) == {"a": "unchanged", "b": "ran", "r@x": "ran", "r@y": "ran", "c": "ran"}
    assert forced["stages"]["b"]["forced"] and not forced["stages"]["a"]["forced"]


def test_transient_fault_is_retried(prefect_api, toy):
    from flows.pipeline import laser_pipeline

    (toy / "faults" / "b.kill_once").touch()
    summary = laser_pipeline(repo_root=str(toy))
    assert runs(toy) == ["a", "b", "b", "r@x", "r@y", "c"]  # b killed by SIGKILL once, then retried
    assert summary["stages"]["b"]["attempt"] == 2
    assert statuses(summary) == dict.fromkeys(ORDER, "ran")


def test_bad_params_failure_is_not_retried(prefect_api, toy):
    from flows.pipeline import PipelineError, laser_pipeline

    (toy / "faults" / "b.bad_params").touch()
    with pytest.raises(PipelineError, match=r"params: toy\.b = 1 is invalid") as err:
        laser_pipeline(repo_root=str(toy))
    assert runs(toy) == ["a", "b"]  # one attempt despite flow.retries = 2; downstream never started
    assert "skipped (upstream failed): r@x, r@y, c" in str(err.value)


def test_permanent_failure_is_not_retried(prefect_api, toy):
    from flows.pipeline import PipelineError, laser_pipeline

    (toy / "faults" / "b.permanent").touch()
    with pytest.raises(PipelineError, match=r"toy data for b is missing") as err:
        laser_pipeline(repo_root=str(toy))
    assert runs(toy) == ["a", "b"]  # one attempt despite flow.retries = 2
    assert "not retried" in str(err.value)


def test_bad_params_file_fails_before_any_stage(prefect_api, toy):
    from flows.pipeline import laser_pipeline
    from laser.errors import ParamsError

    bad = json.loads(json.dumps(PARAMS))
    bad["flow"]["retries"] = -1
    (toy / "params.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ParamsError, match=r"flow\.retries"):
        laser_pipeline(repo_root=str(toy))
    assert runs(toy) == []


def test_profile_rewrites_params_and_applies(prefect_api, toy):
    from flows.pipeline import PipelineError, laser_pipeline

    (toy / "faults" / "a.kill_once").touch()
    with pytest.raises(PipelineError, match="SIGKILL"):
        laser_pipeline(repo_root=str(toy), profile="noretry")  # flow.retries: 0, so the fault is final
    assert yaml.safe_load((toy / "params.yaml").read_text())["flow"]["retries"] == 0
    assert runs(toy) == ["a"]


def _task_runs(flow_run_id) -> dict:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        found = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run for run in found}


def _logs(task_run_id) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(
            any_=[task_run_id])))]


def test_stage_output_logs_progress_and_retry_policy_show_in_prefect(prefect_api, toy, capsys):
    """What the UI shows: a stage's output in its task run's logs (INFO, though env.sh sets WARNING), a progress
    artifact following its bar, a retry delay the UI can show (a number: a list shows as "NaNs"), the run's URL."""
    import logging

    from prefect.artifacts import Artifact

    from flows.pipeline import laser_pipeline

    prefect_logger = logging.getLogger("prefect")
    level = prefect_logger.level
    prefect_logger.setLevel(logging.WARNING)  # as PREFECT_LOGGING_LEVEL=WARNING (scripts/env.sh) does
    try:
        summary = laser_pipeline(repo_root=str(toy))
    finally:
        prefect_logger.setLevel(level)
    url = summary["flow_run_url"]
    assert url and "/flow-runs/flow-run/" in url
    assert f"Prefect flow run: {url}" in capsys.readouterr().out
    flow_run_id = url.rsplit("/", 1)[1]
    task_runs = _task_runs(flow_run_id)
    assert set(task_runs) == set(ORDER)
    logs = _logs(task_runs["b"].id)
    assert "[b] hello from b" in logs, logs
    assert any("[b] rollouts: 100%" in line for line in logs), logs
    for run in task_runs.values():
        assert run.empirical_policy.retries == 2
        assert isinstance(run.empirical_policy.retry_delay, (int, float))  # PARAMS: retry_delay_s 0
    progress = Artifact.get("laser-progress-r-x")
    assert progress is not None and progress.type == "progress" and float(progress.data) == 100.0
    assert progress.description == "r@x: rollouts 2/2"


def test_backoff_extra_wait_gives_the_configured_schedule():
    from flows.pipeline import backoff_extra_s

    delay, backoff = 5.0, 2.0  # retry i waits 5 * 2**(i-1): 5, 10, 20; Prefect waits 5, the task the rest
    assert [delay + backoff_extra_s(attempt, delay, backoff) for attempt in (2, 3, 4)] == [5.0, 10.0, 20.0]
    assert backoff_extra_s(1, delay, backoff) == 0.0


PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")


def _eval_metrics(view_keys=("synthetic", "overall", "macro")) -> dict:
    def head(acc):
        return {"K": 4, "avg@K": acc, "pass@K": acc + 0.2, "maj@K": acc + 0.1, "weighted_maj@K": acc + 0.12,
                "best_of@K": acc, "sv_acc_correct": 0.7, "sv_acc_incorrect": 0.6, "sv_f1": 0.65, "sv_auroc": 0.71,
                "sv_ece": 0.05, "spearman_score_length": 0.1}
    return {"settings": {"prompt_format": "chat"}, "headline_view": "macro",
            "models": {m: {"headline": {k: head(acc + (0.01 if k == "macro" else 0)) for k in view_keys}}
                       for m, acc in (("base", 0.3), ("trained", 0.5))}}


def test_headline_table_picks_macro_then_overall_and_stays_short():
    from flows.pipeline import headline_rows

    train = {"steps": 8, "final_reward_mean": 0.6, "final_self_reward_mse": 0.02, "last_quarter_reward_mean": 0.55}
    rows, view = headline_rows(_eval_metrics(), {"trained": train})  # a column per training variant
    assert view == "macro" and len(rows) <= 30
    by = {r["metric"]: r for r in rows}
    assert by["accuracy (avg@K)"] == {"metric": "accuracy (avg@K)", "base": 0.31, "trained": 0.51}
    assert {"maj@K", "weighted maj@K", "self-verification F1", "self-verification AUROC", "ECE"} <= set(by)
    assert by["train: final reward"]["trained"] == 0.6 and by["train: final self-reward MSE"]["trained"] == 0.02
    no_macro = _eval_metrics(("synthetic", "overall"))
    no_macro.pop("headline_view")
    rows, view = headline_rows(no_macro, None)
    assert view == "overall" and {r["metric"]: r for r in rows}["accuracy (avg@K)"]["base"] == 0.3


def test_metrics_table_lists_numbers_before_text():
    from flows.pipeline import metrics_rows

    rows = metrics_rows({"eval/metrics.json": {"settings": {"prompt_format": "chat"}, "acc": 0.5, "ok": True},
                         "data/stats.json": {"n": 3}})
    assert [(r["file"], r["metric"]) for r in rows] == [("eval/metrics.json", "acc"),
                                                        ("eval/metrics.json", "settings.prompt_format"),
                                                        ("eval/metrics.json", "ok"), ("data/stats.json", "n")]


def test_report_artifact_embeds_plots_and_headline_artifact(prefect_api, tmp_path):
    import base64

    from prefect import flow
    from prefect.artifacts import Artifact

    from flows.pipeline import HEADLINE_ARTIFACT, REPORT_ARTIFACT, embed_images, publish_artifacts
    from laser.config import Params

    (tmp_path / "eval" / "plots").mkdir(parents=True)
    (tmp_path / "eval" / "plots" / "scaling.png").write_bytes(PNG)
    report = tmp_path / "eval" / "report.md"
    report.write_text("# r\n\n![scaling](plots/scaling.png)\n\n![gone](plots/missing.png)\n[web](http://x/y.png)\n")
    text, notes = embed_images(report.read_text(), report.parent)
    assert f"![scaling](data:image/png;base64,{base64.b64encode(PNG).decode()})" in text
    assert "missing.png" in notes[0] and "not found" in notes[0] and "[web](http://x/y.png)" in text

    @flow
    def publish():
        publish_artifacts(tmp_path, report, {"eval/metrics.json": _eval_metrics(),
                                             "train/laser/metrics.json": {"final_reward_mean": 0.6}}, {}, Params())

    publish()
    markdown = Artifact.get(REPORT_ARTIFACT).data
    assert "data:image/png;base64," in markdown and "](plots/" not in markdown
    table = Artifact.get(HEADLINE_ARTIFACT)
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert 1 < len(rows) <= 30 and rows[0]["metric"] == "accuracy (avg@K)" and "'macro'" in table.description


def _intervals(root: Path) -> dict[str, tuple[float, float]]:
    lines = (root / "times.log").read_text().split("\n")
    return {name: (float(a), float(b)) for name, a, b in (line.split() for line in lines if line)}


def test_independent_stages_run_concurrently_and_dvc_lock_keeps_both(prefect_api, toy):
    """r@x and r@y depend only on b: with max_parallel 2 they overlap (DVC releases its repo lock while a stage's
    command runs), and both land in dvc.lock (DVC merges the entries under its lock)."""
    from flows.pipeline import laser_pipeline

    for name in ("r@x", "r@y"):
        (toy / "faults" / f"{name}.sleep").write_text("4")
    summary = laser_pipeline(repo_root=str(toy), max_parallel=2)
    assert statuses(summary) == dict.fromkeys(ORDER, "ran")
    (x0, x1), (y0, y1) = _intervals(toy)["r@x"], _intervals(toy)["r@y"]
    assert x0 < y1 and y0 < x1, "r@x and r@y did not overlap"
    lock = yaml.safe_load((toy / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(ORDER)
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=toy, capture_output=True,
                            text=True, check=True)
    assert json.loads(status.stdout or "{}") == {}


def test_gpu_tag_limit_keeps_gpu_stages_apart(prefect_api, toy):
    """The same two stages, tagged as GPU stages, with a tag concurrency limit of 1: never at once."""
    from prefect import get_client

    from flows.pipeline import laser_pipeline

    params = yaml.safe_load((toy / "params.yaml").read_text())
    params["flow"].update(gpu_stages=["r"], gpu_tag="toy-gpu")
    (toy / "params.yaml").write_text(yaml.safe_dump(params))
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag="toy-gpu", concurrency_limit=1)
    for name in ("r@x", "r@y"):
        (toy / "faults" / f"{name}.sleep").write_text("2")
    try:
        summary = laser_pipeline(repo_root=str(toy), max_parallel=2)
    finally:
        with get_client(sync_client=True) as client:
            client.delete_concurrency_limit_by_tag("toy-gpu")
    assert statuses(summary) == dict.fromkeys(ORDER, "ran")
    (x0, x1), (y0, y1) = _intervals(toy)["r@x"], _intervals(toy)["r@y"]
    assert x1 <= y0 or y1 <= x0, "two GPU stages ran at once"


# ---------------------------------------------------------------------------------------- the command line (CLI)

HOLD = '''
import os, time
from pathlib import Path
Path("hold.pid").write_text(str(os.getpid()))
time.sleep(float(os.environ.get("HOLD_S", "60")))
'''


@pytest.fixture
def cli_project(tmp_path) -> tuple[Path, dict[str, str]]:
    """A one-stage DVC project (``hold``: writes its PID, sleeps) and an environment for ``python -m
    flows.pipeline`` in a subprocess: its own PREFECT_HOME, no PREFECT_API_URL (the ephemeral server)."""
    import os

    root = tmp_path / "proj"
    root.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    (root / "hold.py").write_text(HOLD)
    (root / "dvc.yaml").write_text("stages:\n  hold:\n    cmd: python hold.py\n    deps: [hold.py]\n")
    (root / "params.yaml").write_text("flow:\n  retries: 0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), LASER_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]), DVC_NO_ANALYTICS="1",
               DVC_SITE_CACHE_DIR=str(tmp_path / "dvc-site"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    (tmp_path / "prefect").mkdir()
    return root, env


def test_cli_bad_params_print_only_the_clear_line(cli_project):
    root, env = cli_project
    (root / "bad.yaml").write_text("train:\n  lr: fast\n")
    done = subprocess.run([sys.executable, "-m", "flows.pipeline", "--repo-root", str(root), "--params-file",
                           "bad.yaml"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["laser-pipeline failed:", f"{root / 'bad.yaml'}: params: train.lr = 'fast' is invalid; "
                                                "allowed: a finite number"], done.stderr
    assert not (root / "hold.pid").exists()


def _children(pid: int) -> dict[int, str]:
    """``{pid: command line}`` of the processes whose parent is ``pid`` (Linux /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_killed_flow_takes_its_ephemeral_api_server_with_it(cli_project):
    """``kill -9`` of the flow skips Prefect's own cleanup: its temporary uvicorn server used to keep running
    (re-parented to PID 1), one per killed flow. It is started under a parent watch now and ends within seconds."""
    import os
    import signal
    import time

    root, env = cli_project
    log = root.parent / "flow.log"
    with log.open("wb") as sink:
        flow = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--repo-root", str(root)], env=env,
                                stdout=sink, stderr=subprocess.STDOUT)
    stage_pid, servers = None, []
    try:
        deadline = time.monotonic() + 180
        while not (root / "hold.pid").exists():  # the stage runs: the flow run (and its API server) are up
            assert flow.poll() is None and time.monotonic() < deadline, \
                f"the flow did not reach its stage:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        stage_pid = int((root / "hold.pid").read_text())
        servers = [pid for pid, cmd in _children(flow.pid).items() if "create_app" in cmd]
        assert len(servers) == 1, _children(flow.pid)
        flow.kill()
        flow.wait(10)
        deadline = time.monotonic() + 15
        while _alive(servers[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(servers[0]), "the ephemeral API server outlived the killed flow"
    finally:
        if flow.poll() is None:
            flow.kill()
        if stage_pid is not None:  # dvc and the stage run in their own process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(stage_pid), signal.SIGKILL)
        for pid in servers:  # a leaked server (the test failed) must not outlive the test either
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
