"""A preemption signals the whole process group: `fidel run` with its temporary server saves, ends with exit 75
and one line, and the same command finishes the lineage; the server never outlives fidel (fidel_tts/flows/server.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
FIDEL = [sys.executable, "-m", "fidel_tts.flows.cli"]


def own_server_env() -> dict:
    """The environment of a user without a Prefect server: fidel starts its temporary one."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    return env


def servers_of(pid: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if "fidel_tts.flows.server" in p.cmdline()]
    except psutil.NoSuchProcess:
        return []


def gone(procs: list[psutil.Process], timeout: float) -> bool:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return not alive


HOLDER = textwrap.dedent("""
    import signal, sys, time
    from fidel_tts.flows.server import temporary_server, healthy
    signal.signal(signal.SIGTERM, signal.SIG_IGN if sys.argv[1] == "ignore" else signal.SIG_DFL)
    with temporary_server(timeout=600) as url:
        print(url, flush=True)
        time.sleep(600)
""")


def hold_a_server(tmp_path: Path, on_sigterm: str) -> tuple[subprocess.Popen, str, list[psutil.Process]]:
    env = {**own_server_env(), "PREFECT_HOME": str(tmp_path / "prefect_home")}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, on_sigterm], stdout=subprocess.PIPE, text=True, env=env,
                            cwd=REPO, start_new_session=True)
    url = proc.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:"), url
    servers = servers_of(proc.pid)
    assert len(servers) == 1
    return proc, url, servers


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_the_server_dies_with_the_process_that_started_it(tmp_path, how):
    proc, _, servers = hold_a_server(tmp_path, "default")
    os.kill(proc.pid, how)
    proc.wait(timeout=30)
    assert gone(servers, timeout=30), [s.cmdline() for s in servers]


@pytest.mark.slow
def test_a_signal_to_the_group_does_not_reach_the_server(tmp_path):
    from fidel_tts.flows.server import healthy

    proc, url, servers = hold_a_server(tmp_path, "ignore")
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(2)
        assert healthy(url) and servers[0].is_running()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert gone(servers, timeout=30)


def group_signal_run(command: list[str], started, sig: int, env: dict, timeout: float = 420, after_s: float = 0):
    """Start command in a process group of its own, wait for started(line), signal the whole group. Returns the
    exit code, seconds from the signal to the exit, the output, and the servers it had."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=env, start_new_session=True)
    lines, servers = [], []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        servers = servers or servers_of(proc.pid)
        if started(line) or time.monotonic() > deadline:
            break
    time.sleep(after_s)
    sent = time.monotonic()
    os.killpg(proc.pid, sig)
    rest = proc.communicate(timeout=120)[0]
    return proc.returncode, time.monotonic() - sent, "".join(lines) + rest, servers


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_fidel_run_with_its_temporary_server_survives_a_group_signal_and_resumes(tiny_project, tmp_path, sig):
    settings = tiny_project.flow_settings(tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db", max_steps=1500,
                                          save_interval=5000, val_interval=750)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(settings))
    env = {**own_server_env(), "PREFECT_HOME": str(tmp_path / "prefect_home")}
    command = [*FIDEL, "run", "--config", str(tmp_path / "run.yaml"), "--no-progress"]
    code, seconds, output, servers = group_signal_run(command, lambda line: "training: step 0/" in line, sig, env,
                                                        after_s=3)
    last = output.strip().splitlines()[-1]
    assert code == 75 and last.startswith("preempted: preempted at step "), output[-3000:]
    assert seconds < 30 and "Traceback" not in output
    assert servers and gone(servers, timeout=15)

    from mlflow import MlflowClient

    client = MlflowClient(settings["tracking_uri"])
    [run] = client.search_runs([client.get_experiment_by_name("fidel").experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["status"] == "preempted"

    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=420)
    assert again.returncode == 0, again.stderr[-3000:]
    [resumed] = client.search_runs([client.get_experiment_by_name("fidel").experiment_id])
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"


@pytest.mark.slow
def test_a_group_signal_before_training_ends_with_exit_75_and_one_line(tiny_project, tmp_path):
    settings = tiny_project.flow_settings(tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db", max_steps=4)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(settings))
    env = {**own_server_env(), "PREFECT_HOME": str(tmp_path / "prefect_home")}
    command = [*FIDEL, "run", "--config", str(tmp_path / "run.yaml"), "--no-progress"]
    code, seconds, output, _ = group_signal_run(command, lambda line: "Beginning flow run" in line,
                                                signal.SIGTERM, env)
    last = output.strip().splitlines()[-1]
    assert code == 75 and last.startswith("preempted: "), output[-3000:]
    assert seconds < 30 and "Traceback" not in output
