"""Multi-GPU with torchrun and DDP: which rank am I, collectives that are no-ops on one process, and the
launcher behind `fidel train --nproc N`."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_from_env(device_type: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(values: torch.Tensor, env: Dist) -> torch.Tensor:
    if env.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(flag: bool, env: Dist, device: torch.device) -> bool:
    """True on every rank when it is true on any: all ranks stop at the same step."""
    return any_ranks([flag], env, device)[0]


def any_ranks(flags: list[bool], env: Dist, device: torch.device) -> list[bool]:
    """any_rank of several flags in one collective."""
    if not env.enabled:
        return list(flags)
    values = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [value > 0 for value in values.tolist()]


def barrier(env: Dist) -> None:
    if env.enabled:
        dist.barrier()


def shutdown(env: Dist) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this `fidel train` command under torchrun with nproc workers on this machine."""
    from torch.distributed.run import main as torchrun

    args = [f"--nproc_per_node={nproc}", "--standalone", "-m", "flows.cli", *argv]
    try:
        torchrun(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    except Exception as exc:  # ChildFailedError: a worker exited non-zero (75 when preempted)
        codes = [f.exitcode for f in getattr(exc, "failures", {}).values() if f.exitcode and f.exitcode > 0]
        if not codes:
            print(f"error: torchrun: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return codes[0] if codes else 1
    return 0
