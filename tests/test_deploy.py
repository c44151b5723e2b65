"""Deployments the way Prefect users run them: a real local Prefect server on 127.0.0.1 (a free port), real process
workers (``prefect worker start --pool``), runs triggered with ``prefect deployment run``, real ``dvc repro``.

The toy projects (built in tmp) have a chain a -> ref -> t -> u; ``t`` stands in for train (a cached output, an
uncached metrics file, a persisted uncached checkpoint directory; an uncached input ``ref``). Every stage runs
``step.py``, which appends its name to ``runs.log`` and obeys the fault marker ``faults/<stage>.hold_once`` (write
its PID to ``hold.pid`` and sleep, once: a stage for the test to kill mid-run).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import copy_smoke_repo

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

STEP = '''
import json, os, sys, time
from pathlib import Path

name, out, *inputs = sys.argv[1:]
with open("runs.log", "a") as log:
    log.write(name + "\\n")
print(f"hello from {name} in {Path.cwd().name}", flush=True)
hold = Path("faults") / f"{name}.hold_once"
if hold.exists():
    hold.unlink()
    Path("hold.pid").write_text(str(os.getpid()))
    time.sleep(120)
Path(out).parent.mkdir(parents=True, exist_ok=True)
Path(out).write_text(name + "".join(Path(i).read_text() for i in inputs))
if name == "t":
    Path("ckpt").mkdir(exist_ok=True)
    (Path("ckpt") / "latest").write_text("step2")
    Path("out/t_metrics.json").write_text(json.dumps({"final_reward_mean": 0.5, "where": Path.cwd().name}))
'''

DVC_YAML = '''
stages:
  a:
    cmd: python step.py a out/a.txt
    deps: [step.py]
    outs: [out/a.txt]
  ref:
    cmd: python step.py ref out/ref.json out/a.txt
    deps: [step.py, out/a.txt]
    outs:
      - out/ref.json:
          cache: false
  t:
    cmd: python step.py t out/t.txt out/a.txt out/ref.json
    deps: [step.py, out/a.txt, out/ref.json]
    outs:
      - out/t.txt
      - ckpt:
          persist: true
          cache: false
    metrics:
      - out/t_metrics.json:
          cache: false
  u:
    cmd: python step.py u out/u.txt out/t.txt
    deps: [step.py, out/t.txt]
    outs: [out/u.txt]
'''

ORDER = ["a", "ref", "t", "u"]
PARAMS = {"paths": {"eval_metrics": "out/metrics.json", "eval_report": "out/report.md"},
          "flow": {"retries": 2, "retry_delay_s": 0, "retry_backoff": 1, "gpu_stages": ["t"], "gpu_tag": "toy-gpu",
                   "train_stage": "t"}}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _base_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PYTHONPATH=str(ROOT), DVC_NO_ANALYTICS="1", LASER_CACHE=str(ROOT / ".cache"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_LOGGING_LEVEL="WARNING")
    (tmp / "prefect-home").mkdir(exist_ok=True)
    return env


def _stop(proc: subprocess.Popen, wait_s: float = 15) -> None:
    """TERM then KILL the process group ``proc`` leads."""
    for sig, timeout in ((signal.SIGTERM, wait_s), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``prefect server start`` on 127.0.0.1 (a free port, its own PREFECT_HOME); stopped after the module."""
    import httpx

    tmp = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = _base_env(tmp)
    log = open(tmp / "server.log", "w")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the Prefect server did not come up in 120 s"
            time.sleep(0.5)
        env["PREFECT_API_URL"] = url
        yield {"url": url, "env": env, "tmp": tmp}
    finally:
        _stop(proc)
        log.close()
    assert proc.poll() is not None


@contextlib.contextmanager
def worker(server, pool: str, cwd: Path, name: str):
    """``prefect worker start --pool <pool>``, in its own process group (its flow runs with it); stopped at exit."""
    log = open(server["tmp"] / f"worker-{name}.log", "a")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--name", name],
                            cwd=cwd, env=server["env"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        _stop(proc)
        log.close()


def _run(cmd: list[str], server, cwd: Path = ROOT, timeout: float = 300, env: dict | None = None):
    return subprocess.run(cmd, cwd=cwd, env=env or server["env"], capture_output=True, text=True, timeout=timeout)


def _toy(root: Path, remote: Path, **flow) -> Path:
    root.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    (root / "step.py").write_text(STEP)
    (root / "dvc.yaml").write_text(DVC_YAML)
    params = json.loads(json.dumps(PARAMS))
    params["flow"].update(flow)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "faults").mkdir()
    (root / ".dvc" / "config").write_text(textwrap.dedent(f"""\
        [core]
            no_scm = True
            analytics = false
            site_cache_dir = {root.parent / (root.name + '-dvc-site')}
            remote = store
        ['remote "store"']
            url = {remote}
        """))
    return root


def runs(root: Path) -> list[str]:
    log = root / "runs.log"
    return log.read_text().split() if log.exists() else []


def _flow_runs(server, deployment: str) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server["url"]}), get_client(sync_client=True) as client:
        name = deployment.split("/", 1)[1]
        return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))


# ------------------------------------------------------------------------------------------------------ bad input


def test_no_server_at_prefect_api_url_is_a_clear_message(tmp_path):
    env = _base_env(tmp_path)
    env["PREFECT_API_URL"] = url = f"http://127.0.0.1:{_free_port()}/api"  # nothing listens there
    for module in ("flows.pipeline", "flows.deploy"):
        extra = ["--pool", "laser"] if module == "flows.deploy" else []
        done = subprocess.run([sys.executable, "-m", module, *extra], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2, (module, done.stdout, done.stderr)
        assert f"no Prefect server answers at PREFECT_API_URL={url}" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_deploying_to_a_missing_pool_is_a_clear_message(server, tmp_path):
    toy = _toy(tmp_path / "toy", tmp_path / "remote")
    done = _run([sys.executable, "-m", "flows.deploy", "--pool", "no-such-pool", "--repo-root", str(toy)], server)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "work pool 'no-such-pool' does not exist" in done.stderr and "--create-pool" in done.stderr


# --------------------------------------------------------------------------------------------------- deployments


@pytest.fixture
def smoke_copy(tmp_path, tiny_model_dir) -> Path:
    """A git copy of the repo's files with the smoke profile (models from the repo's cache), as test_pipeline's."""
    return copy_smoke_repo(tmp_path / "smoke")


def test_smoke_pipeline_deployment_runs_on_a_process_worker(server, smoke_copy):
    """Deploy to a process pool, start a worker, `prefect deployment run --watch`: the smoke pipeline runs to the
    end (about 2 minutes on 2 cores); task runs, logs, tags and artifacts are on the server; the worker stops (the
    server at the end of the module)."""
    from prefect import get_client
    from prefect.artifacts import Artifact
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterTaskRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    done = _run([sys.executable, "-m", "flows.deploy", "--pool", "laser-cpu", "--create-pool", "--name", "smoke",
                 "--repo-root", str(smoke_copy), "--profile", "smoke", "--gpu-slots", "1"], server)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "laser-pipeline/smoke" in done.stdout and "prefect worker start --pool laser-cpu" in done.stdout
    with worker(server, "laser-cpu", smoke_copy.parent, "cpu-smoke") as proc:
        done = _run([sys.executable, "-m", "prefect", "deployment", "run", "laser-pipeline/smoke", "--watch",
                     "--watch-timeout", "420"], server, timeout=480)
    assert proc.poll() is not None  # the worker stopped
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stages = ["prepare", "ref_constant", "train@laser", "train@grpo", "rollout_base", "rollout@laser",
              "rollout@grpo", "evaluate", "package"]
    assert (smoke_copy / "eval" / "report.md").is_file()
    (flow_run,) = _flow_runs(server, "laser-pipeline/smoke")
    assert flow_run.state.is_completed()
    with temporary_settings({PREFECT_API_URL: server["url"]}), get_client(sync_client=True) as client:
        assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit == 1
        tasks = {t.name: t for t in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))}
        assert set(tasks) == set(stages) and all(t.state.is_completed() for t in tasks.values())
        assert tasks["train@laser"].tags == ["gpu"] and tasks["rollout_base"].tags == ["gpu"]
        assert "gpu" not in tasks["prepare"].tags
        logs = [log.message for log in client.read_logs(log_filter=LogFilter(
            task_run_id=LogFilterTaskRunId(any_=[tasks["train@laser"].id])))]
        assert any(line.startswith("[train@laser] train: 100%") for line in logs), logs[-20:]
        progress = Artifact.get("laser-progress-train-laser")
        assert progress is not None and float(progress.data) == 100.0
        assert progress.description == "train@laser: train 2/2", progress.description
        headline = Artifact.get("laser-headline")
        rows = json.loads(headline.data)
        assert 8 <= len(rows) <= 30 and {"base", "grpo", "laser"} <= set(rows[0])
        assert Artifact.get("laser-report").data.count("data:image/png;base64,") >= 2
        from prefect.automations import Automation

        from flows.deploy import CRASH_AUTOMATION

        assert Automation.read(name=CRASH_AUTOMATION).actions[0].type == "change-flow-run-state"


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_train_dispatched_to_a_gpu_pool_survives_a_dead_worker(server, tmp_path):
    """Two pools: the pipeline on "cpu" (orchestrator checkout), its stage t (train) as a run of the remote-stage
    deployment on "gpu" (another checkout), data through a shared DVC remote. The first remote run is killed
    mid-stage with its worker (process, flow run, dvc, stage: a dead machine): the orchestrator reports it lost,
    marks it Crashed and retries; a new worker runs it; t's outputs come back, u runs on them here."""
    remote = tmp_path / "dvc-remote"
    # gpu_tag without a limit: the killed run's slot would stay taken until its lease (60 s in Prefect) expires
    fast = dict(train_dispatch="deployment", train_deployment="laser-remote-stage/gpu-test", gpu_tag="dispatch-gpu",
                dispatch_heartbeat_s=1, dispatch_lost_after_s=6, dispatch_start_timeout_s=120)
    orch = _toy(tmp_path / "orch", remote, **fast)
    gpu = _toy(tmp_path / "gpu", remote)
    (gpu / "faults" / "t.hold_once").touch()
    for cmd, where in (([sys.executable, "-m", "flows.deploy", "--remote", "--pool", "gpu", "--create-pool",
                         "--name", "gpu-test", "--repo-root", str(gpu)], "gpu"),
                       ([sys.executable, "-m", "flows.deploy", "--pool", "cpu", "--create-pool", "--name", "orch",
                         "--repo-root", str(orch)], "cpu")):
        done = _run(cmd, server)
        assert done.returncode == 0, (where, done.stdout + done.stderr)
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server["url"]}), get_client(sync_client=True) as client:
        client.delete_concurrency_limit_by_tag("dispatch-gpu")  # flows.deploy made one

    with worker(server, "cpu", tmp_path, "cpu-1"):
        trigger = subprocess.Popen([sys.executable, "-m", "prefect", "deployment", "run", "laser-pipeline/orch",
                                    "--watch", "--watch-timeout", "300"], cwd=ROOT, env=server["env"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            with worker(server, "gpu", tmp_path, "gpu-1") as first:
                deadline = time.monotonic() + 180
                while not (gpu / "hold.pid").exists():
                    assert time.monotonic() < deadline and trigger.poll() is None, "t never started on the gpu pool"
                    time.sleep(0.5)
                doomed = [first.pid, *_descendants(first.pid)]
                assert int((gpu / "hold.pid").read_text()) in doomed
                for pid in doomed:  # the whole machine dies: worker, flow run, dvc, the stage
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            with worker(server, "gpu", tmp_path, "gpu-2"):
                out, _ = trigger.communicate(timeout=300)
        finally:
            if trigger.poll() is None:
                trigger.kill()
    assert trigger.returncode == 0, out[-4000:]
    assert runs(orch) == ["a", "ref", "u"]  # t did not run here
    assert runs(gpu) == ["t", "t"]  # killed once, then run again by the second worker
    assert (orch / "out" / "t.txt").read_text() == "tarefa"  # pulled from the DVC remote
    assert json.loads((orch / "out" / "t_metrics.json").read_text())["where"] == "gpu"  # uncached: sent back
    assert (orch / "out" / "u.txt").read_text() == "utarefa"
    assert not (orch / "ckpt").exists() and (gpu / "ckpt" / "latest").exists()  # checkpoints stay there
    lock = yaml.safe_load((orch / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(ORDER)
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=orch, capture_output=True,
                            text=True, check=True, env=server["env"])
    assert json.loads(status.stdout) == {"t": [{"changed outs": {"ckpt": "deleted"}}]}, status.stdout
    remote_runs = sorted(_flow_runs(server, "laser-remote-stage/gpu-test"), key=lambda r: r.created)
    assert [r.state.name for r in remote_runs] == ["Crashed", "Completed"]
    assert "no heartbeat" in remote_runs[0].state.message
    (pipeline_run,) = _flow_runs(server, "laser-pipeline/orch")
    assert pipeline_run.state.is_completed()


def test_dispatch_without_a_worker_or_a_deployment_fails_clearly(server, tmp_path):
    """No worker on the gpu pool: the run is cancelled after flow.dispatch_start_timeout_s and the stage fails
    naming the pool; a deployment that does not exist fails at once (not retried)."""
    remote = tmp_path / "dvc-remote"
    orch = _toy(tmp_path / "orch", remote, train_dispatch="deployment", train_deployment="laser-remote-stage/idle",
                dispatch_start_timeout_s=3, retries=0)
    gpu = _toy(tmp_path / "gpu", remote)
    done = _run([sys.executable, "-m", "flows.deploy", "--remote", "--pool", "idle-gpu", "--create-pool", "--name",
                 "idle", "--repo-root", str(gpu)], server)
    assert done.returncode == 0, done.stdout + done.stderr
    done = _run([sys.executable, "-m", "flows.pipeline", "--repo-root", str(orch)], server, timeout=240)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no worker of work pool 'idle-gpu' started flow run" in done.stderr, done.stderr[-3000:]
    assert "prefect worker start --pool idle-gpu" in done.stderr
    assert "skipped (upstream failed): u" in done.stderr
    (idle,) = _flow_runs(server, "laser-remote-stage/idle")
    assert idle.state.is_cancelled()

    params = yaml.safe_load((orch / "params.yaml").read_text())
    params["flow"].update(train_deployment="laser-remote-stage/nope", retries=2)
    (orch / "params.yaml").write_text(yaml.safe_dump(params))
    start = time.monotonic()
    done = _run([sys.executable, "-m", "flows.pipeline", "--repo-root", str(orch)], server, timeout=240)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no deployment 'laser-remote-stage/nope'" in done.stderr, done.stderr[-3000:]
    assert "python -m flows.deploy --remote --pool" in done.stderr
    assert time.monotonic() - start < 120
