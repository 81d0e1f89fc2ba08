"""Codec stages as classes: the registry, exact payload sizes, upload and download directions."""

import math

import pytest
import torch

from fedblock.common.codecs import STAGES, CodecError, CodecPipeline
from fedblock.common.messages import TensorSpec

GEN = torch.Generator().manual_seed(0)
# Shapes that exercise each stage's arithmetic: 0-d and 1-d tensors are one int8 row, top-k rounds k up.
BLOCK = {
    "w": torch.randn(33, 17, generator=GEN),
    "b": torch.randn(17, generator=GEN),
    "s": torch.randn((), generator=GEN),
    "c": torch.randn(3, 5, 7, generator=GEN).half(),  # encode starts from float32 whatever the dtype
}
SPECS = [TensorSpec.of(n, t) for n, t in BLOCK.items()]


def payload(blob: bytes) -> int:
    return len(blob) - 8 - int.from_bytes(blob[:8], "little")


def test_the_registry_lists_every_stage_and_only_zstd_is_data_dependent():
    assert set(STAGES) == {"bf16", "fp16", "int8", "topk", "ae", "shuffle", "zstd"}
    assert all(cls.name == name for name, cls in STAGES.items())
    assert [n for n, cls in STAGES.items() if cls.data_dependent] == ["zstd"]
    assert [n for n, cls in STAGES.items() if cls.stateful] == ["topk", "ae"]  # ae: the tuned encoder (FAF)
    assert [n for n, cls in STAGES.items() if cls.needs_weights] == ["ae"]
    assert {n for n, cls in STAGES.items() if cls.lossy} == {"bf16", "fp16", "int8", "topk", "ae"}


@pytest.mark.parametrize("spec,per_tensor", [
    ("none", lambda numel, rows: 4 * numel),
    ("bf16", lambda numel, rows: 2 * numel),
    ("fp16", lambda numel, rows: 2 * numel),
    ("int8", lambda numel, rows: numel + 4 * rows),
    ("topk:0.01", lambda numel, rows: math.ceil(0.01 * numel) * (4 + 4)),
    ("topk:0.1,bf16", lambda numel, rows: math.ceil(0.1 * numel) * (4 + 2)),
    ("shuffle", lambda numel, rows: 4 * numel),
    ("bf16,shuffle", lambda numel, rows: 2 * numel),
    ("int8,shuffle", lambda numel, rows: numel + 4 * rows),
])
def test_payload_nbytes_is_exactly_the_tensor_bytes_on_the_wire(spec, per_tensor):
    codec = CodecPipeline(spec)
    expected = sum(per_tensor(math.prod(s.shape), s.shape[0] if len(s.shape) >= 2 else 1) for s in SPECS)
    assert codec.payload_nbytes(SPECS) == expected
    for _ in range(3):  # random values, and top-k's residual from the encodes before
        assert payload(codec.encode("blk", {n: torch.randn(t.shape, generator=GEN) for n, t in BLOCK.items()})) == expected


@pytest.mark.parametrize("spec", ["topk:0.3,int8", "topk:0.5,int8,shuffle", "fp16,int8", "bf16,topk:1,shuffle"])
def test_payload_nbytes_composes_across_stages(spec):
    codec = CodecPipeline(spec)
    assert payload(codec.encode("blk", BLOCK)) == codec.payload_nbytes(SPECS)


def test_payload_nbytes_is_unknown_when_zstd_compresses():
    assert CodecPipeline("bf16,zstd").payload_nbytes(SPECS) is None


@pytest.mark.parametrize("spec", ["topk:0.01", "bf16,topk:0.1", "topk:0.1,bf16,zstd"])
def test_downloads_refuse_stateful_stages_and_say_why(spec):
    CodecPipeline(spec)  # an upload codec
    with pytest.raises(CodecError, match="a download carries a block's values, not a delta") as refused:
        CodecPipeline(spec, direction="download")
    assert "served to every worker" in str(refused.value)


@pytest.mark.parametrize("spec", ["none", "bf16", "fp16", "int8", "shuffle", "zstd", "shuffle,zstd", "bf16,zstd",
                                  "int8,shuffle,zstd"])
def test_downloads_accept_stateless_stages(spec):
    codec = CodecPipeline(spec, direction="download")
    out = codec.decode(codec.encode("blk", BLOCK), SPECS)
    assert {n: t.shape for n, t in out.items()} == {n: t.shape for n, t in BLOCK.items()}


def test_an_unknown_direction_is_refused():
    with pytest.raises(CodecError, match="direction"):
        CodecPipeline("none", direction="sideways")


def test_shuffle_zstd_round_trips_bf16_weights_loaded_in_fp32_bit_exactly_and_small():
    """Weights stored in bf16 and loaded in fp32 have zero low 16 bits: shuffle puts those in planes of
    their own, which zstd all but removes."""
    weights = {n: torch.randn(shape, generator=GEN).to(torch.bfloat16).float() for n, shape in (("w", (256, 128)), ("b", (128,)))}
    specs = [TensorSpec.of(n, t) for n, t in weights.items()]
    codec = CodecPipeline("shuffle,zstd", direction="download")
    blob = codec.encode("blk", weights)
    out = codec.decode(blob, specs)
    for n, t in weights.items():
        assert torch.equal(out[n].view(torch.int32), t.view(torch.int32))
    ratio = len(blob) / len(CodecPipeline("none", direction="download").encode("blk", weights))
    assert ratio < 0.6, ratio
    assert len(blob) < len(CodecPipeline("zstd").encode("blk", weights))  # what shuffle is for


def test_a_stateful_stage_advances_only_on_commit():
    codec = CodecPipeline("bf16,topk:0.25")  # top-k is stage 1: the state names its stage
    delta = {"w": torch.randn(64, generator=GEN)}
    first, state = codec.encode_pending("blk", delta)
    again, _ = codec.encode_pending("blk", delta)
    assert again == first and not codec.stages[1].residual
    codec.commit(state)
    residual = codec.stages[1].residual[("blk", "w")]
    assert torch.count_nonzero(residual) == 64 - 16
    assert codec.encode_pending("blk", delta)[0] != first  # the residual now adds to the delta
