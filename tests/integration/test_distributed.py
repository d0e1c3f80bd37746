"""DDP: a 2-process gloo run gives the same loss curve as 1 process with the same global batch."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from fidel_tts.flows.server import free_port
from fidel_tts.trainer.training.hooks import TrainHooks
from fidel_tts.trainer.training.trainer import train


def worker(rank: int, world: int, port: int, config: dict, record: str) -> None:
    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from fidel_tts.trainer.training.options import TrainConfig

    rows = []
    result = train(TrainConfig(**config), TrainHooks(on_commit=rows.extend))
    if rank == 0:
        with open(record, "w") as handle:
            json.dump({"rows": rows, "step": result.step, "status": result.status}, handle)
    import torch.distributed as dist

    dist.destroy_process_group()


def curves(rows: list) -> dict:
    out = {}
    for step, metrics in rows:
        for key, value in metrics.items():
            if key.endswith(("_loss", "_top1")):
                out[(key, step)] = value
    return out


@pytest.mark.slow
def test_two_ranks_match_one_process_with_the_same_global_batch(tiny_project, make_train_config, tmp_path):
    single_rows = []
    base = dict(max_steps=12, device="cpu", log_interval=2, val_interval=4, save_interval=6)
    single = train(make_train_config(tiny_project, tmp_path / "one", grad_accumulation=2, **base),
                   TrainHooks(on_commit=single_rows.extend))
    config = make_train_config(tiny_project, tmp_path / "two", grad_accumulation=1, **base).to_dict()
    record = tmp_path / "rank0.json"
    mp.spawn(worker, args=(2, free_port(), config, str(record)), nprocs=2, join=True)
    ddp = json.loads(record.read_text())
    assert single.status == ddp["status"] == "completed" and ddp["step"] == single.step == 12
    one, two = curves(single_rows), curves(ddp["rows"])
    assert one.keys() == two.keys() and len(one) > 20
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-5), key


# ----------------------------------------------------------------------------- two machines (c10d rendezvous)

ROOT = Path(__file__).resolve().parents[2]


def node_argv(project, out: Path, port: int, node_rank: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fidel_tts.flows.cli", "train", "--train-manifest", str(project.train_manifest),
            "--val-manifest", str(project.val_manifest), "--tokenizer", str(project.tokenizer),
            "--config", str(project.base_config), "--base-checkpoint", str(project.base_checkpoint),
            "--output-dir", str(out), "--device", "cpu", "--batch-size", "8", "--learning-rate", "3e-3",
            "--warmup-steps", "5", "--nnodes", "2", "--node-rank", str(node_rank),
            "--rdzv-endpoint", f"127.0.0.1:{port}", *extra]


def start_nodes(project, out: Path, *extra: str) -> dict[int, subprocess.Popen]:
    """Two "machines" on this one: node 1 starts first, so c10d's own numbering (by host, then agent pid) would
    make it rank 0; fidel's must not."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = {}
    for rank in (1, 0):
        nodes[rank] = subprocess.Popen(node_argv(project, out, port, rank, *extra), cwd=ROOT, env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(0.5)
    return nodes


def finish(nodes: dict[int, subprocess.Popen], timeout: float = 150) -> dict[int, tuple[int, str, str]]:
    done = {}
    for rank, process in nodes.items():
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in nodes.values():
                p.kill()
            raise
        done[rank] = (process.returncode, out, err)
    return done


def committed_rows(out: Path) -> list:
    """Every metric row the run committed, from the checkpoints that carry them (one per save)."""
    from fidel_tts.trainer.training.checkpoint import list_checkpoints, load_checkpoint

    return [row for path in list_checkpoints(out) for row in load_checkpoint(path)[0]["committed_rows"]]


@pytest.mark.slow
def test_two_nodes_match_one_process_with_accumulation_2(tiny_project, make_train_config, tmp_path):
    single_rows = []
    settings = dict(max_steps=12, device="cpu", log_interval=2, val_interval=4, save_interval=2, keep_last=20,
                    learning_rate=3e-3, warmup_steps=5)
    single = train(make_train_config(tiny_project, tmp_path / "one", grad_accumulation=2, **settings),
                   TrainHooks(on_commit=single_rows.extend))
    out = tmp_path / "two"
    nodes = finish(start_nodes(tiny_project, out, "--max-steps", "12", "--log-interval", "2", "--val-interval", "4",
                               "--save-every", "2", "--keep-checkpoints", "20"))
    assert nodes[0][0] == 0 and nodes[1][0] == 0, (nodes[0][2][-2000:], nodes[1][2][-2000:])
    assert "completed at step 12/12" in nodes[0][1] and "saved " in nodes[0][1]
    assert "saved " not in nodes[1][1] and "completed" not in nodes[1][1]  # rank 0, the saver, is on node 0
    one, two = curves(single_rows), curves(committed_rows(out))
    assert single.step == 12 and one.keys() == two.keys() and len(one) > 20
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_sigterm_on_one_node_saves_and_stops_both_then_both_resume(tiny_project, tmp_path):
    from fidel_tts.trainer.training.checkpoint import latest_valid_checkpoint, load_checkpoint

    out = tmp_path / "run"
    nodes = start_nodes(tiny_project, out, "--max-steps", "100000", "--log-interval", "1", "--val-interval", "1000",
                        "--save-every", "3")
    deadline = time.monotonic() + 120
    while latest_valid_checkpoint(out)[0] is None:  # training is under way on both nodes
        assert time.monotonic() < deadline and all(p.poll() is None for p in nodes.values()), \
            {rank: p.stderr.read()[-2000:] for rank, p in nodes.items() if p.poll() is not None}
        time.sleep(0.2)
    nodes[1].send_signal(signal.SIGTERM)  # a preemption notice on the node that does not save
    done = finish(nodes, timeout=90)
    assert done[0][0] == done[1][0] == 75, (done[0][2][-2000:], done[1][2][-2000:])
    newest, _ = latest_valid_checkpoint(out)
    state, meta = load_checkpoint(newest)
    assert meta["reason"] == "signal" and "preempted at step" in done[0][1]
    stopped = state["step"]

    resumed = finish(start_nodes(tiny_project, out, "--resume", "auto", "--max-steps", str(stopped + 2),
                                 "--log-interval", "1", "--val-interval", "1000", "--save-every", "1000"))
    assert resumed[0][0] == resumed[1][0] == 0, (resumed[0][2][-2000:], resumed[1][2][-2000:])
    assert f"completed at step {stopped + 2}/{stopped + 2}" in resumed[0][1]
    assert load_checkpoint(latest_valid_checkpoint(out)[0])[0]["step"] == stopped + 2


@pytest.mark.slow
def test_two_machines_with_the_same_node_rank_stop_with_one_line(tiny_project, tmp_path):
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1"}
    machines = []
    for rank in (0, 1, 1):
        argv = node_argv(tiny_project, tmp_path / "out", port, rank, "--max-steps", "2")
        argv[argv.index("--nnodes") + 1] = "3"
        machines.append(subprocess.Popen(argv, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE))
    for code, _, err in finish(dict(enumerate(machines))).values():  # every one stops, none waits for the rest
        assert code == 2 and "error: --node-rank 1: given to more than one machine of this job" in err
    assert not any((tmp_path / "out").glob("*.pt"))


@pytest.mark.slow
def test_node_0_that_cannot_host_the_rendezvous_stops_with_one_line(tiny_project, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(node_argv(tiny_project, tmp_path / "out", port, 0, "--max-steps", "2"), cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True, capture_output=True, timeout=120)
    assert done.returncode == 2
    assert f"error: --rdzv-endpoint 127.0.0.1:{port}: node 0 cannot host the rendezvous there" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("flags, line", [
    (["--nnodes", "2"], "error: --nnodes (launch.nnodes) 2: needs --rdzv-endpoint HOST:PORT, node 0's address"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:29500"],
     "error: --node-rank (launch.node_rank) 2: must be below --nnodes 2"),
    (["--nnodes", "2", "--rdzv-endpoint", "h"],
     "error: --rdzv-endpoint: expected HOST:PORT (node 0's address and a free port), got 'h'"),
    (["--nnodes", "0"], "error: --nnodes: must be at least 1, got 0"),
])
def test_bad_launch_flags_are_one_line_before_anything_starts(tmp_path, capsys, flags, line):
    from fidel_tts.flows.cli import main

    out = tmp_path / "out"
    assert main(["train", "--train-manifest", "a", "--val-manifest", "b", "--output-dir", str(out), *flags]) == 2
    assert capsys.readouterr().err.strip() == line and not out.exists()


def test_the_run_file_takes_the_launch_settings(tmp_path):
    from fidel_tts.tasks.spec import run_spec_from_dict
    from fidel_tts.trainer.errors import FidelError

    paths = {k: "x" for k in ("tokenizer", "base_tokenizer", "config", "base_checkpoint", "output_dir")}
    raw = {**paths, "train_manifests": "a", "val_manifests": "b"}
    spec = run_spec_from_dict({**raw, "launch": {"nproc": 8, "nnodes": 2, "rdzv_endpoint": "gpu-0:29500"}},
                              tmp_path / "run.yaml")
    assert spec.launch_options().node_rank == 0 and spec.launch_options(node_rank=1).node_rank == 1
    assert (spec.launch_options().nproc, spec.launch_options().nnodes) == (8, 2)
    with pytest.raises(FidelError, match=r"run.yaml: --nnodes \(launch.nnodes\) 2: needs --rdzv-endpoint"):
        run_spec_from_dict({**raw, "launch": {"nnodes": 2}}, tmp_path / "run.yaml")
    with pytest.raises(FidelError, match="unknown setting.*launch.freeze_conditioning"):
        run_spec_from_dict({**raw, "launch": {"freeze_conditioning": True}}, tmp_path / "run.yaml")


def test_torchrun_gets_c10d_across_machines_and_node_0_hosts_the_store():
    from fidel_tts.trainer.training.distributed import torchrun_args

    assert torchrun_args(4) == ["--nproc_per_node=4", "--standalone"]
    follower = torchrun_args(2, nnodes=3, node_rank=1, rdzv_endpoint="gpu-0:29500")
    assert {"--nnodes=3", "--node_rank=1", "--rdzv_backend=c10d", "--rdzv_endpoint=gpu-0:29500"} <= set(follower)
    assert "is_host=0" in follower[-1] and "is_host=1" in torchrun_args(2, 3, 0, "gpu-0:29500")[-1]


@pytest.mark.slow
def test_the_flow_training_stage_runs_in_torchrun_workers(tiny_project, make_train_config, tmp_path):
    """What `fidel run` does with launch.nproc 2 (and, per machine, with launch.nnodes): the training stage's
    workers are started from Python, rank 0 with the stage's hooks; its result comes back to the flow."""
    from fidel_tts.tasks.train import launched_training
    from fidel_tts.trainer.training.options import LaunchOptions

    settings = dict(max_steps=6, device="cpu", log_interval=3, val_interval=3, save_interval=3)
    single = train(make_train_config(tiny_project, tmp_path / "one", grad_accumulation=2, **settings))
    launched = launched_training(make_train_config(tiny_project, tmp_path / "two", **settings), None,
                                 LaunchOptions(nproc=2))
    assert launched.status == single.status == "completed" and launched.step == single.step == 6
    assert launched.checkpoint == tmp_path / "two" / "ckpt-step00000006.pt"
    assert len(launched.val_history) == len(single.val_history) == 3
    for mine, theirs in zip(launched.val_history, single.val_history, strict=True):
        for key in ("val_text_loss", "val_mel_loss"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5), key


FOLLOWER = """
import json, sys
from fidel_tts.flows.finetune import finetune
print("FOLLOWER " + json.dumps(finetune(settings=json.load(open(sys.argv[1])), node_rank=1)))
"""


@pytest.mark.slow
def test_two_node_flow_node_0_runs_every_stage_node_1_joins_its_training(tiny_project, tmp_path, mlflow_uri):
    """One run file for both machines; the flow's node_rank parameter tells them apart."""
    from fidel_tts.flows.finetune import finetune
    from mlflow import MlflowClient

    out = tmp_path / "out"
    run = {**tiny_project.flow_settings(out, mlflow_uri, max_steps=8),
           "launch": {"nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{free_port()}"}}
    (tmp_path / "run.json").write_text(json.dumps(run))
    follower = subprocess.Popen([sys.executable, "-c", FOLLOWER, str(tmp_path / "run.json")], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_HOME": str(tmp_path / "node1")})
    try:
        summary = finetune(settings=run)
        stdout, stderr = follower.communicate(timeout=300)
    finally:
        follower.kill()
    assert summary["status"] == "completed" and summary["step"] == 8
    assert follower.returncode == 0, stderr[-3000:]
    joined = json.loads(stdout.split("FOLLOWER ", 1)[1])
    assert joined == {"status": "completed", "node_rank": 1, "step": 8}
    assert (out / "node-1" / ".fidel.lock").is_file()  # node 1's own lock, beside node 0's
    history = MlflowClient(mlflow_uri).get_metric_history(summary["mlflow_run_id"], "train_mel_loss")
    assert history, "rank 0 (on node 0, in a torchrun worker) logs to the flow's MLflow run"
