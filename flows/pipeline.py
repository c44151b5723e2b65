"""The ``laser_pipeline`` Prefect flow: every stage of ``dvc.yaml`` in DAG order, each run as ``dvc repro -s``.

DVC runs the stages and decides which are stale; Prefect orders them, retries transient failures, keeps the
history and publishes the results. The stages and their order come from DVC's own graph of the repo's
``dvc.yaml`` (``foreach`` expansions such as ``rollout@base`` included): there is no second list of stages.

Run it (ephemeral Prefect API, no server needed; the command re-executes itself under ``scripts/env.sh`` when
that was not sourced, so every cache stays in ``.cache``)::

    python -m flows.pipeline                      # params.yaml as it is
    python -m flows.pipeline --profile smoke      # merge profiles/smoke.yaml into params.yaml first
    python -m flows.pipeline --force train        # rerun train and everything downstream of it
    python -m flows.pipeline --force rollout      # a foreach group: rollout@base, rollout@trained, downstream

It prints where the report and the metrics files are. In Python: ``laser_pipeline(profile="smoke")``.

``profile`` REWRITES ``params.yaml``: ``profiles/<name>.yaml`` is deep-merged over it, validated, and written back
atomically (as ``dvc exp run -S`` does), so DVC sees one params file and ``git diff params.yaml`` shows what the
profile changed. ``force`` names a stage (or a ``foreach`` group); it and all its descendants run with
``dvc repro -s -f``, stages upstream of it are left to DVC as usual.

Retries (params ``flow.*``): up to ``flow.retries`` more attempts, waiting ``flow.retry_delay_s *
flow.retry_backoff**i`` seconds before retry ``i+1``. A stage that rejects its params (its script exits 2 after
printing a ``params: ...`` line on stderr, see ``laser.cli``) fails at once with that line, and so does one that
says it cannot succeed as configured (exit 3 after an ``error: ...`` line: rejected data, a model or token not
found, an impossible batch geometry, a path it may not write); any other failure (killed by a signal, OOM, exit
137, a lost worker, an unexpected exception) may be transient and is retried. When a stage fails for good, the
stages downstream of it are skipped, independent ones still run, and the flow fails naming every failed stage.
Params are validated with ``laser.config.load_params`` before any stage starts (on the command line before Prefect
starts: bad params print their one line, no traceback).

The command line ties Prefect's ephemeral API server to the flow process: killed, even by ``kill -9``, the flow
takes the server with it (see ``_end_ephemeral_server_with_this_process``).

Results are published as Prefect artifacts: ``laser-metrics`` (a table of every metric in every metrics file:
``dvc metrics show`` plus ``paths.data_stats``, ``paths.train_metrics``, ``paths.eval_metrics``) and
``laser-report`` (markdown: the report's path, the stage outcomes, the report itself).

Prefect UI and scheduled runs::

    source scripts/env.sh && prefect server start              # terminal 1; UI at http://127.0.0.1:4200
    source scripts/env.sh
    export PREFECT_API_URL=http://127.0.0.1:4200/api            # terminal 2: talk to that server
    python -m flows.pipeline --profile smoke                    # a one-off run, recorded on the server
    python -m flows.pipeline --serve --cron "0 3 * * *"         # a deployment on a cron schedule (Ctrl-C stops)
    prefect deployment run 'laser-pipeline/scheduled'           # trigger the served deployment now

The UI shows one task run per stage (DVC's output is in its logs when ``PREFECT_LOGGING_LEVEL=INFO``; with the
default WARNING it is printed to the console instead) and the two artifacts under the flow run.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _reexec_under_env_sh() -> None:
    """Re-run this command under scripts/env.sh, so Prefect's database, DVC's site cache, HF downloads stay in .cache.

    Called before Prefect is imported: importing it already creates ``~/.prefect`` when PREFECT_HOME is unset.
    """
    root = Path(__file__).resolve().parents[1]
    if "LASER_CACHE" not in os.environ and (root / "scripts" / "env.sh").is_file():
        os.execvp("bash", ["bash", "-c", 'source "$0/scripts/env.sh" && exec "$1" -m flows.pipeline "${@:2}"',
                           str(root), sys.executable, *sys.argv[1:]])


if __name__ == "__main__":
    _reexec_under_env_sh()

import networkx as nx  # noqa: E402  (after the re-exec above, which must precede the Prefect import)
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.context import TaskRunContext  # noqa: E402

from laser.config import Params, apply_profile, load_params  # noqa: E402
from laser.errors import (  # noqa: E402
    BAD_PARAMS_EXIT,
    PERMANENT_EXIT,
    ParamsError,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
METRICS_ARTIFACT = "laser-metrics"
REPORT_ARTIFACT = "laser-report"
DEFAULT_DEPLOYMENT = "scheduled"
DEFAULT_CRON = "0 3 * * *"  # every day at 03:00 (the server's time zone: UTC unless configured)

# DVC's own line for a failed stage command: "ERROR: failed to reproduce 'b': failed to run: cmd, exited with 2"
_FAILED_RUN = re.compile(r"failed to run: .*, exited with (-?\d+)")
# "params: train.lr = ..." (ParamsError) or "params.yaml: params: ..." (load_params prefixes the file)
_PARAMS_LINE = re.compile(r"^(?:\S+: )?params: ")
_MAX_TABLE_ROWS = 2000
_MAX_REPORT_CHARS = 20_000


class StageError(RuntimeError):
    """``dvc repro -s <stage>`` failed for a reason worth retrying (signal, OOM, lost worker, ...)."""


class PermanentStageError(StageError):
    """The stage said it cannot succeed as configured (``laser.cli.PERMANENT_EXIT``): retrying cannot help."""


class BadParamsStageError(PermanentStageError):
    """The stage rejected its params (exit 2 + a ``params:`` line): retrying cannot help."""


class PipelineError(RuntimeError):
    """One or more stages failed for good; the message names each one and why."""


# ------------------------------------------------------------------------------------------------------- the DAG


def _address(stage: Any, root_dir: str) -> str:
    """``stage.addressing`` (the name ``dvc repro -s`` takes), relative to the repo root instead of the cwd."""
    rel = Path(os.path.relpath(stage.path, root_dir)).as_posix()
    name = getattr(stage, "name", None)
    if name is None:  # a .dvc file
        return rel
    return name if rel == "dvc.yaml" else f"{rel}:{name}"


def read_dag(repo_root: str | Path) -> nx.DiGraph:
    """The stage DAG from DVC's own graph (``Repo.index.graph``) of the repo's dvc.yaml files.

    Nodes are the names ``dvc repro -s`` takes (``train``, ``rollout@base``, ``sub/dvc.yaml:stage``), edges go
    upstream -> downstream (DVC's go the other way), and each node's ``position`` (its order in the dvc.yaml files)
    breaks ties so the order is stable. Outputs tracked by ``dvc add`` have nothing to reproduce and are left out.
    """
    from dvc.repo import Repo

    with Repo(str(repo_root)) as repo:
        stages = list(repo.index.stages)
        graph = repo.index.graph  # edge: stage -> a stage it depends on
        names = {stage: _address(stage, repo.root_dir) for stage in stages}
        dag = nx.DiGraph()
        for position, stage in enumerate(stages):
            if stage.cmd or stage.deps:
                dag.add_node(names[stage], position=position)
        for downstream, upstream in graph.edges:
            if names[downstream] in dag and names[upstream] in dag:
                dag.add_edge(names[upstream], names[downstream])
    return dag


def stage_order(dag: nx.DiGraph) -> list[str]:
    """A topological order of the stages; among ready stages, the one written first in dvc.yaml goes first."""
    return list(nx.lexicographical_topological_sort(dag, key=lambda node: dag.nodes[node]["position"]))


def forced_stages(dag: nx.DiGraph, force: str | None) -> set[str]:
    """``force`` (a stage or a ``foreach`` group name) and every stage downstream of it."""
    if not force:
        return set()
    roots = {node for node in dag if node == force or node.rpartition("@")[0] == force}
    if not roots:
        raise ValueError(f"force: unknown stage {force!r}; stages of dvc.yaml: {', '.join(stage_order(dag))}")
    return roots.union(*(nx.descendants(dag, node) for node in roots))


# --------------------------------------------------------------------------------------------------- running dvc


def stage_env(repo_root: str | Path) -> dict[str, str]:
    """The environment stages run in: this one, then ``scripts/env.sh`` of the repo (when it has one) on top."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)  # the venv's dvc and python, even when PATH lacks them
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = os.pathsep.join(p for p in (bindir, env.get("PATH")) if p)
    if (Path(repo_root) / "scripts" / "env.sh").is_file():
        out = subprocess.run(["bash", "-c", "source scripts/env.sh >/dev/null && env -0"], cwd=repo_root, env=env,
                             capture_output=True, check=True).stdout
        env = dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env["PYTHONUNBUFFERED"] = "1"  # stream the stages' output as it comes
    return env


def _dvc(env: dict[str, str]) -> list[str]:
    exe = shutil.which("dvc", path=env.get("PATH"))
    return [exe] if exe else [sys.executable, "-m", "dvc"]


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop dvc and the stage command it runs (they share the process group started for them)."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_streaming(cmd: list[str], cwd: str | Path, env: dict[str, str],
                  on_line: Callable[[str, str], None]) -> int:
    """Run ``cmd``, calling ``on_line(stream, line)`` for each line of stdout/stderr as it comes; the exit code.

    The command gets its own process group, killed (TERM, then KILL) if this one is interrupted or cancelled.
    """
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1, start_new_session=True)

    def pump(pipe, stream: str) -> None:
        for line in pipe:
            on_line(stream, line.rstrip("\n"))

    pumps = [threading.Thread(target=pump, args=(proc.stdout, "stdout"), daemon=True),
             threading.Thread(target=pump, args=(proc.stderr, "stderr"), daemon=True)]
    for thread in pumps:
        thread.start()
    try:
        returncode = proc.wait()
    except BaseException:
        _kill_group(proc)
        raise
    for thread in pumps:
        thread.join(timeout=10)  # a daemon the stage left behind may hold the pipes open: do not wait for it
    return returncode


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == 137:
        return "exit code 137 (SIGKILL: out of memory?)"
    return f"exit code {code}"


def _retry_transient(_task, _task_run, state) -> bool:
    """Prefect's ``retry_condition_fn``: retry all but permanent failures (it must be a plain function)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is not None:
        return not isinstance(exc, PermanentStageError)
    message = state.message or ""
    return not any(cls.__name__ in message for cls in (PermanentStageError, BadParamsStageError))


@task(name="dvc-repro", task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False)
def run_stage(stage: str, force: bool = False, repo_root: str = ".") -> dict[str, Any]:
    """``dvc repro -s [-f] <stage>`` in the repo root; DVC decides whether the stage is stale.

    Returns ``{"stage", "status": "ran" | "restored" | "unchanged", "forced", "attempt", "seconds"}``; raises
    ``BadParamsStageError`` or ``PermanentStageError`` (not retried), or ``StageError`` (retried).
    """
    logger = get_run_logger()
    context = TaskRunContext.get()
    attempt = context.task_run.run_count if context and context.task_run.run_count else 1
    env = stage_env(repo_root)
    cmd = [*_dvc(env), "repro", "-s", *(["-f"] if force else []), stage]
    echo = not logger.isEnabledFor(logging.INFO)  # at WARNING (scripts/env.sh) the console still shows DVC
    tail: collections.deque[str] = collections.deque(maxlen=40)
    params_lines: list[str] = []
    failed_exit: list[int] = []
    status = "unchanged"

    def on_line(stream: str, line: str) -> None:
        nonlocal status
        if stream == "stdout" and line.startswith("Running stage "):
            status = "ran"
        elif stream == "stdout" and "is cached - skipping run" in line and status != "ran":
            status = "restored"  # DVC's run-cache had these exact deps and params: outputs checked out
        if stream == "stderr":
            tail.append(line)
            if _PARAMS_LINE.match(line):
                params_lines.append(line)
            if match := _FAILED_RUN.search(line):
                failed_exit.append(int(match[1]))
        logger.info("[%s] %s", stage, line)
        if echo:
            print(f"[{stage}] {line}", file=sys.stderr if stream == "stderr" else sys.stdout, flush=True)

    logger.info("attempt %d: %s", attempt, " ".join(cmd))
    start = time.monotonic()
    returncode = run_streaming(cmd, repo_root, env, on_line)
    seconds = round(time.monotonic() - start, 2)
    if returncode == 0:
        return {"stage": stage, "status": status, "forced": force, "attempt": attempt,
                "seconds": seconds}
    exit_code = failed_exit[-1] if failed_exit else returncode  # no "failed to run" line: dvc itself failed
    if exit_code == BAD_PARAMS_EXIT and params_lines:
        raise BadParamsStageError(f"stage {stage!r} rejected its params (not retried): " + "; ".join(params_lines))
    if exit_code == PERMANENT_EXIT:
        errors = [line for line in tail if line.startswith("error: ")] or list(tail)[-1:]
        raise PermanentStageError(f"stage {stage!r} cannot succeed as configured (not retried): "
                                  + "; ".join(errors))
    last = "\n".join(f"    {line}" for line in list(tail)[-10:])
    raise StageError(f"stage {stage!r} failed on attempt {attempt} ({_describe_exit(exit_code)}; "
                     f"dvc exited {returncode}); last stderr lines:\n{last}")


# ------------------------------------------------------------------------------------------------------ results


def _flatten(data: dict, prefix: str = ""):
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            yield from _flatten(value, name)
        else:
            yield name, value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value)


def collect_metrics(repo_root: Path, params: Params, env: dict[str, str]) -> dict[str, dict]:
    """``{path relative to the repo: metrics}`` for every metrics file DVC knows plus the ones named in params."""
    logger = get_run_logger()
    files: dict[str, dict] = {}
    try:
        out = subprocess.run([*_dvc(env), "metrics", "show", "--json"], cwd=repo_root, env=env, text=True,
                             capture_output=True, timeout=300)
        shown = json.loads(out.stdout) if out.stdout.strip() else {}
        for rev in shown.values():
            for path, entry in (rev.get("data") or {}).items():
                if isinstance(entry.get("data"), dict):
                    files[Path(path).as_posix()] = entry["data"]
    except (OSError, subprocess.SubprocessError, ValueError, AttributeError) as err:
        logger.warning("dvc metrics show failed (%s); reading the metrics files named in params only", err)
    for rel in (params.paths.data_stats, params.paths.train_metrics, params.paths.eval_metrics):
        path = repo_root / rel
        if Path(rel).as_posix() not in files and path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                logger.warning("cannot read metrics file %s: %s", path, err)
                continue
            if isinstance(data, dict):
                files[Path(rel).as_posix()] = data
    return files


def publish_artifacts(repo_root: Path, report: Path, metrics: dict[str, dict],
                      results: dict[str, dict]) -> None:
    """The ``laser-metrics`` table and the ``laser-report`` markdown artifacts of this flow run."""
    rows = [{"file": path, "metric": name, "value": value}
            for path, data in metrics.items() for name, value in _flatten(data)]
    note = ""
    if len(rows) > _MAX_TABLE_ROWS:
        note = f" (first {_MAX_TABLE_ROWS} of {len(rows)} rows; the files hold all)"
        rows = rows[:_MAX_TABLE_ROWS]
    create_table_artifact(table=rows or [{"file": "", "metric": "(no metrics files yet)", "value": ""}],
                          key=METRICS_ARTIFACT,
                          description=f"Metrics of every DVC metrics file under {repo_root}{note}")
    lines = ["# LaSeR pipeline run", "",
             f"- Report: `{report}`" + ("" if report.is_file() else " (not produced)"),
             *[f"- Metrics: `{repo_root / path}`" for path in metrics], "",
             "| stage | status | attempts | seconds | note |", "|---|---|---|---|---|"]
    for name, result in results.items():
        note_text = (result.get("error") or result.get("reason") or ("forced" if result.get("forced") else ""))
        note_text = note_text.splitlines()[0].replace("|", "\\|") if note_text else ""
        lines.append(f"| {name} | {result['status']} | {result.get('attempt', '')} | {result.get('seconds', '')} "
                     f"| {note_text} |")
    if report.is_file():
        text = report.read_text(errors="replace")
        if len(text) > _MAX_REPORT_CHARS:
            text = text[:_MAX_REPORT_CHARS] + f"\n\n… (truncated; the full report is `{report}`)"
        lines += ["", "---", "", text]
    create_markdown_artifact(markdown="\n".join(lines), key=REPORT_ARTIFACT,
                             description=f"LaSeR report: {report}")


# --------------------------------------------------------------------------------------------------------- flow


def resolve_profile(repo_root: Path, profile: str) -> Path:
    """``profiles/<name>.yaml`` of the repo, or a path to a profile file."""
    candidates = [repo_root / "profiles" / f"{profile}.yaml"]
    if profile.endswith((".yaml", ".yml")) or "/" in profile:
        candidates = [Path(profile), repo_root / profile, *candidates]
    for path in candidates:
        if path.is_file():
            return path
    available = sorted(p.stem for p in (repo_root / "profiles").glob("*.yaml"))
    raise ParamsError(f"params: profile {profile!r} not found; available in {repo_root / 'profiles'}: "
                      f"{', '.join(available) or '(none)'}")


def _in_root(repo_root: Path, path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else repo_root / path


@flow(name="laser-pipeline", log_prints=False)
def laser_pipeline(profile: str | None = None, force: str | None = None, params_file: str = "params.yaml",
                   repo_root: str | None = None) -> dict[str, Any]:
    """Run every stage of dvc.yaml in DAG order, each as ``dvc repro -s <stage>`` with retries.

    profile: merge ``profiles/<profile>.yaml`` into ``params_file`` first (this rewrites the file).
    force: a stage (or ``foreach`` group) to rerun with everything downstream, even when DVC finds it unchanged.
    params_file: the params file validated (and rewritten by ``profile``), relative to the repo root; it is where
        the flow reads ``flow.*`` and ``paths.*`` (the stages and dvc.yaml's ``${...}`` read ``params.yaml``).
    repo_root: the DVC project (default: this repository).

    Returns ``{"repo_root", "order", "stages": {stage: result}, "report", "metrics"}``; raises ``PipelineError``
    when a stage failed for good (after the artifacts are published), ``ParamsError`` on bad params.
    """
    logger = get_run_logger()
    root = Path(repo_root).resolve() if repo_root else REPO_ROOT
    params_path = _in_root(root, params_file)
    if profile:
        profile_path = resolve_profile(root, profile)
        apply_profile(params_path, profile_path)
        logger.warning("profile %s merged into %s (the file was rewritten)", profile_path, params_path)
    params = load_params(params_path)  # bad params fail here, before any stage
    dag = read_dag(root)
    order = stage_order(dag)
    forced = forced_stages(dag, force)
    if not order:
        logger.warning("no stages in %s: nothing to run", root / "dvc.yaml")
    logger.info("stages in DAG order: %s%s", ", ".join(order), f"; forced: {sorted(forced)}" if forced else "")

    cfg = params.flow
    delays = [cfg.retry_delay_s * cfg.retry_backoff**i for i in range(cfg.retries)]
    stage_task = run_stage.with_options(retries=cfg.retries, retry_delay_seconds=delays if any(delays) else 0,
                                        retry_condition_fn=_retry_transient)
    results: dict[str, dict[str, Any]] = {}
    for name in order:
        blocked = [up for up in dag.predecessors(name) if results[up]["status"] in ("failed", "skipped")]
        if blocked:
            results[name] = {"stage": name, "status": "skipped", "reason": f"upstream failed: {', '.join(blocked)}"}
            logger.warning("skipping %s: upstream %s failed", name, ", ".join(blocked))
            continue
        try:
            results[name] = stage_task(name, force=name in forced, repo_root=str(root))
        except Exception as err:
            results[name] = {"stage": name, "status": "failed", "error": str(err),
                             "bad_params": isinstance(err, BadParamsStageError),
                             "retried": not isinstance(err, PermanentStageError)}
            logger.error("%s", err)

    report = _in_root(root, params.paths.eval_report)
    metrics = collect_metrics(root, params, stage_env(root))
    try:
        publish_artifacts(root, report, metrics, results)
    except Exception as err:  # results stay on disk; a UI hiccup must not fail the run
        logger.warning("could not publish the Prefect artifacts: %s", err)

    failed = [r for r in results.values() if r["status"] == "failed"]
    if failed:
        skipped = [r["stage"] for r in results.values() if r["status"] == "skipped"]
        message = "\n".join(r["error"] for r in failed)
        if skipped:
            message += f"\nskipped (upstream failed): {', '.join(skipped)}"
        raise PipelineError(message)
    return {"repo_root": str(root), "order": order, "stages": results,
            "report": str(report) if report.is_file() else None,
            "metrics": {str(root / path): data for path, data in metrics.items()}}


# ------------------------------------------------------------------------------------- the ephemeral API server

# Runs Prefect's ephemeral API server (uvicorn) in place of `python -m uvicorn ...`, plus a thread that ends it once
# the process that started it is gone: a `kill -9` of the flow skips Prefect's atexit stop, and the server used to
# live on (re-parented to PID 1), one per killed flow.
_SERVER_WATCHDOG = """\
import os, runpy, signal, sys, threading, time
parent = int(sys.argv[1])
def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down on TERM
    time.sleep(10)
    os._exit(1)
threading.Thread(target=watch, daemon=True, name="laser-parent-watch").start()
sys.argv = ["uvicorn", *sys.argv[2:]]
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""
CLEANUP_HINT = "pkill -f 'prefect.server.api.server:create_app'"


class _WatchedPopen(subprocess.Popen):
    """``subprocess.Popen`` that starts ``python -m uvicorn ...`` under :data:`_SERVER_WATCHDOG`."""

    def __init__(self, args, *rest, **kwargs):
        if isinstance(args, list) and len(args) >= 3 and args[1:3] == ["-m", "uvicorn"]:
            args = [args[0], "-c", _SERVER_WATCHDOG, str(os.getpid()), *args[3:]]
        super().__init__(args, *rest, **kwargs)


class _SubprocessWithWatchedServer:
    """What Prefect's server module sees as ``subprocess``: the real module, with :class:`_WatchedPopen`."""

    Popen = _WatchedPopen

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)


def _end_ephemeral_server_with_this_process() -> bool:
    """Make the ephemeral API server Prefect starts (no ``PREFECT_API_URL``) end when this process ends, however it
    ends. Prefect imports its server module to start that server anyway; with a real server nothing is imported.
    Returns whether the hook is in place (False, with a warning naming the cleanup, if Prefect changed)."""
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return False  # a real server: no ephemeral one is started
    try:
        import prefect.server.api.server as server
    except ImportError:
        server = None
    if server is None or not hasattr(getattr(server, "subprocess", None), "Popen"):
        print("warning: cannot tie Prefect's temporary API server to this flow; if the flow is killed, end the "
              f"server with: {CLEANUP_HINT}", file=sys.stderr)
        return False
    if not isinstance(server.subprocess, _SubprocessWithWatchedServer):
        server.subprocess = _SubprocessWithWatchedServer()
    return True


# ---------------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline",
                                     description="Run the LaSeR DVC pipeline as a Prefect flow (or serve it).")
    parser.add_argument("--profile", help="merge profiles/<name>.yaml into params.yaml first (rewrites it)")
    parser.add_argument("--force", help="rerun this stage (or foreach group) and everything downstream")
    parser.add_argument("--params-file", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--repo-root", default=str(REPO_ROOT), help="the DVC project (default: this repo)")
    parser.add_argument("--serve", action="store_true",
                        help="serve the flow as a deployment on a cron schedule instead of running it once")
    parser.add_argument("--cron", default=DEFAULT_CRON, help=f"schedule for --serve (default: {DEFAULT_CRON!r})")
    parser.add_argument("--name", default=DEFAULT_DEPLOYMENT,
                        help=f"deployment name for --serve (default: {DEFAULT_DEPLOYMENT!r})")
    args = parser.parse_args(argv)

    if args.serve:
        if args.force:
            parser.error("--force applies to one run; it cannot be scheduled")
        if not os.environ.get("PREFECT_API_URL"):  # an ephemeral API has no scheduler: the cron would never fire
            print("--serve needs a Prefect server: run `prefect server start` (UI at http://127.0.0.1:4200), then "
                  "export PREFECT_API_URL=http://127.0.0.1:4200/api and run this again", file=sys.stderr)
            return 2
        laser_pipeline.serve(name=args.name, cron=args.cron,
                             parameters={"profile": args.profile, "params_file": args.params_file,
                                         "repo_root": args.repo_root})
        return 0

    root = Path(args.repo_root).resolve()
    try:  # bad params: the clear line alone, before Prefect starts (a failed flow run logs a long traceback)
        load_params(_in_root(root, args.params_file),
                    profile=resolve_profile(root, args.profile) if args.profile else None)
    except ParamsError as err:
        print(f"\nlaser-pipeline failed:\n{err}", file=sys.stderr)
        return 2
    _end_ephemeral_server_with_this_process()
    try:
        summary = laser_pipeline(profile=args.profile, force=args.force, params_file=args.params_file,
                                 repo_root=args.repo_root)
    except (ParamsError, ValueError, PipelineError) as err:
        print(f"\nlaser-pipeline failed:\n{err}", file=sys.stderr)
        return 2 if isinstance(err, ParamsError) else 1
    print("\nlaser-pipeline finished:")
    for name, result in summary["stages"].items():
        extra = f", attempt {result['attempt']}" if result.get("attempt", 1) > 1 else ""
        print(f"  {name:<24} {result['status']}" + (f" ({result['seconds']} s{extra})" if "seconds" in result else ""))
    print(f"report:  {summary['report'] or '(not produced)'}")
    for path in summary["metrics"]:
        print(f"metrics: {path}")
    print(f"Prefect artifacts: {METRICS_ARTIFACT}, {REPORT_ARTIFACT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
