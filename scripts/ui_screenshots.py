"""The browser check: fidel as a user meets it in the Prefect UI and the MLflow UI, screenshotted by headless Chromium.

    .venv/bin/python -m scripts.ui_screenshots --root /tmp/uidemo --out docs/screenshots

It starts a Prefect server (a throwaway PREFECT_HOME) and `mlflow ui`, both on 127.0.0.1, creates the process pool,
runs `prefect --no-prompt deploy --all` as docs/deployments.md says, starts a worker, runs the `demo` deployment
(quick) and one `finetune-resume` run with nothing configured, optionally waits for the resume schedule's ticks,
then saves PNGs (under 300 KB each) of: the fine-tune's flow run page, its gates and data artifacts, the
deployments' flow runs, and the MLflow run overview. Everything it starts, it stops. Needs chromium
(Debian: apt-get install -y chromium).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.mlflow_screenshot import free_port, screenshot, stop, wait_until_up

REPO = Path(__file__).resolve().parents[1]

MAX_PNG_BYTES = 300_000


def start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, cwd=REPO, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def shrink(png: Path) -> None:
    """Fewer colours until the PNG is small enough for the repo: UI pages are flat colours and text."""
    from PIL import Image

    for colours in (256, 64):
        if png.stat().st_size <= MAX_PNG_BYTES:
            return
        Image.open(png).convert("RGB").quantize(colours).save(png, optimize=True)


def shoot(url: str, out: Path, size: str, wait_ms: int) -> None:
    width, height = (int(v) for v in size.split("x"))
    screenshot(url, out, width, height, wait_ms)
    shrink(out)
    print(f"{out} ({out.stat().st_size // 1000} KB): {url}", flush=True)


def newest_subflow(client, flow_name: str):
    """The newest run of `flow_name` started by another flow (the demo's fine-tune)."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                 sort=FlowRunSort.START_TIME_DESC, limit=10)
    return next(r for r in runs if r.parent_task_run_id is not None)


def latest_artifact_id(client, key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                 sort=ArtifactSort.CREATED_DESC, limit=1)[0].id


def run_and_capture(args, env: dict, prefect_ui: str, mlflow_ui: str, logs: Path) -> None:
    from fidel_tts.tasks.report import lineage_key
    from fidel_tts.tasks.tracking import run_page
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    prefect = [str(Path(sys.executable).parent / "prefect")]
    for cmd in (["work-pool", "create", "fidel-process", "--type", "process"], ["--no-prompt", "deploy", "--all"]):
        subprocess.run(prefect + cmd, env=env, cwd=REPO, check=True, stdout=(logs / "deploy.log").open("ab"),
                       stderr=subprocess.STDOUT)
    worker = start(prefect + ["worker", "start", "--pool", "fidel-process"], env, logs / "worker.log")
    try:
        demo = run_deployment("fidel-demo/demo", parameters={"root": str(args.root), "quick": True},
                              timeout=args.demo_timeout)
        print(f"demo flow run: {demo.state.type.value} {demo.state.message or ''}", flush=True)
        resume = run_deployment("fidel-finetune/finetune-resume", timeout=300)
        print(f"finetune-resume with nothing configured: {resume.state.type.value}: {resume.state.message}",
              flush=True)
        time.sleep(args.settle_minutes * 60)  # the resume schedule ticks every 10 minutes
    finally:
        stop(worker)
    with get_client(sync_client=True) as client:
        finetune_run = newest_subflow(client, "fidel-finetune")
        key = lineage_key(Path(args.root).resolve() / "runs" / "finetune")
        gates, data = latest_artifact_id(client, f"{key}-gates"), latest_artifact_id(client, f"{key}-data")
    out, wait = Path(args.out), args.wait_ms
    shoot(f"{prefect_ui}/runs/flow-run/{finetune_run.id}", out / "prefect_flow_run.png", "1500x1100", wait)
    shoot(f"{prefect_ui}/artifacts/artifact/{gates}", out / "prefect_gates_artifact.png", "1400x900", wait)
    shoot(f"{prefect_ui}/artifacts/artifact/{data}", out / "prefect_data_artifact.png", "1400x1100", wait)
    shoot(f"{prefect_ui}/runs", out / "prefect_flow_runs.png", "1500x1000", wait)
    shoot(f"{prefect_ui}/deployments", out / "prefect_deployments.png", "1500x800", wait)
    run = find_mlflow_run(args.tracking_uri, str(finetune_run.id))
    shoot(run_page(mlflow_ui, run.info.experiment_id, run.info.run_id), out / "mlflow_run_overview.png",
          "1600x1500", max(wait, 30000))


def find_mlflow_run(tracking_uri: str, flow_run_id: str):
    from mlflow import MlflowClient

    runs = MlflowClient(tracking_uri).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri).search_experiments()],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'", max_results=1)
    if not runs:
        sys.exit(f"error: no MLflow run in {tracking_uri} is tagged with flow run {flow_run_id}")
    return runs[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "fidel-ui-demo",
                   help="the demo's folder (corpus, base model, run)")
    p.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db",
                   help="the store the demo's run file uses (its default), relative to the repo root")
    p.add_argument("--out", default="docs/screenshots")
    p.add_argument("--settle-minutes", type=float, default=0.0,
                   help="wait this long after the runs, so the resume schedule ticks (a tick every 10 minutes)")
    p.add_argument("--demo-timeout", type=float, default=1800)
    p.add_argument("--wait-ms", type=int, default=20000, help="Chromium's virtual time budget per page")
    args = p.parse_args(argv)
    args.root = args.root.resolve()

    logs = Path(tempfile.mkdtemp(prefix="fidel-ui-"))
    prefect_port, mlflow_port = free_port(), free_port()
    prefect_ui, mlflow_ui = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env.update(PREFECT_HOME=str(logs / "prefect_home"), PREFECT_API_URL=f"{prefect_ui}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_URL=prefect_ui)
    os.environ.update({k: env[k] for k in ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_UI_URL",
                                           "PREFECT_SERVER_ANALYTICS_ENABLED")})
    print(f"logs in {logs}", flush=True)
    bin_dir = Path(sys.executable).parent
    server = start([str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                    str(prefect_port)], env, logs / "prefect_server.log")
    mlflow = start([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.tracking_uri, "--host",
                    "127.0.0.1", "--port", str(mlflow_port)], env, logs / "mlflow_ui.log")
    try:
        wait_until_up(f"{prefect_ui}/api/health", server, timeout=180)
        wait_until_up(f"{mlflow_ui}/health", mlflow, timeout=180)
        run_and_capture(args, env, prefect_ui, mlflow_ui, logs)
    finally:
        stop(mlflow)
        stop(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
