"""Prefect's temporary server, owned by fidel: in a session of its own, stopped by fidel, dead with fidel.

Prefect starts its temporary ("ephemeral") server as a plain child. A preemption that signals the whole process
group (a machine shutting down, systemd, `kill -- -PGID`, Ctrl-C) then kills the server together with fidel,
and the save that follows, the flow's final state and the MLflow bookkeeping all fail against a dead API. Here
the server runs in its own session, out of the group's reach, and asks the kernel to end it when fidel's process
ends (PR_SET_PDEATHSIG), so it cannot outlive a fidel that was SIGKILLed either.

`python -m fidel_tts.flows.server ARGS` is that child: it arms the death signal, then runs uvicorn with ARGS.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

STARTUP_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_STARTUP_TIMEOUT_S = 180  # Prefect waits 20 s; a busy 2-core machine takes 5-60 s
PR_SET_PDEATHSIG = 1


class ServerDidNotStart(RuntimeError):
    pass


def startup_timeout() -> float:
    return float(os.environ.get(STARTUP_TIMEOUT) or DEFAULT_STARTUP_TIMEOUT_S)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(port: int) -> list[str]:
    """Prefect's own uvicorn command for its temporary server (prefect.server.api.server.SubprocessASGIServer)."""
    import prefect

    return [sys.executable, "-m", "fidel_tts.flows.server", "--app-dir", str(prefect.__module_path__.parent),
            "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]


def server_env() -> dict[str, str]:
    from prefect.settings import get_current_settings

    return {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
            "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
            "FIDEL_SERVER_PARENT": str(os.getpid())}


def healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until_up(process: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerDidNotStart(f"Prefect's temporary server exited with code {process.returncode} at start")
        if healthy(url):
            return
        time.sleep(0.2)
    raise ServerDidNotStart(f"Prefect's temporary server did not start within {timeout:g} s: raise "
                            f"{STARTUP_TIMEOUT}, or set PREFECT_API_URL to a running server")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s: the whole session, in case uvicorn started anything of its own."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def temporary_server(timeout: float | None = None) -> Iterator[str]:
    """Start the server, point Prefect at it (settings and the environment, so child processes find it too),
    and stop it on the way out, whatever ends the block. Yields the API URL."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    process = subprocess.Popen(server_command(port), env=server_env(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    saved = os.environ.get("PREFECT_API_URL")
    try:
        wait_until_up(process, url, startup_timeout() if timeout is None else timeout)
        os.environ["PREFECT_API_URL"] = url
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        flush_prefect_logs()
        stop(process)
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved


def flush_prefect_logs(timeout: float = 30) -> None:
    """Send the run logs and events Prefect still holds while the server can take them (it would try at exit,
    after the server is gone)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout)


@contextlib.contextmanager
def prefect_api(timeout: float | None = None) -> Iterator[str]:
    """The server a command talks to: the one PREFECT_API_URL names, else a temporary one of fidel's own."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    with temporary_server(timeout) as url:
        yield url


def die_with_parent(parent: int) -> None:
    """Arm SIGTERM for when the process that started this one ends; if it is already gone, end now."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        sys.exit(0)


def main() -> None:
    die_with_parent(int(os.environ["FIDEL_SERVER_PARENT"]))
    import runpy

    sys.argv = ["uvicorn", *sys.argv[1:]]
    runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
