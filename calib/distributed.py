"""Calibration over several processes with torch.distributed (gloo): which batches each rank
streams, the reductions that merge the ranks' statistics, agreement on failures, and how ranks start.

Ranks start under torchrun (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment, on one
machine or several) or from `workers=N` (`ptq quantize --workers N`): the calling process is rank 0,
hosts the rendezvous store on a port the system picks, and spawns N − 1 helpers that join it. Rank r
streams a contiguous run of whole calibration batches (`Shard.part`), so every batch is the batch one
process sees. Ranges merge by min/max; histogram counts (coarsened to the merged range's bins) and
fixed-point moment sums (`calib.exactsum`, each unit the ranks used) by integer addition; and
per-batch Fisher terms are gathered and added in batch order: the statistics are the bits one process computes at the ranks' thread count. A failure on
any rank is agreed on before the next reduction (`Shard.agreed`): rank 0 reports it in one line and
every rank exits with its code; none waits for a peer that is gone.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import PtqError, first_line

BACKEND = "gloo"  # the statistics are CPU tensors
HOST = "127.0.0.1"  # where `workers=N` ranks meet (one machine)
ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankError(PtqError):
    """Another rank failed before a reduction (`rank R of N: ...`, with that rank's exit code).
    Rank 0 reports it; the other ranks exit with the code and print nothing, so a run says it once."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def launched() -> tuple[int, int]:
    """(rank, world size) torchrun gave this process; (0, 1) when it was not started by torchrun."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    missing = [k for k in ENV if k not in os.environ]
    if missing:
        raise PtqError(f"WORLD_SIZE is set but {', '.join(missing)} is not: start ranks with torchrun "
                       "(or unset WORLD_SIZE to run one process)")
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise PtqError(f"RANK and WORLD_SIZE must be integers; got {os.environ['RANK']!r}, {os.environ['WORLD_SIZE']!r}") from None
    if not (world >= 1 and 0 <= rank < world):
        raise PtqError(f"RANK {rank} is not one of the WORLD_SIZE {world} ranks; start ranks with torchrun")
    return rank, world


@dataclass
class Shard:
    """This process's place among the calibration ranks; one process is Shard(0, 1), whose
    reductions do nothing. The process group is joined at the first collective, so loading the
    model overlaps the helpers' start-up."""

    rank: int = 0
    world: int = 1
    store: Any = field(default=None, repr=False)  # rank 0's rendezvous store under workers=N (else env://)
    joined: bool = False

    def part(self, n: int) -> range:
        """This rank's contiguous run of n items (batches): ranks differ in size by at most one."""
        return range(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def join(self) -> None:
        if self.joined or self.world == 1:
            return
        import torch.distributed as dist
        if not dist.is_initialized():
            if self.store is not None:
                dist.init_process_group(BACKEND, store=self.store, rank=self.rank, world_size=self.world)
            else:
                dist.init_process_group(BACKEND, init_method="env://", rank=self.rank, world_size=self.world)
        self.joined = True

    @contextmanager
    def agreed(self) -> Iterator[None]:
        """Run the block on every rank, then agree: if any rank raised, every rank raises — rank 0
        its own error if it failed, else a RankError naming the lowest failing rank."""
        failure: Exception | None = None
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - every failure is exchanged, then raised again
            failure = exc
        if self.world == 1:
            if failure is not None:
                raise failure
            return
        import torch.distributed as dist
        self.join()
        mine = None if failure is None else _outcome(failure)
        outcomes: list[Any] = [None] * self.world
        dist.all_gather_object(outcomes, mine)
        failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
        if not failed:
            return
        r, (code, text) = failed[0]
        if self.rank == 0 and failure is not None:
            raise failure
        raise RankError(f"rank {r} of {self.world}: {text}", code)

    def minimum(self, a: np.ndarray) -> None:
        self._reduce(a, "MIN")

    def maximum(self, a: np.ndarray) -> None:
        self._reduce(a, "MAX")

    def add(self, a: np.ndarray) -> None:
        """In place: the element-wise sum over ranks (int64, or float64 holding integers: exact)."""
        self._reduce(a, "SUM")

    def _reduce(self, a: np.ndarray, op: str) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist
        self.join()
        dist.all_reduce(torch.from_numpy(a), op=getattr(dist.ReduceOp, op))

    def gather(self, items: list) -> list:
        """Every rank's `items`, concatenated in rank order."""
        if self.world == 1:
            return list(items)
        import torch.distributed as dist
        self.join()
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, list(items))
        return [x for part in parts for x in part]


def _outcome(exc: Exception) -> tuple[int, str]:
    if isinstance(exc, RankError):
        return exc.exit_code, str(exc)
    if isinstance(exc, PtqError):
        return exc.exit_code, first_line(exc)
    return 1, f"internal error: {type(exc).__name__}: {first_line(exc)}"


@contextmanager
def ranks(workers: int | None, helper: Callable[..., None], helper_args: tuple = ()) -> Iterator[Shard]:
    """The ranks of one calibration, as a Shard for this process.

    Under torchrun (or in a process whose torch.distributed group is already set up), this rank of
    that world; `workers` must be None. With workers = N > 1, this process is rank 0: it hosts the
    rendezvous store and starts `helper(i, world, port, threads, *helper_args)` for i = 0 … N − 2 in
    spawned processes, which become ranks 1 … N − 1 (`helper_rank`); each rank, this one included
    until the block ends, uses its share of this process's torch threads. Otherwise one process."""
    rank, world = launched()
    import torch.distributed as dist
    if world > 1 or dist.is_initialized():
        if workers is not None:
            raise PtqError("--workers / workers= starts ranks itself; under torchrun (or in a process with a "
                           "torch.distributed group) leave it out: the ranks are already there")
        if dist.is_initialized():  # someone else's group (a helper_rank, a user's script): theirs to end
            yield Shard(dist.get_rank(), dist.get_world_size(), joined=True)
            return
        shard = Shard(rank, world)
        try:
            yield shard
            if shard.joined:
                dist.barrier()  # every rank's last collective: none closes its sockets while a peer still reads
        finally:
            if shard.joined:
                dist.destroy_process_group()
        return
    if workers is None or workers == 1:
        yield Shard()
        return
    yield from _local(workers, helper, helper_args)


def _local(world: int, helper: Callable[..., None], helper_args: tuple) -> Iterator[Shard]:
    import torch.distributed as dist
    import torch.multiprocessing as mp
    store = dist.TCPStore(HOST, 0, world, True, wait_for_workers=False)
    threads = torch.get_num_threads()
    share = max(1, threads // world)
    procs = mp.start_processes(helper, args=(world, store.port, share, *helper_args), nprocs=world - 1,
                               join=False, start_method="spawn").processes
    torch.set_num_threads(share)
    shard = Shard(0, world, store=store)
    ok = False
    try:
        yield shard
        if shard.joined:
            dist.barrier()
        ok = True
    finally:
        torch.set_num_threads(threads)
        if not ok:  # a helper may be waiting in a collective this process will never reach
            for p in procs:
                p.terminate()
        if shard.joined:
            dist.destroy_process_group()
        for p in procs:
            p.join()


@contextmanager
def helper_rank(index: int, world: int, port: int, threads: int) -> Iterator[int]:
    """In a process `ranks` spawned: rank index + 1 of `world`, joined to rank 0's store, with
    `threads` torch threads; the group ends with the block (after a last barrier if it succeeded)."""
    import torch.distributed as dist
    torch.set_num_threads(threads)
    rank = index + 1
    store = dist.TCPStore(HOST, port, world, False)
    dist.init_process_group(BACKEND, store=store, rank=rank, world_size=world)
    try:
        yield rank
        dist.barrier()
    finally:
        dist.destroy_process_group()
