"""Model blocks: a causal LM cut into named groups of parameters, and the tensor math on them.

A block is `embed` (everything that runs before the first decoder layer, tied output head included),
`layers.{i}` (one decoder layer, or `layers.{i}-{j}` for k layers per block) or `head` (everything that
runs after the last decoder layer: final norm, untied lm_head). The decoder layers are found by
structure (the largest homogeneous `nn.ModuleList`) and "before/after" by tracing one tiny forward
pass, so any Hugging Face causal LM works without per-family names (Llama, Qwen2, Mistral, GPT-2,
OPT with its project_in/project_out, ...).

Everything below the partition is plain tensor code on `dict[str, Tensor]` keyed by parameter name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .sharding import full, local_part

Tensors = dict[str, Tensor]

EMBED = "embed"
HEAD = "head"


@dataclass(frozen=True)
class Block:
    """A named, ordered group of parameter names (as in `model.named_parameters()`)."""

    name: str
    params: tuple[str, ...]


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's layer list: the `ModuleList` of same-typed modules holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size and (best is None or size > best[0]):
            best = (size, name, module)
    if best is None:
        raise ValueError(
            f"{type(model).__name__}: no decoder layer list found (expected an nn.ModuleList of identical layers)"
        )
    return best[1], best[2]


def _execution_order(model: nn.Module) -> dict[int, int]:
    """First-execution index of every module that owns parameters directly, from one 2-token forward."""
    order: dict[int, int] = {}
    hooks = []

    def record(module: nn.Module, _args) -> None:
        order.setdefault(id(module), len(order))

    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            hooks.append(module.register_forward_pre_hook(record))
    modes = {m: m.training for m in model.modules()}
    model.eval()  # no dropout: the trace draws nothing from the global generators
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device))
    finally:
        for m, training in modes.items():
            m.training = training
        for hook in hooks:
            hook.remove()
    return order


def partition(model: nn.Module, layers_per_block: int = 1) -> list[Block]:
    """Cut `model` into blocks: `embed`, `layers.*` (k layers each), `head`. Every parameter is in one block."""
    if layers_per_block < 1:
        raise ValueError(f"layers_per_block must be >= 1, got {layers_per_block}")
    layer_prefix, layers = find_decoder_layers(model)
    names = {id(p): n for n, p in model.named_parameters()}  # tied parameters appear once

    # Parameters inside the decoder layers, by layer index.
    layer_of: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            layer_of[id(p)] = i

    # Everything else is embed or head by when its owning module first runs.
    order = _execution_order(model)
    first_layer_run = min((order[id(m)] for m in layers.modules() if id(m) in order), default=0)
    first_run: dict[int, int] = {}  # param -> earliest run of any module owning it (tied weights)
    is_embedding: dict[int, bool] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in layer_of:
                continue
            is_embedding[id(p)] = is_embedding.get(id(p), False) or isinstance(module, nn.Embedding)
            if id(module) in order:
                first_run[id(p)] = min(first_run.get(id(p), order[id(module)]), order[id(module)])
    side: dict[int, str] = {}
    for pid, embedding in is_embedding.items():
        if pid in first_run:
            side[pid] = EMBED if first_run[pid] < first_layer_run else HEAD
        else:  # never executed: guess from the module type
            side[pid] = EMBED if embedding else HEAD

    blocks: list[Block] = []
    embed = tuple(n for pid, n in names.items() if side.get(pid) == EMBED)
    if embed:
        blocks.append(Block(EMBED, embed))
    n_layers = len(layers)
    for start in range(0, n_layers, layers_per_block):
        stop = min(start + layers_per_block, n_layers)
        params = tuple(n for pid, n in names.items() if start <= layer_of.get(pid, -1) < stop)
        name = f"layers.{start}" if stop - start == 1 else f"layers.{start}-{stop - 1}"
        blocks.append(Block(name, params))
    head = tuple(n for pid, n in names.items() if side.get(pid) == HEAD)
    if head:
        blocks.append(Block(HEAD, head))
    covered = sum(len(b.params) for b in blocks)
    if covered != len(names):  # a parameter in no block would silently never train
        raise AssertionError(f"partition covers {covered} of {len(names)} parameters under {layer_prefix}")
    return blocks


def block_params(model: nn.Module, block: Block) -> dict[str, nn.Parameter]:
    """The live parameters of `block` (not copies)."""
    params = dict(model.named_parameters())
    return {n: params[n] for n in block.params}


def set_trainable(model: nn.Module, blocks: Iterable[Block]) -> list[nn.Parameter]:
    """`requires_grad` on exactly the parameters of `blocks`; returns them.

    With every parameter below the lowest trainable block frozen, autograd computes no gradient there.
    """
    wanted = {n for b in blocks for n in b.params}
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)
        if name in wanted:
            trainable.append(p)
    return trainable


# ---- tensor math on {name: tensor} ---------------------------------------------------------------


def snapshot(tensors: Mapping[str, Tensor]) -> Tensors:
    """Detached copies (the start values s_b of a local round)."""
    return {n: t.detach().clone() for n, t in tensors.items()}


def delta(current: Mapping[str, Tensor], start: Mapping[str, Tensor]) -> Tensors:
    """current − start, in float32 (the block's change that travels)."""
    return {n: current[n].detach().float() - start[n].detach().float() for n in start}


def take_delta_(current: Mapping[str, Tensor], start: Mapping[str, Tensor]) -> Tensors:
    """Δ = current − start (float32), and current ← start + Δ.

    The second half is the rounding the coordinator applies when it adds Δ to the global copy of the
    block (g + Δ in float32, with g = start). Doing the same here keeps a worker's own copy identical
    to the global one it will receive, so exchanging deltas adds no error of its own.
    """
    d = delta(current, start)
    with torch.no_grad():
        for n, t in current.items():
            t.copy_(start[n].float() + d[n])
    return d


class HostCopy(Mapping[str, Tensor]):
    """CPU copies of a device block's tensors, still being made (`to_host_async`): the names at once,
    the values once the copy is complete. Reading a value waits for the copy, on the reading thread
    (the communication thread), so the thread that queued the copy never waits for it."""

    def __init__(self, host: Tensors, done) -> None:
        """`host`: the (pinned) CPU tensors being filled; `done`: what completes with the copy, a
        torch.cuda.Event (anything with `query()` and `synchronize()`)."""
        self._host, self._done = host, done

    def ready(self) -> bool:
        """Whether the copy is complete (never waits)."""
        return bool(self._done.query())

    def wait(self) -> None:
        """Until the copy is complete."""
        self._done.synchronize()

    def __getitem__(self, name: str) -> Tensor:
        self.wait()
        return self._host[name]

    def __contains__(self, name: object) -> bool:  # names need no waiting (Mapping's would read the value)
        return name in self._host

    def __iter__(self):
        return iter(self._host)

    def __len__(self) -> int:
        return len(self._host)


def to_host_async(tensors: Mapping[str, Tensor], stream: torch.cuda.Stream | None = None) -> Mapping[str, Tensor]:
    """The same values on the CPU, without the calling thread waiting for a device.

    CPU tensors: `tensors` itself (nothing is copied). Tensors on one CUDA device: a `HostCopy`, their
    copy into pinned host memory queued on `stream` (default: a side stream from torch's pool), after
    all the work queued so far on the caller's current stream (which produces them); the caller goes on
    queueing work at once and the copy overlaps it. The caller must not write the tensors afterwards;
    it may drop them at once: their device memory is not reused before the copy has read it. The
    pinned buffers come from torch's caching host allocator, which reuses them once the reader has
    dropped its copy and the copy's event has passed. Sharded tensors (sharding.py) are gathered
    first: every rank must call it then."""
    if any(isinstance(t, DTensor) for t in tensors.values()):
        tensors = {n: full(t) for n, t in tensors.items()}
    devices = {t.device for t in tensors.values()}
    if all(d.type == "cpu" for d in devices):
        return tensors
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        raise ValueError(f"to_host_async: tensors on {sorted(map(str, devices))}; expected the CPU or one CUDA device")
    device = devices.pop()
    side = stream if stream is not None else torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))  # after the kernels that compute the tensors
    host: Tensors = {}
    with torch.cuda.stream(side):
        for n, t in tensors.items():
            host[n] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host[n].copy_(t, non_blocking=True)
            t.record_stream(side)  # freed by the caller: its memory waits for the side stream's copy
    done = torch.cuda.Event(blocking=True)  # a waiting reader sleeps rather than spins
    done.record(side)
    return HostCopy(host, done)


def add_scaled_(target: Mapping[str, Tensor], update: Mapping[str, Tensor], scale: float = 1.0) -> None:
    """target += scale · update, in place, tensor by tensor."""
    with torch.no_grad():
        for n, u in update.items():
            target[n].add_(local_part(u.to(target[n].dtype), target[n]), alpha=scale)


def assign_(target: Mapping[str, Tensor], values: Mapping[str, Tensor]) -> None:
    """target ← values, in place (keeps optimizer references to the parameters valid). A sharded
    target takes its part of the whole value."""
    with torch.no_grad():
        for n, v in values.items():
            target[n].copy_(local_part(v, target[n]))


def rebase_(current: Mapping[str, Tensor], start: Mapping[str, Tensor], new_global: Mapping[str, Tensor]) -> None:
    """ParaBlock correction for the block being trained when a newer global copy of it arrives.

    w ← g + (w − s) and s ← g: the worker keeps its own progress since s and moves it onto the new
    global values. In place, so the optimizer's state stays attached to the same tensors.
    """
    with torch.no_grad():
        for n, g in new_global.items():
            w, s = current[n], start[n]
            g = local_part(g, s)
            # w + (g − s), not g + (w − s): the same in exact arithmetic, but g − s is exactly 0 when the
            # patch carries the block unchanged (a resync), so such a patch changes nothing at all.
            w.add_(g - s)
            s.copy_(g)


def tensor_bytes(tensors: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def canonical_sha256(tensors: Mapping[str, Tensor], names: Iterable[str]) -> bytes:
    """SHA-256 of a block's canonical form: for each tensor in `names` order, its name, its shape and
    its values as little-endian float32 bytes. Two copies of a block agree exactly when this agrees,
    whatever dtype or device they are held in (a bfloat16 copy hashes as its float32 values). A sharded
    tensor is gathered: every rank must call it then."""
    import hashlib

    h = hashlib.sha256()
    for name in names:
        t = full(tensors[name].detach()).to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())  # numpy's float32 is little-endian on every platform we run on
    return h.digest()
