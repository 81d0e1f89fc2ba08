"""A site of several processes under torch.distributed: rank 0 leads, the other ranks follow.

One federated identity per site. Rank 0 is an ordinary worker (the session, the communication
threads, the compute thread). Its compute thread tells the other ranks, on a control channel (a gloo
group: pickled messages broadcast from rank 0), everything that changes the local model, at the point
where it does it: the run's start (its join answer and the model's files), each patch it applies, each
task it starts, each step boundary of a task (after the patches it applied there) and each look at
whether to stop. The followers run the same algorithm on the same model with the same calls in the same
order, so every rank's copy stays the same, and the trainer's gradient sums (parallel.py) line up:
every collective of a rank runs on its one compute thread. Only rank 0 talks to the coordinator.

When a rank dies, the next collective of every other rank fails, each exits with an error, and
torchrun takes the site down (and, with --max-restarts, brings it back: rank 0 joins the run again).
While rank 0 waits for work it sends a keep-alive every KEEPALIVE_S, so a dead follower is noticed then
too; a rank waits on the others at most --rank-timeout.
"""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..common import blocks as B
from ..common.config import ConfigError
from ..common.messages import Assignment, Patch, RunInfo

log = logging.getLogger("fedblock.site")
KEEPALIVE_S = 5.0


@dataclass(frozen=True)
class Place:
    """This process's place in its site: torchrun's RANK, WORLD_SIZE and LOCAL_RANK."""

    rank: int
    ranks: int
    local_rank: int

    @property
    def leader(self) -> bool:
        return self.rank == 0


def place_from_env() -> Place | None:
    """Under torchrun with more than one process: this process's place; otherwise None."""
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks <= 1:
        return None
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={ranks} without {', '.join(missing)}: start a site of several processes "
                          "with torchrun (or fedblock worker --nproc-per-node)")
    return Place(int(os.environ["RANK"]), ranks, int(os.environ.get("LOCAL_RANK", "0")))


def site_device(place: Place, requested: torch.device) -> torch.device:
    """A CUDA site gives each process of a node its own GPU (its local rank)."""
    return torch.device("cuda", place.local_rank) if requested.type == "cuda" else requested


def join_site(place: Place, device: torch.device, timeout_s: float):
    """Join the site's process group (NCCL for CUDA, gloo otherwise); returns the control group."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    env, timeout = os.environ, timedelta(seconds=timeout_s)
    # torchrun's store outlives a restart of the site, and with it the last attempt's gloo addresses, which
    # the new processes would try to reach (and time out on): each attempt keys its own under a prefix.
    # Every attempt starts every rank once, so each rank's count of its starts is the attempt's number
    # (torchrun's restart count is per node, and not counted where a node restarts for another's sake).
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), place.ranks, timeout=timeout,
                          is_master=env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and place.rank == 0)
    attempt = store.add(f"fedblock/starts/{place.rank}", 1)
    store = dist.PrefixStore(f"fedblock/attempt-{attempt}", store)
    dist.init_process_group(backend, store=store, rank=place.rank, world_size=place.ranks, timeout=timeout)
    log.info("rank %d of %d (%s, %s)", place.rank, place.ranks, backend, device)
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if backend != "gloo" else None


def leave_site() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- messages on the control channel --------------------------------------------------------------

@dataclass(frozen=True)
class Start:
    info: RunInfo
    files: dict[str, bytes] = field(repr=False)  # the model's config and tokenizer files, by relative path
    shard: bool = False  # the model is sharded over the ranks once built (rank 0's --shard-model)


@dataclass(frozen=True)
class Apply:
    patch: Patch


@dataclass(frozen=True)
class Task:
    assignment: Assignment


@dataclass(frozen=True)
class Boundary:
    changed: bool  # the patches sent since the last look changed the model


@dataclass(frozen=True)
class Flag:
    stop: bool


@dataclass(frozen=True)
class KeepAlive:
    pass


@dataclass(frozen=True)
class End:
    pass


class LockstepError(RuntimeError):
    """The ranks no longer run the same calls, or their copies of the model differ."""


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprint(local, names) -> list[int]:
    """A checksum of blocks `names` of the local model: integer sums of the values' bit patterns, which
    no thread count or device changes (a float sum would). The ranks compare theirs after each task, so
    that a rank whose copy drifted stops the site instead of training on silently. A sharded tensor
    has one copy, each rank its part: there is nothing to compare, and it is left out."""
    out = []
    for name in names or local.blocks:  # a task of no named blocks (zeroth-order): the whole model
        for t in B.block_params(local.model, local.blocks[name]).values():
            if isinstance(t, DTensor):
                continue
            bits = t.detach().contiguous().view(_BITS[t.element_size()]).long()
            out += [int(bits.sum()), int(((bits & 0xFFFF) * (bits >> 16)).sum())]
    return out


def agree(mine: list[int], group=None) -> None:
    """Every rank calls it with its fingerprint; raises LockstepError unless all are equal."""
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    if any(other != everyone[0] for other in everyone):
        raise LockstepError("the ranks' copies of the trained blocks differ after a task")


# ---- rank 0 --------------------------------------------------------------------------------------

class Lockstep:
    """What rank 0's compute thread tells the followers. This one, for a process alone, tells nobody."""

    def start(self, info: RunInfo, model_dir: Path, shard: bool = False) -> None: ...

    def apply(self, patch: Patch) -> None: ...

    def task(self, a: Assignment) -> None: ...

    def boundary(self, changed: bool) -> None: ...

    def idle(self) -> None: ...

    def done(self, local, a: Assignment) -> None:
        """The task `a` is done (not stopped): the ranks compare their copies of its blocks."""

    def end(self) -> None: ...

    def stop_flag(self, stop):
        """What the algorithm looks at to stop: `stop` itself, or one whose every look the ranks share."""
        return stop


class Leader(Lockstep):
    def __init__(self, group=None):
        self.group = group
        self._last = time.monotonic()
        self._ended = False

    def _send(self, message) -> None:
        broadcast(message, self.group)
        self._last = time.monotonic()

    def start(self, info: RunInfo, model_dir: Path, shard: bool = False) -> None:
        files = {str(p.relative_to(model_dir)): p.read_bytes() for p in sorted(model_dir.rglob("*")) if p.is_file()}
        self._send(Start(info, files, shard))

    def apply(self, patch: Patch) -> None:
        self._send(Apply(patch))

    def task(self, a: Assignment) -> None:
        self._send(Task(a))

    def boundary(self, changed: bool) -> None:
        self._send(Boundary(changed))

    def idle(self) -> None:
        if time.monotonic() - self._last >= KEEPALIVE_S:
            self._send(KeepAlive())

    def done(self, local, a: Assignment) -> None:
        agree(fingerprint(local, a.blocks), self.group)

    def end(self) -> None:
        """The compute thread is done: the followers leave. After a failed collective (a rank died) the
        others notice their own failure; this tells them nothing more."""
        if self._ended:
            return
        self._ended = True
        try:
            self._send(End())
        except RuntimeError as e:
            log.warning("could not tell the other ranks to stop: %s", e)

    def stop_flag(self, stop):
        return _SharedStop(self, stop)


class _SharedStop:
    """Rank 0's stop, looked at once for all ranks: each look is sent to the followers."""

    def __init__(self, leader: Leader, stop):
        self.leader, self.stop = leader, stop

    def is_set(self) -> bool:
        flag = self.stop.is_set()
        self.leader._send(Flag(flag))
        return flag


# ---- ranks 1.. -----------------------------------------------------------------------------------

class Channel:
    """A follower's end of the control channel."""

    def __init__(self, group=None):
        self.group = group
        self.ended = False

    def receive(self):
        message = broadcast(None, self.group)
        if isinstance(message, End):
            self.ended = True
        return message


class _Pickler(pickle.Pickler):
    """Pickles everything but tensors, which it lists (they travel as raw bytes, `broadcast`)."""

    def __init__(self, file, tensors: list):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors = tensors

    def persistent_id(self, obj):
        if isinstance(obj, torch.Tensor):
            self.tensors.append(obj)
            return len(self.tensors) - 1
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, tensors: list):
        super().__init__(file)
        self.tensors = tensors

    def persistent_load(self, pid):
        return self.tensors[pid]


def broadcast(message, group=None):
    """Rank 0's `message` on every rank of `group` (the others pass None). The message is pickled
    without its tensors, each of which is then broadcast as its bytes into a buffer of its own: a patch
    costs its size once on each side, not the several copies of pickling it whole."""
    tensors: list = []
    header: list = [None, None]
    leader = dist.get_rank() == 0
    if leader:
        buffer = io.BytesIO()
        _Pickler(buffer, tensors).dump(message)
        header = [buffer.getvalue(), [(t.dtype, tuple(t.shape)) for t in tensors]]
    dist.broadcast_object_list(header, src=0, group=group)
    data, specs = header
    received = []
    for i, (dtype, shape) in enumerate(specs):
        if leader:
            flat = tensors[i].detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        else:
            flat = torch.empty(math.prod(shape) * torch.empty((), dtype=dtype).element_size(), dtype=torch.uint8)
        if flat.numel():
            dist.broadcast(flat, src=0, group=group)
        received.append(flat.view(dtype).reshape(shape))
    return message if leader else _Unpickler(io.BytesIO(data), received).load()
