"""Shared fixtures: a tiny generated project, and isolated Prefect and MLflow stores per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip where CUDA is not available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


LEFT_BEHIND: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def prefect_server(tmp_path_factory):
    """One Prefect server for the whole session, in a throwaway PREFECT_HOME, with no analytics: tests never touch
    the user's Prefect. It is fidel's own temporary server (fidel_tts/flows/server.py: its own session, dead with
    pytest even after SIGKILL), so every flow called in-process and every `fidel run` started as a subprocess
    talks to it instead of starting one each; its startup wait fits a busy 2-core machine."""
    from fidel_tts.flows.server import temporary_server

    home = tmp_path_factory.mktemp("prefect_home")
    saved = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_API_URL",
                                            "MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI")}
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    for key in ("PREFECT_API_URL", "MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI"):
        os.environ.pop(key, None)
    with temporary_server(timeout=600) as url:
        yield url
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    LEFT_BEHIND.extend(stop_descendants())


def stop_descendants() -> list[str]:
    """Every process the suite started and left running, killed and named."""
    import psutil

    left = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "multiprocessing.resource_tracker" in " ".join(child.cmdline()):
                continue  # Python's own helper of this process: it ends when pytest closes its pipe
            left.append(f"{child.pid} {' '.join(child.cmdline())[:160]}")
            child.kill()
        except psutil.NoSuchProcess:
            pass
    return left


def pytest_sessionfinish(session, exitstatus):
    """No process outlives the suite: one that was still running at the end fails the run."""
    if LEFT_BEHIND:
        session.config.get_terminal_writer().line("processes left running by the tests (killed):\n  "
                                                  + "\n  ".join(LEFT_BEHIND), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def tiny_project_template(tmp_path_factory):
    from tests.fixtures.synthetic import make_tiny_project

    return make_tiny_project(tmp_path_factory.mktemp("tiny") / "project")


@pytest.fixture
def tiny_project(tiny_project_template, tmp_path):
    """A private copy of the tiny project, so a test may write beside it or break it."""
    from dataclasses import replace

    src = tiny_project_template.root
    dst = tmp_path / "project"
    shutil.copytree(src, dst)
    moved = {k: dst / Path(v).relative_to(src) for k, v in vars(tiny_project_template).items()
             if isinstance(v, Path) and Path(v).is_relative_to(src)}
    return replace(tiny_project_template, **moved)


@pytest.fixture(scope="session")
def mlflow_store_template(tmp_path_factory):
    """Creating an MLflow sqlite store runs its migrations (~6 s): do it once, copy it per test."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow_template")
    MlflowClient(f"sqlite:///{folder}/mlflow.db").search_experiments()
    return folder / "mlflow.db"


@pytest.fixture
def mlflow_uri(mlflow_store_template, tmp_path):
    folder = tmp_path / "mlruns"
    folder.mkdir()
    shutil.copyfile(mlflow_store_template, folder / "mlflow.db")
    return f"sqlite:///{folder}/mlflow.db"


@pytest.fixture(scope="session")
def make_train_config():
    """TrainConfig for the tiny project: a few dozen fast steps with frequent validation and saves."""
    return tiny_train_config


def tiny_train_config(project, output_dir, **overrides):
    from fidel_tts.trainer.training.options import TrainConfig

    settings = dict(train_manifests=[str(project.train_manifest)], val_manifests=[str(project.val_manifest)],
                    tokenizer=str(project.tokenizer), config=str(project.base_config), output_dir=str(output_dir),
                    base_checkpoint=str(project.base_checkpoint), max_steps=30, batch_size=8, learning_rate=3e-3,
                    warmup_steps=5, log_interval=5, val_interval=10, save_interval=10)
    settings.update(overrides)
    return TrainConfig(**settings)
