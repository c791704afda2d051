"""Multi-process training under torchrun: the process group and the few collectives that
training needs besides DistributedDataParallel's gradient all-reduce.

torchrun starts one process per rank and tells each one, in its environment, who it is
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and where rank 0 listens (``MASTER_ADDR``,
``MASTER_PORT``). Without that environment, or with ``WORLD_SIZE`` 1, nothing here touches
torch.distributed and every helper returns its input: training is the single-process code path.

The default group is gloo whatever the device: it carries small Python objects (the run plan,
each epoch's outcome, gathered predictions) from CPU memory. Training on CUDA adds an NCCL group
for the gradients (``gradient_group``). Every collective gives up after ``TIMEOUT``, so a rank
that hangs cannot keep the others waiting forever; a rank that dies closes its connections and
the others fail at their next collective at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

from dmqn_core.errors import DmqnError

# The longest one rank may wait for another inside a collective. Rank 0 alone writes the run
# store, the checkpoints and the inspection sample while the others wait (seconds to a minute).
TIMEOUT = timedelta(minutes=10)

_joined = False  # whether this process has joined torchrun's group (see process_group)

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # rank on this machine: the GPU this process uses

    @property
    def active(self) -> bool:
        """More than one process trains: collectives are real."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run store and checkpoints and prints progress."""
        return self.rank == 0


SINGLE = Context()


def context_from_env(environ: Mapping[str, str] | None = None) -> Context:
    """The context torchrun's environment describes; SINGLE when there is none or WORLD_SIZE is 1."""
    environ = os.environ if environ is None else environ
    try:
        world_size = int(environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return SINGLE
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not environ.get(name)]
        if missing:
            raise DmqnError(
                f"WORLD_SIZE is {world_size} but {', '.join(missing)} is not set; "
                "start multi-process training with torchrun"
            )
        return Context(int(environ["RANK"]), world_size, int(environ.get("LOCAL_RANK", "0")))
    except ValueError as exc:
        raise DmqnError(f"bad torchrun environment: {exc}") from None


@contextmanager
def process_group() -> Iterator[Context]:
    """Join the training processes for the duration of the block (nothing to join: SINGLE).

    A group the caller initialised itself is used as it is and left open; a group opened here
    is destroyed on the way out, also after an error. A process joins torchrun's group this way
    once: the key-value store behind MASTER_PORT outlives a destroyed group and keeps its keys,
    so a second join can pair a rank with its peer's stale address and wait until the timeout.
    A program that trains several runs in one launch calls
    ``torch.distributed.init_process_group("gloo")`` itself, first.
    """
    global _joined
    if dist.is_available() and dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        yield Context(dist.get_rank(), dist.get_world_size(), local_rank)
        return
    context = context_from_env()
    if not context.active:
        yield context
        return
    if _joined:
        raise DmqnError(
            "this process already trained a run of its torchrun launch; to train several, call "
            "torch.distributed.init_process_group('gloo') once before the first"
        )
    _joined = True
    dist.init_process_group("gloo", timeout=TIMEOUT, rank=context.rank, world_size=context.world_size)
    try:
        yield context
    finally:
        dist.destroy_process_group()


def rank_device(context: Context, device: str) -> torch.device:
    """The device of this process: ``device`` itself, but under torchrun ``cuda`` is the GPU of LOCAL_RANK."""
    if not context.active or not device.startswith("cuda"):
        return torch.device(device)
    if device != "cuda":
        raise DmqnError(
            f"under torchrun every process uses the GPU of its LOCAL_RANK: pass --device cuda, not {device}"
        )
    if context.local_rank >= torch.cuda.device_count():
        raise DmqnError(
            f"local rank {context.local_rank} has no GPU of its own: this machine shows "
            f"{torch.cuda.device_count()}; start at most that many processes per node"
        )
    torch.cuda.set_device(context.local_rank)
    return torch.device("cuda", context.local_rank)


def gradient_group(context: Context, device: torch.device) -> dist.ProcessGroup | None:
    """The group DDP all-reduces gradients in: a new NCCL group for CUDA, else the default (gloo) group.

    Every rank must call it, in the same order (creating a group is a collective).
    """
    if context.active and device.type == "cuda":
        # Every rank is a member (no ranks= given), so each gets a group: torch types the answer
        # ProcessGroup | int | None for the ranks left out of a group, which here are none.
        return cast("dist.ProcessGroup", dist.new_group(backend="nccl", timeout=TIMEOUT))
    return None


def gradient_backend(context: Context, device: torch.device) -> str | None:
    """The backend that carries the gradients, for the record; None for one process."""
    if not context.active:
        return None
    return "nccl" if device.type == "cuda" else "gloo"


def broadcast(context: Context, value: T) -> T:
    """Rank 0's ``value`` on every rank (a small picklable object)."""
    if not context.active:
        return value
    # The other ranks hold a placeholder until the call puts rank 0's value in its place.
    box: list[Any] = [value if context.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_main(context: Context, produce: Callable[[], T]) -> T:
    """``produce()`` run on rank 0 only, its value on every rank.

    If it raises on rank 0, every other rank raises a DmqnError with the same message instead of
    waiting for a value that never comes (rank 0 re-raises its own exception).
    """
    if not context.active:
        return produce()
    if context.is_main:
        try:
            value = produce()
        except Exception as exc:
            message = str(exc) if isinstance(exc, DmqnError) else f"{type(exc).__name__}: {exc}"
            broadcast(context, ("error", message))
            raise
        broadcast(context, ("value", value))
        return value
    # This rank's value is not sent: rank 0's ("error", message) or ("value", what produce() returned) replaces it.
    kind, payload = broadcast(context, ("", None))
    if kind == "error":
        raise DmqnError(payload)
    return cast(T, payload)


def gather(context: Context, value: Any) -> list[Any] | None:
    """Every rank's ``value``, in rank order, on rank 0; None on the other ranks."""
    if not context.active:
        return [value]
    out: list[Any] | None = [None] * context.world_size if context.is_main else None
    dist.gather_object(value, out, dst=0)
    return out


def all_reduce_sum(context: Context, values: list[float]) -> list[float]:
    """Elementwise sums of ``values`` over the ranks, on every rank (float64)."""
    if not context.active:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()
