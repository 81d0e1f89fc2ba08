"""Zeroth-order (ZO) tensor math for DeComFL and FedSPZO: directions, estimators, updates. No networking.

Both methods exchange scalars instead of tensors: a party that knows (seed, direction index, scalar)
can regenerate the direction and apply the update itself. That only works if every party, on every
device, regenerates *exactly* the same direction and applies *exactly* the same float32 coefficient;
this module is written around that requirement.

Direction generator (device-independent Rademacher signs)
---------------------------------------------------------
DeComFL draws Gaussian z from a torch.Generator, whose streams differ between CPU and CUDA. We use
Rademacher signs (z = +1 or -1) from a counter-based integer hash instead, computed with int64 tensor
ops that every backend evaluates identically (multiply, add, xor, shift, and, compare). Because z is
±1 and the coefficient is a float32 value c, c*z is exact, so `p + c*z` is rounded once whether or
not the device fuses multiply-add (float32/float64 tensors; bfloat16/float16 tensors are updated in
float32 and rounded to their dtype, see `add_direction_`).

All arithmetic below is on unsigned 32-bit values (M = 2**32 - 1), held in int64 tensors (or Python
ints). A product x*C mod 2**32 is computed without ever exceeding 2**48, so no int64 overflows:

    mul32(x, C) = (x * (C & 0xFFFF) + (((x * (C >> 16)) & 0xFFFF) << 16)) & M

    mix32(x):                           # "lowbias32" by C. Wellons, a bijection on 32-bit values
        x = x ^ (x >> 16); x = mul32(x, 0x7FEB352D)
        x = x ^ (x >> 15); x = mul32(x, 0x846CA68B)
        x = x ^ (x >> 16)

    key_mix(seed, direction, index):    # all three in 0 .. 2**32-1
        k = mix32((seed + 0x9E3779B9) & M)
        k = mix32(k ^ direction)
        k = mix32(k ^ index)

    hash32(k, w) = mix32(mix32(w ^ k) ^ k)       # w = word counter, 0 .. 2**32-1

Element e (0-based, of the parameter viewed as 1-D in row-major order) of parameter number `index`
(its position in the documented parameter order of the caller) in direction `direction` is

    b = (hash32(key_mix(seed, direction, index), e // 32) >> (e % 32)) & 1      # bit 0 = LSB
    z = 2*b - 1

i.e. one hash word per 32 consecutive elements, least significant bit first. Since each step of
key_mix is a bijection, keys differing only in `direction` (or only in `index`) never collide.
Tensors are processed in chunks of CHUNK elements (a multiple of 32, so chunks split on word
boundaries); the chunking changes temporaries only, never a bit of the result.

Replays. Every update is a list of steps (seed, direction, coef) applied as `param -= coef*z` with
coef a float32 value. The ops are element-wise, so for one parameter the result depends only on the
order of that parameter's steps: replaying parameter by parameter (parameter outer loop, steps
inner) gives bit-identical results to applying step by step over all parameters. Callers rely on
this to replay one parameter (or one block) at a time.

Estimators
----------
* `estimate` (DeComFL): P two-point (central) or one-point (forward) estimates of directional
  derivatives on one batch; `apply_` / `steps_for` turn the P scalars into the SGD update
  x -= lr/P * sum_p g_p z_p.
* `spzo_estimate` (FedSPZO): the model is split at decoder layer `split`; block 1 (embeddings,
  layers[:split]) gets P1 directions u_i, block 2 (layers[split:], final norm, head) P2 directions
  v_ij for each u_i. Block 1's output is computed once per (i, sign) and reused for the P2 block-2
  perturbations (`SplitForward`), which is where the saving in layer evaluations comes from
  (`layer_evaluations`, `default_split`). `spzo_steps` / `spzo_apply_` give the update.
"""

from __future__ import annotations

import struct
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .blocks import find_decoder_layers

Step = tuple[int, int, float]  # (seed, direction, coef): param -= coef * z(seed, direction, index)
LossFn = Callable[[nn.Module, Any], tuple[Tensor, int]]

CHUNK = 2**20  # elements per chunk of generated signs (multiple of 32); module-level so tests can shrink it

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


# --------------------------------------------------------------------------------------------------
# Direction generator. The helpers work on Python ints and on int64 tensors alike (same operators).


def _mul32(x, c: int):
    """x * c mod 2**32 for 0 <= x, c < 2**32, with every intermediate below 2**48 (no int64 overflow)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _check_u32(name: str, value: int) -> int:
    value = int(value)
    if not 0 <= value <= _M32:
        raise ValueError(f"{name} must be in 0..2**32-1, got {value}")
    return value


def key_mix(seed: int, direction: int, index: int) -> int:
    """The 32-bit key of one (seed, direction, parameter index) stream (see the module docstring)."""
    k = _mix32((_check_u32("seed", seed) + _GOLDEN) & _M32)
    k = _mix32(k ^ _check_u32("direction", direction))
    return _mix32(k ^ _check_u32("index", index))


def hash32(key: int, words: Tensor) -> Tensor:
    """hash32(key, w) for an int64 tensor of word counters w (each in 0..2**32-1)."""
    return _mix32(_mix32(words ^ key) ^ key)


def _chunk_size() -> int:
    chunk = CHUNK  # read at call time, so a monkeypatched value takes effect
    if chunk <= 0 or chunk % 32:
        raise ValueError(f"zo.CHUNK must be a positive multiple of 32, got {chunk}")
    return chunk


def _sign_table(device, dtype: torch.dtype) -> Tensor:
    """[256, 8]: row v holds the signs of byte value v, 2*((v >> k) & 1) - 1 for k = 0..7."""
    v = torch.arange(256, dtype=torch.int64, device=device).unsqueeze(1)
    return (((v >> torch.arange(8, dtype=torch.int64, device=device)) & 1) * 2 - 1).to(dtype)


def _sign_chunk(key: int, start: int, length: int, table: Tensor) -> Tensor:
    """z for elements start .. start+length-1 (start a multiple of 32) of the stream `key`, in the
    table's dtype and on its device."""
    first_word = start // 32
    words = torch.arange(first_word, first_word + (length + 31) // 32, dtype=torch.int64, device=table.device)
    h = hash32(key, words)
    # Element 32*w + 8*j + k <- bit k of byte j (bits 8j..8j+7) of word w: each byte looks its 8 signs
    # up in the table, several times faster than expanding the bits one by one, with the same values.
    byte_values = (h.unsqueeze(1) >> torch.arange(0, 32, 8, dtype=torch.int64, device=table.device)) & 0xFF
    return torch.nn.functional.embedding(byte_values.view(-1), table).view(-1)[:length]


def _check_numel(numel: int) -> None:
    if numel > 32 * (_M32 + 1):  # the word counter is 32 bits
        raise ValueError(f"tensor of {numel} elements is too large for the 32-bit word counter")


def signs(seed: int, direction: int, index: int, numel: int, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The direction z (1-D, `numel` values, exactly ±1) of parameter `index` in `direction`."""
    _check_numel(numel)
    key = key_mix(seed, direction, index)
    out = torch.empty(numel, dtype=dtype, device=device)
    table = _sign_table(out.device, dtype)
    chunk = _chunk_size()
    for start in range(0, numel, chunk):
        length = min(chunk, numel - start)
        out[start : start + length] = _sign_chunk(key, start, length, table)
    return out


def f32(x: float) -> float:
    """x rounded to the nearest float32 value: every coefficient goes through this, so that all parties
    apply the same float32 number whatever their Python or device arithmetic."""
    try:
        return struct.unpack("<f", struct.pack("<f", float(x)))[0]
    except OverflowError:  # beyond float32 range: let IEEE rounding decide (max value or ±inf)
        return torch.tensor(float(x), dtype=torch.float64).to(torch.float32).item()


def add_direction_(param: Tensor, seed: int, direction: int, index: int, scale: float) -> None:
    """param += f32(scale) * z(seed, direction, index), in place, chunk by chunk over param.view(-1).

    float32 and float64 tensors: one rounding of the exact p + scale*z. bfloat16 / float16 tensors: the
    sum is rounded to float32, then to the tensor's dtype (the same on every device)."""
    if not param.is_contiguous():
        raise ValueError("zo.add_direction_ needs a contiguous tensor (its elements are numbered in memory order)")
    if not param.is_floating_point():
        raise ValueError(f"zo.add_direction_ needs a floating-point tensor, got {param.dtype}")
    _check_numel(param.numel())
    alpha = f32(scale)
    key = key_mix(seed, direction, index)
    flat = param.detach().view(-1)  # shares storage: the in-place add changes param
    chunk = _chunk_size()
    # float32 / float64: add_ in the parameter's dtype, where alpha*z is exact, so one rounding. 16-bit
    # dtypes: torch's CPU kernel rounds alpha itself to bfloat16/float16 (CUDA keeps it in float32), so
    # we add in float32 explicitly and round the sum to the parameter's dtype: the same on every device.
    wide = flat.dtype in (torch.float32, torch.float64)
    table = _sign_table(flat.device, flat.dtype if wide else torch.float32)
    with torch.no_grad():
        for start in range(0, flat.numel(), chunk):
            length = min(chunk, flat.numel() - start)
            part = flat[start : start + length]
            if wide:
                part.add_(_sign_chunk(key, start, length, table), alpha=alpha)
            else:
                z = _sign_chunk(key, start, length, table)
                part.copy_(part.float().add_(z, alpha=alpha))


def perturb_(params: Sequence[Tensor], seed: int, direction: int, scale: float, first_index: int = 0) -> None:
    """add_direction_ on every tensor of `params`, the k-th with index first_index + k."""
    for k, param in enumerate(params):
        add_direction_(param, seed, direction, first_index + k, scale)


def replay_(param: Tensor, index: int, steps: Iterable[Step]) -> None:
    """param -= coef * z(seed, direction, index) for each (seed, direction, coef) of `steps`, in order.

    Element-wise, so replaying one parameter at a time gives the same bits as any interleaving that
    keeps each parameter's steps in order (see the module docstring)."""
    for seed, direction, coef in steps:
        add_direction_(param, seed, direction, index, -coef)


# --------------------------------------------------------------------------------------------------
# DeComFL estimator and update


@dataclass(frozen=True)
class ZOSettings:
    perturbations: int = 5  # P directions per step
    mu: float = 1e-3  # perturbation size (applied as f32(mu))
    estimator: str = "central"  # "central": (L(x+mu z) - L(x-mu z)) / 2mu; "forward": (L(x+mu z) - L(x)) / mu


def _loss(model: nn.Module, batch, loss_fn: LossFn) -> float:
    loss, _n = loss_fn(model, batch)
    return float(loss.item())


def _check_eval(model: nn.Module) -> None:
    # Dropout would make L(x+mu z) and L(x-mu z) see different noise, which swamps the difference.
    if model.training:
        raise ValueError("zeroth-order estimates need the model in eval mode (call model.eval())")


def estimate(
    model: nn.Module, params: Sequence[Tensor], batch, seed: int, settings: ZOSettings, loss_fn: LossFn
) -> tuple[list[float], float]:
    """DeComFL's P directional-derivative estimates on one batch, and the batch's train loss.

    Direction p perturbs params[k] along z(seed, p, k). Central: +mu, L+; -2mu, L-; +mu (back);
    g_p = (L+ - L-) / 2mu, and the train loss is the mean of all L+ and L-. Forward: L0 once, then
    +mu, L+, -mu (back); g_p = (L+ - L0) / mu, train loss L0. Differences in float64 of the float losses;
    each g_p is returned rounded to float32 (f32). The parameters end where they started up to the
    rounding of the three (two) in-place additions."""
    _check_eval(model)
    if settings.estimator not in ("central", "forward"):
        raise ValueError(f"unknown ZO estimator '{settings.estimator}' (known: central, forward)")
    if settings.perturbations < 1:
        raise ValueError(f"need at least one perturbation, got {settings.perturbations}")
    mu = f32(settings.mu)
    grads: list[float] = []
    losses: list[float] = []
    with torch.no_grad():
        if settings.estimator == "forward":
            base = _loss(model, batch, loss_fn)
            losses.append(base)
        for p in range(settings.perturbations):
            perturb_(params, seed, p, mu)
            plus = _loss(model, batch, loss_fn)
            if settings.estimator == "central":
                perturb_(params, seed, p, -2 * mu)
                minus = _loss(model, batch, loss_fn)
                perturb_(params, seed, p, mu)
                losses += [plus, minus]
                grads.append(f32((plus - minus) / (2 * mu)))
            else:
                perturb_(params, seed, p, -mu)
                grads.append(f32((plus - base) / mu))
    return grads, sum(losses) / len(losses)


def steps_for(seed: int, scalars: Sequence[float], lr: float, directions: Sequence[int] | None = None) -> list[Step]:
    """The steps of DeComFL's update x -= lr/P * sum_p g_p z_p: (seed, direction_p, f32(lr * g_p / P))."""
    count = len(scalars)
    if directions is None:
        directions = range(count)
    if len(directions) != count:
        raise ValueError(f"{count} scalars but {len(directions)} directions")
    return [(seed, int(d), f32(lr * g / count)) for d, g in zip(directions, scalars, strict=True)]


def apply_(
    params: Sequence[Tensor], seed: int, scalars: Sequence[float], lr: float, directions: Sequence[int] | None = None
) -> None:
    """DeComFL's SGD step on `params` (params[i] has index i): replay_ of steps_for, parameter by parameter."""
    steps = steps_for(seed, scalars, lr, directions)
    for i, param in enumerate(params):
        replay_(param, i, steps)


# --------------------------------------------------------------------------------------------------
# Split forward: block 1's output once, block 2 evaluated from it many times


class _StopForward(Exception):
    """Raised by the capture hook to end a forward at layers[split]. Deliberately a plain Exception
    subclass (not RuntimeError / TypeError / AttributeError), so that no `except` in model or loss
    code meant for ordinary failures swallows it."""


@dataclass
class Captured:
    """What decoder layer `split` received in `SplitForward.first`, and the shape of a layer's output."""

    args: tuple | None  # positional inputs of layers[split] (None: loss_fn ran no forward, e.g. no trained tokens)
    kwargs: dict
    hidden_at: int | str  # where the hidden states are: a position in args or a key of kwargs
    output_rest: tuple | None  # None: a layer returns a Tensor; else it returns (hidden, *output_rest)


def _tensorish(value) -> bool:
    return isinstance(value, Tensor) or (
        isinstance(value, (tuple, list)) and len(value) > 0 and all(isinstance(v, Tensor) for v in value)
    )


class _Passthrough(nn.Module):
    """Stands in for a decoder layer of block 1 in `SplitForward.second`: returns its input hidden
    states in the structure the real layer returns, at no cost. Plain attributes of the real layer
    (layer_idx, attention_type, ...) are copied, since some models' loops read them."""

    def __init__(self, real: nn.Module, captured: Captured):
        super().__init__()
        for name, value in vars(real).items():
            if not name.startswith("_") and name != "training" and not isinstance(value, (nn.Module, Tensor)):
                setattr(self, name, value)
        self._hidden_at = captured.hidden_at
        self._rest = captured.output_rest

    def forward(self, *args, **kwargs):
        if isinstance(self._hidden_at, int) and len(args) > self._hidden_at:
            hidden = args[self._hidden_at]
        else:
            hidden = kwargs["hidden_states" if isinstance(self._hidden_at, int) else self._hidden_at]
        return hidden if self._rest is None else (hidden, *self._rest)


# (model -> loss functions already run once on it); see SplitForward._prime
_PRIMED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class SplitForward:
    """Evaluate a Hugging Face causal LM in two halves around decoder layer `split`.

    `first(batch)` runs loss_fn(model, batch) until decoder layer `split` is called, and returns its
    inputs (hidden states cloned). `second(captured, batch)` runs loss_fn(model, batch) with layers
    [:split] replaced by passthroughs and the captured inputs substituted at layers[split], so only
    layers[split:] and the (cheap) embedding and head run; it returns what loss_fn returns and, for
    the same batch and weights, equals loss_fn(model, batch). Works for any model whose forward calls
    its decoder layers in order from one nn.ModuleList (blocks.find_decoder_layers); otherwise
    ValueError. Tensor inputs of layers[split] other than the hidden states (masks, rotary
    embeddings) are substituted too; they depend on the batch only. Objects such as the KV cache are
    not: each forward keeps its own.

    The first use of a (model, loss_fn) pair runs loss_fn once without hooks, because a loss function
    may run its own forwards on first use (training.causal_lm_loss checks its head once per model);
    run inside `first`, such a forward would be the one captured.

    `second` swaps modules of the model's layer list while it runs: one thread per model at a time.
    """

    def __init__(self, model: nn.Module, split: int, loss_fn: LossFn):
        _, self.layers = find_decoder_layers(model)
        n = len(self.layers)
        if not 1 <= split <= n - 1:
            raise ValueError(f"split must be in 1..{n - 1} for a model with {n} decoder layers, got {split}")
        self.model, self.split, self.loss_fn = model, split, loss_fn

    def _prime(self, batch) -> None:
        done = _PRIMED.setdefault(self.model, set())
        if self.loss_fn not in done:
            with torch.no_grad():
                self.loss_fn(self.model, batch)
            done.add(self.loss_fn)

    def first(self, batch) -> Captured:
        self._prime(batch)
        seen: dict[str, Any] = {}

        def capture(_module, args, kwargs):
            seen["args"], seen["kwargs"] = args, kwargs
            raise _StopForward

        def record_output(_module, _args, output):
            seen["output"] = output

        hooks = [
            self.layers[self.split].register_forward_pre_hook(capture, with_kwargs=True),
            self.layers[self.split - 1].register_forward_hook(record_output),
        ]
        result = None
        try:
            with torch.no_grad():
                result = self.loss_fn(self.model, batch)
        except _StopForward:
            pass
        finally:
            for hook in hooks:
                hook.remove()

        name = type(self.model).__name__
        if "args" not in seen:
            if "output" not in seen and result is not None and int(result[1]) == 0:
                return Captured(None, {}, 0, None)  # nothing to evaluate: second() reruns loss_fn
            raise ValueError(f"{name}: the forward never called decoder layer {self.split}; cannot split it")
        args, kwargs = list(seen["args"]), dict(seen["kwargs"])
        if args and isinstance(args[0], Tensor):
            hidden_at: int | str = 0
        elif isinstance(kwargs.get("hidden_states"), Tensor):
            hidden_at = "hidden_states"
        else:
            raise ValueError(f"{name}: decoder layer {self.split} got no hidden-state tensor; cannot split it")
        if isinstance(hidden_at, int):
            args[0] = args[0].clone()
            hidden = args[0]
        else:
            kwargs[hidden_at] = kwargs[hidden_at].clone()
            hidden = kwargs[hidden_at]
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        if isinstance(ids, Tensor) and tuple(hidden.shape[: ids.dim()]) != tuple(ids.shape):
            raise ValueError(
                f"{name}: decoder layer {self.split} saw hidden states {tuple(hidden.shape)} for input_ids "
                f"{tuple(ids.shape)}: the loss function runs other forwards first; cannot split it"
            )
        output = seen["output"]
        if isinstance(output, Tensor):
            rest = None
        elif isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            rest = tuple(output[1:])
        else:
            raise ValueError(f"{name}: a decoder layer returned {type(output).__name__}; cannot split it")
        return Captured(tuple(args), kwargs, hidden_at, rest)

    def second(self, captured: Captured, batch) -> tuple[Tensor, int]:
        if captured.args is None:
            with torch.no_grad():
                return self.loss_fn(self.model, batch)
        fired = []

        def substitute(_module, args, kwargs):
            fired.append(True)
            args, kwargs = list(args), dict(kwargs)
            for i in range(min(len(args), len(captured.args))):
                if _tensorish(captured.args[i]):
                    args[i] = captured.args[i]
            for key, value in captured.kwargs.items():
                if key in kwargs and _tensorish(value):
                    kwargs[key] = value
            return tuple(args), kwargs

        real = [self.layers[i] for i in range(self.split)]
        hook = None
        try:
            for i, layer in enumerate(real):
                self.layers[i] = _Passthrough(layer, captured)
            hook = self.layers[self.split].register_forward_pre_hook(substitute, with_kwargs=True)
            with torch.no_grad():
                result = self.loss_fn(self.model, batch)
        finally:
            if hook is not None:
                hook.remove()
            for i, layer in enumerate(real):
                self.layers[i] = layer
        if not fired:
            raise ValueError(f"{type(self.model).__name__}: the forward never called decoder layer {self.split}")
        return result


class LayerCounter:
    """Context manager counting completed forward calls of the model's real decoder layers (`.count`).

    Forward (post) hooks on the layer modules present at entry: passthroughs put in their place do not
    count, nor does a layer whose forward was stopped by SplitForward's capture hook."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.count = 0
        self._hooks: list = []

    def _hit(self, _module, _args, _output) -> None:
        self.count += 1

    def __enter__(self) -> LayerCounter:
        _, layers = find_decoder_layers(self.model)
        self._hooks = [layer.register_forward_hook(self._hit) for layer in layers]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


# --------------------------------------------------------------------------------------------------
# FedSPZO estimator and update


def spzo_estimate(
    model: nn.Module,
    split: int,
    params1: Sequence[Tensor],
    params2: Sequence[Tensor],
    batch,
    seed: int,
    P1: int,
    P2: int,
    mu: float,
    loss_fn: LossFn,
) -> tuple[list[float], float]:
    """FedSPZO's P1*P2 scalars g_ij (i major, j minor) on one batch, and the batch's train loss.

    Block 1 (params1, indices 0..n1-1) moves along u_i = z(seed, i, .), block 2 (params2, indices
    n1..n1+n2-1) along v_ij = z(seed, i*P2 + j, .). For each i: block 1 at +mu u_i, its output h+ once,
    then for each j: block 2 at +mu v_ij, L+_ij from h+, block 2 back; block 1 at -mu u_i (add -2mu),
    h- once, for each j: block 2 at -mu v_ij, L-_ij from h-, back; block 1 back (+mu).
    g_ij = (L+_ij - L-_ij) / 2mu, rounded with f32: the central derivative along [u_i; v_ij]. The train
    loss is the mean of all L+ and L-. A tied head weight belongs to block 1, so block 2's evaluations
    use it perturbed, consistently with a full forward."""
    _check_eval(model)
    if P1 < 1 or P2 < 1:
        raise ValueError(f"need P1, P2 >= 1, got {P1}, {P2}")
    mu = f32(mu)
    n1 = len(params1)
    halves = SplitForward(model, split, loss_fn)
    grads: list[float] = []
    losses: list[float] = []

    def block2_losses(captured: Captured, i: int, sign: float) -> list[float]:
        out = []
        for j in range(P2):
            perturb_(params2, seed, i * P2 + j, sign * mu, first_index=n1)
            out.append(float(halves.second(captured, batch)[0].item()))
            perturb_(params2, seed, i * P2 + j, -sign * mu, first_index=n1)
        return out

    with torch.no_grad():
        for i in range(P1):
            perturb_(params1, seed, i, mu)
            plus = block2_losses(halves.first(batch), i, 1.0)
            perturb_(params1, seed, i, -2 * mu)
            minus = block2_losses(halves.first(batch), i, -1.0)
            perturb_(params1, seed, i, mu)
            grads += [f32((lp - lm) / (2 * mu)) for lp, lm in zip(plus, minus, strict=True)]
            losses += plus + minus
    return grads, sum(losses) / len(losses)


def spzo_steps(
    seed: int, scalars: Sequence[float], lr: float, P1: int, P2: int, n1: int, n2: int
) -> list[list[Step]]:
    """steps[k]: the (seed, direction, coef) list of parameter k (block 1: k < n1; block 2: n1 <= k < n1+n2).

    The update is x -= lr/(P1 P2) * sum_ij g_ij [u_i; v_ij]. Block 1: for each i, direction i with
    coef f32(lr / P1 * (sum_j g_ij / P2)); block 2: for each (i, j), direction i*P2 + j with coef
    f32(lr / (P1*P2) * g_ij). Coefficients are computed in float64 in exactly these expressions."""
    if len(scalars) != P1 * P2:
        raise ValueError(f"expected P1*P2 = {P1 * P2} scalars, got {len(scalars)}")
    g = [float(s) for s in scalars]
    block1 = [(seed, i, f32(lr / P1 * (sum(g[i * P2 : (i + 1) * P2]) / P2))) for i in range(P1)]
    block2 = [(seed, i * P2 + j, f32(lr / (P1 * P2) * g[i * P2 + j])) for i in range(P1) for j in range(P2)]
    return [list(block1) for _ in range(n1)] + [list(block2) for _ in range(n2)]


def spzo_apply_(
    params1: Sequence[Tensor], params2: Sequence[Tensor], seed: int, scalars: Sequence[float], lr: float, P1: int, P2: int
) -> None:
    """FedSPZO's update on both blocks: replay_ of spzo_steps, parameter by parameter."""
    params = list(params1) + list(params2)
    steps = spzo_steps(seed, scalars, lr, P1, P2, len(params1), len(params2))
    for k, param in enumerate(params):
        replay_(param, k, steps[k])


# --------------------------------------------------------------------------------------------------
# Cost model


def layer_evaluations(
    method: str, num_layers: int, split: int, P: int = 0, P1: int = 0, P2: int = 0, estimator: str = "central"
) -> int:
    """Decoder-layer forward evaluations of one ZO step.

    decomfl: central 2*P*n, forward (P+1)*n (split unused); fedspzo: 2*P1*(split + P2*(n - split))."""
    n = num_layers
    if method == "decomfl":
        if estimator == "central":
            return 2 * P * n
        if estimator == "forward":
            return (P + 1) * n
        raise ValueError(f"unknown ZO estimator '{estimator}' (known: central, forward)")
    if method == "fedspzo":
        return 2 * P1 * (split + P2 * (n - split))
    raise ValueError(f"unknown ZO method '{method}' (known: decomfl, fedspzo)")


def default_split(num_layers: int, P1: int, P2: int) -> int:
    """The smallest split in 1..n-1 at which fedspzo needs at most half the layer evaluations of
    decomfl-central with P = P1*P2; n-1 if none does."""
    if num_layers < 2:
        raise ValueError(f"a split needs at least 2 decoder layers, got {num_layers}")
    full = layer_evaluations("decomfl", num_layers, 0, P=P1 * P2)
    for split in range(1, num_layers):
        if 2 * layer_evaluations("fedspzo", num_layers, split, P1=P1, P2=P2) <= full:
            return split
    return num_layers - 1


__all__ = [
    "CHUNK",
    "Captured",
    "LayerCounter",
    "SplitForward",
    "Step",
    "ZOSettings",
    "add_direction_",
    "apply_",
    "default_split",
    "estimate",
    "f32",
    "hash32",
    "key_mix",
    "layer_evaluations",
    "perturb_",
    "replay_",
    "signs",
    "spzo_apply_",
    "spzo_estimate",
    "spzo_steps",
    "steps_for",
]
