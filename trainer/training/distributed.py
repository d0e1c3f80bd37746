"""Multi-GPU and multi-node with torchrun and DDP: which rank am I, collectives that are no-ops on one process,
and the launcher behind `fidel train --nproc N [--nnodes N --node-rank R --rdzv-endpoint HOST:PORT]`.

Across machines torchrun's c10d rendezvous numbers the nodes itself (by host name and agent pid). fidel numbers
them by --node-rank instead, so that global rank 0 (the one that saves and reports) runs on node 0, where the
flow runs its other stages: the launcher hands the node rank to its workers, and each claims its slot in the
rendezvous store before the process group starts, so that two machines given the same node rank stop with one
line instead of hanging.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
from fidel_tts.trainer.errors import EXIT_PREEMPTED, FidelError
from fidel_tts.trainer.process import Dist

NODE_RANK_ENV, NNODES_ENV = "FIDEL_NODE_RANK", "FIDEL_NNODES"  # from the launcher to its workers
RENDEZVOUS_JOIN_S = 1800  # node 0 joins only after the flow's data checks: the others wait that long


def init_from_env(device_type: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        if NODE_RANK_ENV in os.environ:
            os.environ["RANK"] = str(node_ordered_rank(world))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def node_ordered_rank(world: int) -> int:
    """node rank × processes per node + local rank, once every worker of the job has claimed its slot in the
    rendezvous store (the agents' store, torchrun's default with c10d)."""
    node, nnodes = int(os.environ[NODE_RANK_ENV]), int(os.environ[NNODES_ENV])
    local, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    if world != nnodes * local_world:
        raise FidelError(None, f"--nproc: every machine must start the same number of processes ({world} in the "
                               f"job, {local_world} on this one, --nnodes {nnodes})")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        raise FidelError(None, "--nnodes: torchrun's shared rendezvous store is off "
                               "(TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1); unset it")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timedelta(seconds=RENDEZVOUS_JOIN_S))
    prefix = f"fidel/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    store.add(f"{prefix}/node/{node}/{local}", 1)
    if store.add(f"{prefix}/joined", 1) == world:
        store.set(f"{prefix}/all", "1")
    store.wait([f"{prefix}/all"])
    # every worker reads every slot, so all of them stop on a shared node rank (none waits for a missing one)
    shared = [n for n in range(nnodes) if store.check([f"{prefix}/node/{n}/0"])
              and int(store.get(f"{prefix}/node/{n}/0")) > 1]
    if shared:
        raise FidelError(None, f"--node-rank {shared[0]}: given to more than one machine of this job; give each "
                               f"its own, 0 to {nnodes - 1}")
    return node * local_world + local


def from_rank0(compute, env: Dist):
    """compute() run on rank 0 alone, its result on every rank; an error there is raised on every rank."""
    if not env.enabled:
        return compute()
    box = [None]
    if env.main:
        try:
            box[0] = ("value", compute())
        except FidelError as exc:
            box[0] = ("fidel", (exc.path, exc.problem))
        except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
            box[0] = ("error", f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "fidel":
        raise FidelError(*value)
    if kind == "error":
        raise RuntimeError(f"on rank 0: {value}")
    return value


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


def exit_process(code: int) -> NoReturn:
    """End a torchrun launcher or worker with `code`, skipping the interpreter's teardown: torch's C++ threads
    (the rendezvous TCPStore, gloo) can abort it with "terminate called without an active exception", and a
    SIGABRT there would replace exit 75 (preempted, resumable) with a crash. Neither has anything left to clean."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def torchrun_args(nproc: int, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None) -> list[str]:
    """torchrun's options: standalone on one machine; c10d rendezvous at rdzv_endpoint across machines."""
    if nnodes == 1:
        return [f"--nproc_per_node={nproc}", "--standalone"]
    # node 0 hosts the rendezvous store, the others wait for it: the store lives as long as the saving node
    conf = f"join_timeout={RENDEZVOUS_JOIN_S},read_timeout={RENDEZVOUS_JOIN_S},is_host={int(node_rank == 0)}"
    return [f"--nproc_per_node={nproc}", f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={rdzv_endpoint}", "--rdzv_id=fidel", f"--rdzv_conf={conf}"]


def tell_workers(nnodes: int, node_rank: int) -> None:
    """The node rank for node_ordered_rank: workers inherit the launcher's environment."""
    if nnodes > 1:
        os.environ[NODE_RANK_ENV], os.environ[NNODES_ENV] = str(node_rank), str(nnodes)


def launch_function(entrypoint, args: tuple, nproc: int, nnodes: int = 1, node_rank: int = 0,
                    rdzv_endpoint: str | None = None) -> dict:
    """entrypoint(*args) in torchrun's workers, started from Python (the flow's training stage), with the same
    rendezvous as launch_torchrun: {torchrun's global rank: return value} of this machine's workers. A SIGTERM/SIGINT reaches the workers and raises
    SignalException here; a worker that failed raises ChildFailedError."""
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    options = parse_args([*torchrun_args(nproc, nnodes, node_rank, rdzv_endpoint), "fidel"])
    if options.standalone:  # what torchrun's run() does for --standalone
        options.rdzv_backend, options.rdzv_endpoint, options.rdzv_id = "c10d", "localhost:0", uuid.uuid4().hex
    tell_workers(nnodes, node_rank)
    return elastic_launch(config_from_args(options)[0], entrypoint)(*args)


def launch_torchrun(nproc: int, argv: list[str], nnodes: int = 1, node_rank: int = 0,
                    rdzv_endpoint: str | None = None) -> int:
    """Re-run this `fidel` command under torchrun: nproc workers here, on each of nnodes machines.

    Exit code: the first failing worker's (75 when preempted). A SIGTERM/SIGINT to this launcher is passed on to
    its workers by torchrun; they save and stop with every other rank, so the node reports 75 as well."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.rendezvous import RendezvousConnectionError
    from torch.distributed.run import main as torchrun

    tell_workers(nnodes, node_rank)
    try:
        torchrun([*torchrun_args(nproc, nnodes, node_rank, rdzv_endpoint), "-m", "fidel_tts.flows.cli", *argv])
    except SystemExit as exc:
        return int(exc.code or 0)
    except SignalException as exc:
        if exc.sigval in (signal.SIGTERM, signal.SIGINT):
            return EXIT_PREEMPTED
        return 128 + int(exc.sigval)
    except RendezvousConnectionError as exc:
        cause = str(exc.__cause__ or exc).strip().splitlines()[0]
        problem = ("node 0 cannot host the rendezvous there: the port is taken (by another machine given "
                   "--node-rank 0?)" if node_rank == 0 else
                   f"cannot reach node 0's rendezvous there within {RENDEZVOUS_JOIN_S} s")
        raise FidelError(None, f"--rdzv-endpoint {rdzv_endpoint}: {problem} ({cause})") from None
    except Exception as exc:  # ChildFailedError: a worker exited non-zero (75 when preempted)
        codes = [f.exitcode for f in getattr(exc, "failures", {}).values() if f.exitcode and f.exitcode > 0]
        if not codes:
            print(f"error: torchrun: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return codes[0] if codes else 1
    return 0
