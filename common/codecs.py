"""Codec pipelines for block tensors: tensors -> wire bytes -> tensors.

A pipeline is a comma-separated list of stages applied left to right, e.g. `none`, `bf16`,
`topk:0.01,bf16,zstd`, `int8,shuffle,zstd:3`:

    tensor stages   bf16 | fp16        cast floating tensors (lossy)
                    int8               symmetric per-row quantisation, fp32 scale per row (lossy)
                    topk:F             keep the fraction F of entries with the largest magnitude, with
                                       error feedback: what was not sent is added to the next delta
                                       of the same block (the residual lives in the encoder, on the
                                       worker; so uploads only)
                    ae:R[:S]           CG-FedLLM's autoencoder: the block as one image, sent as a latent of
                                       1/R of its elements (the first stage; uploads only; the weights
                                       file from `fedblock codec train`; S: encoder tuning steps)
                    shuffle            byte planes of each tensor (helps zstd on floats; lossless)
    serialisation   safetensors, always (self-describing, never pickle)
    byte stage      zstd[:LEVEL]       must be last (lossless; its output size depends on the data)

Each stage is a `Stage` class in `STAGES`, which parses its own argument. A pipeline encodes uploads
(block deltas, the default) or downloads (block values, `direction="download"`), which refuse stateful
stages. The wire size is exactly `len(blob)`; without zstd, `payload_nbytes` says in advance how many
of those bytes are tensor data. `decode` checks that the result has exactly the expected tensor names
and shapes, and raises `CodecError` for anything malformed; it returns float32 tensors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import safetensors.torch
import torch
import zstandard
from torch import Tensor

from .messages import TensorSpec

Tensors = dict[str, Tensor]
WireSpec = tuple[tuple[int, ...], torch.dtype]  # (shape, dtype) of one tensor on the wire

_MAX_ZSTD_OUTPUT = 1 << 36  # decompression bound; the real bound is the expected raw size
DIRECTIONS = ("upload", "download")


class CodecError(ValueError):
    """A codec spec or an encoded blob is invalid."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    """Only the plain numeric dtypes a codec stage produces; a name from the wire picks nothing else."""
    dtype = getattr(torch, name, None) if name in _PLAIN_DTYPES else None
    if dtype is None:
        raise CodecError(f"unknown dtype {name!r}")
    return dtype


_PLAIN_DTYPES = {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"}


# ---- stages --------------------------------------------------------------------------------------


class Stage:
    """One stage of a pipeline, parsed from `name[:arg]`. A tensor stage maps a block's tensors to the
    tensors that go on the wire (`encode`) and back (`decode`), and says what it makes of one tensor
    (`wire_specs`). A data-dependent stage instead maps the serialised blob (`compress`, `decompress`):
    its output size depends on the values, so it must be last."""

    name: ClassVar[str]
    arg_usage: ClassVar[str] = ""  # how the argument is written, for error messages
    lossy: ClassVar[bool] = False
    stateful: ClassVar[bool] = False  # keeps state from one encode to the next (per worker)
    data_dependent: ClassVar[bool] = False
    needs_weights: ClassVar[bool] = False  # encodes and decodes with a model file (`bind`)

    @classmethod
    def parse(cls, arg: str) -> Stage:
        if arg:
            raise CodecError(f"codec stage {cls.name!r} takes no argument")
        return cls()

    @property
    def spec(self) -> str:
        return self.name

    def encode(self, tensors: Tensors, block: str, meta: dict[str, str], state_out: dict) -> Tensors:
        """The tensors to send for `tensors` of `block`. A stage may add string metadata to `meta`; a
        stateful one puts its next state in `state_out` (key -> value) instead of applying it."""
        raise NotImplementedError

    def decode(self, tensors: Tensors, meta: Mapping[str, str], expected: Mapping[str, TensorSpec]) -> Tensors:
        """Undo `encode`; the tensors come from the network, so anything malformed is a CodecError."""
        raise NotImplementedError

    def wire_specs(self, shape: tuple[int, ...], dtype: torch.dtype) -> list[WireSpec]:
        """What `encode` makes of one tensor of this shape and dtype, exactly. A list, not a byte count,
        so that stages compose: after top-k, a cast changes the values but not the indices."""
        raise NotImplementedError

    def block_wire_specs(self, wire: list[WireSpec]) -> list[WireSpec]:
        """What `encode` makes of a whole block's tensors; tensor by tensor unless a stage maps a block
        as one (the autoencoder)."""
        return [out for shape, dtype in wire for out in self.wire_specs(shape, dtype)]

    def bind(self, weights: Path) -> None:
        """Load the model file a `needs_weights` stage encodes and decodes with."""
        raise NotImplementedError

    def commit(self, key, value) -> None:
        """Apply one entry that `encode` put in `state_out` (stateful stages)."""
        raise NotImplementedError


def _rows(t: Tensor) -> Tensor:
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)


class Cast(Stage):
    lossy = True
    dtype: ClassVar[torch.dtype]

    def encode(self, tensors, block, meta, state_out):
        return {n: t.to(self.dtype) if t.is_floating_point() else t for n, t in tensors.items()}

    def decode(self, tensors, meta, expected):
        return tensors  # the pipeline returns float32

    def wire_specs(self, shape, dtype):
        return [(shape, self.dtype if dtype.is_floating_point else dtype)]


class Bf16(Cast):
    name = "bf16"
    dtype = torch.bfloat16


class Fp16(Cast):
    name = "fp16"
    dtype = torch.float16


class Int8(Stage):
    name = "int8"
    lossy = True

    def encode(self, tensors, block, meta, state_out):
        out: Tensors = {}
        for name, t in tensors.items():
            if not t.is_floating_point():
                out[name] = t
                continue
            rows = _rows(t.float())
            scale = rows.abs().amax(dim=1).clamp_min(1e-30) / 127.0
            q = torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            out[name + "::q"] = q.reshape(t.shape)
            out[name + "::scale"] = scale
        return out

    def decode(self, tensors, meta, expected):
        out: Tensors = {}
        for name, t in tensors.items():
            if name.endswith("::scale"):
                continue
            if not name.endswith("::q"):
                out[name] = t
                continue
            base = name[: -len("::q")]
            scale = tensors.get(base + "::scale")
            if scale is None or t.dtype != torch.int8:
                raise CodecError(f"int8: {base} lacks its scale or is not int8")
            rows = _rows(t)
            if scale.shape != (rows.shape[0],):
                raise CodecError(f"int8: {base} scale shape {tuple(scale.shape)} does not match {rows.shape[0]} rows")
            out[base] = (rows.float() * scale.float()[:, None]).reshape(t.shape)
        return out

    def wire_specs(self, shape, dtype):
        if not dtype.is_floating_point:
            return [(shape, dtype)]
        rows = 1 if len(shape) < 2 else shape[0]
        return [(shape, torch.int8), ((rows,), torch.float32)]


class TopK(Stage):
    """Top-k of delta + residual; the residual, what was not sent, is per (block, tensor)."""

    name = "topk"
    arg_usage = ":F"
    lossy = True
    stateful = True

    def __init__(self, fraction: float):
        self.fraction = fraction
        self.residual: dict[tuple[str, str], Tensor] = {}

    @classmethod
    def parse(cls, arg):
        try:
            fraction = float(arg)
        except ValueError:
            raise CodecError(f"topk needs a fraction, e.g. topk:0.01 (got {'topk:' + arg!r})") from None
        if not 0.0 < fraction <= 1.0:
            raise CodecError(f"topk fraction must be in (0, 1], got {fraction}")
        return cls(fraction)

    @property
    def spec(self):
        return f"topk:{self.fraction}"

    def _k(self, numel: int) -> int:
        return max(1, math.ceil(self.fraction * numel))

    @staticmethod
    def _index_dtype(numel: int) -> torch.dtype:
        return torch.int32 if numel < 2**31 else torch.int64

    def encode(self, tensors, block, meta, state_out):
        out: Tensors = {}
        for name, t in tensors.items():
            if not t.is_floating_point():
                out[name] = t
                continue
            flat = t.reshape(-1).float()
            key = (block, name)
            if key in self.residual:
                flat = flat + self.residual[key]
            idx = torch.topk(flat.abs(), self._k(flat.numel()), sorted=False).indices
            values = flat[idx]
            rest = flat.clone()
            rest[idx] = 0.0
            state_out[key] = rest
            out[name + "::idx"] = idx.to(self._index_dtype(flat.numel()))
            out[name + "::val"] = values
        return out

    def decode(self, tensors, meta, expected):
        out: Tensors = {}
        for name, t in tensors.items():
            if name.endswith("::val"):
                continue
            if not name.endswith("::idx"):
                out[name] = t
                continue
            base = name[: -len("::idx")]
            values = tensors.get(base + "::val")
            spec = expected.get(base)
            if values is None or spec is None:
                raise CodecError(f"topk: unexpected or incomplete tensor {base!r}")
            numel = math.prod(spec.shape)
            if t.dim() != 1 or values.shape != t.shape or t.is_floating_point():
                raise CodecError(f"topk: {base} index/value tensors are malformed")
            idx = t.long()
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise CodecError(f"topk: {base} index out of range")
            dense = torch.zeros(numel, dtype=torch.float32)
            dense[idx] = values.float()
            out[base] = dense.reshape(spec.shape)
        return out

    def wire_specs(self, shape, dtype):
        if not dtype.is_floating_point:
            return [(shape, dtype)]
        numel = math.prod(shape)
        k = self._k(numel)
        return [((k,), self._index_dtype(numel)), ((k,), torch.float32)]

    def commit(self, key, value):
        self.residual[key] = value


class Autoencoder(Stage):
    """CG-FedLLM's codec: a block's delta laid out as one image (`autoencoder.layout`), scaled as its
    weights file says, and sent as the encoder's latent (ratio× fewer elements) with the scale; the
    coordinator decodes it with the decoder. Both halves come from one weights file (`bind`), which
    `fedblock codec train` writes and the coordinator serves. Uploads only: the decoder is the
    coordinator's.

    `ae:RATIO:STEPS` also tunes the worker's own encoder on each update before encoding it (STEPS Adam
    steps on the reconstruction error, decoder fixed): the state this stage keeps, committed only when
    the update was accepted. The decoder never changes during a run, so no weights travel mid-run."""

    name = "ae"
    arg_usage = ":RATIO[:TUNE_STEPS]"
    lossy = True
    stateful = True
    needs_weights = True
    LATENT, SCALE = "ae::latent", "ae::scale"

    def __init__(self, ratio: int, tune_steps: int = 0):
        self.ratio = ratio
        self.tune_steps = tune_steps
        self.model = None  # GradientAutoencoder, once bound
        self.variant = "none"

    @classmethod
    def parse(cls, arg):
        ratio, _, steps = arg.partition(":")
        try:
            r, k = int(ratio), int(steps or 0)
        except ValueError:
            raise CodecError(f"ae needs a ratio and optional tuning steps, e.g. ae:64 or ae:64:20 (got {'ae:' + arg!r})") from None
        if r < 2 or r > 1024 or r & (r - 1):
            raise CodecError(f"ae ratio must be a power of two from 2 to 1024, got {r}")
        if not 0 <= k <= 1000:
            raise CodecError(f"ae tuning steps must be 0..1000, got {k}")
        return cls(r, k)

    @property
    def spec(self):
        return f"ae:{self.ratio}" + (f":{self.tune_steps}" if self.tune_steps else "")

    def bind(self, weights: Path) -> None:
        from .autoencoder import load_weights

        try:
            model, variant = load_weights(weights)
        except (OSError, ValueError) as e:
            raise CodecError(f"{self.spec}: cannot load the autoencoder's weights {weights}: {e}") from None
        if model.ratio != self.ratio:
            raise CodecError(f"{self.spec}: the weights in {weights} are for ratio {model.ratio}, not {self.ratio}")
        self.model, self.variant = model, variant

    @staticmethod
    def block_layout(shapes: Mapping[str, tuple[int, ...]], ratio: int):
        """The image layout of a block (name -> shape): its tensors in name order, as both sides lay it out."""
        from .autoencoder import layout

        return layout([(n, tuple(shapes[n])) for n in sorted(shapes)], ratio)

    @staticmethod
    def block_image(tensors: Mapping[str, Tensor], ratio: int):
        """(image [1, 1, H, W], layout) of a block's tensors (also what `fedblock codec train` trains on)."""
        from .autoencoder import to_image

        lay = Autoencoder.block_layout({n: t.shape for n, t in tensors.items()}, ratio)
        return to_image(tensors, lay), lay

    def _bound(self):
        if self.model is None:
            raise CodecError(f"{self.spec} has no autoencoder weights (the coordinator's --codec-weights)")
        return self.model

    def encode(self, tensors, block, meta, state_out):
        from .autoencoder import scale, tune_encoder

        model = self._bound()
        # The delta may live on the training device; the autoencoder runs where its weights were loaded.
        device = next(model.parameters()).device
        image, factor = scale(self.block_image({n: t.to(device) for n, t in tensors.items()}, self.ratio)[0],
                              self.variant)
        with torch.no_grad():
            if self.tune_steps:
                state = tune_encoder(model, image, self.tune_steps)
                state_out["encoder"] = state
                latent = torch.func.functional_call(model.encoder, state, (image,))
            else:
                latent = model.encode(image)
        return {self.LATENT: latent[0].cpu().contiguous(), self.SCALE: torch.tensor([factor], dtype=torch.float32)}

    def decode(self, tensors, meta, expected):
        from .autoencoder import from_image, unscale

        model = self._bound()
        latent, factor = tensors.get(self.LATENT), tensors.get(self.SCALE)
        if set(tensors) != {self.LATENT, self.SCALE} or latent is None or factor is None:
            raise CodecError(f"ae: expected the tensors {self.LATENT} and {self.SCALE}, got {sorted(tensors)[:4]}")
        lay = self.block_layout({n: spec.shape for n, spec in expected.items()}, self.ratio)
        if tuple(latent.shape) != lay.latent_shape or not latent.is_floating_point():
            raise CodecError(f"ae: latent {tuple(latent.shape)} is not the block's {lay.latent_shape}")
        if factor.numel() != 1 or not math.isfinite(f := float(factor.reshape(()))) or f <= 0:
            raise CodecError("ae: the scale must be one finite number > 0")
        with torch.no_grad():
            image = unscale(model.decode(latent.float()[None]), f)
        return from_image(image, lay)

    def block_wire_specs(self, wire):
        from .autoencoder import layout

        lay = layout([(str(i), shape) for i, (shape, _) in enumerate(wire)], self.ratio)  # its size: shapes only
        return [(lay.latent_shape, torch.float32), ((1,), torch.float32)]

    def commit(self, key, value):
        from .autoencoder import load_encoder_state

        load_encoder_state(self._bound(), value)


class Shuffle(Stage):
    name = "shuffle"

    def encode(self, tensors, block, meta, state_out):
        out: Tensors = {}
        for name, t in tensors.items():
            planes = t.contiguous().reshape(-1).view(torch.uint8).reshape(-1, t.element_size()).t().contiguous()
            out[name + "::shuf"] = planes
            meta[name] = json.dumps({"dtype": _dtype_name(t.dtype), "shape": list(t.shape)})
        return out

    def decode(self, tensors, meta, expected):
        out: Tensors = {}
        for name, planes in tensors.items():
            if not name.endswith("::shuf"):
                raise CodecError(f"shuffle: unexpected tensor {name!r}")
            base = name[: -len("::shuf")]
            try:
                info = json.loads(meta[base])
                dtype = _dtype_from_name(info["dtype"])
                shape = tuple(int(d) for d in info["shape"])
            except (KeyError, ValueError, TypeError) as e:
                raise CodecError(f"shuffle: missing or bad metadata for {base!r}: {e}") from None
            size = dtype.itemsize
            if planes.dtype != torch.uint8 or planes.dim() != 2 or planes.shape[0] != size or planes.shape[1] != math.prod(shape):
                raise CodecError(f"shuffle: {base} byte planes do not match {info}")
            out[base] = planes.t().contiguous().reshape(-1).view(dtype).reshape(shape)
        return out

    def wire_specs(self, shape, dtype):
        return [((dtype.itemsize, math.prod(shape)), torch.uint8)]


class Zstd(Stage):
    name = "zstd"
    arg_usage = "[:L]"
    data_dependent = True

    def __init__(self, level: int = 3):
        self.level = level

    @classmethod
    def parse(cls, arg):
        level = 3
        if arg:
            try:
                level = int(arg)
            except ValueError:
                raise CodecError(f"zstd level must be an integer (got {'zstd:' + arg!r})") from None
        if not 1 <= level <= 22:
            raise CodecError(f"zstd level must be 1..22, got {level}")
        return cls(level)

    @property
    def spec(self):
        return f"zstd:{self.level}"

    def compress(self, blob: bytes) -> bytes:
        return zstandard.ZstdCompressor(level=self.level).compress(blob)

    @staticmethod
    def decompress(data, limit: int) -> bytes:
        """Decompress at most `limit` bytes: a frame may declare (or, streamed, hide) any size."""
        try:
            declared = zstandard.frame_content_size(data)
            if declared > limit:
                raise CodecError(f"zstd frame declares {declared} bytes, more than the {limit} this block can need")
            with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True) as reader:
                out = reader.read(limit + 1)
        except zstandard.ZstdError as e:
            raise CodecError(f"zstd: {e}") from None
        if len(out) > limit:
            raise CodecError(f"zstd output exceeds the {limit} bytes this block can need")
        return out


STAGES: dict[str, type[Stage]] = {cls.name: cls for cls in (Bf16, Fp16, Int8, TopK, Autoencoder, Shuffle, Zstd)}


def _parse_stage(text: str) -> Stage:
    name, _, arg = text.strip().partition(":")
    cls = STAGES.get(name)
    if cls is None:
        known = ", ".join(["none"] + [n + c.arg_usage for n, c in STAGES.items()])
        raise CodecError(f"unknown codec stage {name!r} (known: {known})")
    return cls.parse(arg)


# ---- pipelines -----------------------------------------------------------------------------------

# What one encode changes in a pipeline's state, not yet applied: (stage index, key) -> value.
CodecState = dict


class CodecPipeline:
    """A parsed codec pipeline. Encoders keep per-block state (top-k residuals); use one per worker.

    `direction="download"` refuses stateful stages: a download is a block's values, encoded once per
    block version and served to every worker."""

    def __init__(self, spec: str, direction: str = "upload", weights: Path | None = None):
        """`weights`: the model file of a stage that needs one (the autoencoder); without it such a
        pipeline still parses and sizes, but encoding or decoding raises CodecError."""
        if direction not in DIRECTIONS:
            raise CodecError(f"codec direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
        stages = [] if spec.strip() in ("", "none") else [_parse_stage(s) for s in spec.split(",")]
        for i, stage in enumerate(stages):
            if stage.data_dependent and i != len(stages) - 1:
                raise CodecError(f"{stage.name} must be the last codec stage")
            if stage.needs_weights and i != 0:
                raise CodecError(f"{stage.name} must be the first codec stage (it encodes the block's own tensors)")
            if stage.stateful and any(s.needs_weights for s in stages[:i]):
                raise CodecError(f"{stage.spec} cannot follow {stages[0].spec}: it needs the block's own tensors "
                                 "(bf16, fp16, int8, shuffle and zstd may follow)")
            if stage.stateful and direction == "download":
                why = ("its decoder is the coordinator's, so it encodes uploads only" if stage.needs_weights else
                       "a download carries a block's values, not a delta, so keeping only the top fraction of "
                       "entries would zero the rest of the weights")
                raise CodecError(
                    f"codec stage {stage.spec!r} cannot encode downloads: {why}; and downloads are encoded once "
                    "per block version and served to every worker, so no stage may keep per-receiver state")
            if stage.needs_weights and weights is not None:
                stage.bind(Path(weights))
        self.stages = stages
        self.direction = direction
        self.spec = ",".join(s.spec for s in stages) or "none"
        # A prefix of `stages`, so an index into it is an index into `stages` (see `commit`).
        self._tensor_stages = stages[:-1] if stages and stages[-1].data_dependent else stages
        self._byte_stage = stages[-1] if len(self._tensor_stages) < len(stages) else None

    @property
    def lossless(self) -> bool:
        return not any(s.lossy for s in self.stages)

    def payload_nbytes(self, specs: Sequence[TensorSpec]) -> int | None:
        """The tensor data bytes of an encoded block with these tensors (the blob less its 8-byte
        length and safetensors header), exactly; None when a stage's output depends on the values."""
        if self._byte_stage is not None:
            return None
        wire: list[WireSpec] = [(tuple(spec.shape), torch.float32) for spec in specs]  # encode starts from float32
        for stage in self.stages:
            wire = stage.block_wire_specs(wire)
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in wire)

    # ---- encode ------------------------------------------------------------------------------

    def encode(self, block: str, tensors: Mapping[str, Tensor]) -> bytes:
        """Encode one block's tensors (any float dtype) to wire bytes and advance the codec's state."""
        blob, state = self.encode_pending(block, tensors)
        self.commit(state)
        return blob

    def encode_pending(self, block: str, tensors: Mapping[str, Tensor]) -> tuple[bytes, CodecState]:
        """Encode without advancing the codec's state: the caller passes `state` to `commit` once the
        receiver has the blob. So an update is encoded once, and a resent or refused one does not count
        the unsent rest (top-k's residual) twice."""
        state: CodecState = {}
        out: Tensors = {n: t.detach().float().contiguous() for n, t in tensors.items()}
        meta: dict[str, str] = {}
        for i, stage in enumerate(self._tensor_stages):
            pending: dict = {}
            out = stage.encode(out, block, meta, pending)
            state.update({(i, key): value for key, value in pending.items()})
        blob = safetensors.torch.save({n: t.contiguous() for n, t in out.items()}, metadata=meta or None)
        if self._byte_stage is not None:
            blob = self._byte_stage.compress(blob)
        return blob, state

    def commit(self, state: CodecState) -> None:
        """Advance the state as `encode_pending` computed it (the receiver has that blob)."""
        for (i, key), value in state.items():
            self.stages[i].commit(key, value)

    # ---- decode ------------------------------------------------------------------------------

    def decode(self, blob: bytes | bytearray | memoryview, expected: Sequence[TensorSpec]) -> Tensors:
        """Decode wire bytes into float32 tensors with exactly the `expected` names and shapes. Anything
        wrong with the blob, however it shows, is a CodecError (the bytes come from the network)."""
        try:
            return self._decode(blob, expected)
        except CodecError:
            raise
        except Exception as e:  # overflowing shapes, hostile nesting, failed allocations...
            raise CodecError(f"malformed blob: {type(e).__name__}: {str(e)[:200]}") from None

    def _decode(self, blob, expected: Sequence[TensorSpec]) -> Tensors:
        expected_by_name = {s.name: s for s in expected}
        raw_bound = sum(4 * math.prod(s.shape) for s in expected) + (1 << 20) * max(1, len(expected))
        data = blob
        if self._byte_stage is not None:
            data = self._byte_stage.decompress(data, limit=min(raw_bound * 2, _MAX_ZSTD_OUTPUT))
        tensors, meta = load_safetensors(data)
        for stage in reversed(self._tensor_stages):
            tensors = stage.decode(tensors, meta, expected_by_name)
        if set(tensors) != set(expected_by_name):
            missing = sorted(set(expected_by_name) - set(tensors))
            extra = sorted(set(tensors) - set(expected_by_name))
            raise CodecError(f"tensor set mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
        result = {}
        for name, t in tensors.items():
            spec = expected_by_name[name]
            if tuple(t.shape) != tuple(spec.shape):
                raise CodecError(f"{name}: shape {tuple(t.shape)} != expected {tuple(spec.shape)}")
            if not t.is_floating_point():
                raise CodecError(f"{name}: dtype {_dtype_name(t.dtype)} is not floating point")
            result[name] = t.float()
        return result


# ---- safetensors ---------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 << 20


def load_safetensors(blob) -> tuple[Tensors, dict[str, str]]:
    """(tensors, metadata) of a safetensors blob. A writable buffer (bytearray, a copy-on-write map)
    is read without a copy: the tensors are views of it (a read-only one is copied once). Raises
    CodecError for anything malformed."""
    view = memoryview(blob)
    if view.readonly:  # e.g. bytes from zstd: tensors need a buffer they may write to
        blob = bytearray(view)
        view = memoryview(blob)
    try:
        if len(view) < 8:
            raise ValueError("shorter than its header length")
        header_len = int.from_bytes(view[:8], "little")
        if not 2 <= header_len <= min(_MAX_HEADER, len(view) - 8):
            raise ValueError(f"header length {header_len} does not fit a {len(view)}-byte blob")
        header = json.loads(bytes(view[8 : 8 + header_len]))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("__metadata__ must map strings to strings")
        base, size = 8 + header_len, len(view) - 8 - header_len
        tensors: Tensors = {}
        for name, info in header.items():
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            start, end = (int(o) for o in info["data_offsets"])
            numel = math.prod(shape)
            itemsize = torch.empty((), dtype=dtype).element_size()
            if any(d < 0 for d in shape) or not 0 <= start <= end <= size or end - start != numel * itemsize:
                raise ValueError(f"tensor {name!r}: shape {shape} and offsets [{start}, {end}) do not fit")
            if numel == 0:
                tensors[name] = torch.empty(shape, dtype=dtype)
            else:
                tensors[name] = torch.frombuffer(blob, dtype=dtype, count=numel, offset=base + start).reshape(shape)
        return tensors, {str(k): v for k, v in meta.items()}
    except Exception as e:  # JSON nesting, overflowing numbers, impossible shapes...
        raise CodecError(f"malformed safetensors blob: {type(e).__name__}: {str(e)[:200]}") from None
