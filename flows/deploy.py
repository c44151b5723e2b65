"""Deploy the pipeline to a Prefect work pool, the way Prefect users run flows: a server, pools, workers.

    source scripts/env.sh && prefect server start                 # terminal 1: the server, UI at :4200
    source scripts/env.sh && export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.deploy --pool laser --create-pool             # deployment laser-pipeline/default
    prefect worker start --pool laser                             # terminal 2 (same two lines first): a worker
    prefect deployment run laser-pipeline/default --watch         # trigger it; -p profile=smoke, -p force=train

Train on a GPU machine (``flow.train_dispatch: deployment``, see ``flows/dispatch.py``): on that machine, in its own
checkout of the same commit, with the same DVC remote::

    python -m flows.deploy --remote --pool laser-gpu --create-pool   # deployment laser-remote-stage/gpu
    prefect worker start --pool laser-gpu

What it sets up, all on the server PREFECT_API_URL names (checked first: a clear message when none answers):

- the work pool (``--create-pool``: a process pool; any other must exist: ``prefect work-pool create``);
- the tag concurrency limit ``flow.gpu_tag`` (``--gpu-slots``, default 1 when there is none yet): GPU stages carry
  that tag, so two of them, of this run or another, never share a GPU (one limit per GPU machine: give each machine
  its own ``flow.gpu_tag``);
- the deployment, its code from this checkout (``from_source``: a process worker on this machine runs it here; for
  a Kubernetes or Docker pool build an image of the checkout instead, see the README), its ``repo_root`` this
  project, Prefect's flow heartbeats on (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``);
- the automation ``laser: crash silent runs``: a run of these deployments whose heartbeats stop (its process or
  machine died; a killed worker alone leaves its runs going) is marked Crashed with that reason instead of staying
  Running forever.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINE_ENTRYPOINT = "flows/pipeline.py:laser_pipeline"
REMOTE_ENTRYPOINT = "flows/dispatch.py:laser_remote_stage"
CRASH_AUTOMATION = "laser: crash silent runs"
HEARTBEAT_S = 30  # Prefect's minimum


def ensure_pool(client, name: str, create: bool) -> str | None:
    """None when pool ``name`` exists (or was created: a process pool); else the message to print."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        client.read_work_pool(name)
        return None
    except ObjectNotFound:
        if not create:
            return (f"work pool {name!r} does not exist on the Prefect server; create it (`prefect work-pool create "
                    f"{name} --type process`, or another type) or pass --create-pool")
    client.create_work_pool(WorkPoolCreate(name=name, type="process",
                                           base_job_template=ProcessWorker.get_default_base_job_template()))
    print(f"created process work pool {name!r}")
    return None


def ensure_gpu_limit(client, tag: str, slots: int | None) -> int:
    """The tag concurrency limit on ``tag``: set to ``slots`` when given, created with 1 when there is none."""
    from prefect.exceptions import ObjectNotFound

    try:
        current = client.read_concurrency_limit_by_tag(tag).concurrency_limit
    except ObjectNotFound:
        current = None
    if slots is None and current is not None:
        return current
    client.create_concurrency_limit(tag=tag, concurrency_limit=slots or 1)
    return slots or 1


def ensure_crash_automation(heartbeat_s: int) -> None:
    """An automation marking Crashed any flow run that stops beating while running (Prefect's own recipe)."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    try:
        Automation.read(name=CRASH_AUTOMATION)
        return
    except ValueError:  # not found
        pass
    Automation(
        name=CRASH_AUTOMATION,
        description="A laser run whose flow process stopped sending heartbeats (its worker or machine died).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": ["prefect.flow-run.*"]},
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=3 * heartbeat_s)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {3 * heartbeat_s} s: the flow's process, its worker "
                                            "or its machine died")],
    ).create()
    print(f"created automation {CRASH_AUTOMATION!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", required=True, help="the work pool the deployment runs on")
    parser.add_argument("--create-pool", action="store_true", help="create it (a process pool) when it is missing")
    parser.add_argument("--remote", action="store_true",
                        help="deploy the remote-stage flow (train on this GPU machine) instead of the pipeline")
    parser.add_argument("--name", help="deployment name (default: 'default'; with --remote: 'gpu')")
    parser.add_argument("--repo-root", default=str(REPO_ROOT), help="the DVC project runs use (default: this one)")
    parser.add_argument("--params-file", default="params.yaml", help="the pipeline's params file (default params.yaml)")
    parser.add_argument("--profile", help="default profile of the pipeline's runs (merged into params.yaml)")
    parser.add_argument("--max-parallel", type=int, help="default max_parallel of the pipeline's runs")
    parser.add_argument("--cron", help="also run the pipeline on this cron schedule")
    parser.add_argument("--gpu-slots", type=int, help="tag concurrency limit on flow.gpu_tag (default: 1 if unset)")
    args = parser.parse_args(argv)

    from flows.pipeline import check_server
    from laser.config import load_params
    from laser.errors import ParamsError

    url = os.environ.get("PREFECT_API_URL")
    if not url:
        print("python -m flows.deploy needs a Prefect server: `prefect server start`, then export "
              "PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
        return 2
    if problem := check_server(url):
        print(problem, file=sys.stderr)
        return 2
    root = Path(args.repo_root).resolve()
    try:
        params = load_params(root / args.params_file if not Path(args.params_file).is_absolute()
                             else args.params_file)
    except ParamsError as err:
        print(err, file=sys.stderr)
        return 2

    from prefect import flow, get_client

    with get_client(sync_client=True) as client:
        if problem := ensure_pool(client, args.pool, args.create_pool):
            print(problem, file=sys.stderr)
            return 2
        slots = ensure_gpu_limit(client, params.flow.gpu_tag, args.gpu_slots)
    ensure_crash_automation(HEARTBEAT_S)

    name = args.name or ("gpu" if args.remote else "default")
    parameters: dict = {"repo_root": str(root)}
    if not args.remote:
        parameters.update(params_file=args.params_file, profile=args.profile, max_parallel=args.max_parallel)
    entrypoint = REMOTE_ENTRYPOINT if args.remote else PIPELINE_ENTRYPOINT
    env = {"PYTHONPATH": str(REPO_ROOT), "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}
    flow.from_source(source=str(REPO_ROOT), entrypoint=entrypoint).deploy(
        name=name, work_pool_name=args.pool, parameters=parameters, job_variables={"env": env}, cron=args.cron,
        tags=["laser"], print_next_steps=False, ignore_warnings=True)
    flow_name = "laser-remote-stage" if args.remote else "laser-pipeline"
    print(f"deployment {flow_name}/{name} on work pool {args.pool!r} (project {root}); "
          f"tag limit {params.flow.gpu_tag!r}: {slots} slot(s)")
    print(f"start a worker:  prefect worker start --pool {args.pool}")
    if args.remote:
        print(f"orchestrator params: flow.train_dispatch: deployment, flow.train_deployment: {flow_name}/{name}")
    else:
        print(f"run it:          prefect deployment run '{flow_name}/{name}' --watch")
    return 0


if __name__ == "__main__":
    if "LASER_CACHE" not in os.environ and (REPO_ROOT / "scripts" / "env.sh").is_file():  # as flows.pipeline does
        os.execvp("bash", ["bash", "-c", 'source "$0/scripts/env.sh" && exec "$1" -m flows.deploy "${@:2}"',
                           str(REPO_ROOT), sys.executable, *sys.argv[1:]])
    sys.exit(main())
