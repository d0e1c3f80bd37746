"""Screenshot a fidel run in the MLflow UI with headless Chromium (Debian: `apt-get install -y chromium`).

    .venv/bin/python -m scripts.mlflow_screenshot --tracking-uri sqlite:///mlruns/mlflow.db --out run.png

It serves the store with `mlflow ui` on 127.0.0.1 (a free port), opens the run's page (`--page model-metrics`, the
run's metric charts; `--page metric` one metric across steps; `--page overview` params and tags), saves a PNG and
stops the server. Without --run-id it takes the newest run of the experiment.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from fidel_tts.flows.server import free_port


def find_run(tracking_uri: str, experiment: str, run_id: str | None):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    if run_id:
        return client.get_run(run_id)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1) if exp \
        else []
    if not runs:
        sys.exit(f"error: no run in experiment {experiment!r} of {tracking_uri}")
    return runs[0]


def page_url(base: str, page: str, experiment_id: str, run_id: str, metric: str) -> str:
    if page == "metric":  # the query the UI itself builds for its metric page
        quote = urllib.parse.quote
        query = (f"runs={json.dumps([run_id])}&metric={quote(json.dumps(metric))}&experiments="
                 f"{json.dumps([experiment_id])}&plot_metric_keys={quote(json.dumps([metric]))}&plot_layout={{}}"
                 "&x_axis=step&y_axis_scale=linear&line_smoothness=1&show_point=true&deselected_curves=[]"
                 "&last_linear_y_axis_range=[]")
        return f"{base}/#/metric?{query.replace(' ', '')}"
    tab = "/model-metrics" if page == "model-metrics" else ""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}{tab}?workflowType=machine_learning"  # training layout


def wait_until_up(url: str, server: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"error: mlflow ui exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"error: mlflow ui did not answer at {url} within {timeout:.0f} s")


def stop(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the process group started with start_new_session, SIGKILL after timeout."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    sys.exit("error: no chromium found; on Debian: apt-get install -y chromium")


def screenshot(url: str, out: Path, width: int, height: int, wait_ms: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
            "--no-first-run", "--no-default-browser-check", "--run-all-compositor-stages-before-draw",
            f"--window-size={width},{height}",
            f"--virtual-time-budget={wait_ms}", f"--screenshot={out.resolve()}", url]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not out.is_file():
        sys.exit(f"error: chromium failed ({done.returncode}): {done.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db")
    p.add_argument("--experiment", default="fidel")
    p.add_argument("--run-id")
    p.add_argument("--page", choices=["model-metrics", "metric", "overview"], default="model-metrics")
    p.add_argument("--metric", default="train_mel_loss", help="for --page metric")
    p.add_argument("--out", default="mlflow_run.png")
    p.add_argument("--size", default="1600x1500", help="window WIDTHxHEIGHT")
    p.add_argument("--wait-ms", type=int, default=90000,
                   help="virtual time budget: the page's timers run this far (charts load lazily) before the shot")
    args = p.parse_args(argv)

    run = find_run(args.tracking_uri, args.experiment, args.run_id)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.tracking_uri,
                               "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until_up(f"{base}/health", server)
        url = page_url(base, args.page, run.info.experiment_id, run.info.run_id, args.metric)
        width, height = (int(v) for v in args.size.split("x"))
        screenshot(url, Path(args.out), width, height, args.wait_ms)
    finally:
        stop(server)
    print(f"{args.out}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
