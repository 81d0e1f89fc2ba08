"""A model sharded over the ranks of a site with FSDP2 (torch's `fully_shard`), for a model whose
weights do not fit one device.

Each decoder layer is one FSDP unit and the rest of the model (embeddings, final norm, output head:
tied weights stay in one unit) the root's. Every rank keeps its part of each tensor (rows, dim 0); a
unit's whole weights exist only while it runs forward or backward, then are freed. Parameters keep
their names, so blocks, patches and deltas name them as before; they are DTensors, and the helpers here
move values between whole tensors (what travels) and this rank's part.

The gradients of the trained block are reduce-scattered as sums (divide factor 1), because the trainer
already weights each rank's loss by its share of the site's tokens (parallel.py): the sum is the
gradient one process takes on the whole batch. Every rank must run every unit's forward and backward in
the same order: FSDP's gathers are collectives.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def shard_model(model: nn.Module, layers: Iterable[nn.Module], device: torch.device, group=None) -> None:
    """Shard `model` in place over the ranks of `group` (None: the default group): each of `layers`
    one unit, the rest the root's. A model on the CPU moves to `device` unit by unit, so the device
    never holds more than its parts and one whole unit."""
    mesh = DeviceMesh.from_group(group or dist.group.WORLD, device.type)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no pre-multiplied one)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def mine(t: Tensor) -> Tensor:
    """This rank's part of `t` (`t` itself where it is not sharded)."""
    return t.to_local() if isinstance(t, DTensor) else t


def held(model: nn.Module) -> tuple[int, int]:
    """(elements of the parameters this rank holds, elements of the whole model's parameters)."""
    return sum(mine(p).numel() for p in model.parameters()), sum(p.numel() for p in model.parameters())


def full(t: Tensor) -> Tensor:
    """The whole tensor: a DTensor is gathered from every rank (a collective: every rank calls it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_part(value: Tensor, like: Tensor) -> Tensor:
    """`value`, a whole tensor that every rank has, as a DTensor sharded as `like` is (each rank
    slices out its part: no communication); `value` itself where `like` is not sharded."""
    if not isinstance(like, DTensor) or isinstance(value, DTensor):
        return value
    return distribute_tensor(value.to(like.to_local().device), like.device_mesh, like.placements, src_data_rank=None)
