"""The ``laser_pipeline`` Prefect flow: every stage of ``dvc.yaml`` in DAG order, each run as ``dvc repro -s``.

DVC runs the stages and decides which are stale; Prefect orders them, retries transient failures, keeps the
history and publishes the results. The stages and their order come from DVC's own graph of the repo's
``dvc.yaml`` (``foreach`` expansions such as ``rollout@base`` included): there is no second list of stages.

Run it (ephemeral Prefect API, no server needed; the command re-executes itself under ``scripts/env.sh`` when
that was not sourced, so every cache stays in ``.cache``)::

    python -m flows.pipeline                      # params.yaml as it is
    python -m flows.pipeline --profile smoke      # merge profiles/smoke.yaml into params.yaml first
    python -m flows.pipeline --force train        # rerun train and everything downstream of it
    python -m flows.pipeline --force rollout      # a foreach group: rollout@<each variant>, downstream

It prints where the report and the metrics files are. In Python: ``laser_pipeline(profile="smoke")``.

``profile`` REWRITES ``params.yaml``: ``profiles/<name>.yaml`` is deep-merged over it, validated, and written back
atomically (as ``dvc exp run -S`` does), so DVC sees one params file and ``git diff params.yaml`` shows what the
profile changed. ``force`` names a stage (or a ``foreach`` group); it and all its descendants run with
``dvc repro -s -f``, stages upstream of it are left to DVC as usual.

Retries (params ``flow.*``): up to ``flow.retries`` more attempts, waiting ``flow.retry_delay_s *
flow.retry_backoff**i`` seconds before retry ``i+1`` (Prefect waits ``flow.retry_delay_s``, the one number its UI
shows as "Retry Delay"; the task itself waits the backoff's extra seconds, and says so in its log). A stage that
rejects its params (its script exits 2 after printing a ``params: ...`` line on stderr, see ``laser.cli``) fails at
once with that line, and so does one that says it cannot succeed as configured (exit 3 after an ``error: ...`` line:
rejected data, a model or token not found, an impossible batch geometry, a path it may not write); any other failure
(killed by a signal, OOM, exit 137, a lost worker, an unexpected exception) may be transient and is retried. When a
stage fails for good, the stages downstream of it are skipped, independent ones still run, and the flow fails naming
every failed stage.
Params are validated with ``laser.config.load_params`` before any stage starts (on the command line before Prefect
starts: bad params print their one line, no traceback).

The command line ties Prefect's ephemeral API server to the flow process: killed, even by ``kill -9``, the flow
takes the server with it (see ``_end_ephemeral_server_with_this_process``).

Concurrency (``flow.max_parallel``, or ``--parallel N``): up to N stages whose upstream stages are done run at once
(``rollout@base`` beside ``train``). DVC allows it: ``dvc repro -s`` releases the repo lock while the stage command
runs and re-takes it to write ``dvc.lock`` (merging, not overwriting, the other stages' entries); its per-path
read/write locks keep two commands off the same outputs. Each call passes ``--wait-for-lock`` so two stages ending
together wait for each other instead of failing. Stages in ``flow.gpu_stages`` carry the tag ``flow.gpu_tag``: a tag
concurrency limit on the Prefect server (``python -m flows.deploy`` creates one) keeps two of them off one GPU.

``flow.train_dispatch: deployment`` runs ``flow.train_stage`` as a run of the deployment ``flow.train_deployment``
(on a GPU work pool) instead of here; inputs and outputs go through the DVC remote (see ``flows/dispatch.py``).

What a Prefect user sees: every line a stage prints is in its task run's logs (INFO; the flow and task run loggers
are raised to INFO when ``PREFECT_LOGGING_LEVEL`` leaves them quieter, so the console shows them too); with a server
the flow prints its flow-run URL; a stage printing a progress bar (train: step i/N, rollout: samples done/total) gets
a progress artifact ``laser-progress-<stage>`` that follows it.

Results are published as Prefect artifacts: ``laser-headline`` (a table of the headline numbers: per model accuracy,
pass/maj/weighted-maj@K, self-verification F1, AUROC, ECE; train's final reward and self-reward MSE),
``laser-metrics`` (a table of every metric in every metrics file, numbers first: ``dvc metrics show`` plus
``paths.eval_metrics``, each variant's ``train/<variant>/metrics.json``, ``paths.data_stats``) and
``laser-report`` (markdown: the report's path, the stage outcomes, the report itself with its plots embedded as
data: URIs, so they render in the UI).

Prefect UI and scheduled runs::

    source scripts/env.sh && prefect server start              # terminal 1; UI at http://127.0.0.1:4200
    source scripts/env.sh
    export PREFECT_API_URL=http://127.0.0.1:4200/api            # terminal 2: talk to that server
    python -m flows.pipeline --profile smoke                    # a one-off run, recorded on the server
    python -m flows.pipeline --serve --cron "0 3 * * *"         # a deployment on a cron schedule (Ctrl-C stops)
    prefect deployment run 'laser-pipeline/scheduled'           # trigger the served deployment now

Work pools and workers (``flows/deploy.py``): ``python -m flows.deploy --pool laser --create-pool`` deploys the flow
to a process work pool, ``prefect worker start --pool laser`` runs what is triggered there.
"""

from __future__ import annotations

import argparse
import base64
import contextvars
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
from prefect.artifacts import (  # noqa: E402
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.context import TaskRunContext  # noqa: E402
from prefect.settings import temporary_settings  # noqa: E402

from flows.dvc_output import ReproOutput  # noqa: E402
from flows.errors import BadParamsStageError, PermanentStageError, PipelineError  # noqa: E402
from laser.config import Params, apply_profile, load_params  # noqa: E402
from laser.errors import (  # noqa: E402
    ParamsError,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
METRICS_ARTIFACT = "laser-metrics"
REPORT_ARTIFACT = "laser-report"
HEADLINE_ARTIFACT = "laser-headline"
PROGRESS_ARTIFACT = "laser-progress-{stage}"  # the stage name with what a key may not hold made '-'
DEFAULT_DEPLOYMENT = "scheduled"
DEFAULT_CRON = "0 3 * * *"  # every day at 03:00 (the server's time zone: UTC unless configured)

_MAX_TABLE_ROWS = 2000
_MAX_REPORT_CHARS = 20_000
_MAX_IMAGE_BYTES = 1_000_000  # a plot larger than this is linked by path, not embedded (the plots are ~30-80 kB)
_MAX_EMBEDDED_BYTES = 8_000_000  # all embedded plots of one report artifact together
# a tqdm bar line, as stages print them to a pipe: "train:  50%|#####     | 4/8 [00:10<00:10, ...]"; the bars a
# progress artifact follows (train's steps, the rollouts' samples), not the libraries' (loading, saving shards)
PROGRESS_BARS = ("train", "rollouts")
_TQDM_LINE = re.compile(r"^(?P<desc>[^:|]{1,60}):\s+(?P<pct>\d+)%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\b")




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


_LIVE: set[subprocess.Popen] = set()  # the commands running now (stages run in threads when flow.max_parallel > 1)
_LIVE_LOCK = threading.Lock()


def kill_running_commands() -> None:
    """Stop every command :func:`run_streaming` is running (the flow was interrupted while stages ran in threads)."""
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        _kill_group(proc)


def run_streaming(cmd: list[str], cwd: str | Path, env: dict[str, str],
                  on_line: Callable[[str, str], None]) -> int:
    """Run ``cmd``, calling ``on_line(stream, line)`` for each line of stdout/stderr as it comes; the exit code.

    Text mode: a progress bar's carriage returns end lines too, so each update of a bar is a line. ``on_line`` runs in
    the caller's context (Prefect's run context included: it may log and create artifacts). The command gets its own
    process group, killed (TERM, then KILL) if this one is interrupted or cancelled.
    """
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1, start_new_session=True)
    with _LIVE_LOCK:
        _LIVE.add(proc)

    def pump(pipe, stream: str) -> None:
        for line in pipe:
            on_line(stream, line.rstrip("\n"))

    pumps = [threading.Thread(target=contextvars.copy_context().run, args=(pump, proc.stdout, "stdout"), daemon=True),
             threading.Thread(target=contextvars.copy_context().run, args=(pump, proc.stderr, "stderr"), daemon=True)]
    for thread in pumps:
        thread.start()
    try:
        returncode = proc.wait()
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        with _LIVE_LOCK:
            _LIVE.discard(proc)
    for thread in pumps:
        thread.join(timeout=10)  # a daemon the stage left behind may hold the pipes open: do not wait for it
    return returncode


class StageProgress:
    """A Prefect progress artifact that follows the progress bar a stage prints (:data:`PROGRESS_BARS`: train's
    steps, the rollouts' samples, per eval set).

    Created at the first bar line, updated at most every ``every_s`` seconds and at the end of each bar; an API
    error is logged once and never fails the stage.
    """

    def __init__(self, stage: str, logger, every_s: float = 2.0):
        self.stage, self.logger, self.every_s = stage, logger, every_s
        self.key = PROGRESS_ARTIFACT.format(stage=re.sub(r"[^a-z0-9]+", "-", stage.lower()).strip("-"))
        self.artifact_id = None
        self.last_update = 0.0
        self.failed = False

    def on_line(self, line: str) -> None:
        match = _TQDM_LINE.match(line.strip())
        if not match or self.failed:
            return
        desc, n, total = match["desc"].strip(), int(match["n"]), int(match["total"])
        if total <= 0 or desc not in PROGRESS_BARS:
            return
        now = time.monotonic()
        if self.artifact_id is not None and n < total and now - self.last_update < self.every_s:
            return
        self.last_update = now
        description = f"{self.stage}: {desc} {n}/{total}"
        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(100.0 * n / total, key=self.key, description=description)
            else:
                update_progress_artifact(self.artifact_id, 100.0 * n / total, description=description)
        except Exception as err:  # the UI's view of progress must not fail the stage
            self.failed = True
            self.logger.warning("progress artifact for %s not updated (%s); the stage goes on", self.stage, err)


def _retry_transient(_task, _task_run, state) -> bool:
    """Prefect's ``retry_condition_fn``: retry all but permanent failures (it must be a plain function)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is not None:
        return not isinstance(exc, PermanentStageError)
    message = state.message or ""
    return not any(cls.__name__ in message for cls in (PermanentStageError, BadParamsStageError))


def backoff_extra_s(attempt: int, delay_s: float, backoff: float) -> float:
    """The seconds to wait at the start of ``attempt`` beyond the ``delay_s`` Prefect already waited: retry ``i``
    (attempt ``i + 1``) waits ``delay_s * backoff**(i - 1)`` in all."""
    return 0.0 if attempt < 3 else delay_s * (backoff ** (attempt - 2) - 1)


@task(name="dvc-repro", task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False)
def run_stage(stage: str, force: bool = False, repo_root: str = ".", retry_delay_s: float = 0.0,
              retry_backoff: float = 1.0, dispatch: dict[str, Any] | None = None) -> dict[str, Any]:
    """``dvc repro -s [-f] <stage>`` in the repo root; DVC decides whether the stage is stale.

    ``dispatch`` (``flows.dispatch.dispatch_settings``): run the stage as a run of that deployment instead (another
    work pool; data through the DVC remote). Returns ``{"stage", "status": "ran" | "restored" | "unchanged",
    "forced", "attempt", "seconds"}``; raises ``BadParamsStageError`` or ``PermanentStageError`` (not retried), or
    ``StageFailure`` (retried).
    """
    logger = get_run_logger()
    context = TaskRunContext.get()
    attempt = context.task_run.run_count if context and context.task_run.run_count else 1
    if extra := backoff_extra_s(attempt, retry_delay_s, retry_backoff):
        logger.info("attempt %d: waiting %.1f s more (flow.retry_backoff = %s) after Prefect's %.1f s retry delay",
                    attempt, extra, retry_backoff, retry_delay_s)
        time.sleep(extra)
    if dispatch:
        from flows.dispatch import dispatch_stage

        start = time.monotonic()
        result = dispatch_stage(stage, force, Path(repo_root), dispatch, logger)
        return {"stage": stage, "forced": force, "attempt": attempt, "seconds": round(time.monotonic() - start, 2),
                **result}
    return repro(stage, force, repo_root, logger, attempt)


def repro(stage: str, force: bool, repo_root: str | Path, logger, attempt: int = 1) -> dict[str, Any]:
    """The body of :func:`run_stage` (also run by the remote-stage flow): ``dvc repro -s``, streamed to the logs."""
    env = stage_env(repo_root)
    # --wait-for-lock: a stage running beside this one holds DVC's repo lock while it writes dvc.lock; wait, not fail
    cmd = [*_dvc(env), "--wait-for-lock", "repro", "-s", *(["-f"] if force else []), stage]
    echo = not logger.isEnabledFor(logging.INFO)  # at WARNING (scripts/env.sh) the console still shows DVC
    output = ReproOutput(stage)
    progress = StageProgress(stage, logger)

    def on_line(stream: str, line: str) -> None:
        progress.on_line(line)
        output.on_line(stream, line)
        logger.info("[%s] %s", stage, line)
        if echo:
            print(f"[{stage}] {line}", file=sys.stderr if stream == "stderr" else sys.stdout, flush=True)

    logger.info("attempt %d: %s", attempt, " ".join(cmd))
    start = time.monotonic()
    returncode = run_streaming(cmd, repo_root, env, on_line)
    seconds = round(time.monotonic() - start, 2)
    if returncode != 0:
        raise output.failure(returncode, attempt)
    return {"stage": stage, "status": output.status, "forced": force, "attempt": attempt, "seconds": seconds}


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
    train_metrics = [params.paths.trained(v).metrics for v in params.variants]
    for rel in (params.paths.eval_metrics, *train_metrics, params.paths.data_stats):
        path = repo_root / rel
        if Path(rel).as_posix() not in files and path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                logger.warning("cannot read metrics file %s: %s", path, err)
                continue
            if isinstance(data, dict):
                files[Path(rel).as_posix()] = data
    first = [Path(rel).as_posix() for rel in (params.paths.eval_metrics, *train_metrics)]
    return {path: files[path] for path in sorted(files, key=lambda p: (first.index(p) if p in first else 2, p))}


def metrics_rows(metrics: dict[str, dict]) -> list[dict[str, Any]]:
    """Every metric of every file as ``{"file", "metric", "value"}`` rows: per file the numbers first, then the
    rest (strings such as ``prompt_format``, lists), each group in file order."""
    rows = []
    for path, data in metrics.items():
        flat = [{"file": path, "metric": name, "value": value} for name, value in _flatten(data)]
        is_number = [isinstance(r["value"], (int, float)) and not isinstance(r["value"], bool) for r in flat]
        rows += [r for r, num in zip(flat, is_number) if num] + [r for r, num in zip(flat, is_number) if not num]
    return rows


HEADLINE_ROWS = (("accuracy (avg@K)", "avg@K"), ("pass@K", "pass@K"), ("maj@K", "maj@K"),
                 ("weighted maj@K", "weighted_maj@K"), ("self-verification F1", "sv_f1"),
                 ("self-verification AUROC", "sv_auroc"), ("ECE", "sv_ece"), ("K", "K"))
TRAIN_ROWS = (("train: final reward", "final_reward_mean"), ("train: final self-reward MSE", "final_self_reward_mse"),
              ("train: last-quarter reward", "last_quarter_reward_mean"), ("train: steps", "steps"))


def headline_rows(eval_metrics: dict | None, train_metrics: dict[str, dict] | None) -> tuple[list[dict[str, Any]], str]:
    """The ``laser-headline`` table (at most 30 rows): one row per number, one column per model; and the view.

    Per model the headline of ``eval_metrics`` (``models.<model>.headline.<view>``, the view being its
    ``headline_view``, else ``macro`` when present, else ``overall``); then each training variant's final reward
    and MSE (``train_metrics``: variant -> its train/<variant>/metrics.json) in its own column."""
    models = (eval_metrics or {}).get("models") or {}
    view = (eval_metrics or {}).get("headline_view")
    heads: dict[str, dict] = {}
    for model, block in models.items():
        available = (block or {}).get("headline") or {}
        chosen = view if view in available else "macro" if "macro" in available else "overall"
        if isinstance(available.get(chosen), dict):
            heads[model] = available[chosen]
            view = view or chosen
    rows = [{"metric": label, **{model: _round(head.get(key)) for model, head in heads.items()}}
            for label, key in HEADLINE_ROWS if any(key in head for head in heads.values())]
    for label, key in TRAIN_ROWS:
        values = {variant: _round(m[key]) for variant, m in (train_metrics or {}).items() if m and key in m}
        if values:
            rows.append({"metric": label, **dict.fromkeys(heads, None), **values})
    return rows[:30], view or "overall"


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


_IMAGE = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)")


def embed_images(markdown: str, base_dir: Path) -> tuple[str, list[str]]:
    """Markdown images with relative paths (which do not resolve in the Prefect UI) as ``data:`` URIs (which do).

    A missing image, one over ``_MAX_IMAGE_BYTES`` or past ``_MAX_EMBEDDED_BYTES`` in all keeps a plain link to
    its absolute path; returns the markdown and a note per image not embedded."""
    notes: list[str] = []
    budget = [_MAX_EMBEDDED_BYTES]
    kinds = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
             ".gif": "image/gif", ".webp": "image/webp"}

    def replace(match: re.Match) -> str:
        src = match["src"]
        if re.match(r"^[a-z][a-z0-9+.-]*:", src):  # http:, data:, ...: resolves already
            return match[0]
        path = (base_dir / src).resolve()
        kind = kinds.get(path.suffix.lower())
        size = path.stat().st_size if path.is_file() else None
        if kind is None or size is None or size > _MAX_IMAGE_BYTES or size > budget[0]:
            why = ("not found" if size is None else "not an image type" if kind is None else
                   f"{size} bytes: too large to embed")
            notes.append(f"{path}: {why}")
            return f"[{match['alt'] or path.name}: `{path}`]"
        budget[0] -= size
        return f"![{match['alt']}](data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()})"

    return _IMAGE.sub(replace, markdown), notes


def publish_artifacts(repo_root: Path, report: Path, metrics: dict[str, dict],
                      results: dict[str, dict], params: Params | None = None) -> None:
    """The ``laser-headline`` and ``laser-metrics`` tables and the ``laser-report`` markdown of this flow run."""
    rows = metrics_rows(metrics)
    note = ""
    if len(rows) > _MAX_TABLE_ROWS:
        note = f" (first {_MAX_TABLE_ROWS} of {len(rows)} rows; the files hold all)"
        rows = rows[:_MAX_TABLE_ROWS]
    if params is not None:
        eval_data = metrics.get(Path(params.paths.eval_metrics).as_posix())
        train_data = {v: metrics.get(Path(params.paths.trained(v).metrics).as_posix()) for v in params.variants}
        head, view = headline_rows(eval_data, train_data)
        create_table_artifact(table=head or [{"metric": "(no eval or train metrics yet)"}], key=HEADLINE_ARTIFACT,
                              description=f"LaSeR headline (view {view!r} of the eval sets; K = samples per problem); "
                                          f"all metrics: {METRICS_ARTIFACT}")
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
        text, missing = embed_images(text, report.parent)
        lines += ["", "---", "", text]
        if missing:
            lines += ["", "Plots not embedded: " + "; ".join(missing)]
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


def show_run_logs() -> None:
    """Raise Prefect's flow and task run loggers to INFO when they only inherit a quieter level (scripts/env.sh sets
    ``PREFECT_LOGGING_LEVEL=WARNING`` to keep Prefect's own chatter off the console): what a stage prints is then in
    its task run's logs in the UI, and on the console. A level set for those loggers themselves is kept."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        run_logger = logging.getLogger(name)
        if run_logger.level == logging.NOTSET and run_logger.getEffectiveLevel() > logging.INFO:
            run_logger.setLevel(logging.INFO)


def flow_run_url() -> str | None:
    """The UI page of the current flow run when a Prefect server is used (None with the ephemeral API)."""
    from prefect.runtime import flow_run
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url or not flow_run.id:
        return None
    try:
        return flow_run.ui_url
    except Exception:  # a URL for the user's convenience, never a reason to fail
        return None


def _stage_group(name: str) -> str:
    return name.rpartition("@")[0] or name


def _announce_run(logger) -> str | None:
    """Print the flow-run URL when a server records the run (None with an ephemeral API)."""
    url = flow_run_url()
    if url:
        print(f"Prefect flow run: {url}", flush=True)
        logger.info("flow run page: %s", url)
    return url


def _flow_params(root: Path, params_file: str, profile: str | None, logger) -> tuple[Path, Params]:
    """Apply ``profile`` (rewriting the params file) and load the params: bad params fail here, before any stage."""
    params_path = _in_root(root, params_file)
    if profile:
        profile_path = resolve_profile(root, profile)
        apply_profile(params_path, profile_path)
        logger.warning("profile %s merged into %s (the file was rewritten)", profile_path, params_path)
    return params_path, load_params(params_path)


def _train_dispatch(cfg, dag: nx.DiGraph, root: Path, order: list[str], logger) -> dict[str, Any] | None:
    """The dispatch settings of ``flow.train_dispatch: deployment`` (None: local); a missing train stage or server
    fails here, before any stage."""
    if cfg.train_dispatch != "deployment":
        return None
    from flows.dispatch import dispatch_settings

    if not any(cfg.train_stage in (name, _stage_group(name)) for name in dag):
        raise ValueError(f"flow.train_stage = {cfg.train_stage!r} (the stage flow.train_dispatch sends) is not "
                         f"a stage of {root / 'dvc.yaml'}: {', '.join(order)}")
    dispatch = dispatch_settings(cfg)  # needs a Prefect server: a clear error here, before any stage
    logger.info("%s runs as a run of the deployment %r (flow.train_dispatch: deployment)", cfg.train_stage,
                cfg.train_deployment)
    return dispatch


def _stage_caller(cfg, root: Path, forced: set[str], dispatch: dict[str, Any] | None, logger) -> Callable:
    """``call(name, submit)``: run (or submit) one stage's task with the retry policy, the GPU tag and dispatch."""
    # One number for Prefect (its UI shows "Retry Delay: <n>s"; a list shows as NaN); the task adds the backoff.
    stage_task = run_stage.with_options(retries=cfg.retries, retry_delay_seconds=cfg.retry_delay_s,
                                        retry_condition_fn=_retry_transient)
    gpu_task = stage_task.with_options(tags=[cfg.gpu_tag])
    if cfg.retries:
        waits = ", ".join(f"{cfg.retry_delay_s * cfg.retry_backoff**i:g} s" for i in range(cfg.retries))
        logger.info("a transient stage failure is retried up to %d times, waiting %s", cfg.retries, waits)

    def call(name: str, submit: bool):
        dispatched = dispatch if cfg.train_stage in (name, _stage_group(name)) else None  # train: every train@<v>
        # a dispatched stage uses no GPU here: its run on the GPU pool takes the tag's slot there (if this task held
        # it too, the two would wait for each other)
        gpu = not dispatched and (_stage_group(name) in cfg.gpu_stages or name in cfg.gpu_stages)
        chosen = gpu_task if gpu else stage_task
        kwargs = dict(force=name in forced, repo_root=str(root), retry_delay_s=cfg.retry_delay_s,
                      retry_backoff=cfg.retry_backoff, dispatch=dispatched)
        return chosen.submit(name, **kwargs) if submit else chosen(name, **kwargs)

    return call


def _failed(name: str, err: Exception, logger) -> dict[str, Any]:
    logger.error("%s", err)
    return {"stage": name, "status": "failed", "error": str(err), "bad_params": isinstance(err, BadParamsStageError),
            "retried": not isinstance(err, PermanentStageError)}


def _run_stages(dag: nx.DiGraph, order: list[str], parallel: int, call: Callable, logger) -> dict[str, dict]:
    """Every stage once its upstream is done, in DAG order, up to ``parallel`` at once; a stage whose upstream
    failed is skipped. Returns the results in DAG order."""
    results: dict[str, dict[str, Any]] = {}
    pending = list(order)
    running: dict[Any, str] = {}  # future -> stage
    try:
        while pending or running:
            for name in list(pending):  # start what is ready, in DAG order, while slots are free
                upstream = list(dag.predecessors(name))
                if any(up not in results for up in upstream):
                    continue
                blocked = [up for up in upstream if results[up]["status"] in ("failed", "skipped")]
                pending.remove(name)
                if blocked:
                    results[name] = {"stage": name, "status": "skipped",
                                     "reason": f"upstream failed: {', '.join(blocked)}"}
                    logger.warning("skipping %s: upstream %s failed", name, ", ".join(blocked))
                    continue
                if parallel == 1:  # in this thread: Ctrl-C stops the stage's command at once
                    try:
                        results[name] = call(name, submit=False)
                    except Exception as err:
                        results[name] = _failed(name, err, logger)
                    break  # rescan: what it unblocked comes next
                running[call(name, submit=True)] = name
                if len(running) >= parallel:
                    break
            if running:
                from prefect.futures import as_completed

                future = next(iter(as_completed(list(running))))
                name = running.pop(future)
                try:
                    results[name] = future.result()
                except Exception as err:
                    results[name] = _failed(name, err, logger)
    except BaseException:
        kill_running_commands()  # stages in threads: their commands must not outlive the flow
        raise
    return {name: results[name] for name in order}


def _raise_for_failures(results: dict[str, dict[str, Any]]) -> None:
    failures = [r for r in results.values() if r["status"] == "failed"]
    if failures:
        skipped = [r["stage"] for r in results.values() if r["status"] == "skipped"]
        message = "\n".join(r["error"] for r in failures)
        if skipped:
            message += f"\nskipped (upstream failed): {', '.join(skipped)}"
        raise PipelineError(message)


@flow(name="laser-pipeline", log_prints=False)
def laser_pipeline(profile: str | None = None, force: str | None = None, params_file: str = "params.yaml",
                   repo_root: str | None = None, max_parallel: int | None = None) -> dict[str, Any]:
    """Run every stage of dvc.yaml in DAG order, each as ``dvc repro -s <stage>`` with retries.

    profile: merge ``profiles/<profile>.yaml`` into ``params_file`` first (this rewrites the file).
    force: a stage (or ``foreach`` group) to rerun with everything downstream, even when DVC finds it unchanged.
    params_file: the params file validated (and rewritten by ``profile``), relative to the repo root; it is where
        the flow reads ``flow.*`` and ``paths.*`` (the stages and dvc.yaml's ``${...}`` read ``params.yaml``).
    repo_root: the DVC project (default: this repository).
    max_parallel: stages at once when the DAG allows (default ``flow.max_parallel``).

    Returns ``{"repo_root", "order", "stages": {stage: result}, "report", "metrics", "flow_run_url"}``; raises
    ``PipelineError`` when a stage failed for good (after the artifacts are published), ``ParamsError`` on bad params.
    """
    show_run_logs()
    logger = get_run_logger()
    url = _announce_run(logger)
    root = Path(repo_root).resolve() if repo_root else REPO_ROOT
    _params_path, params = _flow_params(root, params_file, profile, logger)
    cfg = params.flow
    parallel = cfg.max_parallel if max_parallel is None else max_parallel
    if parallel < 1:
        raise ValueError(f"max_parallel = {parallel} is invalid; allowed: an int >= 1")
    dag = read_dag(root)
    order = stage_order(dag)
    forced = forced_stages(dag, force)
    if not order:
        logger.warning("no stages in %s: nothing to run", root / "dvc.yaml")
    logger.info("stages in DAG order: %s%s%s", ", ".join(order), f"; forced: {sorted(forced)}" if forced else "",
                f"; up to {parallel} at once" if parallel > 1 else "")
    dispatch = _train_dispatch(cfg, dag, root, order, logger)
    results = _run_stages(dag, order, parallel, _stage_caller(cfg, root, forced, dispatch, logger), logger)

    report = _in_root(root, params.paths.eval_report)
    metrics = collect_metrics(root, params, stage_env(root))
    try:
        publish_artifacts(root, report, metrics, results, params)
    except Exception as err:  # results stay on disk; a UI hiccup must not fail the run
        logger.warning("could not publish the Prefect artifacts: %s", err)
    _raise_for_failures(results)
    return {"repo_root": str(root), "order": order, "stages": results,
            "report": str(report) if report.is_file() else None,
            "metrics": {str(root / path): data for path, data in metrics.items()}, "flow_run_url": url}


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
# Prefect waits 20 s for that server by default; a cold start on a 2-core machine (imports, SQLite migrations)
# measured 21 s, past which the flow fails with "Timed out while attempting to connect to ephemeral Prefect API
# server" (the likely cause of a CI failure). A default only: PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS wins.
EPHEMERAL_STARTUP_TIMEOUT_S = 120


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


def check_server(api_url: str | None = None, timeout_s: float = 10.0) -> str | None:
    """None when ``api_url`` (default: PREFECT_API_URL) is unset or a Prefect server answers there; else the
    message to print (no server, or not a Prefect API)."""
    import httpx

    url = api_url if api_url is not None else os.environ.get("PREFECT_API_URL", "")
    if not url:
        return None
    try:
        response = httpx.get(url.rstrip("/") + "/health", timeout=timeout_s)
        response.raise_for_status()
        return None
    except (httpx.HTTPError, OSError) as err:
        return (f"no Prefect server answers at PREFECT_API_URL={url} ({type(err).__name__}: {err}).\n"
                "Start one (`source scripts/env.sh && prefect server start`), point PREFECT_API_URL at the one you "
                "use, or unset it to run on a temporary local API.")


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
    parser.add_argument("--parallel", type=int, default=None, metavar="N",
                        help="run up to N stages at once when the DAG allows (default: flow.max_parallel)")
    args = parser.parse_args(argv)
    if args.parallel is not None and args.parallel < 1:
        parser.error(f"--parallel {args.parallel}: allowed: an int >= 1")
    if problem := check_server():
        print(f"\nlaser-pipeline failed:\n{problem}", file=sys.stderr)
        return 2

    if args.serve:
        if args.force:
            parser.error("--force applies to one run; it cannot be scheduled")
        if not os.environ.get("PREFECT_API_URL"):  # an ephemeral API has no scheduler: the cron would never fire
            print("--serve needs a Prefect server: run `prefect server start` (UI at http://127.0.0.1:4200), then "
                  "export PREFECT_API_URL=http://127.0.0.1:4200/api and run this again", file=sys.stderr)
            return 2
        laser_pipeline.serve(name=args.name, cron=args.cron,
                             parameters={"profile": args.profile, "params_file": args.params_file,
                                         "repo_root": args.repo_root, "max_parallel": args.parallel})
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
        with temporary_settings(set_defaults={"server.ephemeral.startup_timeout_seconds": EPHEMERAL_STARTUP_TIMEOUT_S}):
            summary = laser_pipeline(profile=args.profile, force=args.force, params_file=args.params_file,
                                     repo_root=args.repo_root, max_parallel=args.parallel)
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
    print(f"Prefect artifacts: {HEADLINE_ARTIFACT}, {METRICS_ARTIFACT}, {REPORT_ARTIFACT}")
    if summary.get("flow_run_url"):
        print(f"Prefect flow run: {summary['flow_run_url']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
