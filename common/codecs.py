"""Codec pipelines for block deltas: tensors -> wire bytes -> tensors.

A pipeline is a comma-separated list of stages applied left to right, e.g. `none`, `bf16`,
`topk:0.01,bf16,zstd`, `int8,shuffle,zstd:3`:

    tensor stages   bf16 | fp16        cast floating tensors (lossy)
                    int8               symmetric per-row quantisation, fp32 scale per row (lossy)
                    topk:F             keep the fraction F of entries with the largest magnitude, with
                                       error feedback: what was not sent is added to the next delta
                                       of the same block (the residual lives in the encoder, on the worker)
                    shuffle            byte planes of each tensor (helps zstd on floats; lossless)
    serialisation   safetensors, always (self-describing, never pickle)
    byte stage      zstd[:LEVEL]       must be last (lossless)

The wire size is exactly `len(blob)`. `decode` checks that the result has exactly the expected tensor
names and shapes, and raises `CodecError` for anything malformed; it returns float32 tensors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import safetensors.torch
import torch
import zstandard
from torch import Tensor

from .messages import TensorSpec

Tensors = dict[str, Tensor]

_CAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_MAX_ZSTD_OUTPUT = 1 << 36  # decompression bound; the real bound is the expected raw size


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


@dataclass
class _Stage:
    name: str
    arg: float | int | None = None
    # topk error feedback: (block, tensor) -> residual not yet sent
    residual: dict[tuple[str, str], Tensor] = field(default_factory=dict)

    @property
    def lossy(self) -> bool:
        return self.name in ("bf16", "fp16", "int8", "topk")


def _parse_stage(text: str) -> _Stage:
    name, _, arg = text.strip().partition(":")
    if name in _CAST or name in ("int8", "shuffle"):
        if arg:
            raise CodecError(f"codec stage {name!r} takes no argument")
        return _Stage(name)
    if name == "topk":
        try:
            fraction = float(arg)
        except ValueError:
            raise CodecError(f"topk needs a fraction, e.g. topk:0.01 (got {text!r})") from None
        if not 0.0 < fraction <= 1.0:
            raise CodecError(f"topk fraction must be in (0, 1], got {fraction}")
        return _Stage(name, fraction)
    if name == "zstd":
        level = 3
        if arg:
            try:
                level = int(arg)
            except ValueError:
                raise CodecError(f"zstd level must be an integer (got {text!r})") from None
        if not 1 <= level <= 22:
            raise CodecError(f"zstd level must be 1..22, got {level}")
        return _Stage(name, level)
    raise CodecError(f"unknown codec stage {name!r} (known: none, bf16, fp16, int8, topk:F, shuffle, zstd[:L])")


# What one encode changes in a pipeline's state, not yet applied: (stage index, (block, tensor)) -> residual.
CodecState = dict


class CodecPipeline:
    """A parsed codec pipeline. Encoders keep per-block state (top-k residuals); use one per worker."""

    def __init__(self, spec: str):
        stages = [] if spec.strip() in ("", "none") else [_parse_stage(s) for s in spec.split(",")]
        for i, stage in enumerate(stages):
            if stage.name == "zstd" and i != len(stages) - 1:
                raise CodecError("zstd must be the last codec stage")
        self.stages = stages
        self.spec = ",".join(s.name if s.arg is None else f"{s.name}:{s.arg}" for s in stages) or "none"

    @property
    def lossless(self) -> bool:
        return not any(s.lossy for s in self.stages)

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
        compress: _Stage | None = None
        for i, stage in enumerate(self.stages):
            if stage.name in _CAST:
                out = {n: t.to(_CAST[stage.name]) if t.is_floating_point() else t for n, t in out.items()}
            elif stage.name == "int8":
                out = _int8_encode(out)
            elif stage.name == "topk":
                residual: dict = {}
                out = _topk_encode(out, block, float(stage.arg), stage.residual, residual)
                state.update({(i, key): r for key, r in residual.items()})
            elif stage.name == "shuffle":
                out = _shuffle_encode(out, meta)
            elif stage.name == "zstd":
                compress = stage
        blob = safetensors.torch.save({n: t.contiguous() for n, t in out.items()}, metadata=meta or None)
        if compress is not None:
            blob = zstandard.ZstdCompressor(level=int(compress.arg)).compress(blob)
        return blob, state

    def commit(self, state: CodecState) -> None:
        """Advance the state as `encode_pending` computed it (the receiver has that blob)."""
        for (i, key), residual in state.items():
            self.stages[i].residual[key] = residual

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
        if self.stages and self.stages[-1].name == "zstd":
            data = _unzstd(data, limit=min(raw_bound * 2, _MAX_ZSTD_OUTPUT))
        tensors, meta = load_safetensors(data)
        for stage in reversed(self.stages):
            if stage.name == "shuffle":
                tensors = _shuffle_decode(tensors, meta)
            elif stage.name == "topk":
                tensors = _topk_decode(tensors, expected_by_name)
            elif stage.name == "int8":
                tensors = _int8_decode(tensors)
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


def _unzstd(data, limit: int) -> bytes:
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


# ---- stages --------------------------------------------------------------------------------------


def _rows(t: Tensor) -> Tensor:
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)


def _int8_encode(tensors: Tensors) -> Tensors:
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


def _int8_decode(tensors: Tensors) -> Tensors:
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


def _topk_encode(tensors: Tensors, block: str, fraction: float, residual: Mapping, new_residual: dict) -> Tensors:
    """Top-k of delta + `residual`; what is not sent goes into `new_residual` (applied on commit)."""
    out: Tensors = {}
    for name, t in tensors.items():
        if not t.is_floating_point():
            out[name] = t
            continue
        flat = t.reshape(-1).float()
        key = (block, name)
        if key in residual:
            flat = flat + residual[key]
        k = max(1, math.ceil(fraction * flat.numel()))
        idx = torch.topk(flat.abs(), k, sorted=False).indices
        values = flat[idx]
        rest = flat.clone()
        rest[idx] = 0.0
        new_residual[key] = rest
        out[name + "::idx"] = idx.to(torch.int32 if flat.numel() < 2**31 else torch.int64)
        out[name + "::val"] = values
    return out


def _topk_decode(tensors: Tensors, expected: Mapping[str, TensorSpec]) -> Tensors:
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


def _shuffle_encode(tensors: Tensors, meta: dict[str, str]) -> Tensors:
    out: Tensors = {}
    for name, t in tensors.items():
        size = t.element_size()
        planes = t.contiguous().reshape(-1).view(torch.uint8).reshape(-1, size).t().contiguous()
        out[name + "::shuf"] = planes
        meta[name] = json.dumps({"dtype": _dtype_name(t.dtype), "shape": list(t.shape)})
    return out


def _shuffle_decode(tensors: Tensors, meta: Mapping[str, str]) -> Tensors:
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
        size = torch.empty((), dtype=dtype).element_size()
        if planes.dtype != torch.uint8 or planes.dim() != 2 or planes.shape[0] != size or planes.shape[1] != math.prod(shape):
            raise CodecError(f"shuffle: {base} byte planes do not match {info}")
        out[base] = planes.t().contiguous().reshape(-1).view(dtype).reshape(shape)
    return out


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
