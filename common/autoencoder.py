"""CG-FedLLM's gradient autoencoder (arXiv 2405.13746): a block's update as an image, compressed 2^k-fold.

The authors published no code; the architecture follows a third-party reproduction (it is CycleGAN's
ResNet generator cut at the bottleneck). With k = log2(ratio):

    encoder  Pad(1), Conv3x3 1->1 (no bias), BN, ReLU
             k x [Conv3x3 stride 2 pad 1, BN, ReLU]            channels 1 -> 2 -> ... -> 2^k
             3 x ResidualBlock(2^k)
    decoder  3 x ResidualBlock(2^k)
             k x [ConvTranspose3x3 stride 2 pad 1 out_pad 1, BN, ReLU]   channels 2^k -> ... -> 1
             Pad(3), Conv7x7 1->1 (bias), Tanh

    ResidualBlock(c)(x) = x + [Pad(1), Conv3x3, BN, ReLU, Pad(1), Conv3x3, BN](x)

An image [N, 1, H, W] (H, W multiples of 2^k) becomes a latent [N, 2^k, H/2^k, W/2^k]: H*W/2^k values,
so the compression ratio is exactly 2^k. Convolutions followed by BatchNorm have no bias (BN cancels it).

Padding: `Pad(n)` reflects, as in the paper, except where a side of its input is not longer than n,
where reflection is undefined (a latent 1 position tall, or a 2x2 image before the 7x7 head); there it
replicates the border. So any H, W that are multiples of 2^k work, and `layout` adds no padding beyond
rounding up, except that it never makes a latent of a single position (1x1), on which BatchNorm cannot
train with one image per batch.

Other parts, all pure tensor code:

* `layout` / `to_image` / `from_image`: a block's tensors (name -> tensor) as one zero-padded image;
* `scale` / `unscale`: the normalisation variants, "none" (faithful) and "max" (into Tanh's range);
* `train_autoencoder`: pre-training on recorded updates (the paper's TGAP), with a held-out report;
* `tune_encoder`: our FAF, the worker tuning its own encoder copy on its true update (decoder fixed);
* `save_weights` / `load_weights`: safetensors with metadata, never pickle;
* `cosine` / `relative_error`: reconstruction metrics.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .models import BUILD_LOCK
from .training import seeded_rng

log = logging.getLogger(__name__)

FORMAT = "fedblock-ae/1"
VARIANTS = ("none", "max")
MIN_RATIO, MAX_RATIO = 2, 1024  # 1/1024: a 126M-parameter autoencoder already (0.47 GiB)
_RESIDUAL_BLOCKS = 3


# ----------------------------------------------------------------------------------------------- model


class _Pad(nn.Module):
    """Reflection padding by n on each side, or replicate padding when a side is too short (<= n) to
    reflect. Parameter-free, so the state dict is the same as with nn.ReflectionPad2d."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x: Tensor) -> Tensor:
        mode = "reflect" if min(x.shape[-2:]) > self.n else "replicate"
        return F.pad(x, (self.n,) * 4, mode=mode)


class ResidualBlock(nn.Module):
    """x + (Pad(1), Conv3x3, BN, ReLU, Pad(1), Conv3x3, BN)(x), channels and size unchanged."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _Pad(1), nn.Conv2d(channels, channels, 3, bias=False), nn.BatchNorm2d(channels), nn.ReLU(True),
            _Pad(1), nn.Conv2d(channels, channels, 3, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _check_ratio(ratio: int) -> int:
    """k = log2(ratio) for a power of two in [MIN_RATIO, MAX_RATIO]; ValueError otherwise."""
    if (isinstance(ratio, bool) or not isinstance(ratio, int) or not MIN_RATIO <= ratio <= MAX_RATIO
            or ratio & (ratio - 1)):
        raise ValueError(f"autoencoder ratio must be a power of two from {MIN_RATIO} to {MAX_RATIO}, "
                         f"got {ratio!r}")
    return ratio.bit_length() - 1


class GradientAutoencoder(nn.Module):
    """The autoencoder for a compression ratio 2^k: images [N, 1, H, W] with H, W multiples of
    `multiple` (= 2^k) <-> latents [N, 2^k, H/2^k, W/2^k].

    In eval mode (BatchNorm on its running statistics) encode and decode are deterministic functions
    of their input; the codec calls them that way, under torch.no_grad."""

    def __init__(self, ratio: int) -> None:
        super().__init__()
        self.k = _check_ratio(ratio)
        self.ratio = ratio
        self.multiple = 2 ** self.k
        c = self.multiple
        enc: list[nn.Module] = [_Pad(1), nn.Conv2d(1, 1, 3, bias=False), nn.BatchNorm2d(1), nn.ReLU(True)]
        for i in range(self.k):
            enc += [nn.Conv2d(2 ** i, 2 ** (i + 1), 3, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(2 ** (i + 1)), nn.ReLU(True)]
        enc += [ResidualBlock(c) for _ in range(_RESIDUAL_BLOCKS)]
        dec: list[nn.Module] = [ResidualBlock(c) for _ in range(_RESIDUAL_BLOCKS)]
        for i in range(self.k, 0, -1):
            dec += [nn.ConvTranspose2d(2 ** i, 2 ** (i - 1), 3, stride=2, padding=1, output_padding=1,
                                       bias=False),
                    nn.BatchNorm2d(2 ** (i - 1)), nn.ReLU(True)]
        dec += [_Pad(3), nn.Conv2d(1, 1, 7), nn.Tanh()]
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent of one image H x W; ValueError when H or W is not a multiple."""
        if height <= 0 or width <= 0 or height % self.multiple or width % self.multiple:
            raise ValueError(f"image {height}x{width}: sides must be positive multiples of {self.multiple}")
        return self.multiple, height // self.multiple, width // self.multiple

    def encode(self, image: Tensor) -> Tensor:
        """[N, 1, H, W] -> [N, 2^k, H/2^k, W/2^k]."""
        if image.dim() != 4 or image.shape[1] != 1:
            raise ValueError(f"expected an image [N, 1, H, W], got {tuple(image.shape)}")
        self.latent_shape(image.shape[2], image.shape[3])
        return self.encoder(image)

    def decode(self, latent: Tensor) -> Tensor:
        """[N, 2^k, h, w] -> [N, 1, h*2^k, w*2^k], values in (-1, 1) (Tanh)."""
        if latent.dim() != 4 or latent.shape[1] != self.multiple:
            raise ValueError(f"expected a latent [N, {self.multiple}, h, w], got {tuple(latent.shape)}")
        return self.decoder(latent)

    def forward(self, image: Tensor) -> Tensor:
        return self.decode(self.encode(image))


# ---------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies in the flat image: `numel` elements from `offset`, in the row-major order
    of the tensor, transposed first when `transposed`."""

    name: str
    shape: tuple[int, ...]
    transposed: bool
    offset: int
    numel: int


@dataclass(frozen=True)
class Layout:
    """A block's tensors as one image [1, 1, height, width]; see `layout`."""

    entries: tuple[Entry, ...]
    height: int
    width: int
    multiple: int

    @property
    def numel(self) -> int:
        """Elements of the block's tensors (the image's real, un-padded elements)."""
        return sum(e.numel for e in self.entries)

    @property
    def padded(self) -> int:
        """Zeros added at the end of the image: height * width - numel."""
        return self.height * self.width - self.numel

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H/m, W/m) of the latent, C = m = 2^k; its element count is height * width / m."""
        m = self.multiple
        return m, self.height // m, self.width // m


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def layout(specs: Sequence[tuple[str, tuple[int, ...]]], multiple: int) -> Layout:
    """The image layout of a block of tensors (name, shape), in the given order.

    Rule: a 2-D tensor whose first dim is smaller than its second is taken as is, otherwise (also when
    square) transposed, so that its rows are the "factor vectors" along its longer side: a LoRA A
    (r x d_in) as is, a LoRA B (d_out x r) transposed. (The paper stacks A^T and B as d x r columns;
    this image is that one transposed.) 0-d, 1-d and >= 3-d tensors are flattened. Everything is
    flattened row-major and concatenated; the width W is the most common long side among the 2-D
    tensors (ties: the longer), or ceil(sqrt(total)) when there are none, rounded up to a multiple of
    `multiple`; H = ceil(total / W) rounded up to a multiple of `multiple`, and 2 * multiple when the
    image would otherwise be a single multiple x multiple square (a latent of one position); the
    remaining H*W - total elements are zeros at the end.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be positive, got {multiple}")
    entries: list[Entry] = []
    long_sides: Counter[int] = Counter()
    offset = 0
    for name, shape in specs:
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"{name}: negative dimension in {shape}")
        numel = math.prod(shape)
        transposed = len(shape) == 2 and not shape[0] < shape[1]
        if len(shape) == 2 and numel:
            long_sides[max(shape)] += 1
        entries.append(Entry(name, shape, transposed, offset, numel))
        offset += numel
    if len({e.name for e in entries}) != len(entries):
        raise ValueError("duplicate tensor names in the layout")
    if offset == 0:
        raise ValueError("nothing to lay out: the block has no elements")
    if long_sides:
        # most common long side; among equally common ones the longer (fewer, longer rows)
        natural = max(long_sides.items(), key=lambda kv: (kv[1], kv[0]))[0]
    else:
        natural = math.isqrt(offset - 1) + 1  # ceil(sqrt(total))
    width = _round_up(natural, multiple)
    height = _round_up(-(-offset // width), multiple)
    if height == multiple and width == multiple:
        height = 2 * multiple
    return Layout(tuple(entries), height, width, multiple)


def to_image(tensors: Mapping[str, Tensor], lay: Layout) -> Tensor:
    """The block as a float32 image [1, 1, H, W]; the tensors must be exactly the layout's names and
    shapes (ValueError otherwise)."""
    if set(tensors) != {e.name for e in lay.entries}:
        raise ValueError(f"tensors {sorted(tensors)} do not match the layout {[e.name for e in lay.entries]}")
    parts = []
    for e in lay.entries:
        t = tensors[e.name]
        if tuple(t.shape) != e.shape:
            raise ValueError(f"{e.name}: shape {tuple(t.shape)}, the layout says {e.shape}")
        t = t.detach().to(torch.float32)
        parts.append((t.T if e.transposed else t).reshape(-1))
    flat = torch.cat(parts)
    flat = torch.cat([flat, flat.new_zeros(lay.padded)])
    return flat.view(1, 1, lay.height, lay.width)


def from_image(image: Tensor, lay: Layout) -> dict[str, Tensor]:
    """The block's tensors (float32, fresh memory) read back from an image [1, 1, H, W] (or [1, H, W]);
    the exact inverse of `to_image` on the un-padded elements. The padding is ignored."""
    if image.numel() != lay.height * lay.width or tuple(image.shape[-2:]) != (lay.height, lay.width):
        raise ValueError(f"image {tuple(image.shape)} does not match the layout {lay.height}x{lay.width}")
    flat = image.detach().to(torch.float32).reshape(-1)
    out: dict[str, Tensor] = {}
    for e in lay.entries:
        part = flat[e.offset:e.offset + e.numel]
        if e.transposed:
            out[e.name] = part.view(e.shape[1], e.shape[0]).T.contiguous()
        else:
            out[e.name] = part.view(e.shape).clone()
    return out


# ------------------------------------------------------------------------------------- normalisation


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown autoencoder variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def scale(image: Tensor, variant: str) -> tuple[Tensor, float]:
    """(image / factor, factor). "none": factor 1.0 (the paper: no normalisation). "max": factor is the
    largest absolute value of the image, so the result lies in [-1, 1], Tanh's range; 1.0 for an
    all-zero image. The factor is a float32 value (it travels as one float32 beside the latent)."""
    _check_variant(variant)
    if variant == "none":
        return image, 1.0
    peak = image.detach().abs().max().to(torch.float32) if image.numel() else torch.tensor(0.0)
    factor = float(peak) if float(peak) > 0 and math.isfinite(float(peak)) else 1.0
    if factor == 1.0:
        return image, 1.0
    return image / torch.tensor(factor, dtype=image.dtype, device=image.device), factor


def unscale(image: Tensor, factor: float) -> Tensor:
    """The inverse of `scale`: image * factor (as float32)."""
    if factor == 1.0:
        return image
    return image * torch.tensor(factor, dtype=torch.float32).to(image.dtype).to(image.device)


# ------------------------------------------------------------------------------------------- metrics


def _flat(x: Tensor | Mapping[str, Tensor], names: Sequence[str] | None = None) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().reshape(-1).to(torch.float64)
    keys = list(names) if names is not None else list(x)
    if not keys:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([x[k].detach().reshape(-1).to(torch.float64).cpu() for k in keys])


def _pair(a: Tensor | Mapping[str, Tensor], b: Tensor | Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    if isinstance(a, Tensor) != isinstance(b, Tensor):
        raise TypeError("compare two tensors or two mappings of tensors")
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor)
        if a.numel() != b.numel():
            raise ValueError(f"sizes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        return _flat(a), _flat(b).to(a.device)
    assert not isinstance(b, Tensor)
    if set(a) != set(b):
        raise ValueError(f"tensor names differ: {sorted(set(a) ^ set(b))}")
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"{k}: shapes differ: {tuple(a[k].shape)} vs {tuple(b[k].shape)}")
    return _flat(a), _flat(b, list(a))


def cosine(a: Tensor | Mapping[str, Tensor], b: Tensor | Mapping[str, Tensor]) -> float:
    """Cosine similarity of all entries of a and b (same names and shapes; float64 arithmetic);
    0.0 when either norm is zero."""
    x, y = _pair(a, b)
    nx, ny = float(x.norm()), float(y.norm())
    return 0.0 if nx == 0 or ny == 0 else float(x @ y) / (nx * ny)


def relative_error(approx: Tensor | Mapping[str, Tensor], exact: Tensor | Mapping[str, Tensor]) -> float:
    """||approx - exact|| / ||exact|| over all entries; 0.0 when both are zero, inf when only exact is."""
    x, y = _pair(approx, exact)
    err, ref = float((x - y).norm()), float(y.norm())
    if ref == 0:
        return 0.0 if err == 0 else math.inf
    return err / ref


# ------------------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class TrainReport:
    """The outcome of `train_autoencoder`. MSEs are in the scaled space the model works in (what the
    loss minimises), over whole images (padding included); cosine and relative error compare each
    held-out image with its unscaled reconstruction and are averaged over images. Holdout figures are
    nan when nothing was held out."""

    steps: int
    train_mse: float
    holdout_mse: float
    holdout_cosine: float
    holdout_rel_error: float
    seconds: float
    train_images: int = 0
    holdout_images: int = 0


def _as_image(image: Tensor, model: GradientAutoencoder) -> Tensor:
    """[1, H, W] or [1, 1, H, W] -> float32 [1, H, W], with sides checked against the model."""
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 1:
        raise ValueError(f"expected a training image [1, H, W], got {tuple(image.shape)}")
    _, h, w = model.latent_shape(image.shape[1], image.shape[2])
    if h * w < 2:
        # BatchNorm cannot train on one value per channel (a batch of one image with a 1x1 latent)
        raise ValueError(f"image {image.shape[1]}x{image.shape[2]} has a 1x1 latent at ratio {model.ratio}; "
                         f"layout() never makes such images")
    return image.detach().to(torch.float32)


def _batches(groups: Sequence[Sequence[int]], batch_size: int, gen: torch.Generator) -> Iterator[list[int]]:
    """Endless epochs: each shape group shuffled and cut into batches of at most batch_size, all the
    epoch's batches in a shuffled order."""
    while True:
        batches: list[list[int]] = []
        for g in groups:
            perm = [g[i] for i in torch.randperm(len(g), generator=gen).tolist()]
            batches += [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]
        for j in torch.randperm(len(batches), generator=gen).tolist():
            yield batches[j]


@torch.no_grad()
def _evaluate(model: GradientAutoencoder, originals: Sequence[Tensor], scaled: Sequence[tuple[Tensor, float]]
              ) -> tuple[float, float, float]:
    """(mean scaled-space MSE, mean cosine, mean relative error) over images, model in eval mode."""
    if not originals:
        return math.nan, math.nan, math.nan
    mses, coss, rels = [], [], []
    device = next(model.parameters()).device
    for x, (s, factor) in zip(originals, scaled, strict=True):
        out = model(s[None].to(device))[0].cpu()
        mses.append(float(F.mse_loss(out, s)))
        rec = unscale(out, factor)
        coss.append(cosine(rec, x))
        rels.append(relative_error(rec, x))
    n = len(originals)
    return sum(mses) / n, sum(coss) / n, sum(rels) / n


def train_autoencoder(images: Sequence[Tensor], ratio: int, *, variant: str, steps: int, lr: float = 2e-4,
                      batch_size: int = 8, seed: int = 0, holdout: float = 0.2, log_every: int = 0,
                      device: str | torch.device = "cpu") -> tuple[GradientAutoencoder, TrainReport]:
    """Pre-train an autoencoder (the paper's TGAP) on recorded updates, each already an image [1, H, W]
    (`to_image`; sizes may differ), each scaled by itself with `variant`.

    MSE reconstruction loss, Adam(lr), `steps` batches of up to `batch_size` images of one shape.
    Everything random (initial weights, holdout split, batch order) comes from `seed`; the global RNG
    is left as it was. A seeded shuffle holds out round(holdout * n) images, at least one when there
    are two or more (none when holdout is 0), and the report is measured on them. Logs the loss every
    `log_every` steps (0: never). Returns the model in eval mode, on `device`.
    """
    start = time.perf_counter()
    _check_variant(variant)
    if steps < 0 or batch_size < 1 or not 0 <= holdout < 1:
        raise ValueError(f"need steps >= 0, batch_size >= 1, 0 <= holdout < 1; got {steps}, {batch_size}, {holdout}")
    if not images:
        raise ValueError("no images to train on")
    with BUILD_LOCK, seeded_rng(seed, torch.device("cpu")):  # other threads' builds and seeded draws wait
        model = GradientAutoencoder(ratio)
    model.to(device)
    originals = [_as_image(im, model) for im in images]
    scaled = [scale(x, variant) for x in originals]

    gen = torch.Generator().manual_seed(seed)
    n = len(originals)
    n_hold = 0 if n < 2 or holdout == 0 else min(n - 1, max(1, round(holdout * n)))
    order = torch.randperm(n, generator=gen).tolist()
    held, train = sorted(order[:n_hold]), sorted(order[n_hold:])
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i in train:
        by_shape.setdefault(tuple(originals[i].shape), []).append(i)

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    batches = _batches(list(by_shape.values()), batch_size, gen)
    with torch.enable_grad():
        for step in range(1, steps + 1):
            x = torch.stack([scaled[i][0] for i in next(batches)]).to(device)
            loss = F.mse_loss(model(x), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if log_every and step % log_every == 0:
                log.info("autoencoder 1/%d %s: step %d/%d, loss %.3e", ratio, variant, step, steps, loss.item())
    model.eval()
    train_mse, _, _ = _evaluate(model, [originals[i] for i in train], [scaled[i] for i in train])
    h_mse, h_cos, h_rel = _evaluate(model, [originals[i] for i in held], [scaled[i] for i in held])
    return model, TrainReport(steps, train_mse, h_mse, h_cos, h_rel, time.perf_counter() - start,
                              len(train), len(held))


# ----------------------------------------------------------------------------------------------- FAF


def encoder_state(model: GradientAutoencoder) -> dict[str, Tensor]:
    """A copy of the encoder's state dict (parameters and BatchNorm buffers)."""
    return {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}


def load_encoder_state(model: GradientAutoencoder, state: Mapping[str, Tensor]) -> None:
    """Commit encoder values (from `tune_encoder` or `encoder_state`) to `model`; exact names only."""
    model.encoder.load_state_dict(dict(state), strict=True)


def tune_encoder(model: GradientAutoencoder, image: Tensor, steps: int, lr: float = 1e-3) -> dict[str, Tensor]:
    """Our FAF: new encoder values after `steps` Adam steps minimising MSE(decode(encode(image)), image),
    with the decoder frozen and BatchNorm in eval mode (its running statistics unchanged, and they are
    what the coordinator's decoder was trained with). `image` [N, 1, H, W] is in the model's scaled
    space (`scale` first). `model` is not changed; commit the result with `load_encoder_state`.
    steps=0 returns the current encoder state."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if steps == 0:
        return encoder_state(model)
    work = copy.deepcopy(model).eval()
    for p in work.decoder.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(work.encoder.parameters(), lr=lr)
    x = image.detach().to(next(work.parameters()).device, torch.float32)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.mse_loss(work(x), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return encoder_state(work)


# ------------------------------------------------------------------------------------------- weights


_RESERVED = ("format", "ratio", "variant")


def save_weights(model: GradientAutoencoder, path: str | Path, *, variant: str,
                 extra: dict[str, str] | None = None) -> None:
    """Write the whole state dict (BatchNorm running statistics included) as safetensors, with metadata
    format, ratio, variant and the `extra` strings (which may not use those three keys)."""
    _check_variant(variant)
    extra = dict(extra or {})
    if clash := [k for k in extra if k in _RESERVED]:
        raise ValueError(f"extra metadata may not set {clash}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise ValueError("extra metadata must map strings to strings")
    metadata = {**extra, "format": FORMAT, "ratio": str(model.ratio), "variant": variant}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a weights file (ValueError when it is not a safetensors file)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from None


def load_weights(path: str | Path) -> tuple[GradientAutoencoder, str]:
    """(model in eval mode, variant) from a `save_weights` file. ValueError unless the metadata says
    fedblock-ae/1 with a valid ratio and variant and the tensors are exactly the names, shapes and
    dtypes of a fresh GradientAutoencoder(ratio). Reads safetensors only (no pickle)."""
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        ratio = int(meta.get("ratio", ""))
    except ValueError:
        raise ValueError(f"{path}: bad ratio {meta.get('ratio')!r}") from None
    variant = meta.get("variant", "")
    try:
        _check_ratio(ratio)
        _check_variant(variant)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    try:
        tensors = safetensors.torch.load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path}: unreadable tensors ({e})") from None
    with BUILD_LOCK, seeded_rng(0, torch.device("cpu")):  # the initial values are overwritten; keep the RNG
        model = GradientAutoencoder(ratio)
    expected = model.state_dict()
    if set(tensors) != set(expected):
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"{path}: not a ratio-{ratio} autoencoder: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for k, v in expected.items():
        t = tensors[k]
        if t.shape != v.shape or t.dtype != v.dtype:
            raise ValueError(f"{path}: {k} is {t.dtype} {tuple(t.shape)}, expected {v.dtype} {tuple(v.shape)}")
    model.load_state_dict(tensors, strict=True)
    return model.eval(), variant


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
