"""LoRA adapters (`--peft lora`): the trainable parameters become low-rank adapters, which form blocks.

With adapters, a model has two kinds of blocks:

* the base model's blocks (`embed`, `layers.{i}`, `head`), frozen: they stay at version 0 for the whole
  run, so after a worker's first sync (nothing, when it has the base model: hash-checked) they never
  travel again;
* one adapter block per base block that holds adapters, named `lora.<base block>` (`lora.layers.3`),
  which the algorithms train, exchange and aggregate like any block.

`--train-blocks` keeps naming base blocks ('layers.*'); with adapters it selects their adapter blocks.
Both sides build the same adapters from the same `LoraSettings`: the initial values come from
`settings.seed` on the CPU generator, so a worker with its own base model also holds the initial
adapters without downloading them. The export merges the adapters into the base weights (a plain
Hugging Face folder) and can write the adapter alone in peft's format.
"""

from __future__ import annotations

import fnmatch
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .blocks import Block

PREFIX = "lora."
PEFT_KINDS = ("none", "lora")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # CG-FedLLM's and FedIT's choice


@dataclass(frozen=True)
class LoraSettings:
    """The adapters of a run; every party builds them from these alone."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"--lora-r must be >= 1, got {self.r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"--lora-alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if not self.targets or not all(t and t.replace("_", "").replace(".", "").isalnum() for t in self.targets):
            raise ValueError(f"--lora-targets must be module names such as q_proj,v_proj, got {','.join(self.targets)!r}")

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> LoraSettings:
        return cls(int(d["r"]), float(d["alpha"]), float(d["dropout"]), tuple(d["targets"]), int(d["seed"]))


def is_adapter(param_name: str) -> bool:
    return ".lora_" in param_name


def add_lora(model: nn.Module, lora: LoraSettings | None) -> nn.Module:
    """`model` with LoRA adapters on the target modules (a peft model), or `model` itself for None.

    The adapters are initialised (A: peft's Kaiming-uniform, B: zero) from `lora.seed` on the CPU
    generator, whatever the model's device (peft makes them on the CPU, then moves them), and the global
    generator is left as it was. Threads take turns (workers of one process, in tests)."""
    if lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    tied = _tied_targets(model, lora.targets)
    if tied:  # merging would fold the adapter into the shared weight, changing both of its uses
        raise ValueError(f"--lora-targets {','.join(lora.targets)}: {', '.join(sorted(tied)[:3])} shares its weight "
                         "with another module (tied embeddings); target other modules")

    from .models import BUILD_LOCK
    from .training import seeded_rng

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.targets), bias="none", task_type="CAUSAL_LM")
    with BUILD_LOCK, seeded_rng(lora.seed, torch.device("cpu")):
        try:
            return get_peft_model(model, config)
        except ValueError as e:  # no module matches the targets
            raise ValueError(f"--lora-targets {','.join(lora.targets)}: {str(e).splitlines()[0]}") from None


def _tied_targets(model: nn.Module, targets: Sequence[str]) -> set[str]:
    """The modules `targets` names (peft's rule: the name or its last parts) whose weight another module shares."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    tied = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if any(name == t or name.endswith("." + t) for t in targets) and isinstance(weight, nn.Parameter):
            if uses[id(weight)] > 1:
                tied.add(name)
    return tied


def split_blocks(blocks: Sequence[Block]) -> list[Block]:
    """Each block of a partition of a model with adapters, cut in two: its base parameters (same name)
    and its adapters (`lora.<name>`), in model order. An adapter belongs to the block of the weight it
    adapts (`<module>.base_layer.*`): an embedding's adapters are parameters that never run as a module
    of their own, so the partition alone could not place them."""
    block_of = {n: b.name for b in blocks for n in b.params if not is_adapter(n)}
    adapters: dict[str, list[str]] = {b.name: [] for b in blocks}
    for b in blocks:
        for n in b.params:
            if is_adapter(n):
                module = n.split(".lora_")[0]
                owner = next((blk for p, blk in block_of.items() if p.startswith(module + ".base_layer.")), b.name)
                adapters[owner].append(n)
    out: list[Block] = []
    for b in blocks:
        base = tuple(n for n in b.params if not is_adapter(n))
        if base:
            out.append(Block(b.name, base))
        if adapters[b.name]:
            out.append(Block(PREFIX + b.name, tuple(adapters[b.name])))
    return out


def select_trainable(block_names: Iterable[str], patterns: str, adapters: bool) -> tuple[str, ...]:
    """The blocks that `--train-blocks` patterns select: by name; with adapters, the adapter blocks of the
    base blocks the patterns name (a pattern may also name the adapter block itself)."""
    globs = [p.strip() for p in patterns.split(",") if p.strip()]

    def matches(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in globs)

    if not adapters:
        return tuple(b for b in block_names if matches(b))
    return tuple(b for b in block_names if b.startswith(PREFIX) and (matches(b.removeprefix(PREFIX)) or matches(b)))


def merge(model: nn.Module) -> nn.Module:
    """The plain model with the adapters folded into its weights (W + B·A·alpha/r)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def save_adapter(model: nn.Module, out: Path) -> Path:
    """The adapters alone, in peft's format (adapter_config.json, adapter_model.safetensors). No base
    model is named: the state dir knows the base only by its fingerprint, and naming the merged export
    would apply the adapters twice. Load with `PeftModel.from_pretrained(base_model, out)`."""
    model.peft_config["default"].base_model_name_or_path = None
    model.save_pretrained(out, safe_serialization=True)
    return out


def partition(model: nn.Module, layers_per_block: int, lora: LoraSettings | None) -> list[Block]:
    """The blocks of `model` (built with `add_lora(model, lora)`): with adapters, base and adapter blocks."""
    from .blocks import partition as base_partition

    blocks = base_partition(model, layers_per_block)
    return blocks if lora is None else split_blocks(blocks)


def recorded(run: dict) -> LoraSettings | None:
    """The adapters a state dir's run.json records (None: full-parameter run)."""
    return LoraSettings.from_dict(run["peft"]) if run.get("peft") else None
