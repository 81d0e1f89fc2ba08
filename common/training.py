"""Local training of some blocks of a causal LM, and held-out evaluation.

`BlockTrainer` is the whole of a worker's optimisation: `requires_grad` only on the assigned blocks and
an AdamW state only for them, new for every round. With the round's batches fixed by (seed, round)
(data.BatchStream) and every random draw of a step (dropout, which stays on where the model has it)
seeded from (seed, round, step), a round's update is a function of the global model and the assignment
alone: a round run twice gives the same delta, which is what makes a resumed run equal an
uninterrupted one.
The same class drives centralised block-coordinate training in tests, which is how we check that
federation adds no error of its own.

`task_loss` is the loss everywhere one is computed: the causal-LM loss of the replies, or for a
classification batch (data.collate's choice_ids / choice_label) the cross-entropy over the choices'
answer-token logits at each prompt's last token (as MeZO and DeComFL score SST-2 and the like).
`evaluate` adds the accuracy of the choices' argmax for such data.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import sharding
from .blocks import Block, find_decoder_layers, set_trainable
from .data import IGNORE_INDEX, DataError, TokenizedExample, collate
from .parallel import DataParallel


@dataclass(frozen=True)
class OptimConfig:
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm of the trained blocks; 0 disables
    # Recompute decoder layers in the backward pass instead of storing their activations: "auto" only as
    # many of the layers above the trained block as `checkpointed_layers` says it takes to keep the peak
    # at MEMORY_TARGET of full fine-tuning's, "on" all of them, "off" none.
    gradient_checkpointing: str = "auto"


GRADIENT_CHECKPOINTING = ("auto", "on", "off")
# What "auto" aims at, as a fraction of full fine-tuning's peak memory: DESIGN's 0.5, less a margin for
# the estimate's error (benchmarks/memory.py measures the result).
MEMORY_TARGET = 0.48


def checkpointed_layers(config, total: int, trainable: int, above: int, tokens: int, element_size: int,
                        target: float = MEMORY_TARGET, baseline: int = 0) -> int:
    """How many of the `above` decoder layers that backward runs through to reach the trained blocks
    must be checkpointed for a peak of at most `target` x full fine-tuning's: the fewest, as each costs
    a forward pass again. A model of the peak from the sizes alone (checked against benchmarks/memory.py):
    the process's `baseline` bytes besides the weights (libraries, data), the weights, the gradients,
    AdamW's two moments and its step's temporaries of what is trained, a stored layer's activations
    (per token (8 hidden + 4 intermediate) values: attention and MLP inputs, norms, residuals, the MLP's
    gate, up and product), a checkpointed layer's input only, and the logits with their gradient."""
    hidden = int(config.hidden_size)
    inner = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    layers = int(getattr(config, "num_hidden_layers", above) or above)
    stored, kept = tokens * (8 * hidden + 4 * inner) * element_size, tokens * hidden * element_size
    logits = 2 * tokens * vocab * 4
    full = baseline + 4 * total * element_size + layers * stored + logits
    block = baseline + total * element_size + 5 * trainable * element_size + above * stored + logits
    need = block - target * full
    if need <= 0 or above * (stored - kept) < 0.02 * block:  # within target, or nothing worth recomputing
        return 0
    return min(above, math.ceil(need / (stored - kept)))


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over the trained positions, and their number.

    The logits (tokens × vocabulary: the largest tensors of a small model's step, 200 MB for 8 × 128
    tokens of a 49k vocabulary) are computed only for the trained tokens: an SFT batch trains on the
    replies only, a fraction of its tokens. Where the model's logits are its output head applied to its
    base model's last hidden state (checked once per model), the head sees exactly the trained tokens;
    otherwise the model's own `logits_to_keep` keeps the positions trained in any row.
    """
    targets = batch["labels"][:, 1:]
    trained = targets != IGNORE_INDEX
    n = int(trained.sum())
    if n == 0:
        return torch.zeros((), device=targets.device), 0
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if _head_is_separable(model):
        hidden = model.base_model(**inputs).last_hidden_state[:, :-1]
        logits = model.get_output_embeddings()(hidden[trained])
        chosen = targets[trained]
    else:
        positions = trained.any(dim=0).nonzero().squeeze(1)
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            logits = model(**inputs, logits_to_keep=positions).logits
        else:
            logits = model(**inputs).logits[:, positions]
        chosen = targets[:, positions]
        logits = logits.reshape(-1, logits.shape[-1])
    loss = F.cross_entropy(logits.float(), chosen.reshape(-1), ignore_index=IGNORE_INDEX)
    return loss, n


def task_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The batch's loss and its weight: for a classification batch ("choice_ids" in it) the mean
    cross-entropy of the right choice among the choices' logits (`choice_logits`) and the number of
    rows; otherwise exactly `causal_lm_loss`."""
    if "choice_ids" in batch:
        logits = choice_logits(model, batch)
        return F.cross_entropy(logits, batch["choice_label"]), int(logits.shape[0])
    return causal_lm_loss(model, batch)


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (attention_mask 1), whether the batch is padded on the right
    or on the left."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)
    last = torch.where(attention_mask.bool(), positions, -1).max(dim=1).values
    if bool((last < 0).any()):
        raise ValueError("a row of the batch has no real token")
    return last


def choice_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, C] float32: the logits of each row's choice tokens (batch["choice_ids"]) at its last real
    token, i.e. the next-token scores of the answers after the prompt. Only the last positions go
    through the output head (through `logits_to_keep` where the head is not separable)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    last = last_positions(batch["attention_mask"])
    rows = torch.arange(last.shape[0], device=last.device)
    if _head_is_separable(model):
        hidden = model.base_model(**inputs).last_hidden_state[rows, last]
        logits = model.get_output_embeddings()(hidden)
    elif "logits_to_keep" in inspect.signature(model.forward).parameters:
        positions, index = torch.unique(last, return_inverse=True)
        logits = model(**inputs, logits_to_keep=positions).logits[rows, index]
    else:
        logits = model(**inputs).logits[rows, last]
    return logits.gather(1, batch["choice_ids"]).float()


def _head_is_separable(model: nn.Module) -> bool:
    """Are the model's logits exactly output_head(base_model(x).last_hidden_state)? (Not where a model
    scales or soft-caps its logits, for instance.) Checked on a tiny input, once per model."""
    known = getattr(model, "_fedblock_separable_head", None)
    if known is not None:
        return known
    head, base = model.get_output_embeddings(), getattr(model, "base_model", None)
    separable = False
    # Sharded, only the whole model's forward gathers the embeddings and the head (sharding.py).
    if head is not None and not sharding.is_sharded(model) and base is not None and base is not model:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                device = next(model.parameters()).device
                ids = torch.arange(1, 9, device=device).reshape(1, 8) % max(2, model.config.vocab_size)
                mask = torch.ones_like(ids)
                whole = model(input_ids=ids, attention_mask=mask).logits
                split = head(base(input_ids=ids, attention_mask=mask).last_hidden_state)
                separable = whole.shape == split.shape and torch.allclose(whole, split, rtol=1e-4, atol=1e-5)
        except (AttributeError, TypeError, RuntimeError):
            separable = False
        finally:
            model.train(was_training)
    model._fedblock_separable_head = separable
    return separable


# torch's generators are global to the process: seeded steps of workers that share one (tests run
# several as threads) take turns, so that no step draws from another step's seeded stream.
_RNG_LOCK = threading.Lock()


def step_seed(key: Sequence[int]) -> int:
    """A 64-bit seed from a key such as (worker seed, round, step); different keys, unrelated seeds."""
    digest = hashlib.blake2b(repr(tuple(int(k) for k in key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with torch's global generators seeded with `seed`: the CPU's, and the device's
    for a CUDA device (dropout draws from these). Their previous states are restored afterwards, so
    nothing outside the block sees the seeding; other threads' seeded blocks wait for this one."""
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    # fork_rng saves and restores the CPU generator and those of the CUDA devices listed (none on CPU).
    with _RNG_LOCK, torch.random.fork_rng(devices=[index] if cuda else [], device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def _no_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A loss of 0 whose backward runs through the whole model: a sharded model's rank whose rows have
    no trained token still takes part in every gather and gradient sum."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1)
    return out.logits.sum() * 0.0


@dataclass(frozen=True)
class StepResult:
    loss: float
    tokens: int


def _resident_bytes() -> int:
    """This process's resident memory now (Linux), 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class BlockTrainer:
    """Trains `model` one assignment at a time: `begin_round(blocks)`, then `step(batch, lr)` K times."""

    def __init__(self, model: nn.Module, blocks: Sequence[Block], optim: OptimConfig = OptimConfig(),
                 parallel: DataParallel | None = None):
        """`parallel`: the site's ranks, each stepping on its rows of the global batch (see `step`)."""
        self.model = model
        self.parallel = parallel
        self.blocks = {b.name: b for b in blocks}
        self.optim_config = optim
        self.active: tuple[str, ...] = ()
        self._params: list[nn.Parameter] = []
        self._optimizer: torch.optim.Optimizer | None = None
        set_trainable(model, [])
        if optim.gradient_checkpointing not in GRADIENT_CHECKPOINTING:
            raise ValueError(f"gradient_checkpointing must be one of {GRADIENT_CHECKPOINTING}")
        if optim.gradient_checkpointing == "on" and not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
        self._layers: list[nn.Module] = []
        self._checkpointing: tuple = ()  # (active blocks, tokens) the layers' flags were set for
        self.checkpointed = 0  # decoder layers recomputed in the backward pass, as last set
        if optim.gradient_checkpointing != "off" and getattr(model, "supports_gradient_checkpointing", False):
            # Non-reentrant checkpointing copes with frozen inputs below the trained block, so the input
            # embeddings need no gradient (with one, backward would run through the frozen layers below).
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5's name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if getattr(model, "_require_grads_hook", None) is not None:
                model.disable_input_require_grads()
            try:
                prefix, layers = find_decoder_layers(model)
            except ValueError:
                if optim.gradient_checkpointing == "on":
                    raise
                prefix, layers = "", []  # auto: nothing to choose from
            self._layers = list(layers)
            self._layer_of = {f"{prefix}.{i}.{n}": i for i, layer in enumerate(layers) for n, _ in layer.named_parameters()}
            embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            # By name: sharding the model (sharding.py) after this replaces the parameter objects.
            own = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
            self._embedding = {n for n, p in model.named_parameters() if id(p) in own}
            for layer in self._layers:
                layer.gradient_checkpointing = False  # set per step (`_checkpoint`)
        model.train()

    def begin_round(self, names: Sequence[str]) -> None:
        """Train the blocks `names` from now on, with a fresh AdamW state (and no gradient elsewhere)."""
        names = tuple(names)
        unknown = [n for n in names if n not in self.blocks]
        if unknown:
            raise KeyError(f"unknown blocks {unknown}")
        self._params = set_trainable(self.model, [self.blocks[n] for n in names])
        for p in self._params:
            p.grad = None
        c = self.optim_config
        self._optimizer = torch.optim.AdamW(self._params, lr=0.0, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay)
        self.active = names

    def step(self, batch: dict[str, torch.Tensor], lr: float, seed: Sequence[int] | None = None) -> StepResult:
        """One optimiser step on the active blocks; returns the batch loss (`task_loss`) and its trained
        token count (rows for a classification batch).

        With `seed`, a key such as (worker seed, round, step), every random draw of the forward and
        backward pass (dropout) comes from torch's generators seeded from that key (`seeded_rng`), so
        the step is a function of the model, the batch and the key. Without it they draw from torch's
        global generators as they are.

        With `parallel`, `batch` is this rank's rows of the site's batch: the loss is weighted by this
        rank's share of the global token count and the gradients summed over the ranks (parallel.py), so
        every rank takes the step one process takes on the whole batch; the loss and tokens returned
        are the whole batch's. On a sharded model (sharding.py) FSDP makes the sums, and a rank
        whose rows train no token runs the model all the same, for a loss of 0.
        """
        if self._optimizer is None:
            raise RuntimeError("begin_round() first")
        sharded = sharding.is_sharded(self.model)
        device = sharding.mine(self._params[0]).device
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if self._layers:
            self._checkpoint(int(batch["input_ids"].numel()))
        with nullcontext() if seed is None else seeded_rng(step_seed(seed), device):
            loss, tokens = task_loss(self.model, batch)
            if not loss.requires_grad and sharded:  # no forward ran: every rank must run every unit (FSDP)
                loss = _no_loss(self.model, batch)
            value = float(loss.detach())
            if self.parallel is not None:  # every rank decides on the whole batch's loss: all raise, or none
                mine = tokens
                total, tokens = self.parallel.sum_scalars([value * mine, mine])
                tokens = int(tokens)
                if tokens:
                    value, loss = total / tokens, loss * (mine / tokens)
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss is {value}")
            if loss.requires_grad:  # not where this rank's rows have no trained token (it adds zeros)
                loss.backward()
        if self.parallel is not None and not sharded:  # sharded, FSDP summed the gradients
            for p in self._params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.parallel.sum_([p.grad for p in self._params])
        if self.optim_config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._params, self.optim_config.grad_clip)
        for group in self._optimizer.param_groups:
            group["lr"] = lr
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        return StepResult(value, tokens)


    def _checkpoint(self, tokens: int) -> None:
        """Set which decoder layers recompute in the backward pass for a batch of `tokens` tokens: of the
        layers from the lowest trained one up, the lowest `checkpointed_layers` ("auto") or all ("on")."""
        if self._checkpointing == (self.active, tokens):
            return
        params = dict(self.model.named_parameters())
        trained = [n for b in self.active for n in self.blocks[b].params]
        lowest = min((0 if n in self._embedding else self._layer_of.get(n, len(self._layers))
                      for n in trained), default=len(self._layers))
        above = len(self._layers) - lowest
        if self.optim_config.gradient_checkpointing == "on":
            count = above
        else:
            total = sum(p.numel() for p in params.values())
            weight = next(self._layers[0].parameters())  # the model's dtype (LoRA's adapters may be float32)
            # On the CPU the process's other memory counts against the same budget; on a GPU it does not.
            baseline = _resident_bytes() - sum(sharding.mine(p).numel() * p.element_size() for p in params.values()) \
                if weight.device.type == "cpu" else 0
            count = checkpointed_layers(self.model.config, total, sum(p.numel() for p in self._params), above, tokens,
                                        weight.element_size(), baseline=max(0, baseline))
        for i, layer in enumerate(self._layers):
            layer.gradient_checkpointing = lowest <= i < lowest + count
        self._checkpointing = (self.active, tokens)
        self.checkpointed = count


@dataclass(frozen=True)
class Evaluation:
    """Held-out result: the weighted mean `task_loss`, its weight (trained tokens, or rows for
    classification data) and, for classification data only, the accuracy of the choices' argmax."""

    loss: float
    tokens: int
    accuracy: float | None


@torch.no_grad()
def evaluate(model: nn.Module, data: Sequence[TokenizedExample], batch_size: int, pad_id: int) -> Evaluation:
    """Evaluate `model` on `data` in batches of `batch_size`: token-weighted mean loss (labels as in
    training), or for classification data the row-weighted mean cross-entropy over the choices and
    the fraction of rows whose right choice has the largest logit (ties go to the first choice)."""
    with_choices = sum(ex.choices is not None for ex in data)
    if with_choices not in (0, len(data)):
        raise DataError(f"the evaluation data mixes {with_choices} examples with choices and {len(data) - with_choices} without")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens, correct = 0.0, 0, 0
    try:
        for i in range(0, len(data), batch_size):
            batch = {k: v.to(device) for k, v in collate(data[i : i + batch_size], pad_id).items()}
            if with_choices:
                logits = choice_logits(model, batch)
                loss, n = F.cross_entropy(logits, batch["choice_label"]), int(logits.shape[0])
                correct += int((logits.argmax(dim=1) == batch["choice_label"]).sum())
            else:
                loss, n = causal_lm_loss(model, batch)
            if n:
                total += float(loss) * n
                tokens += n
    finally:
        model.train(was_training)
    accuracy = (correct / tokens if tokens else math.nan) if with_choices else None
    return Evaluation(total / tokens if tokens else math.nan, tokens, accuracy)


def evaluate_loss(
    model: nn.Module, data: Sequence[TokenizedExample], batch_size: int, pad_id: int
) -> tuple[float, int]:
    """(loss, tokens) of `evaluate`."""
    result = evaluate(model, data, batch_size, pad_id)
    return result.loss, result.tokens
