"""Data-parallel helpers around torch.distributed (torchrun sets the environment; compute.World reads it).

A job of N ranks trains like one process at the same global batch: every rank holds the same seeded
generators and draws the whole batch's example indices, t and noise, then takes its slice (rank r: rows
r*b .. (r+1)*b - 1, b = batch / N). DistributedDataParallel averages the gradients, so the update equals the
one-process update up to float rounding. Rank 0 alone writes; what every rank needs from a file (a checkpoint
to resume) is read by rank 0 and broadcast, so nodes need not share a file system.
With one process every helper here is the identity (or does nothing).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .compute import Compute, World


def launched() -> bool:
    """True inside a torchrun job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def session(compute: Compute, timeout_s: float = 1800.0) -> Iterator[None]:
    """The process group of this rank for the duration of the block (nothing for one process)."""
    w = compute.world
    if w.world_size == 1:
        yield
        return
    if compute.device.type == "cuda":
        torch.cuda.set_device(compute.device)
    dist.init_process_group(w.backend, rank=w.rank, world_size=w.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device, world: World) -> nn.Module:
    """DistributedDataParallel around `model` (which keeps its own parameters); the model itself when alone."""
    if world.world_size == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def gather(x: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's equally shaped x, concatenated in rank order along dim 0 (on every rank)."""
    if world.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_objects(obj: Any, world: World) -> list[Any]:
    """[rank 0's obj, rank 1's, ...] on every rank."""
    if world.world_size == 1:
        return [obj]
    out: list[Any] = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's obj on every rank."""
    if world.world_size == 1:
        return obj
    box = [obj if world.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.world_size > 1:
        dist.barrier()


def rank_slice(n: int, world: World) -> slice:
    """This rank's rows of a global batch of n (n divisible by the world size)."""
    if n % world.world_size:
        raise ValueError(f"a batch of {n} does not split over {world.world_size} ranks; use a multiple of it")
    b = n // world.world_size
    return slice(world.rank * b, (world.rank + 1) * b)


def torchrun_command(nproc: int, module_args: list[str]) -> list[str]:
    """`torchrun --standalone --nproc_per_node N -m ...` with this interpreter (the venv's torch)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *module_args]


def relaunch(nproc: int, module_args: list[str], threads: int = 0) -> int:
    """`torchrun --standalone --nproc_per_node nproc -m MODULE ARGS` (module_args = ["-m", MODULE, *ARGS]), run
    by torchrun's own code in this process, so that a failing rank's one-line error is not followed by
    torchrun's report of it. Returns the first failing rank's exit status (0: all succeeded). `threads`: torch
    threads per rank (0: OMP_NUM_THREADS, else torchrun's default of one)."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if threads or "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(threads or 1)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the ranks speak for themselves
    try:
        run(parse_args(torchrun_command(nproc, module_args)[3:]))
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        return first.exitcode or 1
    return 0
