"""One stage (``flow.train_stage``, train) run as a run of a Prefect deployment on another work pool: a GPU machine.

``flow.train_dispatch: deployment`` in params makes the ``laser-pipeline`` flow run that stage here instead of
``dvc repro -s`` in its own checkout. Data moves through the DVC remote (``dvc remote add -d ...`` in both
checkouts; any DVC remote: S3, GCS, SSH, a shared directory), the way DVC projects share data:

1. orchestrator (:func:`dispatch_stage`): ``dvc push`` the stage's cached inputs (outputs of upstream stages);
   uncached small inputs (``ref/ref_constant.json`` is ``cache: false``) travel inline in the run's parameters, and
   the stage's code deps (and ``dvc.yaml``) as digests: the GPU checkout must hold the same code, or the run fails
   at once naming the files that differ;
2. ``run_deployment(flow.train_deployment)``, not waited on: the orchestrator watches the run, fails (retried by the
   flow) when no worker picks it up within ``flow.dispatch_start_timeout_s`` (no worker on that pool, or no pool),
   and marks it Crashed and fails (retried) when it stops sending heartbeats for ``flow.dispatch_lost_after_s``
   (its worker or machine died: a killed worker alone leaves its runs going, Prefect's process worker does not stop
   them);
3. the GPU worker (:func:`laser_remote_stage`): writes the orchestrator's ``params.yaml`` and ``dvc.lock`` and the
   inline inputs, ``dvc pull`` the cached inputs, ``dvc repro -s <stage>`` (logs and a progress artifact as at
   home), ``dvc push <stage>``, and publishes its ``dvc.lock`` entry and its uncached outputs (train's metrics,
   step log, DVCLive directory and curves) in the artifact ``laser-dispatch-<stage>`` of its run;
4. orchestrator: merges that entry into its ``dvc.lock`` (under DVC's repo lock), writes the uncached outputs and
   ``dvc pull <stage>`` the cached ones (``models/<variant>``): the stages downstream run here as usual.

The checkpoints (``paths.checkpoints``, resume state and not a DVC output) stay on the GPU machine: a retried run
resumes from them there; they are not needed here. Deploy the remote flow with
``python -m flows.deploy --remote --pool <gpu pool>`` from the GPU checkout; see the README for a Kubernetes or
Docker pool.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import tarfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger

from flows.errors import PermanentStageError, StageFailure

REMOTE_FLOW = "laser-remote-stage"
PAYLOAD_ARTIFACT = "laser-dispatch-{stage}"
_PAYLOAD_MARK = "<!-- laser-dispatch-payload -->"
_MAX_INLINE_BYTES = 16_000_000  # uncached files sent inline, each way; larger ones must be cached DVC outputs
_POLL_S = 2.0


def dispatch_settings(cfg) -> dict[str, Any]:
    """What :func:`dispatch_stage` needs from ``params.flow``; fails when no Prefect server is configured (a
    deployment runs on a server's work pool: the ephemeral API has no workers)."""
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise ValueError("flow.train_dispatch: deployment needs a Prefect server with a worker on the GPU pool: set "
                         "PREFECT_API_URL (see README, 'Work pools and workers'), or set flow.train_dispatch: local")
    return {"deployment": cfg.train_deployment, "start_timeout_s": cfg.dispatch_start_timeout_s,
            "heartbeat_s": cfg.dispatch_heartbeat_s, "lost_after_s": cfg.dispatch_lost_after_s,
            "gpu_tag": cfg.gpu_tag}


# ---------------------------------------------------------------------------------------------- the stage's files


def stage_io(root: Path, name: str) -> dict[str, Any]:
    """The stage's deps and outs, from DVC: ``{"cached": [...], "inline": [...], "sources": [...], "outs": [{path,
    cache, persist}]}``; deps are outputs of other stages (cached or not) or sources (code, data under git)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    from flows.pipeline import _address

    with Repo(str(root)) as repo:
        stages = list(repo.index.stages)
        target = next((s for s in stages if _address(s, repo.root_dir) == name), None)
        if target is None or Path(target.path).resolve() != (root / "dvc.yaml").resolve():
            raise PermanentStageError(f"stage {name!r} is not a stage of {root / 'dvc.yaml'}: it cannot be dispatched")

        def rel(fs_path: str) -> str:
            return Path(os.path.relpath(fs_path, repo.root_dir)).as_posix()

        produced = {rel(out.fs_path): out for stage in stages if stage is not target for out in stage.outs}
        io_: dict[str, Any] = {"cached": [], "inline": [], "sources": [], "outs": []}
        for dep in target.deps:
            if isinstance(dep, ParamsDependency):
                continue  # params.yaml travels whole
            path = rel(dep.fs_path)
            out = next((o for p, o in produced.items() if path == p or path.startswith(p + "/")), None)
            io_["sources" if out is None else "cached" if out.use_cache else "inline"].append(path)
        io_["outs"] = [{"path": rel(o.fs_path), "cache": bool(o.use_cache), "persist": bool(o.persist)}
                       for o in target.outs]
    return io_


def digest(path: Path) -> str:
    """sha256 of a file, or of a directory's sorted (relative path, file digest) pairs; "missing" if absent."""
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        h = hashlib.sha256()
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{item.relative_to(path).as_posix()}\0{digest(item)}\n".encode())
        return h.hexdigest()
    return "missing"


def pack(path: Path) -> dict[str, str]:
    """A file (``{"file": base64}``) or a directory (``{"tar": base64 of a .tar.gz}``) to send inline."""
    if path.is_dir():
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            tar.add(path, arcname=".")
        data, kind = buffer.getvalue(), "tar"
    elif path.is_file():
        data, kind = path.read_bytes(), "file"
    else:
        raise StageFailure(f"{path} does not exist: it cannot be sent")
    if len(data) > _MAX_INLINE_BYTES:
        raise PermanentStageError(f"{path} is {len(data)} bytes: too large to send inline (limit {_MAX_INLINE_BYTES});"
                                  " make it a cached DVC output (drop `cache: false`) so it goes through the remote")
    return {kind: base64.b64encode(data).decode()}


def unpack(packed: dict[str, str], path: Path) -> None:
    """Write what :func:`pack` made at ``path`` (atomically: a temporary sibling, then a rename)."""
    from laser.io import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    if "file" in packed:
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(base64.b64decode(packed["file"]))
        return
    with atomic_path(path, is_dir=True) as tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(base64.b64decode(packed["tar"])), mode="r:gz") as tar:
            tar.extractall(tmp, filter="data")


def run_dvc(root: Path, args: list[str], logger, what: str) -> None:
    """``dvc <args>`` in ``root``, streamed to the logs; a failure raises StageFailure (retried) naming ``what``,
    or PermanentStageError when DVC says no remote is configured."""
    from flows.pipeline import _dvc, run_streaming, stage_env

    env = stage_env(root)
    tail: list[str] = []

    def on_line(stream: str, line: str) -> None:
        tail.append(line)
        del tail[:-20]
        logger.info("[dvc %s] %s", args[0], line)

    code = run_streaming([*_dvc(env), "--wait-for-lock", *args], root, env, on_line)
    if code:
        text = "\n".join(f"    {line}" for line in tail[-10:])
        cls = PermanentStageError if "no remote specified" in text or "remote is not set" in text else StageFailure
        raise cls(f"{what} failed (`dvc {' '.join(args)}` exited {code} in {root}):\n{text}"
                  + ("\n    configure one: dvc remote add -d <name> <url>" if cls is PermanentStageError else ""))


# ---------------------------------------------------------------------------------------------- the orchestrator


def dispatch_stage(stage: str, force: bool, root: Path, settings: dict[str, Any], logger) -> dict[str, Any]:
    """Run ``stage`` of the project at ``root`` as a run of ``settings["deployment"]`` and bring its results here.

    Returns ``{"status", "remote_flow_run", "remote_pool"}``; raises ``PermanentStageError`` (not retried: no such
    deployment, the GPU checkout's code differs, the stage failed permanently there) or ``StageFailure`` (retried: no
    worker picked the run up, the run was lost or crashed, a transfer failed)."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    root = root.resolve()
    io_ = stage_io(root, stage)
    if io_["cached"]:
        run_dvc(root, ["push", *io_["cached"]], logger, f"pushing the inputs of {stage} to the DVC remote")
    inputs = {path: pack(root / path) for path in io_["inline"]}
    sources = {path: digest(root / path) for path in [*io_["sources"], "dvc.yaml"]}
    lock = root / "dvc.lock"
    heartbeat = f"laser_heartbeat_{uuid.uuid4().hex}"
    parameters = {"stage": stage, "force": force, "lock": lock.read_text() if lock.is_file() else "",
                  "params": (root / "params.yaml").read_text() if (root / "params.yaml").is_file() else "",
                  "inputs": inputs, "cached_inputs": io_["cached"], "sources": sources, "heartbeat": heartbeat,
                  "heartbeat_s": settings["heartbeat_s"], "gpu_tag": settings.get("gpu_tag")}
    deployment = settings["deployment"]
    try:
        remote = run_deployment(name=deployment, parameters=parameters, timeout=0, tags=["laser-dispatch"])
    except ObjectNotFound:
        raise PermanentStageError(
            f"stage {stage!r}: no deployment {deployment!r} on the Prefect server (flow.train_deployment); deploy it "
            "from the GPU checkout: python -m flows.deploy --remote --pool <gpu pool>") from None
    logger.info("%s dispatched: flow run %r of %s", stage, remote.name, deployment)
    try:
        state, pool = watch(remote.id, deployment, settings, heartbeat, logger)
    finally:
        _delete_variable(heartbeat)
    where = f"flow run {remote.name!r} of {deployment} on pool {pool!r}"
    if not state.is_completed():
        message = state.message or state.name
        permanent = any(word in message for word in ("PermanentStageError", "BadParamsStageError",
                                                     "cannot succeed as configured", "rejected its params"))
        cls = PermanentStageError if permanent else StageFailure
        raise cls(f"stage {stage!r} ended {state.name} in {where}: {message}")
    payload = read_payload(remote.id, stage)
    apply_payload(root, stage, payload, logger)
    logger.info("%s: %s in %s; results are here", stage, payload["status"], where)
    return {"status": payload["status"], "remote_flow_run": remote.name, "remote_pool": pool}


def watch(flow_run_id, deployment: str, settings: dict[str, Any], heartbeat: str, logger):
    """Wait for the run's final state; raise StageFailure when no worker starts it in time or it stops beating."""
    from prefect import get_client
    from prefect.states import Cancelled, Crashed
    from prefect.variables import Variable

    started_waiting = time.monotonic()
    last_beat, last_sign = None, time.monotonic()
    with get_client(sync_client=True) as client:
        pool = "?"
        with contextlib.suppress(Exception):  # only for the messages
            pool = client.read_deployment_by_name(deployment).work_pool_name or "?"
        while True:
            run = client.read_flow_run(flow_run_id)
            state = run.state
            if state is None or state.is_final():
                return state, pool
            now = time.monotonic()
            if state.is_scheduled() or state.is_pending():
                if now - started_waiting > settings["start_timeout_s"]:
                    client.set_flow_run_state(flow_run_id, Cancelled(message="no worker picked it up"), force=True)
                    raise StageFailure(
                        f"no worker of work pool {pool!r} started flow run {run.name!r} of {deployment} within "
                        f"{settings['start_timeout_s']:g} s (flow.dispatch_start_timeout_s); is one running? "
                        f"`prefect worker start --pool {pool}` on the GPU machine (cancelled; retried)")
                last_sign = now
            elif state.is_running():
                beat = Variable.get(heartbeat, default=None)
                if beat != last_beat:
                    last_beat, last_sign = beat, now
                elif now - last_sign > settings["lost_after_s"]:
                    message = (f"no heartbeat for {settings['lost_after_s']:g} s (flow.dispatch_lost_after_s): its "
                               f"worker or machine died")
                    client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
                    raise StageFailure(f"lost flow run {run.name!r} of {deployment} on pool {pool!r} mid-stage: "
                                     f"{message}; marked Crashed (retried: a new run resumes from the checkpoints "
                                     f"there)")
            time.sleep(_POLL_S)


def _delete_variable(name: str) -> None:
    from prefect.variables import Variable

    with contextlib.suppress(Exception):  # a leftover variable costs nothing
        Variable.unset(name)


def read_payload(flow_run_id, stage: str) -> dict[str, Any]:
    """The payload :func:`laser_remote_stage` published in its run's ``laser-dispatch-<stage>`` artifact."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    key = payload_key(stage)
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]),
                                                                     flow_run_id=ArtifactFilterFlowRunId(
                                                                         any_=[flow_run_id])))
    for artifact in found:
        text = artifact.data if isinstance(artifact.data, str) else ""
        if _PAYLOAD_MARK in text:
            block = text.split(_PAYLOAD_MARK, 1)[1].split("```json", 1)[1].split("```", 1)[0]
            return json.loads(block)
    raise StageFailure(f"the dispatched run of {stage!r} completed without its {key!r} artifact: results not found")


def apply_payload(root: Path, stage: str, payload: dict[str, Any], logger) -> None:
    """The remote results here: the dvc.lock entry (under DVC's repo lock: a stage running beside this one may be
    writing dvc.lock), the uncached outputs, then ``dvc pull <stage>`` for the cached ones."""
    from dvc.repo import Repo

    from laser.io import atomic_write_text

    with Repo(str(root), _wait_for_lock=True) as repo, repo.lock:
        lock = root / "dvc.lock"
        data = yaml.safe_load(lock.read_text()) if lock.is_file() else None
        data = data if isinstance(data, dict) else {"schema": "2.0"}
        data.setdefault("stages", {})[stage] = payload["lock_entry"]
        atomic_write_text(lock, yaml.safe_dump(data, sort_keys=False))
    for path, packed in payload["files"].items():
        unpack(packed, root / path)
    if payload["cached_outs"]:
        run_dvc(root, ["pull", stage], logger, f"pulling the outputs of {stage} from the DVC remote")


def payload_key(stage: str) -> str:
    import re

    return PAYLOAD_ARTIFACT.format(stage=re.sub(r"[^a-z0-9]+", "-", stage.lower()).strip("-"))


# ----------------------------------------------------------------------------------------------- the GPU worker


def _beat(name: str, every_s: float, stop: threading.Event) -> None:
    from prefect.variables import Variable

    count = 0
    while not stop.is_set():
        count += 1
        with contextlib.suppress(Exception):  # a missed beat; the next one may get through
            Variable.set(name, str(count), overwrite=True)
        stop.wait(every_s)


@flow(name=REMOTE_FLOW, log_prints=False)
def laser_remote_stage(stage: str, force: bool = False, lock: str = "", params: str = "",
                       inputs: dict[str, dict[str, str]] | None = None, cached_inputs: list[str] | None = None,
                       sources: dict[str, str] | None = None, heartbeat: str | None = None, heartbeat_s: float = 30.0,
                       gpu_tag: str | None = None, repo_root: str | None = None) -> dict[str, Any]:
    """Run one stage in this checkout for an orchestrating ``laser-pipeline`` flow (see the module docstring).

    repo_root: this machine's checkout of the project (the deployment's default; ``python -m flows.deploy`` sets it).
    The other parameters come from :func:`dispatch_stage`."""
    from prefect.artifacts import create_markdown_artifact

    from flows.pipeline import REPO_ROOT, run_stage, show_run_logs
    from laser.io import atomic_write_text

    show_run_logs()
    logger = get_run_logger()
    root = Path(repo_root).resolve() if repo_root else REPO_ROOT
    stop = threading.Event()
    if heartbeat:
        threading.Thread(target=_beat, args=(heartbeat, heartbeat_s, stop), daemon=True, name="laser-beat").start()
    try:
        differ = [path for path, want in (sources or {}).items() if digest(root / path) != want]
        if differ:
            raise PermanentStageError(
                f"this checkout ({root}) differs from the orchestrator's in {', '.join(differ)}: check out the same "
                "commit on both machines (the stage's code and dvc.yaml must match)")
        if params:
            atomic_write_text(root / "params.yaml", params)
        if lock:
            atomic_write_text(root / "dvc.lock", lock)
        for path, packed in (inputs or {}).items():
            unpack(packed, root / path)
        if cached_inputs:
            run_dvc(root, ["pull", *cached_inputs], logger, f"pulling the inputs of {stage} from the DVC remote")
        task = run_stage.with_options(retries=0, tags=[gpu_tag] if gpu_tag else [])
        result = task(stage, force=force, repo_root=str(root))
        outs = stage_io(root, stage)["outs"]
        if any(o["cache"] for o in outs):
            run_dvc(root, ["push", stage], logger, f"pushing the outputs of {stage} to the DVC remote")
        entry = (yaml.safe_load((root / "dvc.lock").read_text()) or {}).get("stages", {}).get(stage)
        if entry is None:
            raise StageFailure(f"{root / 'dvc.lock'} has no entry for {stage!r} after it ran")
        files, kept = {}, []
        for out in outs:
            if out["cache"]:
                continue
            if out["persist"] and (root / out["path"]).is_dir():
                kept.append(out["path"])  # checkpoints: stay here for a resumed run
            else:
                files[out["path"]] = pack(root / out["path"])
        payload = {"status": result["status"], "lock_entry": entry, "files": files,
                   "cached_outs": [o["path"] for o in outs if o["cache"]], "kept_here": kept}
        summary = [f"# {stage} on {os.uname().nodename}", "", f"- status: {result['status']}",
                   f"- checkout: `{root}`",
                   *[f"- through the DVC remote: `{p}`" for p in payload["cached_outs"]],
                   *[f"- sent in this artifact: `{p}`" for p in files],
                   *[f"- kept on this machine: `{p}`" for p in kept],
                   "", "Read back by the orchestrating flow:", "", _PAYLOAD_MARK, "```json", json.dumps(payload), "```"]
        create_markdown_artifact(markdown="\n".join(summary), key=payload_key(stage),
                                 description=f"{stage} run for an orchestrating laser-pipeline flow")
        return {"stage": stage, "status": result["status"], "host": os.uname().nodename}
    finally:
        stop.set()
