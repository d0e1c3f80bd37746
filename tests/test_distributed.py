"""DDP: a 2-process gloo run gives the same loss curve as 1 process with the same global batch."""

import json
import os
import socket

import pytest
import torch.multiprocessing as mp

from trainer.train import TrainHooks, train

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, config: dict, record: str) -> None:
    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from trainer.train import TrainConfig

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
