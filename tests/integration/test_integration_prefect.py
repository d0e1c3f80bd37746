"""Against real services: a Prefect server on 127.0.0.1, the deployments of prefect.yaml, a process worker.

A `finetune` run is SIGKILLed mid-training together with its worker (a preempted machine), a concurrent second
trigger exits at once with "already running", and `finetune-resume` finishes the lineage into the same MLflow
run: resume count 1, no step logged twice, the export registered with its alias. Everything it starts, it stops.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from fidel_tts.flows.server import free_port
from fidel_tts.trainer.lock import AlreadyRunning, OutputDirLock
from fidel_tts.trainer.training.checkpoint import NAME, latest_valid_checkpoint
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "fidel-process"
STEPS, SAVE_EVERY, KILL_AFTER = 60, 10, 20


class Services:
    """Background processes in their own sessions, stopped (whole process group) at the end."""

    def __init__(self, env: dict, logs: Path):
        self.env, self.logs, self.procs = env, logs, {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = (proc, log)
        return proc

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        proc, log = self.procs.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):  # workers before the server they report to
            self.kill(name, signal.SIGTERM)

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.is_file() else ""
        return f"--- {name}.log ---\n" + "\n".join(text.splitlines()[-lines:])


def wait_for(predicate, timeout: float, what: str, services: Services):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    logs = "\n".join(services.tail(n) for n in ("server", "worker", "worker2") if (services.logs / f"{n}.log").exists())
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_run_file(project, tmp_path: Path, mlflow_uri: str) -> Path:
    run = {
        "train_manifests": [str(project.train_manifest)], "val_manifests": [str(project.val_manifest)],
        "tokenizer": str(project.tokenizer), "base_tokenizer": str(project.base_tokenizer),
        "config": str(project.base_config), "base_checkpoint": str(project.base_checkpoint),
        "output_dir": str(tmp_path / "out"), "tracking_uri": mlflow_uri, "run_name": "integration",
        "train": {"max_steps": STEPS, "batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 5, "log_interval": 5,
                  "val_interval": SAVE_EVERY, "save_interval": SAVE_EVERY, "keep_last": 10},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run), encoding="utf-8")
    return path


def test_killed_deployment_resumes_into_one_clean_mlflow_run(tiny_project, tmp_path, mlflow_uri):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect_home"), PREFECT_API_URL=api, PWD=str(REPO),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    logs = tmp_path / "logs"
    logs.mkdir()
    services = Services(env, logs)
    run_file = write_run_file(tiny_project, tmp_path, mlflow_uri)
    out = tmp_path / "out"
    lock_file = out / ".fidel.lock"
    try:
        # no scheduler: the cron of finetune-resume must not fire while the test drives the runs by hand
        services.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui",
                                  "--no-scheduler"])
        wait_for(lambda: healthy(f"{api}/health"), 90, "the Prefect server", services)
        for args in (["work-pool", "create", POOL, "--type", "process"], ["--no-prompt", "deploy", "--all"]):
            done = subprocess.run([PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
        services.start("worker", [PREFECT, "worker", "start", "--pool", POOL])

        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            def final_state(flow_run_id, timeout: float):
                def done():
                    state = client.read_flow_run(flow_run_id).state
                    return state if state is not None and state.is_final() else None
                return wait_for(done, timeout, f"flow run {flow_run_id} to finish", services)

            resume_deployment = client.read_deployment_by_name("fidel-finetune/finetune-resume")
            assert [s.schedule.cron for s in resume_deployment.schedules] == ["*/10 * * * *"]
            assert resume_deployment.parameters["resume"] == "auto"

            first = run_deployment("fidel-finetune/finetune", parameters={"run_config": str(run_file)}, timeout=0)
            holder = wait_for(lambda: (h := read_json(lock_file)) and h["flow_run_id"] == str(first.id) and h,
                              120, "the first run to take the output dir's lock", services)
            assert holder["host"] == socket.gethostname() and not holder["released"]

            # a concurrent second trigger on the same output dir: frozen first run, so it surely still holds the lock
            os.kill(holder["pid"], signal.SIGSTOP)
            try:
                second = run_deployment("fidel-finetune/finetune", parameters={"run_config": str(run_file)},
                                        timeout=0)
                state = final_state(second.id, 120)
            finally:
                os.kill(holder["pid"], signal.SIGCONT)
            assert state.type == StateType.COMPLETED, state
            assert f"already running (pid {holder['pid']}, host {holder['host']}" in state.message

            def mid_training():
                # a checkpoint at >= KILL_AFTER whose metrics are committed: the trainer tags checkpoint.step
                # after it logged them (a kill between writing a checkpoint and that commit is a known gap)
                run = read_json(out / "mlflow_run.json")
                if not run:
                    return False
                tags = MlflowClient(mlflow_uri).get_run(run["run_id"]).data.tags
                return KILL_AFTER <= int(tags.get("checkpoint.step", 0)) < STEPS
            wait_for(mid_training, 120, f"a committed checkpoint at step >= {KILL_AFTER}", services)
            # the machine is preempted: worker and flow process die at once, nobody reports the run's end
            os.kill(holder["pid"], signal.SIGKILL)
            services.kill("worker")
            wait_for(lambda: not Path(f"/proc/{holder['pid']}").exists(), 30, "the flow process to die", services)
            newest, _ = latest_valid_checkpoint(out)  # a checkpoint torn by the kill is passed over
            killed_at = int(NAME.match(newest.name).group(1))
            assert killed_at < STEPS and not (out / "finished.json").exists()
            assert client.read_flow_run(first.id).state.type == StateType.RUNNING  # stale on the server

            services.start("worker2", [PREFECT, "worker", "start", "--pool", POOL])
            third = run_deployment("fidel-finetune/finetune-resume", parameters={"run_config": str(run_file)},
                                   timeout=0)
            state = final_state(third.id, 240)
            assert state.type == StateType.COMPLETED, (state, services.tail("worker2", 80))
            stale = client.read_flow_run(first.id).state
            assert stale.type == StateType.CRASHED and "process gone" in stale.message, stale
    finally:
        services.stop_all()
        # flow processes run in sessions of their own: end the one still holding the lock after a failure
        try:
            OutputDirLock(out).acquire().release()
        except AlreadyRunning as busy:
            os.kill(busy.holder.pid, signal.SIGKILL)

    assert json.loads((out / "finished.json").read_text())["status"] == "completed"
    mlflow = MlflowClient(mlflow_uri)
    runs = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["resume.count"] == "1" and tags["triage.decision"] == "resume"
    assert int(tags["resume.from_step"]) == killed_at >= KILL_AFTER and tags["gates"] == "PASS"
    for key in run.data.metrics:
        steps = [m.step for m in mlflow.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} logs a step twice: {sorted(steps)}"
    curve = sorted(m.step for m in mlflow.get_metric_history(run.info.run_id, "train_mel_loss"))
    assert curve == list(range(5, STEPS + 1, 5)), "one clean curve: every logged step once, none missing"
    assert sorted(m.step for m in mlflow.get_metric_history(run.info.run_id, "val_mel_loss")) == list(
        range(0, STEPS + 1, SAVE_EVERY))
    assert any(k.startswith("system/") for k in run.data.metrics)
    version = mlflow.get_model_version_by_alias("fidel-am", "candidate")
    assert version.run_id == run.info.run_id
    [output] = run.outputs.model_outputs  # the export, logged once as the run's model
    assert output.model_id == run.data.tags["export.model_id"] and output.step == STEPS
    assert "gpt.pth" in {a.path for a in mlflow.list_logged_model_artifacts(output.model_id)}
    assert [a.path for a in mlflow.list_artifacts(run.info.run_id, "plots")] == ["plots/loss_curves.png"]
